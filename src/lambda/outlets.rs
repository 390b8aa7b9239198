//! Where an invocation reports besides its answer: events for its outcomes, the
//! dead-letter queue for SQS messages that failed for good, and its metric lines — built
//! when the first invocation needs them, not during init.

use crate::aws::AwsConfig;
use crate::error::Result;
use crate::events::dead_letter::DeadLetterQueue;
use crate::events::{EventPublisher, EventSettings};
use crate::metrics::{MetricsFormat, MetricsSink};

/// Where an invocation reports besides its answer: events for its outcomes
/// ([`EventPublisher`]), the dead-letter queue for SQS messages that failed for good, and
/// its metric lines. The default has none of them, which is how the function behaved
/// before any existed; `stage3-lambda` writes its metrics to stdout
/// ([`LazyOutlets::with_metrics`]).
#[derive(Debug, Default, Clone)]
pub struct Outlets {
    pub events: EventPublisher,
    pub dead_letter: Option<DeadLetterQueue>,
    pub metrics: MetricsSink,
}

/// Where the function's metric lines go, given `STAGE3_METRICS`: stdout, which CloudWatch
/// Logs reads, unless it says `off`.
pub fn metrics_sink(format: Option<MetricsFormat>) -> MetricsSink {
    match format {
        Some(MetricsFormat::Off) => MetricsSink::Off,
        Some(MetricsFormat::Emf) | None => MetricsSink::Stdout,
    }
}

impl Outlets {
    /// Builds what `settings` names (clients only, no network call): once, at start-up.
    /// The AWS clients start from `aws`, loaded once for all of them.
    pub(crate) async fn from_settings(settings: &EventSettings, aws: &AwsConfig) -> Result<Self> {
        let dead_letter = match &settings.dead_letter_queue_url {
            Some(url) => Some(DeadLetterQueue::from_aws(url, aws).await),
            None => None,
        };
        Ok(Outlets {
            events: EventPublisher::from_settings(settings, aws).await?,
            dead_letter,
            metrics: MetricsSink::Off,
        })
    }
}

/// The [`Outlets`], built when the first invocation needs them rather than at start-up:
/// the init phase then loads no AWS configuration (which reads the profile files) and
/// builds no EventBridge, SQS or webhook client. The settings were checked when the
/// configuration was read, so building cannot fail on them later.
#[derive(Debug)]
pub struct LazyOutlets {
    settings: EventSettings,
    aws: AwsConfig,
    metrics: MetricsSink,
    built: tokio::sync::OnceCell<Outlets>,
}

impl LazyOutlets {
    pub fn new(settings: EventSettings, aws: AwsConfig) -> Self {
        LazyOutlets {
            settings,
            aws,
            metrics: MetricsSink::Off,
            built: tokio::sync::OnceCell::new(),
        }
    }

    /// Metric lines go to `metrics` (which needs no client: writing one is free).
    pub fn with_metrics(mut self, metrics: MetricsSink) -> Self {
        self.metrics = metrics;
        self
    }

    /// Whether the first invocation has built them yet.
    #[cfg(test)]
    pub(crate) fn is_built(&self) -> bool {
        self.built.initialized()
    }

    /// The outlets, built on the first call and shared by every later one.
    pub(crate) async fn get(&self) -> Result<&Outlets> {
        self.built
            .get_or_try_init(|| async {
                let mut outlets = Outlets::from_settings(&self.settings, &self.aws).await?;
                outlets.metrics = self.metrics.clone();
                Ok(outlets)
            })
            .await
    }
}
