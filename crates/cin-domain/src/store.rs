use serde::{Deserialize, Serialize};

use crate::DomainError;

/// The `store` options of an upload, as Filestack defines them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreOptions {
    /// Storage kind, compared case-insensitively (`s3`, `local`...). Empty means the default profile.
    #[serde(default)]
    pub location: Option<String>,
    /// Bucket name in final storage.
    #[serde(default)]
    pub container: Option<String>,
    /// Object key, or a key prefix when it ends in `/`.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// `public` or `private`.
    #[serde(default)]
    pub access: Option<String>,
}

impl StoreOptions {
    /// Checks the options that become parts of storage names.
    pub fn validate(&self) -> Result<(), DomainError> {
        if let Some(path) = &self.path {
            validate_store_path(path)?;
        }
        if let Some(container) = &self.container {
            validate_container(container)?;
        }
        Ok(())
    }

    /// The object key in final storage: `path` when it names an object, otherwise
    /// `{path or ''}{handle}_{filename}`.
    pub fn object_key(&self, handle: &str, filename: &str) -> String {
        match self.path.as_deref() {
            Some(path) if !path.is_empty() && !path.ends_with('/') => path.to_owned(),
            prefix => format!("{}{}_{}", prefix.unwrap_or(""), handle, filename),
        }
    }
}

fn validate_store_path(path: &str) -> Result<(), DomainError> {
    let bad = || DomainError::InvalidStorePath(path.chars().take(256).collect());
    if path.is_empty() {
        return Ok(());
    }
    if path.len() > STORE_PATH_MAX || path.starts_with('/') || path.contains('\\') {
        return Err(bad());
    }
    if path.chars().any(char::is_control) {
        return Err(bad());
    }
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    if trimmed
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(bad());
    }
    Ok(())
}

/// What a store path may be, as a regular expression (for API descriptions):
/// relative, `/`-separated segments that are neither empty, `.` nor `..`, no
/// backslash or control character; at most [`STORE_PATH_MAX`] bytes.
pub const STORE_PATH_PATTERN: &str =
    r"^(?:(?!\.\.?(?:/|$))[^/\\\x00-\x1f\x7f-\x9f]+/)*(?:(?!\.\.?$)[^/\\\x00-\x1f\x7f-\x9f]+)?$";
pub const STORE_PATH_MAX: usize = 900;

/// What a container (bucket) name may be, as a regular expression: lowercase
/// letters, digits, `-` and `.`, not starting with `-` or `.`, no `..`; 3 to 63 long.
pub const CONTAINER_PATTERN: &str = r"^[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*\.?$";
pub const CONTAINER_LEN: std::ops::RangeInclusive<usize> = 3..=63;

/// Whether `name` is a container (bucket) name a store accepts.
pub fn validate_container(name: &str) -> Result<(), DomainError> {
    let ok = CONTAINER_LEN.contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(DomainError::InvalidContainer(
            name.chars().take(64).collect(),
        ))
    }
}

/// Turns a client-supplied filename into one that is safe to show and to use as the
/// last component of a key: no directories, no `..`, no control characters.
pub fn sanitize_filename(raw: &str) -> String {
    let base = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = base.chars().filter(|c| !c.is_control()).collect();
    let cleaned = cleaned.trim();
    if cleaned.is_empty() || cleaned == "." || cleaned == ".." {
        return "file".to_owned();
    }
    let mut out = String::new();
    for c in cleaned.chars() {
        if out.len() + c.len_utf8() > 255 {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_lose_directories() {
        assert_eq!(sanitize_filename("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_filename("..\\..\\boot.ini"), "boot.ini");
        assert_eq!(sanitize_filename(".."), "file");
        assert_eq!(sanitize_filename("a\u{0}b.txt"), "ab.txt");
        assert_eq!(sanitize_filename("photo.jpg"), "photo.jpg");
    }

    #[test]
    fn keys_follow_filestack_rules() {
        let mut o = StoreOptions::default();
        assert_eq!(o.object_key("H", "f.txt"), "H_f.txt");
        o.path = Some("dir/sub/".into());
        assert_eq!(o.object_key("H", "f.txt"), "dir/sub/H_f.txt");
        o.path = Some("exact/name.bin".into());
        assert_eq!(o.object_key("H", "f.txt"), "exact/name.bin");
    }

    #[test]
    fn store_paths_cannot_escape() {
        for bad in ["../x", "a/../b", "/abs", "a//b", "a\\b"] {
            let o = StoreOptions {
                path: Some(bad.into()),
                ..Default::default()
            };
            assert!(o.validate().is_err(), "{bad}");
        }
    }
}
