//! The AWS SDK configuration that every AWS client of the service starts from — S3,
//! EventBridge and SQS: the standard `AWS_*` variables, profile and credential chain — and
//! the one SQS client set-up that the dead-letter queue and `stage3 submit` share.
//!
//! It is loaded once, when the first AWS client is built, and shared by the others: each
//! client used to load its own copy with near-identical code. A run that builds no AWS
//! client (filesystem storage, no events) never loads it. Loading makes no network call;
//! credentials are resolved on a client's first request.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
#[cfg(feature = "sqs")]
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_eventbridge::config::http::HttpResponse;
use aws_sdk_eventbridge::error::{ProvideErrorMetadata, SdkError};
use tokio::sync::OnceCell;

/// The region when neither the environment nor a client's target names one.
const DEFAULT_REGION: &str = "us-east-1";

/// The shared AWS configuration, loaded on first use. Clones share one load.
#[derive(Clone, Default)]
pub struct AwsConfig {
    /// `AWS_REGION` (or `AWS_DEFAULT_REGION`), when set.
    region: Option<String>,
    loaded: Arc<OnceCell<SdkConfig>>,
}

impl fmt::Debug for AwsConfig {
    // The loaded configuration holds the credentials provider: say only whether it is there.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsConfig")
            .field("region", &self.region)
            .field("loaded", &self.loaded.initialized())
            .finish()
    }
}

impl AwsConfig {
    /// `region` is `AWS_REGION` (or `AWS_DEFAULT_REGION`), when set.
    pub(crate) fn new(region: Option<String>) -> Self {
        AwsConfig {
            region,
            loaded: Arc::default(),
        }
    }

    /// `AWS_REGION` (or `AWS_DEFAULT_REGION`), when set.
    #[cfg(test)]
    pub(crate) fn region(&self) -> Option<&str> {
        self.region.as_deref()
    }

    /// The region a client of `target` (an EventBridge bus, an SQS queue URL) signs for:
    /// `AWS_REGION`, else the one in the bus ARN or queue URL (`arn:aws:events:REGION:…`,
    /// `https://sqs.REGION.amazonaws.com/…`), else `us-east-1`. Giving a client its region
    /// up front keeps its start-up free of the instance-metadata lookup the default
    /// region chain would make.
    pub(crate) fn region_for(&self, target: Option<&str>) -> String {
        if let Some(region) = &self.region {
            return region.clone();
        }
        let from_target = target.and_then(|target| {
            if let Some(arn) = target.strip_prefix("arn:") {
                arn.split(':').nth(2).map(str::to_string)
            } else {
                let host = target.split("://").nth(1)?.split(['/', ':']).next()?;
                let mut labels = host.split('.');
                (labels.next() == Some("sqs"))
                    .then(|| labels.next())?
                    .map(str::to_string)
            }
        });
        from_target
            .filter(|region| !region.is_empty())
            .unwrap_or_else(|| DEFAULT_REGION.to_string())
    }

    /// The shared configuration, loaded on the first call. Each client sets its own region
    /// on its builder; the one given here (`AWS_REGION`, else `us-east-1`) serves the
    /// credential chain, and spares the loader the region chain's instance-metadata lookup.
    pub(crate) async fn sdk_config(&self) -> &SdkConfig {
        self.loaded
            .get_or_init(|| {
                aws_config::defaults(BehaviorVersion::latest())
                    .region(Region::new(self.region_for(None)))
                    .load()
            })
            .await
    }
}

/// SQS calls connect within this...
#[cfg(feature = "sqs")]
pub(crate) const SQS_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// ...and finish within this, each attempt.
#[cfg(feature = "sqs")]
pub(crate) const SQS_OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// The set-up of every SQS client: short timeouts and the SDK's standard retries (3
/// attempts). A dead letter that fails costs only a redelivery, and a submission that
/// fails says what it could not send; neither should hang.
#[cfg(feature = "sqs")]
pub(crate) fn configure_sqs(builder: aws_sdk_sqs::config::Builder) -> aws_sdk_sqs::config::Builder {
    use aws_sdk_sqs::config::retry::RetryConfig;
    use aws_sdk_sqs::config::timeout::TimeoutConfig;
    builder
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(SQS_CONNECT_TIMEOUT)
                .operation_timeout(SQS_OPERATION_TIMEOUT)
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(3))
}

