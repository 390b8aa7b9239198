//! Telling the rest of the pipeline what happened: completion events and the dead-letter
//! queue.
//!
//! A batch answer reaches only whoever asked for it. Stage 4 and dashboards want to hear
//! about every stored image without polling, so after a batch the CLI and the Lambda
//! function hand the answer to an [`EventPublisher`], which turns it into events
//! (docs/design.md §2 "Events"):
//!
//! | event | EventBridge `detail-type` | webhook `type` | data |
//! |---|---|---|---|
//! | a scene was stored | `Stage3 Scene Ready` | `scene.ready` | the `Stage3Output` |
//! | a scene failed | `Stage3 Scene Failed` | `scene.failed` | `{scene_id, error_type, message}` |
//! | a batch ended | `Stage3 Batch Done` | `batch.done` | `{summary, story_id?, manifest?, gallery?}` |
//!
//! and fans them out to every configured `EventSink`: EventBridge (`eventbridge`) and a
//! signed webhook (`webhook`). Events are a report, never part of the work: a sink that
//! cannot deliver retries a few times (`crate::retry::RetryPolicy::EVENTS` unless told
//! otherwise), then logs and counts what it lost, and a stored scene stays stored whatever
//! happens to its event.
//!
//! Publishing has one time budget, so a receiver that accepts connections and never answers
//! cannot hold the run: the Lambda function's is its invocation deadline, the CLI's is
//! `cli_budget` (`STAGE3_EVENTS_TIMEOUT_SECS`), spent by every sink and every retry
//! together.
//!
//! [`dead_letter`] is the other outlet: SQS messages that failed for good go straight to
//! the dead-letter queue instead of calling the provider again on every redelivery.

#[cfg(feature = "lambda")]
pub mod dead_letter;
mod eventbridge;
mod settings;
mod webhook;

pub use eventbridge::EventBridgeSink;
pub use settings::{EventSettings, WebhookSettings};
pub(crate) use webhook::WebhookSink;
// What a webhook receiver checks: the signature and timestamp headers, and the window.
pub use webhook::{REPLAY_WINDOW, SIGNATURE_HEADER, TIMESTAMP_HEADER};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::aws::AwsConfig;
use crate::deadline::Deadline;
use crate::error::{Result, Stage3Error};
use crate::schema::{BatchAnswer, BatchSummary, SceneFailure, Stage3Output};

/// The EventBridge `source` of every event (docs/design.md §2).
pub(crate) const EVENT_SOURCE: &str = "stage3";

/// The variable naming the CLI's time budget for a batch's events, in seconds.
pub(crate) const CLI_BUDGET_VARIABLE: &str = "STAGE3_EVENTS_TIMEOUT_SECS";
/// The CLI's budget when the variable is unset: a webhook's POST may take 10 s, so this
/// leaves room for a retry, yet a silent receiver costs a run half a minute, not the 80 s
/// that four attempts of each of two events in a row took without a budget.
pub(crate) const DEFAULT_CLI_BUDGET: Duration = Duration::from_secs(30);
/// The longest budget the variable may ask for.
const MAX_CLI_BUDGET_SECS: u64 = 3600;

/// The CLI's one time budget for publishing a batch's events, from
/// `STAGE3_EVENTS_TIMEOUT_SECS` (1 to 3600 seconds; blank is unset) read through `lookup`.
/// The Lambda function needs none: its invocation deadline bounds its events.
pub(crate) fn cli_budget(lookup: impl Fn(&str) -> Option<String>) -> Result<Duration> {
    let Some(raw) = lookup(CLI_BUDGET_VARIABLE).filter(|raw| !raw.trim().is_empty()) else {
        return Ok(DEFAULT_CLI_BUDGET);
    };
    match raw.trim().parse::<u64>() {
        Ok(secs) if (1..=MAX_CLI_BUDGET_SECS).contains(&secs) => Ok(Duration::from_secs(secs)),
        _ => Err(Stage3Error::config(format!(
            "{CLI_BUDGET_VARIABLE}: expected a number of seconds from 1 to \
             {MAX_CLI_BUDGET_SECS}, got {raw:?}"
        ))),
    }
}

/// What an event announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum EventKind {
    SceneReady,
    SceneFailed,
    BatchDone,
}

impl EventKind {
    /// The EventBridge `detail-type`.
    pub(crate) fn detail_type(self) -> &'static str {
        match self {
            EventKind::SceneReady => "Stage3 Scene Ready",
            EventKind::SceneFailed => "Stage3 Scene Failed",
            EventKind::BatchDone => "Stage3 Batch Done",
        }
    }

    /// The webhook body's `type`.
    pub(crate) fn webhook_type(self) -> &'static str {
        match self {
            EventKind::SceneReady => "scene.ready",
            EventKind::SceneFailed => "scene.failed",
            EventKind::BatchDone => "batch.done",
        }
    }
}

/// One event: its kind and its data, serialised once and shared by every sink.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Event {
    pub kind: EventKind,
    /// The JSON of the data: EventBridge's `detail`, the webhook body's `data`.
    pub data: String,
}

