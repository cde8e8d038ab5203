//! One conformance suite for every `FinalStore`: the local origin directory and S3
//! (against two real S3-compatible servers, s3s-fs and moto).

use std::sync::Mutex;

use async_trait::async_trait;
use cin_domain::{MultipartCheckpoint, PartNumber, RangeSet, Segment, UploadId};
use cin_storage::{
    ChunkSize, FinalStore, FinalStoreError, LocalDirStore, LocalObject, NoJournal, ObjectToStore,
    PartStore, PutJournal, S3Settings, S3Store, StorageError,
};
use futures_util::TryStreamExt;

use crate::support::{
    random_bytes, sha256_hex, S3Backend, S3Server, MIB, S3_ACCESS_KEY, S3_SECRET_KEY,
};

/// Writes `bytes` as local parts of `part_len` bytes and returns them as one object.
async fn local_object(dir: &std::path::Path, bytes: &[u8], part_len: usize) -> LocalObject {
    let parts = PartStore::open(dir).unwrap();
    let upload = UploadId::generate();
    parts.create_upload(&upload).await.unwrap();
    let mut segments = Vec::new();
    for (i, piece) in bytes.chunks(part_len).enumerate() {
        let number = PartNumber::new(i as i64 + 1).unwrap();
        let body = futures_util::stream::iter([Ok::<_, cin_storage::BodyError>(
            bytes::Bytes::copy_from_slice(piece),
        )]);
        parts
            .write_chunk(
                &upload,
                number,
                0,
                ChunkSize::Exact(piece.len() as u64),
                &RangeSet::new(),
                body,
            )
            .await
            .unwrap();
        segments.push(Segment {
            file: PartStore::part_file(&upload, number),
            offset: 0,
            len: piece.len() as u64,
        });
    }
    LocalObject {
        parts,
        segments,
        size: bytes.len() as u64,
    }
}

async fn read(
    store: &dyn FinalStore,
    container: &str,
    key: &str,
    range: Option<(u64, u64)>,
) -> Vec<u8> {
    let stream = store.get(container, key, range).await.unwrap();
    stream
        .try_fold(Vec::new(), |mut acc, b| async move {
            acc.extend_from_slice(&b);
            Ok(acc)
        })
        .await
        .unwrap()
}

/// A journal kept in memory, starting from a given checkpoint.
struct MemoryJournal {
    start: Option<MultipartCheckpoint>,
    saved: Mutex<Vec<Option<MultipartCheckpoint>>>,
}

#[async_trait]
impl PutJournal for MemoryJournal {
    fn resume(&self) -> Option<MultipartCheckpoint> {
        self.start.clone()
    }
    async fn record(&self, checkpoint: Option<MultipartCheckpoint>) -> Result<(), StorageError> {
        self.saved.lock().unwrap().push(checkpoint);
        Ok(())
    }
}

async fn put(
    store: &dyn FinalStore,
    container: &str,
    key: &str,
    source: &LocalObject,
) -> cin_storage::PutOutcome {
    let object = ObjectToStore {
        container,
        key,
        source,
        filename: "résumé final.pdf",
        mimetype: "application/pdf",
        acl: None,
    };
    store.put(&object, &NoJournal).await.unwrap()
}

