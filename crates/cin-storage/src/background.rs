//! Threads for background disk work (delivering files to a local final store)
//! that run at a lower CPU priority than request handling: under a burst of
//! uploads, acknowledging them comes first and delivery uses the CPU left over;
//! on an idle POP it runs at full speed.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::StorageError;

/// The nice value of background threads (request handling runs at the process's own, usually 0).
const BACKGROUND_NICE: libc::c_int = 19;

type Job = Box<dyn FnOnce() + Send>;

pub struct BackgroundPool {
    queue: Option<mpsc::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl BackgroundPool {
    pub fn start(name: &str, threads: usize) -> Result<Self, StorageError> {
        let (queue, jobs) = mpsc::channel::<Job>();
        let jobs = Arc::new(Mutex::new(jobs));
        let threads = (0..threads.max(1))
            .map(|i| {
                let jobs = jobs.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || {
                        lower_priority();
                        loop {
                            let job = {
                                let jobs = jobs.lock().unwrap_or_else(|p| p.into_inner());
                                jobs.recv()
                            };
                            match job {
                                Ok(job) => job(),
                                Err(_) => break,
                            }
                        }
                    })
                    .map_err(|e| StorageError::io(format!("starting {name} threads"), e))
            })
            .collect::<Result<_, _>>()?;
        Ok(BackgroundPool {
            queue: Some(queue),
            threads,
        })
    }

    /// Runs `work` on a background thread and returns its result.
    pub async fn run<T, F>(&self, work: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (done, answer) = oneshot::channel();
        let stopped = || StorageError::Stopped("background");
        self.queue
            .as_ref()
            .ok_or_else(stopped)?
            .send(Box::new(move || {
                let _ = done.send(work());
            }))
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }
}

impl Drop for BackgroundPool {
    fn drop(&mut self) {
        self.queue.take();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Lowers the calling thread's CPU priority (Linux nice values are per thread).
/// Best effort: where it is refused, the work runs at normal priority.
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread's own id.
    let refused = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE) != 0
    };
    if refused {
        tracing::debug!(error = %std::io::Error::last_os_error(), "background thread keeps normal priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_at_lower_priority_and_returns_its_result() {
        let pool = BackgroundPool::start("test", 2).unwrap();
        let nice = pool
            .run(|| unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::getpriority(libc::PRIO_PROCESS, tid)
            })
            .await
            .unwrap();
        assert_eq!(nice, BACKGROUND_NICE);
        let results: Vec<u32> =
            futures_util::future::join_all((0..8).map(|i| pool.run(move || i * 2)))
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
        assert_eq!(results, (0..8).map(|i| i * 2).collect::<Vec<_>>());
    }
}