impl Event {
    fn new(kind: EventKind, data: &impl Serialize) -> Event {
        Event {
            kind,
            // Our data are plain structs with string keys: serialising them cannot fail.
            data: serde_json::to_string(data).expect("event data serialise to JSON"),
        }
    }

    pub(crate) fn scene_ready(output: &Stage3Output) -> Event {
        Event::new(EventKind::SceneReady, output)
    }

    pub(crate) fn scene_failed(failure: &SceneFailure) -> Event {
        Event::new(EventKind::SceneFailed, failure)
    }

    pub(crate) fn batch_done(summary: &BatchSummary, story: Option<&StoryRef>) -> Event {
        Event::new(EventKind::BatchDone, &BatchDone { summary, story })
    }
}

/// The story a batch illustrated, when its envelope named one (`"story_id"`), with where
/// its manifest and storyboard page were stored. Carried by `Stage3 Batch Done`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct StoryRef {
    pub story_id: String,
    /// `stories/{story_id}/manifest.json`: its URL, or its path on the filesystem store.
    #[serde(rename = "manifest", skip_serializing_if = "Option::is_none")]
    pub manifest_url: Option<String>,
    /// `stories/{story_id}/index.html`: its URL, or its path on the filesystem store.
    #[serde(rename = "gallery", skip_serializing_if = "Option::is_none")]
    pub gallery_url: Option<String>,
}

impl From<&crate::schema::StoryLinks> for StoryRef {
    fn from(links: &crate::schema::StoryLinks) -> Self {
        StoryRef {
            story_id: links.story_id.clone(),
            manifest_url: links.manifest_url.clone().or(links.manifest_path.clone()),
            gallery_url: links.gallery_url.clone().or(links.gallery_path.clone()),
        }
    }
}

/// The data of `Stage3 Batch Done`: `{summary, story_id?, manifest?, gallery?}`.
#[derive(Serialize)]
struct BatchDone<'a> {
    summary: &'a BatchSummary,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    story: Option<&'a StoryRef>,
}

/// The events of a finished batch, in the order they are published: one `Scene Ready` per
/// result, one `Scene Failed` per failure, then `Batch Done`.
pub(crate) fn batch_events(answer: &BatchAnswer, story: Option<&StoryRef>) -> Vec<Event> {
    let mut events = Vec::with_capacity(answer.results.len() + answer.failures.len() + 1);
    events.extend(answer.results.iter().map(Event::scene_ready));
    events.extend(answer.failures.iter().map(Event::scene_failed));
    events.push(Event::batch_done(&answer.summary, story));
    events
}

/// Somewhere events go. A sink makes its own retries and never fails: it answers how many
/// of the events it could not deliver, having logged why.
#[async_trait]
pub(crate) trait EventSink: Send + Sync + std::fmt::Debug {
    /// A short name for logs and reports: `eventbridge`, `webhook`.
    fn name(&self) -> &'static str;

    /// Delivers `events`, giving up on what is not delivered by `deadline`. Answers the
    /// number of events lost.
    async fn deliver(&self, events: &[Event], deadline: Deadline) -> usize;
}

/// What one publication did, summed over the sinks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EventReport {
    /// Events handed to the sinks (each counted once per sink).
    pub attempted: usize,
    /// Of those, delivered.
    pub delivered: usize,
    /// Of those, lost after every retry (logged).
    pub lost: usize,
}

/// Every configured sink, behind one call. With no sink configured it does nothing.
#[derive(Debug, Default, Clone)]
pub struct EventPublisher {
    sinks: Vec<Arc<dyn EventSink>>,
    /// Events lost since start-up, over every publication (a warm Lambda serves many).
    lost_total: Arc<AtomicU64>,
}

impl EventPublisher {
    /// A publisher over explicit sinks (and the tests' stand-ins).
    pub(crate) fn new(sinks: Vec<Arc<dyn EventSink>>) -> Self {
        EventPublisher {
            sinks,
            lost_total: Arc::default(),
        }
    }

    /// No sinks: publishing does nothing.
    #[cfg(test)]
    pub(crate) fn disabled() -> Self {
        EventPublisher::default()
    }

    /// The sinks `settings` names (`STAGE3_EVENT_BUS`, `STAGE3_WEBHOOK_URL`): their
    /// clients are built here, once, without any network call. The EventBridge client
    /// starts from `aws`, which is loaded only if a bus is named.
    pub(crate) async fn from_settings(settings: &EventSettings, aws: &AwsConfig) -> Result<Self> {
        let mut sinks: Vec<Arc<dyn EventSink>> = Vec::new();
        if let Some(bus) = &settings.event_bus {
            let sink = eventbridge::EventBridgeSink::from_aws(bus, aws).await;
            sinks.push(Arc::new(sink));
        }
        if let Some(webhook) = &settings.webhook {
            sinks.push(Arc::new(WebhookSink::new(webhook)?));
        }
        Ok(EventPublisher::new(sinks))
    }

    pub fn is_enabled(&self) -> bool {
        !self.sinks.is_empty()
    }

