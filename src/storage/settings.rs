//! What the stores are built from: read from the environment by [`crate::config`].

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::secret::Secret;

/// Where images and their result records are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    Fs,
    S3,
}

impl FromStr for StorageKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fs" => Ok(StorageKind::Fs),
            "s3" => Ok(StorageKind::S3),
            other => Err(format!("unknown storage {other:?}; expected fs or s3")),
        }
    }
}

/// Where images go: the backend, and what it is built from.
#[derive(Debug, Clone)]
pub struct StorageSettings {
    pub kind: StorageKind,
    /// The filesystem backend's root (`STAGE3_OUTPUT_DIR`, `--out`).
    pub output_dir: PathBuf,
    /// The S3 backend's settings; present when `kind` is [`StorageKind::S3`].
    pub s3: Option<S3Settings>,
}

/// What the S3 client is built from (`STAGE3_S3_*`).
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    pub endpoint: Option<String>,
    pub region: String,
    /// Prepended to every key; empty or ending in `/`.
    pub prefix: String,
    pub force_path_style: bool,
    pub presign_expiry: Duration,
    /// Keys for this bucket alone (`STAGE3_S3_ACCESS_KEY_ID`, `STAGE3_S3_SECRET_ACCESS_KEY`),
    /// used instead of the AWS credential chain. Needed on Lambda with Qiniu or MinIO: there
    /// the chain yields the function's AWS role, and Lambda reserves `AWS_ACCESS_KEY_ID`.
    pub credentials: Option<S3Credentials>,
}

/// A static access key pair for an S3-compatible service.
#[derive(Debug, Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
}
