//! One conformance suite for every [`MetadataStore`] (in the manner of Garage's
//! `db/test.rs`): each test is a generic function over a [`Subject`], the way to
//! open (and reopen) one implementation, and the `sled` module runs them all
//! against [`SledMetadataStore`]. A new implementation adds a `Subject` and one
//! `suite!` line.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use cin_domain::{
    FileRecord, FileStatus, Handle, PartNumber, PartRecord, ReplicationJob, Segment, UploadId,
    WebhookDelivery,
};
use serde_json::json;

use crate::{JobChange, MetadataStore, SledMetadataStore, StorageError};

/// A stored value the suite damages, by what it belongs to.
#[derive(Clone, Copy, Debug)]
enum Target<'a> {
    File(&'a Handle),
    Part(&'a UploadId, PartNumber),
    Job(&'a Handle),
    Webhook(u64),
}

/// How a value is damaged, as a torn write or a bad sector would.
#[derive(Clone, Copy, Debug)]
enum Damage {
    FlipLastByte,
    Truncate,
    Empty,
}

const DAMAGES: [Damage; 3] = [Damage::FlipLastByte, Damage::Truncate, Damage::Empty];

/// One implementation under test.
struct Subject {
    /// Opens the store kept at `path`, creating it the first time. Called again
    /// on the same path once every handle of the previous store is dropped, as a
    /// restart does.
    open: fn(&Path) -> Result<Arc<dyn MetadataStore>, StorageError>,
    /// Damages one stored value of the closed store at `path`; panics when no
    /// such value is stored (so a changed layout fails the suite, not passes it).
    damage: fn(&Path, Target<'_>, Damage),
}

fn open(subject: &Subject, path: &Path) -> Arc<dyn MetadataStore> {
    (subject.open)(path).expect("open the metadata store")
}

fn part(n: i64) -> PartNumber {
    PartNumber::new(n).expect("valid part number")
}

/// A record with every kind of field set. Built from JSON so fields added later
/// with a default need no change here.
fn record() -> FileRecord {
    let mut file: FileRecord = serde_json::from_value(json!({
        "handle": Handle::generate(),
        "upload_id": UploadId::generate(),
        "filename": "clip é.mp4",
        "mimetype": "video/mp4",
        "size": 12,
        "mode": "Regular",
        "status": "Uploading",
        "created_at_ms": 1_700_000_000_000u64,
        "completed_at_ms": null,
        "stored_at_ms": null,
        "store": {},
        "profile": "default",
        "container": "media",
        "key": "in/clip.mp4",
        "segments": [],
        "sha256": null,
        "replication_attempts": 0,
        "last_error": null,
    }))
    .expect("a valid record");
    file.segments = vec![
        Segment {
            file: format!("{}/00001", file.upload_id),
            offset: 0,
            len: 5,
        },
        Segment {
            file: "log/0000000003".into(),
            offset: 4096,
            len: 7,
        },
    ];
    file.app = Some("acme".into());
    file
}

fn part_record(start: u64, end: u64) -> PartRecord {
    let mut part = PartRecord::default();
    part.received.insert(start, end);
    part.committed_len = Some(end);
    part.etag = Some(format!("\"{start}-{end}\""));
    part.touched_at_ms = 42;
    part
}

fn delivery(handle: &Handle, body: &str) -> WebhookDelivery {
    WebhookDelivery {
        seq: 0,
        url: "http://hooks.example/in".into(),
        app: "acme".into(),
        handle: handle.clone(),
        body: body.into(),
        attempts: 0,
        not_before_ms: 0,
        last_error: None,
    }
}

/// Two upload ids equal but for their last character.
fn ids_sharing_a_prefix() -> (UploadId, UploadId) {
    let base = UploadId::generate().as_str().to_owned();
    let stem = &base[..base.len() - 1];
    let a = UploadId::parse(&format!("{stem}a")).expect("upload id");
    let b = UploadId::parse(&format!("{stem}b")).expect("upload id");
    (a, b)
}

fn handles(files: &[FileRecord]) -> BTreeSet<Handle> {
    files.iter().map(|f| f.handle.clone()).collect()
}

async fn file_records_round_trip(subject: &Subject) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(subject, dir.path());
    let mut file = record();
    let other = record();
    assert_eq!(store.get_file(&file.handle).unwrap(), None);
    store.put_file(&file, JobChange::Keep).unwrap();
    store.put_file(&other, JobChange::Keep).unwrap();
    assert_eq!(store.get_file(&file.handle).unwrap(), Some(file.clone()));

    // A second write replaces the record.
    file.status = FileStatus::InTransit;
    file.completed_at_ms = Some(1_700_000_000_500);
    file.sha256 = Some("ab".repeat(32));
    store.put_file(&file, JobChange::Keep).unwrap();
    assert_eq!(store.get_file(&file.handle).unwrap(), Some(file.clone()));
    assert_eq!(store.get_file(&other.handle).unwrap(), Some(other.clone()));

    let all = store.files().unwrap();
    assert_eq!(all.len(), 2, "one record per handle, however often written");
    assert_eq!(handles(&all), handles(&[file.clone(), other.clone()]));
    assert!(all.contains(&file) && all.contains(&other));
}

async fn put_file_changes_the_job_as_asked(subject: &Subject) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(subject, dir.path());
    let file = record();
    store.put_file(&file, JobChange::Keep).unwrap();
    assert_eq!(store.get_job(&file.handle).unwrap(), None);

    let mut job = ReplicationJob::new(file.handle.clone());
    job.attempts = 3;
    job.last_error = Some("timed out".into());
    store
        .put_file(&file, JobChange::Upsert(job.clone()))
        .unwrap();
    assert_eq!(store.get_job(&file.handle).unwrap(), Some(job.clone()));
    store.put_file(&file, JobChange::Keep).unwrap();
    assert_eq!(store.get_job(&file.handle).unwrap(), Some(job.clone()));

    job.attempts = 4;
    store.put_job(&job).unwrap();
    assert_eq!(store.get_job(&file.handle).unwrap(), Some(job));

    store.put_file(&file, JobChange::Remove).unwrap();
    assert_eq!(store.get_job(&file.handle).unwrap(), None);
    assert_eq!(
        store.get_file(&file.handle).unwrap(),
        Some(file),
        "removing the job keeps the record"
    );
}

async fn upload_ids_lead_to_their_handle(subject: &Subject) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(subject, dir.path());
    let (a, b) = ids_sharing_a_prefix();
    let mut first = record();
    first.upload_id = a.clone();
    let mut second = record();
    second.upload_id = b.clone();
    assert_eq!(store.handle_for_upload(&a).unwrap(), None);
    store.put_file(&first, JobChange::Keep).unwrap();
    store.put_file(&second, JobChange::Keep).unwrap();
    assert_eq!(store.handle_for_upload(&a).unwrap(), Some(first.handle));
    assert_eq!(store.handle_for_upload(&b).unwrap(), Some(second.handle));
    assert_eq!(
        store.handle_for_upload(&UploadId::generate()).unwrap(),
        None
    );
}

