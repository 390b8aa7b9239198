//! The S3-compatible backend: Qiniu Kodo, MinIO, AWS S3 (and anything else speaking SigV4).
//!
//! One `aws-sdk-s3` client is built at start-up and shared by every scene. It is tuned for
//! servers that are not AWS (docs/design.md §3): checksums only when an operation requires them,
//! bodies uploaded from memory (never `aws-chunked`), path-style addressing by default.
//! Every SDK failure becomes a [`Stage3Error::Storage`] that says which operation, bucket
//! and key failed and whether retrying can help; credentials and presigned URLs never
//! appear in those messages.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use bytes::Bytes;

use super::S3Settings;
use super::{Created, Fetched, Listed, ObjectInfo, ObjectMeta, ObjectStore};
use crate::aws::AwsConfig;
use crate::error::{Result, Stage3Error};

/// Longest wait for a TCP (and TLS) connection to the endpoint.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a whole S3 call may take; a 2K PNG is a few MB, so this is generous.
pub(crate) const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Error codes that mean "the server is busy or hiccuped", whatever the HTTP status.
const TRANSIENT_CODES: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
];

/// An [`ObjectStore`] over one bucket and key prefix.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Empty or ending in `/`; prepended to every key.
    prefix: String,
    presign_expiry: Duration,
}

impl fmt::Debug for S3Store {
    // The client's configuration holds the credentials provider: leave it out entirely.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("presign_expiry", &self.presign_expiry)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Every S3 operation this store calls, with the IAM action AWS checks for it. A role needs
    /// the object actions on `arn:aws:s3:::bucket/prefix*` and `s3:ListBucket` on the bucket;
    /// HEAD is allowed by `s3:GetObject`, and so is reading a presigned GET URL, which is signed
    /// with the store's credentials. infra/template.yaml grants exactly these, and
    /// tests/infra.rs checks this list against the calls below and against the template.
    pub const IAM_ACTIONS: &[(&str, &str)] = &[
        ("PutObject", "s3:PutObject"),
        ("GetObject", "s3:GetObject"),
        ("HeadObject", "s3:GetObject"),
        // Releasing a claim (src/cache/mod.rs); merged story fragments are removed the same way.
        ("DeleteObject", "s3:DeleteObject"),
        ("ListObjectsV2", "s3:ListBucket"),
    ];

    /// Builds the client from `s3` on the shared AWS configuration, signing with the
    /// bucket's own keys when given, else with the standard AWS credential chain
    /// (environment variables, profile, the Lambda role). Call once, at start-up.
    pub(crate) async fn from_settings(s3: &S3Settings, aws: &AwsConfig) -> Self {
        let mut client_config = Self::configure(
            aws_sdk_s3::config::Builder::from(aws.sdk_config().await),
            s3,
        );
        if let Some(keys) = &s3.credentials {
            client_config = client_config.credentials_provider(Credentials::new(
                &keys.access_key_id,
                keys.secret_access_key.expose(),
                None,
                None,
                "stage3-s3-keys",
            ));
        }
        S3Store::new(
            Client::from_conf(client_config.build()),
            &s3.bucket,
            &s3.prefix,
            s3.presign_expiry,
        )
    }

    /// Applies the Stage 3 client settings to `builder`: region, endpoint, addressing,
    /// checksums, timeouts and retries. Public so tests and embedders that bring their own
    /// credentials get exactly the production behaviour.
    pub fn configure(
        builder: aws_sdk_s3::config::Builder,
        s3: &S3Settings,
    ) -> aws_sdk_s3::config::Builder {
        let mut builder = builder
            .region(Region::new(s3.region.clone()))
            .force_path_style(s3.force_path_style)
            // Since 1.69 the SDK adds CRC32 checksums and streams with `aws-chunked`
            // encoding; Qiniu, older MinIO and Ceph reject both (docs/design.md §3).
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            )
            // One attempt: the service already retries transient storage failures with
            // jittered backoff inside the Lambda deadline. SDK retries underneath would
            // multiply attempts (3 × 3) and could not see that deadline.
            .retry_config(RetryConfig::standard().with_max_attempts(1));
        if let Some(endpoint) = &s3.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        builder
    }

    /// A store over an existing client (tests, embedding). `prefix` should be empty or end
    /// in `/`, as [`S3Settings::prefix`] does.
    pub fn new(client: Client, bucket: &str, prefix: &str, presign_expiry: Duration) -> Self {
        S3Store {
            client,
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            presign_expiry,
        }
    }

    fn object_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Turns an SDK failure into a storage error naming the call, bucket and key.
    fn failure<E>(&self, operation: &str, object_key: &str, error: SdkError<E>) -> Stage3Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let what = format!("S3 {operation} of s3://{}/{object_key} failed", self.bucket);
        classify(&what, &error)
    }
}