    /// Events lost since this publisher was built.
    pub(crate) fn lost_total(&self) -> u64 {
        self.lost_total.load(Ordering::Relaxed)
    }

    /// Publishes a finished batch: a `Scene Ready` per result, a `Scene Failed` per
    /// failure, one `Batch Done` with the summary and, when given, the story.
    pub(crate) async fn publish_batch(
        &self,
        answer: &BatchAnswer,
        story: Option<&StoryRef>,
        deadline: Deadline,
    ) -> EventReport {
        if !self.is_enabled() {
            return EventReport::default();
        }
        self.publish(&batch_events(answer, story), deadline).await
    }

    /// Hands `events` to every sink at once and waits for all of them (each bounded by
    /// its own timeouts and by `deadline`).
    pub(crate) async fn publish(&self, events: &[Event], deadline: Deadline) -> EventReport {
        if events.is_empty() || !self.is_enabled() {
            return EventReport::default();
        }
        let losses = futures::future::join_all(
            self.sinks
                .iter()
                .map(|sink| async move { (sink.name(), sink.deliver(events, deadline).await) }),
        )
        .await;
        let mut report = EventReport::default();
        for (sink, lost) in losses {
            report.attempted += events.len();
            report.delivered += events.len() - lost.min(events.len());
            report.lost += lost;
            if lost > 0 {
                tracing::warn!(sink, lost, events = events.len(), "events lost");
            }
        }
        self.lost_total
            .fetch_add(report.lost as u64, Ordering::Relaxed);
        tracing::info!(
            events = events.len(),
            delivered = report.delivered,
            lost = report.lost,
            lost_since_start = self.lost_total(),
            "events published"
        );
        report
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut with `…`.
#[cfg(feature = "lambda")]
pub(crate) fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorType, Stage3Error};
    use serde_json::{json, Value};

    fn answer() -> BatchAnswer {
        let mut answer = BatchAnswer::default();
        answer.failures.push(SceneFailure::new(
            "s2",
            &Stage3Error::invalid_request("image_prompt: blank"),
        ));
        answer.summarize();
        answer
    }

    #[test]
    fn a_batch_gives_one_event_per_scene_then_batch_done() {
        let events = batch_events(&answer(), None);
        let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::SceneFailed, EventKind::BatchDone]);
        let failed: Value = serde_json::from_str(&events[0].data).unwrap();
        assert_eq!(failed["scene_id"], "s2");
        assert_eq!(failed["error_type"], ErrorType::InvalidRequest.as_str());
        let done: Value = serde_json::from_str(&events[1].data).unwrap();
        assert_eq!(done["summary"]["failed"], 1);
        assert!(done.get("story_id").is_none(), "{done}");
    }

    #[test]
    fn batch_done_carries_the_story_when_given() {
        let story = StoryRef {
            story_id: "fox_tale".into(),
            manifest_url: Some("https://img.example.com/stories/fox_tale/manifest.json".into()),
            gallery_url: None,
        };
        let event = Event::batch_done(&answer().summary, Some(&story));
        let done: Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(
            done,
            json!({
                "summary": {"scenes": 1, "succeeded": 0, "failed": 1, "from_cache": 0, "cost_usd": 0.0},
                "story_id": "fox_tale",
                "manifest": "https://img.example.com/stories/fox_tale/manifest.json",
            })
        );
    }

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(EventKind::SceneReady.detail_type(), "Stage3 Scene Ready");
        assert_eq!(EventKind::SceneFailed.detail_type(), "Stage3 Scene Failed");
        assert_eq!(EventKind::BatchDone.detail_type(), "Stage3 Batch Done");
        assert_eq!(EventKind::SceneReady.webhook_type(), "scene.ready");
        assert_eq!(EventKind::SceneFailed.webhook_type(), "scene.failed");
        assert_eq!(EventKind::BatchDone.webhook_type(), "batch.done");
    }

    #[test]
    fn the_cli_budget_defaults_to_thirty_seconds_and_refuses_nonsense() {
        let budget = |value: Option<&str>| {
            cli_budget(|name| {
                assert_eq!(name, CLI_BUDGET_VARIABLE);
                value.map(str::to_string)
            })
        };
        assert_eq!(budget(None).unwrap(), Duration::from_secs(30));
        assert_eq!(budget(Some("  ")).unwrap(), DEFAULT_CLI_BUDGET);
        assert_eq!(budget(Some(" 5 ")).unwrap(), Duration::from_secs(5));
        for bad in ["0", "3601", "-1", "1.5", "soon"] {
            let err = budget(Some(bad)).unwrap_err();
            assert_eq!(err.error_type(), ErrorType::Config, "{bad}");
            assert!(err.to_string().contains(CLI_BUDGET_VARIABLE), "{err}");
        }
    }

    #[test]
    #[cfg(feature = "lambda")]
    fn shorten_cuts_on_a_character_boundary() {
        assert_eq!(shorten("abc", 10), "abc");
        let cut = shorten(&"é".repeat(300), 101);
        assert!(cut.len() <= 101, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }
}