async fn parts_come_in_part_number_order(subject: &Subject) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(subject, dir.path());
    let upload = UploadId::generate();
    assert!(store.parts(&upload).unwrap().is_empty());
    assert_eq!(store.get_part(&upload, part(1)).unwrap(), None);
    // Written out of order, across a byte boundary of the number (255/256), up to the highest.
    let numbers = [300, 2, 10_000, 1, 256, 255, 9_999, 512];
    for n in numbers {
        store
            .put_part(&upload, part(n), &part_record(0, n as u64))
            .unwrap();
    }
    let listed = store.parts(&upload).unwrap();
    let mut sorted = numbers.to_vec();
    sorted.sort_unstable();
    assert_eq!(
        listed
            .iter()
            .map(|(n, _)| i64::from(n.get()))
            .collect::<Vec<_>>(),
        sorted
    );
    for (n, record) in &listed {
        assert_eq!(record, &part_record(0, u64::from(n.get())));
    }

    // Writing a part again replaces it.
    let mut grown = part_record(0, 2);
    grown.received.insert(10, 20);
    store.put_part(&upload, part(2), &grown).unwrap();
    assert_eq!(store.get_part(&upload, part(2)).unwrap(), Some(grown));
    assert_eq!(store.parts(&upload).unwrap().len(), numbers.len());
}

