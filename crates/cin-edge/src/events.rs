//! Status changes of files, published as they happen: the live `/events` stream
//! and the webhook queue listen here.

use cin_domain::{FileStatus, Handle};
use tokio::sync::broadcast;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusChange {
    pub handle: Handle,
    pub status: FileStatus,
}

/// Enough room for bursts; a subscriber that falls further behind re-reads the record.
const CAPACITY: usize = 1024;

pub struct StatusEvents {
    tx: broadcast::Sender<StatusChange>,
}

impl Default for StatusEvents {
    fn default() -> Self {
        StatusEvents {
            tx: broadcast::channel(CAPACITY).0,
        }
    }
}

impl StatusEvents {
    pub fn publish(&self, handle: &Handle, status: FileStatus) {
        // No subscriber is not an error.
        let _ = self.tx.send(StatusChange {
            handle: handle.clone(),
            status,
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<StatusChange> {
        self.tx.subscribe()
    }
}
