//! The AWS SDK configuration that every AWS client of the service starts from — S3,
//! EventBridge and SQS: the standard `AWS_*` variables, profile and credential chain.
//!
//! It is loaded once, when the first AWS client is built, and shared by the others: each
//! client used to load its own copy with near-identical code. A run that builds no AWS
//! client (filesystem storage, no events) never loads it. Loading makes no network call;
//! credentials are resolved on a client's first request.

use std::fmt;
use std::sync::Arc;

use aws_config::{BehaviorVersion, Region, SdkConfig};
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
    pub fn new(region: Option<String>) -> Self {
        AwsConfig {
            region,
            loaded: Arc::default(),
        }
    }

    /// `AWS_REGION` (or `AWS_DEFAULT_REGION`), when set.
    pub fn region(&self) -> Option<&str> {
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
    pub async fn sdk_config(&self) -> &SdkConfig {
        self.loaded
            .get_or_init(|| {
                aws_config::defaults(BehaviorVersion::latest())
                    .region(Region::new(self.region_for(None)))
                    .load()
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