async fn parts_of_uploads_sharing_a_prefix_stay_apart(subject: &Subject) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(subject, dir.path());
    let (a, b) = ids_sharing_a_prefix();
    for n in 1..=3 {
        store.put_part(&a, part(n), &part_record(0, 100)).unwrap();
    }
    store.put_part(&b, part(2), &part_record(0, 200)).unwrap();
    assert_eq!(store.parts(&a).unwrap().len(), 3);
    assert_eq!(
        store.parts(&b).unwrap(),
        vec![(part(2), part_record(0, 200))]
    );
    assert_eq!(
        store.get_part(&a, part(2)).unwrap(),
        Some(part_record(0, 100))
    );
    assert_eq!(store.get_part(&b, part(1)).unwrap(), None);
}

async fn remove_parts_forgets_one_upload_only(subject: &Subject) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(subject, dir.path());
    let (a, b) = ids_sharing_a_prefix();
    let mut file = record();
    file.upload_id = a.clone();
    store.put_file(&file, JobChange::Keep).unwrap();
    for n in [1, 2, 256] {
        store.put_part(&a, part(n), &part_record(0, 5)).unwrap();
        store.put_part(&b, part(n), &part_record(0, 6)).unwrap();
    }
    store.remove_parts(&a).unwrap();
    assert!(store.parts(&a).unwrap().is_empty());
    assert_eq!(store.get_part(&a, part(256)).unwrap(), None);
    assert_eq!(
        store.parts(&b).unwrap().len(),
        3,
        "the neighbour keeps its parts"
    );
    assert_eq!(store.get_file(&file.handle).unwrap(), Some(file.clone()));
    assert_eq!(store.handle_for_upload(&a).unwrap(), Some(file.handle));
    // Nothing to remove is no error.
    store.remove_parts(&a).unwrap();
    store.remove_parts(&UploadId::generate()).unwrap();
}

async fn delete_file_forgets_record_index_parts_and_job(subject: &Subject) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(subject, dir.path());
    let (a, b) = ids_sharing_a_prefix();
    let mut gone = record();
    gone.upload_id = a.clone();
    let mut kept = record();
    kept.upload_id = b.clone();
    for file in [&gone, &kept] {
        store
            .put_file(
                file,
                JobChange::Upsert(ReplicationJob::new(file.handle.clone())),
            )
            .unwrap();
        store
            .put_part(&file.upload_id, part(1), &part_record(0, 9))
            .unwrap();
    }
    store.delete_file(&gone).unwrap();
    assert_eq!(store.get_file(&gone.handle).unwrap(), None);
    assert_eq!(store.handle_for_upload(&a).unwrap(), None);
    assert!(store.parts(&a).unwrap().is_empty());
    assert_eq!(store.get_job(&gone.handle).unwrap(), None);
    assert_eq!(
        store
            .jobs_after(None, 10)
            .unwrap()
            .into_iter()
            .map(|j| j.handle)
            .collect::<Vec<_>>(),
        vec![kept.handle.clone()]
    );
    assert_eq!(store.files().unwrap(), vec![kept.clone()]);

    // The other file, whose upload id shares a prefix, is whole.
    assert_eq!(store.get_file(&kept.handle).unwrap(), Some(kept.clone()));
    assert_eq!(store.handle_for_upload(&b).unwrap(), Some(kept.handle));
    assert_eq!(store.parts(&b).unwrap().len(), 1);
}

async fn jobs_come_a_page_at_a_time_in_handle_order(subject: &Subject) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(subject, dir.path());
    assert!(store.jobs_after(None, 10).unwrap().is_empty());
    let mut handles: Vec<Handle> = (0..7).map(|_| Handle::generate()).collect();
    for handle in &handles {
        store.put_job(&ReplicationJob::new(handle.clone())).unwrap();
    }
    handles.sort();

    let mut seen = Vec::new();
    let mut after: Option<Handle> = None;
    loop {
        let page = store.jobs_after(after.as_ref(), 3).unwrap();
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = Some(last.handle.clone());
        seen.extend(page.into_iter().map(|j| j.handle));
    }
    assert_eq!(seen, handles, "every job once, in handle order");

    assert!(store.jobs_after(None, 0).unwrap().is_empty());
    assert_eq!(store.jobs_after(None, 100).unwrap().len(), handles.len());
    // `after` need not be a stored handle: the page starts at the next one after it.
    let unstored = Handle::generate();
    let expected: Vec<&Handle> = handles.iter().filter(|h| **h > unstored).collect();
    let from_unstored = store.jobs_after(Some(&unstored), 100).unwrap();
    assert_eq!(
        from_unstored.iter().map(|j| &j.handle).collect::<Vec<_>>(),
        expected
    );
    let last = handles.last().expect("handles");
    assert!(store.jobs_after(Some(last), 10).unwrap().is_empty());
}