/// Decides whether `error` is worth retrying and describes it for people.
fn classify<E>(what: &str, error: &SdkError<E>) -> Stage3Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match error {
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => {
            let status = error.raw_response().map(|r| r.status().as_u16());
            let code = error.code();
            let transient = match (status, code) {
                (_, Some(code)) if TRANSIENT_CODES.contains(&code) => true,
                (Some(status), _) => status >= 500 || status == 408 || status == 429,
                // An answer we could not even read as HTTP: a proxy or a half-closed socket.
                (None, _) => true,
            };
            let mut message = format!("{what}:");
            if let Some(status) = status {
                message.push_str(&format!(" HTTP {status}"));
            }
            match (code, error.message()) {
                (Some(code), Some(text)) => message.push_str(&format!(" {code}: {text}")),
                (Some(code), None) => message.push_str(&format!(" {code}")),
                (None, Some(text)) => message.push_str(&format!(" {text}")),
                // HEAD answers have no body, so nothing but the status is known.
                (None, None) if status.is_some() => message.push_str(" (no error details)"),
                (None, None) => message.push_str(&format!(" {}", causes(error))),
            }
            Stage3Error::storage(message, transient)
        }
        SdkError::TimeoutError(_) => Stage3Error::storage(
            format!("{what}: the endpoint did not answer within the operation timeout"),
            true,
        ),
        SdkError::DispatchFailure(failure) => {
            // A "user" dispatch failure is a malformed request or endpoint: it will fail the
            // same way next time. Connect refusals, resets and timeouts may not.
            let transient = !failure.is_user();
            Stage3Error::storage(
                format!("{what}: could not reach the endpoint: {}", causes(error)),
                transient,
            )
        }
        // The SDK could not build the request (a bad key, a missing region): our mistake.
        _ => Stage3Error::storage(format!("{what}: {}", causes(error)), false),
    }
}

/// The error and its sources, `outer: inner: root`, without the `Debug` dump the SDK's
/// `DisplayErrorContext` appends (it is noisy and repeats the endpoint's internals).
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        // Wrappers often repeat their source's text; say it once.
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// Whether a failed read means "no such object" rather than a real failure. Servers differ
/// (`NoSuchKey`, `NotFound`, a bare 404 on HEAD), but a missing bucket is always an error.
fn is_missing_object<E>(error: &SdkError<E>) -> bool
where
    E: ProvideErrorMetadata,
{
    if !matches!(error, SdkError::ServiceError(_)) {
        return false;
    }
    match error.code() {
        Some("NoSuchKey" | "NotFound") => true,
        Some("NoSuchBucket") => false,
        _ => error.raw_response().map(|r| r.status().as_u16()) == Some(404),
    }
}

/// Whether a conditional write was refused because the object exists (`412`), as opposed
/// to failing.
fn is_precondition_failed<E>(error: &SdkError<E>) -> bool
where
    E: ProvideErrorMetadata,
{
    matches!(error, SdkError::ServiceError(_))
        && (error.code() == Some("PreconditionFailed")
            || error.raw_response().map(|r| r.status().as_u16()) == Some(412))
}

