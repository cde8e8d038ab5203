//! Signed part-upload URLs: `/multipart/upload` hands out a URL that names exactly
//! one chunk (upload, part, offset, size, MD5) and expires; the PUT handler accepts
//! only URLs this POP signed. Beside it, an upload grant allows any chunk of one
//! upload, so a client that has it sends each chunk in one request, not two.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone)]
pub struct UrlSigner {
    secret: Vec<u8>,
}

/// What a signature covers: the canonical string of a grant.
pub trait Signed {
    fn canonical(&self) -> String;
}

/// The chunk a signed URL allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkGrant {
    pub upload_id: String,
    pub part: u32,
    pub offset: u64,
    pub size: u64,
    /// Base64 MD5 the body must have, when the client declared one.
    pub md5: Option<String>,
    /// Base64 CRC32C the body must have, when the client declared one.
    pub crc32c: Option<String>,
    /// Unix seconds after which the URL is refused.
    pub expires: u64,
}

impl Signed for ChunkGrant {
    fn canonical(&self) -> String {
        let mut canonical = format!(
            "{}\n{}\n{}\n{}\n{}\n{}",
            self.upload_id,
            self.part,
            self.offset,
            self.size,
            self.md5.as_deref().unwrap_or(""),
            self.expires
        );
        // Appended only when present, so URLs signed without it stay valid.
        if let Some(crc32c) = &self.crc32c {
            canonical.push_str("\ncrc32c:");
            canonical.push_str(crc32c);
        }
        canonical
    }
}

/// Any chunk of one upload, until `expires`. Offsets and sizes are not signed:
/// every chunk is checked against the upload's declared size when it arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadGrant {
    pub upload_id: String,
    pub expires: u64,
}

impl UploadGrant {
    /// The query value that marks a chunk URL as signed by an upload grant.
    pub const SCOPE: &'static str = "upload";
}

impl Signed for UploadGrant {
    fn canonical(&self) -> String {
        // The scope leads, so no chunk grant's string can equal an upload grant's.
        format!("{}\n{}\n{}", Self::SCOPE, self.upload_id, self.expires)
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl UrlSigner {
    pub fn new(secret: Vec<u8>) -> Self {
        UrlSigner { secret }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length.
        HmacSha256::new_from_slice(&self.secret).unwrap_or_else(|_| unreachable!())
    }

    pub fn sign(&self, grant: &impl Signed) -> String {
        let mut mac = self.mac();
        mac.update(grant.canonical().as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// True when `signature` is this POP's signature of `grant` (compared in constant time).
    pub fn verify(&self, grant: &impl Signed, signature: &str) -> bool {
        let expected = self.sign(grant);
        expected.as_bytes().ct_eq(signature.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn altered_grants_fail() {
        let signer = UrlSigner::new(b"k".to_vec());
        let grant = ChunkGrant {
            upload_id: "u".into(),
            part: 1,
            offset: 0,
            size: 10,
            md5: None,
            crc32c: None,
            expires: 99,
        };
        let sig = signer.sign(&grant);
        assert!(signer.verify(&grant, &sig));
        let bigger = ChunkGrant {
            size: 11,
            ..grant.clone()
        };
        assert!(!signer.verify(&bigger, &sig));
        // A declared checksum is part of what is signed.
        let with_crc = ChunkGrant {
            crc32c: Some("AAAAAA==".into()),
            ..grant.clone()
        };
        let crc_sig = signer.sign(&with_crc);
        assert!(signer.verify(&with_crc, &crc_sig));
        assert!(!signer.verify(&grant, &crc_sig));
        let other_crc = ChunkGrant {
            crc32c: Some("AAAAAQ==".into()),
            ..grant.clone()
        };
        assert!(!signer.verify(&other_crc, &crc_sig));
        assert!(!UrlSigner::new(b"other".to_vec()).verify(&grant, &sig));
    }

    #[test]
    fn an_upload_grant_is_bound_to_its_upload_and_expiry() {
        let signer = UrlSigner::new(b"k".to_vec());
        let grant = UploadGrant {
            upload_id: "u".into(),
            expires: 99,
        };
        let sig = signer.sign(&grant);
        assert!(signer.verify(&grant, &sig));
        for altered in [
            UploadGrant {
                upload_id: "v".into(),
                ..grant.clone()
            },
            UploadGrant {
                expires: 100,
                ..grant.clone()
            },
        ] {
            assert!(!signer.verify(&altered, &sig));
        }
    }
}
