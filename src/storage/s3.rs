//! The S3-compatible backend: Qiniu Kodo, MinIO, AWS S3.

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectMeta, ObjectStore};
use crate::config::Config;
use crate::error::Result;

#[derive(Debug)]
pub struct S3Store {}

impl S3Store {
    pub async fn from_config(_config: &Config) -> Result<Self> {
        todo!("s3 store")
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, _key: &str, _bytes: Bytes, _meta: ObjectMeta) -> Result<()> {
        todo!()
    }
    async fn get(&self, _key: &str) -> Result<Option<Bytes>> {
        todo!()
    }
    async fn exists(&self, _key: &str) -> Result<bool> {
        todo!()
    }
    fn location(&self, _key: &str) -> String {
        todo!()
    }
    fn public_key(&self, _key: &str) -> String {
        todo!()
    }
    async fn signed_url(&self, _key: &str) -> Result<Option<String>> {
        todo!()
    }
}
