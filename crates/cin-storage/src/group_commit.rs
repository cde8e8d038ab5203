//! Group commit: one thread takes every request queued since its last batch,
//! handles them together (writes, then one sync) and answers each caller, so
//! concurrent requests share one fsync instead of paying one each. A caller's
//! request reaches the thread only after everything it did before asking, so the
//! sync that answers it covers that too.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::StorageError;

type Answer<Resp> = oneshot::Sender<Result<Resp, BatchError>>;

/// Why a batch (or one request of it) failed, as each of its callers is told.
#[derive(Clone, Debug)]
pub struct BatchError {
    message: String,
    /// The disk was full: callers answer 507 rather than report a fault.
    no_space: bool,
}

impl From<StorageError> for BatchError {
    fn from(e: StorageError) -> Self {
        BatchError {
            no_space: e.is_no_space(),
            message: e.to_string(),
        }
    }
}

impl From<BatchError> for StorageError {
    fn from(e: BatchError) -> Self {
        if e.no_space {
            StorageError::NoSpace {
                context: "making writes durable failed".into(),
                source: std::io::Error::new(std::io::ErrorKind::StorageFull, e.message),
            }
        } else {
            StorageError::Commit(e.message)
        }
    }
}

pub struct GroupCommit<Req, Resp> {
    name: &'static str,
    queue: Option<mpsc::Sender<(Req, Answer<Resp>)>>,
    thread: Option<JoinHandle<()>>,
}

impl<Req: Send + 'static, Resp: Send + 'static> GroupCommit<Req, Resp> {
    /// Starts the committer thread. `commit` handles a batch of requests and
    /// returns one answer per request, in order, once they are durable.
    pub fn start<F>(name: &'static str, mut commit: F) -> Result<Self, StorageError>
    where
        F: FnMut(Vec<Req>) -> Vec<Result<Resp, BatchError>> + Send + 'static,
    {
        let (queue, waiting) = mpsc::channel::<(Req, Answer<Resp>)>();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-commit"))
            .spawn(move || {
                while let Ok(first) = waiting.recv() {
                    let (requests, answers): (Vec<Req>, Vec<Answer<Resp>>) =
                        std::iter::once(first).chain(waiting.try_iter()).unzip();
                    for (answer, result) in answers.into_iter().zip(commit(requests)) {
                        // A caller that gave up (its request was dropped) needs no answer.
                        let _ = answer.send(result);
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

    /// Hands `request` to the committer; returns its answer once it is durable.
    pub async fn submit(&self, request: Req) -> Result<Resp, StorageError> {
        let (answer, answered) = oneshot::channel();
        let stopped = || StorageError::Stopped(self.name);
        self.queue
            .as_ref()
            .ok_or_else(stopped)?
            .send((request, answer))
            .map_err(|_| stopped())?;
        answered
            .await
            .map_err(|_| stopped())?
            .map_err(StorageError::from)
    }
}

impl<Req, Resp> Drop for GroupCommit<Req, Resp> {
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
            GroupCommit::start("test", move |batch: Vec<u32>| {
                counted.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(5));
                batch.into_iter().map(|n| Ok(n * 2)).collect()
            })
            .unwrap(),
        );
        let callers: Vec<_> = (0..64u32)
            .map(|n| {
                let commit = commit.clone();
                tokio::spawn(async move { (n, commit.submit(n).await) })
            })
            .collect();
        for caller in callers {
            let (n, answer) = caller.await.unwrap();
            assert_eq!(answer.unwrap(), n * 2, "each caller gets its own answer");
        }
        let syncs = syncs.load(Ordering::SeqCst);
        assert!((1..64).contains(&syncs), "64 callers took {syncs} syncs");
    }

    #[tokio::test]
    async fn a_failed_sync_fails_its_callers_only() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let commit = GroupCommit::start("test", move |batch: Vec<()>| {
            let result = if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(BatchError::from(StorageError::Commit(
                    "syncing: disk gone".into(),
                )))
            } else {
                Ok(())
            };
            vec![result; batch.len()]
        })
        .unwrap();
        let err = commit.submit(()).await.unwrap_err();
        assert!(err.to_string().contains("disk gone"), "{err}");
        assert!(!err.is_no_space());
        commit.submit(()).await.unwrap();
    }

    #[tokio::test]
    async fn a_full_disk_reaches_callers_as_no_space() {
        let commit = GroupCommit::start("test", |batch: Vec<()>| {
            let full = StorageError::io(
                "syncing the log",
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            );
            vec![Err::<(), _>(BatchError::from(full)); batch.len()]
        })
        .unwrap();
        let err = commit.submit(()).await.unwrap_err();
        assert!(err.is_no_space(), "{err}");
        assert!(err.to_string().contains("syncing the log"), "{err}");
    }
}
