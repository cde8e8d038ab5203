use std::fmt;

use rand::distributions::Alphanumeric;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::DomainError;

const HANDLE_LEN: usize = 20;
const UPLOAD_ID_LEN: usize = 32;
/// Handles and upload ids begin with the id of the POP that minted them.
pub const POP_ID_LEN: usize = 2;

fn random_alphanumeric(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// The regular expression `is_alphanumeric_of_len` accepts (for API descriptions).
fn alphanumeric_pattern(len: usize) -> String {
    format!("^[A-Za-z0-9]{{{len}}}$")
}

fn is_alphanumeric_of_len(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The short id of a POP in a network of POPs: two characters of `[A-Za-z0-9]`.
/// Every handle and upload id a POP mints begins with it, so any POP can tell
/// where a file was uploaded, and where its upload goes on, from its name alone.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PopId(String);

impl PopId {
    pub fn parse(s: &str) -> Result<Self, DomainError> {
        if is_alphanumeric_of_len(s, POP_ID_LEN) {
            Ok(PopId(s.to_owned()))
        } else {
            Err(DomainError::InvalidPopId(s.chars().take(64).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The POP id at the start of a minted name (whose form was checked).
    fn prefix_of(name: &str) -> PopId {
        PopId(name[..POP_ID_LEN].to_owned())
    }
}

impl TryFrom<String> for PopId {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        PopId::parse(&s)
    }
}

impl From<PopId> for String {
    fn from(p: PopId) -> String {
        p.0
    }
}

impl fmt::Display for PopId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The public name of a file: the last path segment of its filelink. 20
/// characters of `[A-Za-z0-9]`, as Filestack's SDKs expect: the minting POP's
/// id, then 18 random ones (about 107 bits).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Handle(String);

impl Handle {
    /// A new handle minted by `pop`.
    pub fn mint(pop: &PopId) -> Self {
        Handle(format!(
            "{pop}{}",
            random_alphanumeric(HANDLE_LEN - POP_ID_LEN)
        ))
    }

    /// A handle of a random POP (for tests).
    pub fn generate() -> Self {
        Handle(random_alphanumeric(HANDLE_LEN))
    }

    /// The POP that minted this handle.
    pub fn pop(&self) -> PopId {
        PopId::prefix_of(&self.0)
    }

    /// What [`Handle::parse`] accepts, as a regular expression.
    pub fn pattern() -> String {
        alphanumeric_pattern(HANDLE_LEN)
    }

    pub fn parse(s: &str) -> Result<Self, DomainError> {
        if is_alphanumeric_of_len(s, HANDLE_LEN) {
            Ok(Handle(s.to_owned()))
        } else {
            Err(DomainError::InvalidHandle(s.chars().take(64).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Handle {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Handle::parse(&s)
    }
}

impl From<Handle> for String {
    fn from(h: Handle) -> String {
        h.0
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The private name of an upload session, known only to the uploading client.
/// It also names the directory holding the upload's part files, so it is strictly validated.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UploadId(String);

impl UploadId {
    /// A new upload id minted by `pop`: its id, then 30 random characters.
    pub fn mint(pop: &PopId) -> Self {
        UploadId(format!(
            "{pop}{}",
            random_alphanumeric(UPLOAD_ID_LEN - POP_ID_LEN)
        ))
    }

    /// An upload id of a random POP (for tests).
    pub fn generate() -> Self {
        UploadId(random_alphanumeric(UPLOAD_ID_LEN))
    }

    /// The POP that minted this upload id: the one that holds the upload.
    pub fn pop(&self) -> PopId {
        PopId::prefix_of(&self.0)
    }

    /// What [`UploadId::parse`] accepts, as a regular expression.
    pub fn pattern() -> String {
        alphanumeric_pattern(UPLOAD_ID_LEN)
    }

    pub fn parse(s: &str) -> Result<Self, DomainError> {
        if is_alphanumeric_of_len(s, UPLOAD_ID_LEN) {
            Ok(UploadId(s.to_owned()))
        } else {
            Err(DomainError::InvalidUploadId(s.chars().take(64).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UploadId {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        UploadId::parse(&s)
    }
}

impl From<UploadId> for String {
    fn from(u: UploadId) -> String {
        u.0
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A 1-based part number, at most [`PartNumber::MAX`] as in S3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PartNumber(u32);

impl PartNumber {
    pub const MAX: u32 = 10_000;

    pub fn new(n: i64) -> Result<Self, DomainError> {
        if (1..=i64::from(Self::MAX)).contains(&n) {
            Ok(PartNumber(n as u32))
        } else {
            Err(DomainError::PartOutOfRange {
                got: n,
                max: Self::MAX,
            })
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for PartNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_handles_parse_back() {
        let h = Handle::generate();
        assert_eq!(h.as_str().len(), 20);
        assert_eq!(Handle::parse(h.as_str()).unwrap(), h);
    }

    #[test]
    fn handles_reject_path_tricks() {
        for bad in [
            "",
            "../../../etc/passwd",
            "aaaaaaaaaaaaaaaaaaa/",
            "aaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(Handle::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn minted_names_carry_their_pop_and_keep_their_form() {
        let pop = PopId::parse("A7").unwrap();
        let handle = Handle::mint(&pop);
        assert_eq!(handle.as_str().len(), 20);
        assert_eq!(Handle::parse(handle.as_str()).unwrap(), handle);
        assert_eq!(handle.pop(), pop);
        assert_ne!(Handle::mint(&pop), handle, "the rest is random");
        let upload = UploadId::mint(&pop);
        assert_eq!(UploadId::parse(upload.as_str()).unwrap(), upload);
        assert_eq!(upload.pop(), pop);
        assert_eq!(
            Handle::parse("zz345678901234567890")
                .unwrap()
                .pop()
                .as_str(),
            "zz"
        );
    }

    #[test]
    fn pop_ids_are_two_alphanumerics() {
        for good in ["00", "eu", "Z9"] {
            assert_eq!(PopId::parse(good).unwrap().as_str(), good);
        }
        for bad in ["", "a", "abc", "a-", "é1", "local"] {
            assert!(PopId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn part_numbers_are_bounded() {
        assert!(PartNumber::new(0).is_err());
        assert!(PartNumber::new(10_001).is_err());
        assert_eq!(PartNumber::new(1).unwrap().get(), 1);
    }
}
