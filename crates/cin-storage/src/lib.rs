//! Where a POP keeps things: the metadata store (records of files, parts and
//! replication jobs), the local part files holding uploaded bytes, and the final
//! stores the replicator delivers complete files to.

pub mod background;
pub mod error;
pub mod final_store;
pub mod group_commit;
pub mod metadata;
#[cfg(test)]
mod metadata_conformance;
pub mod orphans;
pub mod parts;
pub mod segment_log;
mod sled_durability;

pub use error::{BodyError, ChunkError, StorageError};
pub use final_store::{
    FinalStore, FinalStoreError, LocalDirStore, NoJournal, ObjectInfo, ObjectToStore, PutJournal,
    PutOutcome, S3Settings, S3Store, PACKED_MAX, PACK_DIR,
};
pub use metadata::{JobChange, MetadataStore, SledMetadataStore};
pub use parts::{
    sync_dir, ByteStream, ChunkSize, ChunkWritten, DigestKind, LocalObject, OnBreak, PartStore,
    SegmentOwner, SegmentReader,
};
pub use segment_log::SegmentLog;