async fn files_come_a_page_at_a_time_in_handle_order(subject: &Subject) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(subject, dir.path());
    assert!(store.files_after(None, 10).unwrap().is_empty());
    let mut files: Vec<FileRecord> = (0..7).map(|_| record()).collect();
    for file in &files {
        store.put_file(file, JobChange::Keep).unwrap();
    }
    // Written again: still one record, in its place.
    files[3].status = FileStatus::InTransit;
    store.put_file(&files[3], JobChange::Keep).unwrap();
    files.sort_by(|a, b| a.handle.cmp(&b.handle));

    let mut seen = Vec::new();
    let mut after: Option<Handle> = None;
    loop {
        let page = store.files_after(after.as_ref(), 3).unwrap();
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = Some(last.handle.clone());
        seen.extend(page);
    }
    assert_eq!(
        seen, files,
        "every record once, in handle order, as written last"
    );

    assert!(store.files_after(None, 0).unwrap().is_empty());
    // `after` need not be a stored handle: the page starts at the next one after it.
    let unstored = Handle::generate();
    let expected: Vec<&Handle> = files
        .iter()
        .map(|f| &f.handle)
        .filter(|h| **h > unstored)
        .collect();
    let from_unstored = store.files_after(Some(&unstored), 100).unwrap();
    assert_eq!(
        from_unstored.iter().map(|f| &f.handle).collect::<Vec<_>>(),
        expected
    );
    let last = &files.last().expect("files").handle;
    assert!(store.files_after(Some(last), 10).unwrap().is_empty());
    store.delete_file(&files[0]).unwrap();
    assert_eq!(
        store.files_after(None, 100).unwrap().len(),
        files.len() - 1,
        "a deleted record is not listed"
    );
}

async fn webhooks_queue_in_order_with_sequence_numbers_rising_across_reopen(subject: &Subject) {
    let dir = tempfile::tempdir().unwrap();
    let handle = Handle::generate();
    let mut before_reopen = Vec::new();
    {
        let store = open(subject, dir.path());
        assert!(store.webhooks().unwrap().is_empty());
        // Enough to carry the sequence past a byte boundary.
        for batch in 0..3 {
            let deliveries = (0..100)
                .map(|i| delivery(&handle, &format!("event {batch}-{i}")))
                .collect();
            store.enqueue_webhooks(deliveries).unwrap();
        }
        let queued = store.webhooks().unwrap();
        assert_eq!(queued.len(), 300);
        let bodies: Vec<String> = (0..3)
            .flat_map(|b| (0..100).map(move |i| format!("event {b}-{i}")))
            .collect();
        assert_eq!(
            queued.iter().map(|d| d.body.clone()).collect::<Vec<_>>(),
            bodies,
            "the queue is in enqueue order"
        );
        assert!(queued.windows(2).all(|w| w[0].seq < w[1].seq));
        // Removing the newest must not let its number be handed out again.
        let newest = queued.last().expect("queued").seq;
        store.remove_webhook(newest).unwrap();
        before_reopen.extend(queued.iter().map(|d| d.seq));
        store.flush().await.unwrap();
    }
    let store = open(subject, dir.path());
    assert_eq!(store.webhooks().unwrap().len(), 299);
    store
        .enqueue_webhooks(vec![delivery(&handle, "after restart")])
        .unwrap();
    let queued = store.webhooks().unwrap();
    let newest = queued.last().expect("queued");
    assert_eq!(newest.body, "after restart");
    let highest_before = before_reopen.iter().copied().max().expect("seqs");
    assert!(
        newest.seq > highest_before,
        "seq {} after reopen, {highest_before} before",
        newest.seq
    );
}