#[cfg(feature = "sqs")]
impl AwsConfig {
    /// An SQS client for `queue_url` on the shared configuration ([`configure_sqs`]), in the
    /// region [`AwsConfig::region_for`] chooses. The endpoint comes from the standard
    /// `AWS_ENDPOINT_URL_SQS` / `AWS_ENDPOINT_URL`. Makes no network call.
    pub(crate) async fn sqs_client(&self, queue_url: &str) -> aws_sdk_sqs::Client {
        let config = configure_sqs(aws_sdk_sqs::config::Builder::from(self.sdk_config().await))
            .region(aws_sdk_sqs::config::Region::new(
                self.region_for(Some(queue_url)),
            ));
        aws_sdk_sqs::Client::from_conf(config.build())
    }
}

/// Whether an AWS error code names a failure that may pass if the call (or entry) is made
/// again: throttling, an internal error, the service unavailable.
pub(crate) fn retryable_code(code: &str) -> bool {
    code.contains("Throttl") || code.starts_with("Internal") || code == "ServiceUnavailable"
}

/// Whether a failed AWS call may succeed if made again: transport failures, timeouts,
/// 5xx and [`retryable_code`]s. A missing bus or queue, a refused permission or bad
/// credentials will not.
pub(crate) fn is_transient<E: ProvideErrorMetadata>(error: &SdkError<E, HttpResponse>) -> bool {
    match error {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(service) => {
            service.raw().status().as_u16() >= 500
                || retryable_code(service.err().code().unwrap_or_default())
        }
        _ => false,
    }
}

/// Splits entries of the given sizes into consecutive calls of at most `max_entries`
/// entries and `max_bytes` bytes, in order — the limits of AWS's batch calls (EventBridge
/// `PutEvents`, SQS `SendMessageBatch`: 10 entries, 256 KiB). Every size must be at most
/// `max_bytes`.
pub(crate) fn plan_batches(
    sizes: &[usize],
    max_entries: usize,
    max_bytes: usize,
) -> Vec<Range<usize>> {
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (index, size) in sizes.iter().enumerate() {
        if index > start && (index - start == max_entries || bytes + size > max_bytes) {
            batches.push(start..index);
            (start, bytes) = (index, 0);
        }
        bytes += size;
    }
    if start < sizes.len() {
        batches.push(start..sizes.len());
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_order_and_both_limits() {
        assert_eq!(plan_batches(&[1; 25], 10, 100), [0..10, 10..20, 20..25]);
        assert_eq!(plan_batches(&[40, 40, 40, 1], 10, 100), [0..2, 2..4]);
        assert_eq!(plan_batches(&[100, 1, 100], 10, 100), [0..1, 1..2, 2..3]);
        assert!(plan_batches(&[], 10, 100).is_empty());
    }

    #[test]
    fn a_client_signs_for_the_environment_region_else_its_target_region() {
        let unset = AwsConfig::new(None);
        assert_eq!(
            unset.region_for(Some(
                "arn:aws:events:eu-west-1:123456789012:event-bus/stage3"
            )),
            "eu-west-1"
        );
        assert_eq!(
            unset.region_for(Some(
                "https://sqs.ap-southeast-1.amazonaws.com/123456789012/dlq"
            )),
            "ap-southeast-1"
        );
        assert_eq!(unset.region_for(Some("stage3-bus")), "us-east-1");
        assert_eq!(
            unset.region_for(Some("http://127.0.0.1:5000/123456789012/dlq")),
            "us-east-1"
        );
        let set = AwsConfig::new(Some("cn-north-1".into()));
        assert_eq!(
            set.region_for(Some(
                "arn:aws:events:eu-west-1:123456789012:event-bus/stage3"
            )),
            "cn-north-1"
        );
    }

    #[tokio::test]
    async fn clones_share_one_load() {
        let aws = AwsConfig::new(Some("eu-west-1".into()));
        let clone = aws.clone();
        assert!(!format!("{aws:?}").contains("loaded: true"));
        let first: *const SdkConfig = aws.sdk_config().await;
        let second: *const SdkConfig = clone.sdk_config().await;
        assert_eq!(first, second);
        assert!(format!("{clone:?}").contains("loaded: true"));
    }
}
