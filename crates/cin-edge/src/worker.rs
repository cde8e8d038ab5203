//! The one contract of every background loop of a POP (replication, webhooks,
//! the expiry sweep, cache eviction, store probes): do some work, wait for more,
//! and stop when asked, within a deadline. [`Workers`] runs them and stops them
//! in the order they were started, each within its own deadline, whatever the
//! remote ends they talk to do.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a worker reports after a round of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerState {
    /// There is more to do at once.
    Busy,
    /// Nothing to do before `wait_for_work` says so, or this long at most.
    Idle(Duration),
}

#[async_trait]
pub trait Worker: Send + 'static {
    fn name(&self) -> &'static str;

    /// One round of work. Dropped (cancelled) when a stop is asked, so every
    /// step it takes must leave durable state consistent, as a crash would.
    async fn work(&mut self) -> WorkerState;

    /// Waits until there may be work, or `idle` has passed. Cancelled on stop.
    async fn wait_for_work(&mut self, idle: Duration) {
        tokio::time::sleep(idle).await;
    }

    /// After a stop: finishes what it started (e.g. deliveries in flight).
    /// Cancelled when the worker's deadline passes.
    async fn drain(&mut self) {}
}

/// Running workers, stopped in order.
pub struct Workers {
    stop: watch::Sender<bool>,
    running: Vec<(&'static str, Duration, JoinHandle<()>)>,
}

impl Default for Workers {
    fn default() -> Self {
        Workers {
            stop: watch::channel(false).0,
            running: Vec::new(),
        }
    }
}

impl Workers {
    /// Starts `worker`; on shutdown it gets `deadline` to stop and drain.
    pub fn spawn(&mut self, mut worker: impl Worker, deadline: Duration) {
        let mut stop = self.stop.subscribe();
        let name = worker.name();
        let task = tokio::spawn(async move {
            loop {
                if *stop.borrow() {
                    break;
                }
                let state = tokio::select! {
                    _ = stopped(&mut stop) => break,
                    state = worker.work() => state,
                };
                if let WorkerState::Idle(idle) = state {
                    tokio::select! {
                        _ = stopped(&mut stop) => break,
                        _ = worker.wait_for_work(idle) => {}
                    }
                }
            }
            worker.drain().await;
        });
        self.running.push((name, deadline, task));
    }

    /// Asks every worker to stop, then waits for each in start order, cancelling
    /// one that overruns its deadline. Returns the names of those cancelled.
    pub async fn stop(self) -> Vec<&'static str> {
        let _ = self.stop.send(true);
        let mut cancelled = Vec::new();
        for (name, deadline, mut task) in self.running {
            match tokio::time::timeout(deadline, &mut task).await {
                Ok(Ok(())) => tracing::debug!(worker = name, "worker stopped"),
                Ok(Err(e)) => tracing::error!(worker = name, error = %e, "worker failed"),
                Err(_) => {
                    tracing::warn!(
                        worker = name,
                        ?deadline,
                        "worker did not stop in time; cancelled"
                    );
                    task.abort();
                    let _ = task.await;
                    cancelled.push(name);
                }
            }
        }
        cancelled
    }
}

/// Resolves once `flag` turns true (or its sender is gone).
pub async fn stopped(flag: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not Send: drop it here, not in a select.
    let _ = flag.wait_for(|set| *set).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Counting(Arc<AtomicUsize>);

    #[async_trait]
    impl Worker for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        async fn work(&mut self) -> WorkerState {
            self.0.fetch_add(1, Ordering::SeqCst);
            WorkerState::Idle(Duration::from_secs(3600))
        }
    }

    /// Works for ever and drains for ever, as a worker stuck on a dead peer would.
    struct Stuck;

    #[async_trait]
    impl Worker for Stuck {
        fn name(&self) -> &'static str {
            "stuck"
        }
        async fn work(&mut self) -> WorkerState {
            std::future::pending().await
        }
        async fn drain(&mut self) {
            std::future::pending::<()>().await
        }
    }

    #[tokio::test]
    async fn idle_and_stuck_workers_stop_within_their_deadlines() {
        let rounds = Arc::new(AtomicUsize::new(0));
        let mut workers = Workers::default();
        workers.spawn(Counting(rounds.clone()), Duration::from_secs(5));
        workers.spawn(Stuck, Duration::from_millis(100));
        // The idle worker ran its first round and now waits for an hour.
        while rounds.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let started = std::time::Instant::now();
        let cancelled = workers.stop().await;
        assert_eq!(cancelled, vec!["stuck"]);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
