//! Public URLs of stored objects: which URL an answer gives for a key.
//!
//! The store says where an object lives; this module decides how readers reach it:
//!
//! - a CDN origin (`STAGE3_PUBLIC_BASE_URL`): `base + / + key`, optionally signed with Qiniu's
//!   timestamp anti-leech scheme (`STAGE3_CDN_SIGN=qiniu`) so the URL expires;
//! - otherwise whatever the store offers without credentials (an S3 presigned GET), or none.
//!
//! URLs are computed when an answer is given, never stored: a record on disk must not carry
//! a signature that expires (or leaks the right to read) long after it was written.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use md5::{Digest, Md5};

use crate::error::Result;
use crate::secret::Secret;
use crate::storage::ObjectStore;

/// How answers point at stored objects.
#[derive(Debug, Clone)]
pub enum UrlPolicy {
    /// `base + / + key` on a CDN, signed when the domain has anti-leech on.
    Cdn {
        /// Origin and optional path, without a trailing `/`.
        base: String,
        signer: Option<QiniuSigner>,
    },
    /// No CDN: the store's own credential-free URL (a presigned GET on S3), if it has one.
    Store,
}

impl UrlPolicy {
    /// The URL for `key` as readers should use it now.
    pub(crate) async fn url(&self, store: &dyn ObjectStore, key: &str) -> Result<Option<String>> {
        match self {
            UrlPolicy::Cdn { base, signer } => {
                let url = format!("{base}/{}", encode_path(&store.public_key(key)));
                Ok(Some(match signer {
                    Some(signer) => signer.sign_for(&url, SystemTime::now()),
                    None => url,
                }))
            }
            UrlPolicy::Store => store.presigned_url(key).await,
        }
    }
}

/// Qiniu CDN timestamp anti-leech (docs/design.md §3): `T` = expiry as lower-case hex Unix
/// seconds, `sign = md5(key + url_encode(path) + T)`, appended as `sign=…&t=…`.
#[derive(Clone)]
pub struct QiniuSigner {
    key: Secret,
    ttl: Duration,
}

impl std::fmt::Debug for QiniuSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QiniuSigner")
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl QiniuSigner {
    pub(crate) fn new(key: Secret, ttl: Duration) -> Self {
        QiniuSigner { key, ttl }
    }

    /// `url` signed to expire `ttl` after `now`.
    pub(crate) fn sign_for(&self, url: &str, now: SystemTime) -> String {
        let expires = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(self.ttl)
            .as_secs();
        self.sign(url, expires)
    }

    /// `url` (whose path is already percent-encoded) signed to expire at `expires` (Unix
    /// seconds). An existing query string is kept; `sign` and `t` come last, sign first.
    pub(crate) fn sign(&self, url: &str, expires: u64) -> String {
        let t = format!("{expires:x}");
        let path = url_path(url);
        let digest = Md5::digest(format!("{}{path}{t}", self.key.expose()).as_bytes());
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}sign={}&t={t}", hex::encode(digest))
    }
}

/// The path part of an absolute URL: after the authority, before any query or fragment.
fn url_path(url: &str) -> &str {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path_start = after_scheme.find('/').unwrap_or(after_scheme.len());
    let path = &after_scheme[path_start..];
    let end = path.find(['?', '#']).unwrap_or(path.len());
    &path[..end]
}

/// Percent-encodes a key for a URL path: RFC 3986 unreserved characters and `/` stay, every
/// other byte of the UTF-8 text becomes `%XX` (what Qiniu's `url_encode` does).
pub(crate) fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Qiniu CDN timestamp anti-leech: every URL is signed with `key` and expires after `ttl`.
#[derive(Debug, Clone)]
pub(crate) struct CdnSigning {
    pub key: Secret,
    pub ttl: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> QiniuSigner {
        QiniuSigner::new(Secret::new("12345678"), Duration::from_secs(3600))
    }

    // Qiniu's documented example: key 12345678, expiry 2015-08-01 00:00 Beijing time
    // (1438358400 = 0x55bb9b80). The expected signs were computed independently of this code,
    // with Python's hashlib: md5(b"12345678/DIR1/dir2/vodfile.mp455bb9b80") and the same for
    // the percent-encoded Chinese path; both equal the values in Qiniu's documentation.
    #[test]
    fn the_documented_example_signs_to_the_documented_url() {
        assert_eq!(
            signer().sign(
                "http://xxx.yyy.com/DIR1/dir2/vodfile.mp4?v=1.1",
                1_438_358_400
            ),
            "http://xxx.yyy.com/DIR1/dir2/vodfile.mp4?v=1.1\
             &sign=19eb212771e87cc3d478b9f32d6c7bf9&t=55bb9b80"
        );
        let path = encode_path("/DIR1/中文/vodfile.mp4");
        assert_eq!(path, "/DIR1/%E4%B8%AD%E6%96%87/vodfile.mp4");
        assert_eq!(
            signer().sign(&format!("http://xxx.yyy.com{path}?v=1.2"), 1_438_358_400),
            format!(
                "http://xxx.yyy.com{path}?v=1.2&sign=6356bca0d2aecf7211003e468861f5ea&t=55bb9b80"
            )
        );
    }

    #[test]
    fn a_url_without_a_query_gets_one_and_expires_ttl_from_now() {
        let now = UNIX_EPOCH + Duration::from_secs(1_438_358_400 - 3600);
        let url = signer().sign_for("https://img.example.com/stories/a.png", now);
        assert!(url.starts_with("https://img.example.com/stories/a.png?sign="));
        assert!(url.ends_with("&t=55bb9b80"), "{url}");
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let debug = format!("{:?}", signer());
        assert!(!debug.contains("12345678"), "{debug}");
    }

    #[test]
    fn paths_are_taken_without_host_or_query() {
        assert_eq!(url_path("https://h.example.com/a/b.png?x=1#f"), "/a/b.png");
        assert_eq!(url_path("https://h.example.com"), "");
        assert_eq!(url_path("https://h.example.com:8443/a"), "/a");
    }
}
