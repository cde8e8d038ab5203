//! The vocabulary of a CIN edge POP: identifiers, the file status machine, store
//! options and the records kept about uploads. Nothing here does I/O, so the rules
//! can be tested in isolation and shared by the HTTP layer and the storage layer.

pub mod error;
pub mod ids;
pub mod mime;
pub mod ranges;
pub mod record;
pub mod status;
pub mod store;

pub use error::DomainError;
pub use ids::{Handle, PartNumber, PopId, UploadId};
pub use mime::mimetype_for_filename;
pub use ranges::RangeSet;
pub use record::{
    CompletedPart, FileRecord, MultipartCheckpoint, PartRecord, ReplicationJob, Segment, TusConcat,
    TusState, UploadMode, WebhookDelivery,
};
pub use status::{FileStatus, Transition};
pub use store::{sanitize_filename, StoreOptions};
