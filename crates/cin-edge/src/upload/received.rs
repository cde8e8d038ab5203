//! What an upload still in progress holds contiguously from byte 0, for reading
//! a file while it uploads: a filelink read streams these bytes as they become
//! durable, metadata and `/events` report their count. Kept in memory per
//! upload, advanced as parts are recorded, so a reader gets it without looking
//! at any range; rebuilt from the part records the first time it is asked for.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cin_domain::{Handle, PartNumber, PartRecord, Segment, UploadId};
use cin_storage::{ByteStream, MetadataStore, PartStore};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use super::UploadError;

/// The bytes `[0, len)` of an upload, durable and acknowledged, and where they lie.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prefix {
    pub len: u64,
    pub segments: Vec<Segment>,
    /// Parts wholly inside the prefix (the next one, if any, is partly in it).
    whole_parts: u32,
}

impl Prefix {
    /// Continues the prefix over the parts after its whole ones: each whole
    /// part (its committed length all received) adds all of itself, the first
    /// other part what it holds from its start, and there it stops.
    fn extend(
        &mut self,
        mut part: impl FnMut(PartNumber) -> Option<PartRecord>,
        upload: &UploadId,
    ) {
        // The partly received part is looked at again from its start.
        if self.segments.len() > self.whole_parts as usize {
            if let Some(partial) = self.segments.pop() {
                self.len -= partial.len;
            }
        }
        loop {
            let Ok(number) = PartNumber::new(i64::from(self.whole_parts) + 1) else {
                return;
            };
            let Some(record) = part(number) else {
                return;
            };
            let held = record.received.contiguous_prefix();
            let whole = record
                .committed_len
                .is_some_and(|len| record.received.covers(0, len));
            let len = match record.committed_len {
                Some(committed) if whole => committed,
                _ => held,
            };
            if len > 0 {
                self.segments
                    .push(PartStore::part_segment(upload, number, &record, len));
                self.len += len;
            }
            if !whole {
                return;
            }
            self.whole_parts += 1;
        }
    }
}

/// The prefixes of uploads in progress that someone has asked about.
#[derive(Default)]
pub struct ReceivedPrefixes {
    by_upload: Mutex<HashMap<UploadId, watch::Sender<Prefix>>>,
}

impl ReceivedPrefixes {
    /// Follows the upload's prefix; the receiver sees every advance, and its
    /// sender goes away when the upload stops uploading.
    pub fn watch(
        &self,
        meta: &dyn MetadataStore,
        upload: &UploadId,
    ) -> Result<watch::Receiver<Prefix>, UploadError> {
        let mut by_upload = self.by_upload.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = by_upload.get(upload) {
            return Ok(sender.subscribe());
        }
        let mut prefix = Prefix::default();
        let mut failure = None;
        prefix.extend(
            |n| match meta.get_part(upload, n) {
                Ok(record) => record,
                Err(e) => {
                    failure = Some(e);
                    None
                }
            },
            upload,
        );
        if let Some(e) = failure {
            return Err(e.into());
        }
        let (sender, receiver) = watch::channel(prefix);
        by_upload.insert(upload.clone(), sender);
        Ok(receiver)
    }

    /// A part of `upload` was recorded: the prefix moves on, if anyone follows it.
    pub fn recorded(&self, meta: &dyn MetadataStore, upload: &UploadId) {
        let mut by_upload = self.by_upload.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sender) = by_upload.get(upload) else {
            return;
        };
        if sender.receiver_count() == 0 {
            by_upload.remove(upload);
            return;
        }
        sender.send_if_modified(|prefix| {
            let before = prefix.len;
            // A failed read stops the prefix where it is; the next record moves it on.
            prefix.extend(|n| meta.get_part(upload, n).ok().flatten(), upload);
            prefix.len != before
        });
    }

    /// The upload is no longer uploading (complete, expired, deleted): readers
    /// see their watch end and read the file's record instead.
    pub fn forget(&self, upload: &UploadId) {
        self.by_upload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(upload);
    }
}