async fn webhook_deliveries_update_and_go_in_place(subject: &Subject) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(subject, dir.path());
    let handle = Handle::generate();
    store
        .enqueue_webhooks(vec![
            delivery(&handle, "first"),
            delivery(&handle, "second"),
            delivery(&handle, "third"),
        ])
        .unwrap();
    let queued = store.webhooks().unwrap();
    let mut retried = queued[0].clone();
    retried.attempts = 2;
    retried.not_before_ms = 99;
    retried.last_error = Some("503".into());
    store.put_webhook(&retried).unwrap();
    store.remove_webhook(queued[1].seq).unwrap();
    store.remove_webhook(queued[1].seq).unwrap();
    assert_eq!(store.webhooks().unwrap(), vec![retried, queued[2].clone()]);
}

async fn flush_then_reopen_keeps_everything(subject: &Subject) {
    let dir = tempfile::tempdir().unwrap();
    let file = record();
    let mut job = ReplicationJob::new(file.handle.clone());
    job.not_before_ms = 5;
    let (written_files, written_parts, written_webhooks) = {
        let store = open(subject, dir.path());
        let mut files = vec![file.clone()];
        store
            .put_file(&file, JobChange::Upsert(job.clone()))
            .unwrap();
        for _ in 0..20 {
            let other = record();
            store.put_file(&other, JobChange::Keep).unwrap();
            files.push(other);
        }
        store
            .put_part(&file.upload_id, part(2), &part_record(0, 7))
            .unwrap();
        store
            .put_part(&file.upload_id, part(1), &part_record(0, 5))
            .unwrap();
        store
            .enqueue_webhooks(vec![delivery(&file.handle, "InTransit")])
            .unwrap();
        store.flush().await.unwrap();
        (
            files,
            store.parts(&file.upload_id).unwrap(),
            store.webhooks().unwrap(),
        )
    };
    let store = open(subject, dir.path());
    assert_eq!(store.get_file(&file.handle).unwrap(), Some(file.clone()));
    let mut reread = store.files().unwrap();
    let mut expected = written_files;
    reread.sort_by(|x, y| x.handle.cmp(&y.handle));
    expected.sort_by(|x, y| x.handle.cmp(&y.handle));
    assert_eq!(reread, expected);
    assert_eq!(
        store.handle_for_upload(&file.upload_id).unwrap(),
        Some(file.handle.clone())
    );
    assert_eq!(store.parts(&file.upload_id).unwrap(), written_parts);
    assert_eq!(store.get_job(&file.handle).unwrap(), Some(job.clone()));
    assert_eq!(store.jobs_after(None, 10).unwrap(), vec![job]);
    assert_eq!(store.webhooks().unwrap(), written_webhooks);
}

async fn check_writable_succeeds_and_leaves_records_alone(subject: &Subject) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(subject, dir.path());
    let file = record();
    store.put_file(&file, JobChange::Keep).unwrap();
    store.check_writable().await.unwrap();
    store.check_writable().await.unwrap();
    assert_eq!(store.files().unwrap(), vec![file]);
    assert!(store.jobs_after(None, 10).unwrap().is_empty());
    assert!(store.webhooks().unwrap().is_empty());
}

/// Whether `result` is the error a corrupt value must give.
fn is_corrupt<T: std::fmt::Debug>(result: Result<T, StorageError>) -> bool {
    matches!(result, Err(StorageError::Corrupt { .. }))
}

