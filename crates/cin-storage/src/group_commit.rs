//! Group commit: one thread makes writes durable for every caller that asked since
//! its last sync, so concurrent requests share one fsync instead of paying one each.
//! A caller asks only after its own write, so the sync that answers it covers it.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::StorageError;

type Waiter = oneshot::Sender<Result<(), String>>;

pub struct GroupCommit {
    name: &'static str,
    queue: Option<mpsc::Sender<Waiter>>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    /// Starts the committer thread; `sync` makes every write issued so far durable.
    pub fn start<F>(name: &'static str, mut sync: F) -> Result<Self, StorageError>
    where
        F: FnMut() -> Result<(), StorageError> + Send + 'static,
    {
        let (queue, waiting) = mpsc::channel::<Waiter>();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-commit"))
            .spawn(move || {
                while let Ok(first) = waiting.recv() {
                    let mut batch = vec![first];
                    batch.extend(waiting.try_iter());
                    let result = sync().map_err(|e| e.to_string());
                    for waiter in batch {
                        // A caller that gave up (its request was dropped) needs no answer.
                        let _ = waiter.send(result.clone());
                    }
                }
            })
            .map_err(|e| StorageError::io(format!("starting the {name} commit thread"), e))?;
        Ok(GroupCommit {
            name,
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Returns once every write this caller issued before calling is durable.
    pub async fn commit(&self) -> Result<(), StorageError> {
        let (done, answer) = oneshot::channel();
        let stopped = || StorageError::Commit(format!("the {} committer has stopped", self.name));
        self.queue
            .as_ref()
            .ok_or_else(stopped)?
            .send(done)
            .map_err(|_| stopped())?;
        answer
            .await
            .map_err(|_| stopped())?
            .map_err(StorageError::Commit)
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        // Closing the queue ends the thread; joining it releases what it holds
        // (files, the database) before the owner is reopened.
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_syncs_and_all_get_answers() {
        let syncs = Arc::new(AtomicUsize::new(0));
        let counted = syncs.clone();
        let commit = Arc::new(
            GroupCommit::start("test", move || {
                counted.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(5));
                Ok(())
            })
            .unwrap(),
        );
        let callers: Vec<_> = (0..64)
            .map(|_| {
                let commit = commit.clone();
                tokio::spawn(async move { commit.commit().await })
            })
            .collect();
        for caller in callers {
            caller.await.unwrap().unwrap();
        }
        let syncs = syncs.load(Ordering::SeqCst);
        assert!((1..64).contains(&syncs), "64 callers took {syncs} syncs");
    }

    #[tokio::test]
    async fn a_failed_sync_fails_its_callers_only() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let commit = GroupCommit::start("test", move || {
            if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(StorageError::io(
                    "syncing",
                    std::io::Error::other("disk gone"),
                ))
            } else {
                Ok(())
            }
        })
        .unwrap();
        let err = commit.commit().await.unwrap_err();
        assert!(err.to_string().contains("disk gone"), "{err}");
        commit.commit().await.unwrap();
    }
}