/// The contract every final store keeps.
async fn conformance(store: &dyn FinalStore, container: &str) {
    let dir = tempfile::tempdir().unwrap();
    store.check().await.unwrap();

    // A small object, from two local segments.
    let small = random_bytes(100_000, 60);
    let source = local_object(dir.path(), &small, 60_000).await;
    let outcome = put(store, container, "dir/sub/small.bin", &source).await;
    assert_eq!(outcome.sha256, sha256_hex(&small));
    assert_eq!(outcome.size, small.len() as u64);
    assert_eq!(
        store
            .head(container, "dir/sub/small.bin")
            .await
            .unwrap()
            .unwrap()
            .size,
        small.len() as u64
    );
    assert_eq!(
        read(store, container, "dir/sub/small.bin", None).await,
        small
    );
    assert_eq!(
        read(
            store,
            container,
            "dir/sub/small.bin",
            Some((59_990, 60_010))
        )
        .await,
        &small[59_990..60_010]
    );

    // A large object: several multipart parts for S3, crossing local segment edges.
    let large = random_bytes(12 * MIB + 5, 61);
    let source = local_object(dir.path(), &large, 3 * MIB + 1).await;
    let outcome = put(store, container, "large.bin", &source).await;
    assert_eq!(outcome.sha256, sha256_hex(&large));
    assert_eq!(
        sha256_hex(&read(store, container, "large.bin", None).await),
        sha256_hex(&large)
    );
    let mid = 5 * MIB as u64;
    assert_eq!(
        read(store, container, "large.bin", Some((mid - 3, mid + 3))).await,
        &large[mid as usize - 3..mid as usize + 3]
    );

    // Replacing an object with a smaller one and back (locally, a pack record
    // and a file); sizes S3 takes in one PutObject.
    let sizes = [3_000, 2 * MIB + 5, 4_000];
    for (i, size) in sizes.into_iter().enumerate() {
        let bytes = random_bytes(size, 63 + i as u64);
        let source = local_object(dir.path(), &bytes, size).await;
        put(store, container, "switch.bin", &source).await;
        assert_eq!(
            sha256_hex(&read(store, container, "switch.bin", None).await),
            sha256_hex(&bytes),
            "{size} bytes replace the object"
        );
        let head = store.head(container, "switch.bin").await.unwrap().unwrap();
        assert_eq!(head.size, size as u64);
    }
    store.delete(container, "switch.bin").await.unwrap();
    assert!(store.head(container, "switch.bin").await.unwrap().is_none());

    // A put with a stale checkpoint (a multipart upload the store no longer knows) still succeeds.
    let journal = MemoryJournal {
        start: Some(MultipartCheckpoint {
            upload_id: "no-such-upload".into(),
            container: container.into(),
            key: "large.bin".into(),
            part_size: 5 * MIB as u64,
            parts: vec![],
        }),
        saved: Mutex::new(Vec::new()),
    };
    let replacement = random_bytes(11 * MIB, 62);
    let source = local_object(dir.path(), &replacement, 4 * MIB).await;
    let object = ObjectToStore {
        container,
        key: "large.bin",
        source: &source,
        filename: "large.bin",
        mimetype: "application/octet-stream",
        acl: None,
    };
    let outcome = store.put(&object, &journal).await.unwrap();
    assert_eq!(outcome.sha256, sha256_hex(&replacement));
    assert_eq!(
        sha256_hex(&read(store, container, "large.bin", None).await),
        sha256_hex(&replacement),
        "put replaces"
    );

    // Missing objects and deletes.
    assert!(store
        .head(container, "missing.bin")
        .await
        .unwrap()
        .is_none());
    assert!(matches!(
        store.get(container, "missing.bin", None).await,
        Err(FinalStoreError::NotFound { .. })
    ));
    store.delete(container, "dir/sub/small.bin").await.unwrap();
    assert!(store
        .head(container, "dir/sub/small.bin")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn local_directory_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDirStore::open(dir.path()).unwrap();
    conformance(&store, "default").await;
    // A small object named as the directory of a larger one (S3 allows it;
    // s3s-fs, itself a directory of files, does not).
    let sources = tempfile::tempdir().unwrap();
    let outer = random_bytes(3_000, 66);
    let inner = random_bytes(2 * MIB + 7, 67);
    let source = local_object(sources.path(), &inner, 2 * MIB + 7).await;
    put(&store, "default", "nest/inner.bin", &source).await;
    let source = local_object(sources.path(), &outer, 3_000).await;
    put(&store, "default", "nest", &source).await;
    assert_eq!(read(&store, "default", "nest", None).await, outer);
    let head = store.head("default", "nest").await.unwrap().unwrap();
    assert_eq!(head.size, 3_000);
    assert_eq!(
        sha256_hex(&read(&store, "default", "nest/inner.bin", None).await),
        sha256_hex(&inner)
    );
    // Names that would escape the root are refused.
    let source = local_object(dir.path(), b"x", 1).await;
    let object = ObjectToStore {
        container: "default",
        key: "../../escape",
        source: &source,
        filename: "x",
        mimetype: "text/plain",
        acl: None,
    };
    assert!(matches!(
        store.put(&object, &NoJournal).await,
        Err(FinalStoreError::Rejected(_))
    ));
}

#[tokio::test]
async fn s3_store_conforms() {
    s3_store_conforms_on(S3Backend::S3sFs).await;
}

#[tokio::test]
async fn s3_store_conforms_on_moto() {
    s3_store_conforms_on(S3Backend::Moto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conforms_on_a_seaweedfs_cluster() {
    let cluster = crate::seaweedfs::SeaweedCluster::start().await;
    cluster.create_bucket("conformance").await;
    let store = conformance_store(&cluster.endpoint).await;
    conformance(&store, "conformance").await;
}

/// An S3 store on bucket `conformance` at `endpoint`, with 5 MiB parts.
async fn conformance_store(endpoint: &str) -> S3Store {
    S3Store::connect(S3Settings {
        bucket: "conformance".into(),
        region: "us-east-1".into(),
        endpoint: endpoint.to_owned(),
        force_path_style: true,
        access_key_id: S3_ACCESS_KEY.into(),
        secret_access_key: S3_SECRET_KEY.into(),
        part_size: 5 * MIB as u64,
        concurrency: 2,
    })
    .await
}

async fn s3_store_conforms_on(backend: S3Backend) {
    let server = S3Server::start_backend(backend).await;
    server.create_bucket("conformance").await;
    let store = conformance_store(&server.endpoint).await;
    conformance(&store, "conformance").await;
    assert!(
        server.open_multipart_uploads().await.is_empty(),
        "no multipart upload is left open"
    );

    // Metadata travels with the object.
    let head = server
        .client()
        .await
        .head_object()
        .bucket("conformance")
        .key("large.bin")
        .send()
        .await
        .unwrap();
    let meta = head.metadata().unwrap();
    let expected = sha256_hex(&random_bytes(11 * MIB, 62));
    assert_eq!(meta.get("sha256"), Some(&expected));
    assert_eq!(
        meta.get("mimetype").map(String::as_str),
        Some("application/octet-stream")
    );
}

#[tokio::test]
async fn s3_store_reports_bad_credentials_and_missing_buckets() {
    let server = S3Server::start().await;
    let settings = S3Settings {
        bucket: "nope".into(),
        region: "us-east-1".into(),
        endpoint: server.endpoint.clone(),
        force_path_style: true,
        access_key_id: S3_ACCESS_KEY.into(),
        secret_access_key: S3_SECRET_KEY.into(),
        part_size: 5 * MIB as u64,
        concurrency: 1,
    };
    let missing = S3Store::connect(settings.clone()).await;
    assert!(matches!(
        missing.check().await,
        Err(FinalStoreError::Rejected(_))
    ));
    server.create_bucket("nope").await;
    let wrong_secret = S3Store::connect(S3Settings {
        secret_access_key: "wrong".into(),
        ..settings.clone()
    })
    .await;
    assert!(matches!(
        wrong_secret.check().await,
        Err(FinalStoreError::Rejected(_))
    ));
    let closed = S3Store::connect(S3Settings {
        endpoint: "http://127.0.0.1:9".into(),
        ..settings
    })
    .await;
    assert!(matches!(
        closed.check().await,
        Err(FinalStoreError::Unreachable(_))
    ));
}