/// Streams bytes `[start, end)` of a file still uploading as they become
/// durable (`end` None: to the end, once the upload completes). The stream
/// fails when no new byte came for `idle` or the upload ended without
/// completing, so a player asks again (with a Range) rather than seeing a
/// file that looks whole.
pub fn read_growing(
    mut prefix: watch::Receiver<Prefix>,
    meta: Arc<dyn MetadataStore>,
    parts: PartStore,
    handle: Handle,
    (start, end): (u64, Option<u64>),
    idle: Duration,
) -> ByteStream {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    tokio::spawn(async move {
        let mut pos = start;
        let mut end = end;
        let mut complete = false;
        let (mut held, mut segments) = {
            let p = prefix.borrow_and_update();
            (p.len, p.segments.clone())
        };
        loop {
            let upto = end.map_or(held, |e| held.min(e));
            if upto > pos {
                let mut bytes = parts.read_range(&segments, pos, upto);
                while let Some(chunk) = bytes.next().await {
                    let failed = chunk.is_err();
                    let len = chunk.as_ref().map_or(0, |b| b.len() as u64);
                    // A reader that stops taking bytes is let go after the idle time.
                    let sent = tokio::time::timeout(idle, tx.send(chunk)).await;
                    if !matches!(sent, Ok(Ok(()))) || failed {
                        return;
                    }
                    pos += len;
                }
            }
            if end.is_some_and(|e| pos >= e) || complete {
                return;
            }
            match tokio::time::timeout(idle, prefix.changed()).await {
                Ok(Ok(())) => {
                    let p = prefix.borrow_and_update();
                    (held, segments) = (p.len, p.segments.clone());
                }
                // The upload is no longer uploading: its record says what it holds.
                Ok(Err(_)) => match meta.get_file(&handle) {
                    Ok(Some(file)) if file.completed_at_ms.is_some() && !file.status.is_gone() => {
                        (held, segments) = (file.size, file.segments);
                        end = Some(end.map_or(file.size, |e| e.min(file.size)));
                        complete = true;
                    }
                    _ => {
                        let gone = io::Error::other(format!(
                            "the upload of {handle} ended without completing"
                        ));
                        let _ = tx.send(Err(gone)).await;
                        return;
                    }
                },
                Err(_) => {
                    let stalled = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no new bytes of {handle} arrived for {} s; ask again from byte {pos}",
                            idle.as_secs()
                        ),
                    );
                    let _ = tx.send(Err(stalled)).await;
                    return;
                }
            }
        }
    });
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cin_domain::RangeSet;

    fn part(received: &[(u64, u64)], committed: Option<u64>) -> PartRecord {
        let mut set = RangeSet::new();
        for &(a, b) in received {
            set.insert(a, b);
        }
        PartRecord {
            received: set,
            committed_len: committed,
            etag: None,
            touched_at_ms: 0,
            in_log: None,
        }
    }

    #[test]
    fn the_prefix_runs_over_whole_parts_and_stops_in_the_first_other() {
        let upload = UploadId::generate();
        let parts = [
            part(&[(0, 10)], Some(10)),
            part(&[(0, 4), (6, 10)], Some(10)),
            part(&[(0, 10)], Some(10)),
        ];
        let get = |n: PartNumber| parts.get(n.get() as usize - 1).cloned();
        let mut prefix = Prefix::default();
        prefix.extend(get, &upload);
        assert_eq!(prefix.len, 14);
        assert_eq!(prefix.segments.len(), 2);
        assert_eq!(prefix.segments[1].len, 4);

        // Part 2 filled in: the prefix takes it and part 3.
        let parts = [
            part(&[(0, 10)], Some(10)),
            part(&[(0, 10)], Some(10)),
            part(&[(0, 10)], Some(10)),
        ];
        let get = |n: PartNumber| parts.get(n.get() as usize - 1).cloned();
        prefix.extend(get, &upload);
        assert_eq!(prefix.len, 30);
        assert_eq!(prefix.segments.len(), 3);
    }

    #[test]
    fn a_tus_upload_is_one_growing_part() {
        let upload = UploadId::generate();
        let mut prefix = Prefix::default();
        prefix.extend(|_| Some(part(&[(0, 7)], None)), &upload);
        assert_eq!((prefix.len, prefix.segments.len()), (7, 1));
        prefix.extend(|_| Some(part(&[(0, 12)], None)), &upload);
        assert_eq!((prefix.len, prefix.segments.len()), (12, 1));
        assert_eq!(prefix.segments[0].len, 12);
    }
}
