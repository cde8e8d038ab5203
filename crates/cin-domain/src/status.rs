//! The one status machine of a file at a POP. Every change of a file's status is
//! a [`Transition`] applied by [`FileRecord::apply`], which checks it against the
//! current status; nothing else assigns `status`.
//!
//! ```text
//!   Uploading --Complete--> InTransit --Store--> Stored
//!       |                       |                  |
//!       +--Expire--> Expired    +--Delete-->       +--Delete--> Deleted
//!       +--Delete--> Deleted
//! ```

use serde::{Deserialize, Serialize};

use crate::{DomainError, FileRecord};

/// Where a file is in its life at this POP. Only ever moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileStatus {
    /// Bytes are arriving; the filelink does not serve yet.
    Uploading,
    /// Complete at the POP and servable; not yet confirmed by final storage.
    InTransit,
    /// Confirmed (size and checksum) by final storage.
    Stored,
    /// Abandoned before it was complete and swept: its bytes are gone.
    Expired,
    /// Deleted by the client (tus DELETE, `DELETE /api/file`): its bytes are
    /// gone from this POP and final storage, or kept only for the final
    /// uploads that still reference them.
    Deleted,
}

impl FileStatus {
    pub const ALL: [FileStatus; 5] = [
        FileStatus::Uploading,
        FileStatus::InTransit,
        FileStatus::Stored,
        FileStatus::Expired,
        FileStatus::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FileStatus::Uploading => "Uploading",
            FileStatus::InTransit => "InTransit",
            FileStatus::Stored => "Stored",
            FileStatus::Expired => "Expired",
            FileStatus::Deleted => "Deleted",
        }
    }

    /// The file is gone for clients: its handle answers as expired or deleted.
    pub fn is_gone(self) -> bool {
        matches!(self, FileStatus::Expired | FileStatus::Deleted)
    }
}

/// A change of a file's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Every byte arrived: the file is servable and queued for final storage.
    Complete,
    /// Final storage confirmed the object.
    Store,
    /// The sweep found the upload abandoned.
    Expire,
    /// The client terminated the upload or deleted the file.
    Delete,
}

impl Transition {
    fn target(self) -> FileStatus {
        match self {
            Transition::Complete => FileStatus::InTransit,
            Transition::Store => FileStatus::Stored,
            Transition::Expire => FileStatus::Expired,
            Transition::Delete => FileStatus::Deleted,
        }
    }
}

impl FileRecord {
    /// Applies `transition` if the current status allows it, stamping the time
    /// of the change; otherwise leaves the record as it was.
    pub fn apply(&mut self, transition: Transition, now_ms: u64) -> Result<(), DomainError> {
        use FileStatus::*;
        let allowed = matches!(
            (self.status, transition),
            (Uploading, Transition::Complete)
                | (InTransit, Transition::Store)
                | (Uploading, Transition::Expire)
                | (Uploading | InTransit | Stored, Transition::Delete)
        );
        if !allowed {
            return Err(DomainError::IllegalTransition {
                from: self.status.as_str(),
                to: transition.target().as_str(),
            });
        }
        self.status = transition.target();
        match transition {
            Transition::Complete => self.completed_at_ms = Some(now_ms),
            Transition::Store => self.stored_at_ms = Some(now_ms),
            Transition::Expire => self.expired_at_ms = Some(now_ms),
            Transition::Delete => self.deleted_at_ms = Some(now_ms),
        }
        Ok(())
    }

    /// Records written before `Expired` was a status said so with `expired_at_ms` alone.
    pub fn upgrade(mut self) -> Self {
        if self.expired_at_ms.is_some() && self.status == FileStatus::Uploading {
            self.status = FileStatus::Expired;
        }
        self
    }

    /// The POP holds this file's bytes itself (an upload in progress, or a
    /// complete file whose local copy was not evicted).
    pub fn has_local_copy(&self) -> bool {
        match self.status {
            FileStatus::Uploading | FileStatus::InTransit => true,
            FileStatus::Stored => self.evicted_at_ms.is_none(),
            FileStatus::Expired | FileStatus::Deleted => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::record;

    #[test]
    fn the_happy_path_moves_forward_and_stamps_times() {
        let mut file = record();
        file.apply(Transition::Complete, 10).unwrap();
        assert_eq!(file.status, FileStatus::InTransit);
        assert_eq!(file.completed_at_ms, Some(10));
        file.apply(Transition::Store, 20).unwrap();
        assert_eq!(file.status, FileStatus::Stored);
        assert_eq!(file.stored_at_ms, Some(20));
    }

    #[test]
    fn nothing_moves_backwards_or_out_of_a_terminal_state() {
        let mut stored = record();
        stored.status = FileStatus::Stored;
        // Only Delete leaves Stored.
        for t in [Transition::Complete, Transition::Store, Transition::Expire] {
            assert!(stored.clone().apply(t, 1).is_err(), "Stored {t:?}");
        }
        let mut expired = record();
        expired.apply(Transition::Expire, 1).unwrap();
        let before = expired.clone();
        let err = expired.apply(Transition::Complete, 2).unwrap_err();
        assert_eq!(expired, before, "a refused transition changes nothing");
        assert!(err.to_string().contains("Expired"), "{err}");
    }

    #[test]
    fn a_file_is_deleted_at_any_live_status_and_only_once() {
        let mut uploading = record();
        uploading.apply(Transition::Delete, 1).unwrap();
        assert_eq!(uploading.status, FileStatus::Deleted);
        let mut stored = record();
        stored.apply(Transition::Complete, 1).unwrap();
        stored.apply(Transition::Store, 2).unwrap();
        stored.apply(Transition::Delete, 3).unwrap();
        assert_eq!(stored.deleted_at_ms, Some(3));
        assert!(!stored.has_local_copy());
        assert!(stored.apply(Transition::Delete, 4).is_err());
        let mut expired = record();
        expired.apply(Transition::Expire, 1).unwrap();
        assert!(expired.apply(Transition::Delete, 2).is_err());
    }

    #[test]
    fn old_expired_records_read_as_expired() {
        let mut old = record();
        old.expired_at_ms = Some(5);
        assert_eq!(old.upgrade().status, FileStatus::Expired);
    }
}