async fn corrupt_values_are_errors_not_panics(subject: &Subject) {
    for damage in DAMAGES {
        let dir = tempfile::tempdir().unwrap();
        let file = record();
        let healthy = record();
        let seq = {
            let store = open(subject, dir.path());
            for f in [&file, &healthy] {
                store
                    .put_file(f, JobChange::Upsert(ReplicationJob::new(f.handle.clone())))
                    .unwrap();
            }
            store
                .put_part(&file.upload_id, part(1), &part_record(0, 5))
                .unwrap();
            store
                .enqueue_webhooks(vec![delivery(&file.handle, "InTransit")])
                .unwrap();
            store.flush().await.unwrap();
            store.webhooks().unwrap()[0].seq
        };
        let targets = [
            Target::Part(&file.upload_id, part(1)),
            Target::Job(&file.handle),
            Target::Webhook(seq),
            Target::File(&file.handle),
        ];
        // Damaged one after the other: each check finds its own damage and the
        // ones before, never a panic.
        for target in targets {
            (subject.damage)(dir.path(), target, damage);
            let store = match (subject.open)(dir.path()) {
                Ok(store) => store,
                // Refusing to open a damaged store is an answer too (with a recovery path).
                Err(StorageError::Corrupt { .. }) => continue,
                Err(e) => panic!("{damage:?} of {target:?}: opening failed with {e}"),
            };
            let found = match target {
                Target::File(handle) => {
                    is_corrupt(store.get_file(handle)) && is_corrupt(store.files())
                }
                Target::Part(upload, n) => {
                    is_corrupt(store.get_part(upload, n)) && is_corrupt(store.parts(upload))
                }
                Target::Job(handle) => {
                    is_corrupt(store.get_job(handle)) && is_corrupt(store.jobs_after(None, 10))
                }
                Target::Webhook(_) => is_corrupt(store.webhooks()),
            };
            assert!(
                found,
                "{damage:?} of {target:?} was not reported as corrupt"
            );
            if !matches!(target, Target::File(_)) {
                assert_eq!(
                    store.get_file(&healthy.handle).unwrap(),
                    Some(healthy.clone()),
                    "undamaged records still read"
                );
            }
        }
    }
}

/// Runs every test of the suite against one subject.
macro_rules! suite {
    ($subject:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $test() {
                super::$test(&$subject).await;
            }
        )*
    };
}

macro_rules! all_tests {
    ($subject:expr) => {
        suite!($subject;
            file_records_round_trip,
            put_file_changes_the_job_as_asked,
            upload_ids_lead_to_their_handle,
            parts_come_in_part_number_order,
            parts_of_uploads_sharing_a_prefix_stay_apart,
            remove_parts_forgets_one_upload_only,
            delete_file_forgets_record_index_parts_and_job,
            jobs_come_a_page_at_a_time_in_handle_order,
            files_come_a_page_at_a_time_in_handle_order,
            webhooks_queue_in_order_with_sequence_numbers_rising_across_reopen,
            webhook_deliveries_update_and_go_in_place,
            flush_then_reopen_keeps_everything,
            check_writable_succeeds_and_leaves_records_alone,
            corrupt_values_are_errors_not_panics,
        );
    };
}

mod sled {
    use super::*;

    const SLED: Subject = Subject {
        open: open_sled,
        damage: damage_sled,
    };

    fn open_sled(path: &Path) -> Result<Arc<dyn MetadataStore>, StorageError> {
        Ok(Arc::new(SledMetadataStore::open(path)?))
    }

    /// Damages a value in place, through sled itself: tree names and key layout
    /// as [`SledMetadataStore`] writes them.
    fn damage_sled(path: &Path, target: Target<'_>, damage: Damage) {
        let db =
            crate::metadata::open_sled(::sled::Config::new().path(path), path).expect("open sled");
        let (tree, key) = match target {
            Target::File(handle) => ("files", handle.as_str().as_bytes().to_vec()),
            Target::Job(handle) => ("jobs", handle.as_str().as_bytes().to_vec()),
            Target::Part(upload, n) => {
                let mut key = upload.as_str().as_bytes().to_vec();
                key.extend_from_slice(&n.get().to_be_bytes());
                ("parts", key)
            }
            Target::Webhook(seq) => ("webhooks", seq.to_be_bytes().to_vec()),
        };
        let tree = db.open_tree(tree).expect("open tree");
        let mut value = tree
            .get(&key)
            .expect("read value")
            .unwrap_or_else(|| panic!("no stored value for {target:?}"))
            .to_vec();
        match damage {
            Damage::FlipLastByte => {
                if let Some(last) = value.last_mut() {
                    *last ^= 0x5a;
                }
            }
            Damage::Truncate => value.truncate(3),
            Damage::Empty => value.clear(),
        }
        tree.insert(&key, value).expect("write value");
        db.flush().expect("flush sled");
    }

    all_tests!(SLED);
}