impl S3Store {
    async fn put_object(
        &self,
        key: &str,
        bytes: Bytes,
        meta: ObjectMeta,
        only_if_new: bool,
    ) -> Result<Created> {
        let object_key = self.object_key(key);
        let size = bytes.len() as u64;
        // S3 replaces an object atomically on PutObject: readers see the old or the new one.
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .content_type(meta.content_type)
            .cache_control(meta.cache_control)
            .body(ByteStream::from(bytes));
        if only_if_new {
            request = request.if_none_match("*");
        }
        match request.send().await {
            Ok(output) => Ok(Created::Created(ObjectInfo {
                size,
                etag: output.e_tag().map(str::to_string),
            })),
            Err(e) if only_if_new && is_precondition_failed(&e) => Ok(Created::AlreadyExists),
            Err(e) => Err(self.failure("PutObject", &object_key, e)),
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, bytes: Bytes, meta: ObjectMeta) -> Result<ObjectInfo> {
        match self.put_object(key, bytes, meta, false).await? {
            Created::Created(info) => Ok(info),
            // An unconditional PUT has no condition to fail; a server saying so is confused.
            Created::AlreadyExists => Err(Stage3Error::storage(
                format!("S3 PutObject of {} reported a conflict", self.location(key)),
                true,
            )),
        }
    }

    async fn put_new(&self, key: &str, bytes: Bytes, meta: ObjectMeta) -> Result<Created> {
        self.put_object(key, bytes, meta, true).await
    }

    async fn get(&self, key: &str, limit: u64) -> Result<Fetched> {
        let object_key = self.object_key(key);
        let output = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .send()
            .await
        {
            Ok(output) => output,
            Err(e) if is_missing_object(&e) => return Ok(Fetched::Missing),
            Err(e) => return Err(self.failure("GetObject", &object_key, e)),
        };
        let location = self.location(key);
        let announced = output.content_length().map_or(0, |n| n.max(0) as u64);
        if announced > limit {
            // Dropping the body closes the connection without reading it.
            return Ok(Fetched::TooLarge { size: announced });
        }
        let body = output.body.collect().await.map_err(|e| {
            Stage3Error::storage(
                format!(
                    "S3 GetObject of {location} failed while reading the body: {}",
                    causes(&e)
                ),
                true,
            )
        })?;
        let bytes = body.into_bytes();
        if bytes.len() as u64 > limit {
            return Ok(Fetched::TooLarge {
                size: bytes.len() as u64,
            });
        }
        Ok(Fetched::Found(bytes))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let object_key = self.object_key(key);
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .send()
            .await
        {
            Ok(output) => Ok(Some(ObjectInfo {
                size: output.content_length().map_or(0, |n| n.max(0) as u64),
                etag: output.e_tag().map(str::to_string),
            })),
            Err(e) if is_missing_object(&e) => Ok(None),
            Err(e) => Err(self.failure("HeadObject", &object_key, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let object_key = self.object_key(key);
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_missing_object(&e) => Ok(()),
            Err(e) => Err(self.failure("DeleteObject", &object_key, e)),
        }
    }

    fn location(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, self.object_key(key))
    }

    fn public_key(&self, key: &str) -> String {
        self.object_key(key)
    }

    async fn list_objects(&self, prefix: &str) -> Result<Vec<Listed>> {
        let full_prefix = self.object_key(prefix);
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_continuation_token(token.clone())
                .send()
                .await
                .map_err(|e| self.failure("ListObjectsV2", &full_prefix, e))?;
            objects.extend(page.contents().iter().filter_map(|object| {
                let key = object.key()?;
                // A key ending in `/` is a "folder" marker some consoles create.
                if key.ends_with('/') {
                    return None;
                }
                Some(Listed {
                    key: key.strip_prefix(&self.prefix)?.to_string(),
                    // Every server we target sends `LastModified`; one that did not would
                    // make its objects the oldest, never the newest.
                    last_modified: object
                        .last_modified()
                        .and_then(|time| SystemTime::try_from(*time).ok())
                        .unwrap_or(UNIX_EPOCH),
                    size: object.size().map_or(0, |n| n.max(0) as u64),
                })
            }));
            let next = page.next_continuation_token().map(str::to_string);
            match next {
                Some(next) if page.is_truncated() == Some(true) => {
                    if token.as_ref() == Some(&next) {
                        return Err(Stage3Error::storage(
                            format!(
                                "S3 ListObjectsV2 of s3://{}/{full_prefix} returned the same \
                                 continuation token twice",
                                self.bucket
                            ),
                            false,
                        ));
                    }
                    token = Some(next);
                }
                _ => break,
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn presigned_url(&self, key: &str) -> Result<Option<String>> {
        let object_key = self.object_key(key);
        let presigning = PresigningConfig::expires_in(self.presign_expiry)
            .map_err(|e| Stage3Error::config(format!("STAGE3_S3_PRESIGN_SECS: {e}")))?;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .presigned(presigning)
            .await
            .map_err(|e| self.failure("presigning GetObject", &object_key, e))?;
        Ok(Some(request.uri().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn from_settings_keys_objects_under_the_bucket_and_prefix() {
        let store = S3Store::from_settings(
            &S3Settings {
                bucket: "pictures".into(),
                endpoint: Some("https://s3.cn-east-1.qiniucs.com".into()),
                region: "cn-east-1".into(),
                prefix: "stories/".into(),
                force_path_style: true,
                presign_expiry: Duration::from_secs(3600),
                credentials: None,
            },
            &AwsConfig::default(),
        )
        .await;

        assert_eq!(store.location("a.png"), "s3://pictures/stories/a.png");
        assert_eq!(store.public_key("a.png"), "stories/a.png");
        let client_config = store.client.config();
        assert_eq!(
            client_config.region().map(|r| r.as_ref()),
            Some("cn-east-1")
        );
        assert_eq!(
            client_config.request_checksum_calculation(),
            Some(&RequestChecksumCalculation::WhenRequired)
        );
        assert_eq!(
            client_config.response_checksum_validation(),
            Some(&ResponseChecksumValidation::WhenRequired)
        );
    }

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn causes_name_every_layer_once() {
        let chain = Layer(
            "dispatch failure",
            Some(Box::new(Layer(
                "connection refused",
                Some(Box::new(Layer("connection refused", None))),
            ))),
        );
        assert_eq!(causes(&chain), "dispatch failure: connection refused");
    }
}
