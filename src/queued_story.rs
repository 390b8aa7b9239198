//! A story too long for one invocation, run through the Lambda function's request queue.
//!
//! [`submit_story`] checks the story whole, as `generate` would before spending (a bad
//! story sends nothing), stores its plan beside its manifest and sends it in messages the
//! function reads as story batches. [`follow_story`] reads where the story stands from the
//! plan and the manifest — the view the storyboard page shows — once, or polling with
//! backoff until nothing is pending.

#[cfg(feature = "sqs")]
use std::time::SystemTime;
use std::time::{Duration, Instant};

#[cfg(feature = "sqs")]
use serde::Serialize;

use crate::config::Config;
use crate::deadline::Deadline;
use crate::error::{Result, Stage3Error};
#[cfg(feature = "sqs")]
use crate::queue::{self, RequestQueue, Unsent};
use crate::schema::validate_story_id;
#[cfg(feature = "sqs")]
use crate::schema::Submission;
#[cfg(feature = "sqs")]
use crate::service::Stage3Service;
use crate::storage;
#[cfg(feature = "sqs")]
use crate::story::StoryPlan;
use crate::story::{self, StoryProgress};

/// The first wait between polls, and again whenever the story moved.
const FIRST_POLL: Duration = Duration::from_secs(2);
/// The longest wait between polls of a story that does not move.
const LONGEST_POLL: Duration = Duration::from_secs(30);

/// Where and how a story is sent.
#[derive(Debug, Clone)]
pub struct SubmitOptions {
    /// The request queue's URL (the stack's `RequestQueueUrl` output).
    pub queue_url: String,
    /// The story's id: else the input's `story_id`, else a new one.
    pub story_id: Option<String>,
    /// Scenes per message, at most `STAGE3_MAX_BATCH`: 1 is the most parallel.
    pub scenes_per_message: usize,
}

/// What `stage3 submit` prints: the messages and scenes the queue took, and what it did not.
#[cfg(feature = "sqs")]
#[derive(Debug, Serialize)]
pub struct SubmitReport {
    pub story_id: String,
    pub queue_url: String,
    pub messages: usize,
    pub scenes: usize,
    pub plan_path: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unsent: Vec<Unsent>,
    /// The story's estimate, when its prices are known.
    #[serde(skip)]
    pub estimated_cost_usd: Option<f64>,
}

#[cfg(feature = "sqs")]
impl SubmitReport {
    /// The lines a person reads: the story's size and estimate, and how to send what was
    /// not sent.
    pub fn closing_lines(&self) -> Vec<String> {
        let estimate = self
            .estimated_cost_usd
            .map(|cost| format!(", estimated cost ${cost:.4}"))
            .unwrap_or_default();
        let mut lines = vec![format!(
            "story {}: {} scene(s) sent in {} message(s){estimate}; plan: {}",
            self.story_id, self.scenes, self.messages, self.plan_path
        )];
        if !self.unsent.is_empty() {
            let scenes: usize = self.unsent.iter().map(|u| u.scene_ids.len()).sum();
            lines.push(format!(
                "not sent: {} message(s), {scenes} scene(s); run the same command with \
                 --story-id {} to send them (scenes already drawn come from the cache)",
                self.unsent.len(),
                self.story_id
            ));
        }
        lines
    }
}

/// Checks `submission` whole, stores its plan (`stories/{id}/plan.json`) through the
/// configured store and sends it to the queue with `SendMessageBatch`. `Err` when it is
/// refused before anything is sent; messages the queue did not take are in the report.
#[cfg(feature = "sqs")]
pub async fn submit_story(
    config: Config,
    submission: Submission,
    options: SubmitOptions,
) -> Result<SubmitReport> {
    let per_message = options.scenes_per_message;
    if per_message == 0 || per_message > config.max_batch {
        return Err(Stage3Error::config(format!(
            "--scenes-per-message {per_message}: the function takes 1 to {} scenes a message \
             (STAGE3_MAX_BATCH)",
            config.max_batch
        )));
    }
    let story_id = match options
        .story_id
        .or_else(|| submission.story_id().map(str::to_string))
    {
        Some(id) => id,
        None => new_story_id(),
    };
    validate_story_id(&story_id)?;
    // What `generate` checks before it spends, against nobody who bills.
    let check = Stage3Service::for_checking(config.clone())
        .check(submission.clone())
        .await?;
    let requests = submission.into_requests();
    let messages = queue::story_messages(&story_id, &requests, per_message)?;
    let queue = RequestQueue::from_aws(&options.queue_url, &config.aws).await?;

    let store = storage::from_settings(&config.storage, &config.aws).await?;
    let plan = StoryPlan::new(
        &story_id,
        messages.iter().flat_map(|m| m.scene_ids.clone()).collect(),
        SystemTime::now(),
    );
    let plan_path = story::write_plan(store.as_ref(), &plan, Deadline::NONE).await?;
    let sent = queue.send_all(&messages, Deadline::NONE).await;
    Ok(SubmitReport {
        story_id,
        queue_url: options.queue_url,
        messages: sent.sent,
        scenes: sent.sent_scenes,
        plan_path,
        unsent: sent.unsent,
        estimated_cost_usd: check.plan.estimated_cost_usd,
    })
}

/// `story-YYYYMMDD-HHMMSS-xxxx`: sortable by time, unlikely to meet another.
#[cfg(feature = "sqs")]
fn new_story_id() -> String {
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let digits: String = now.chars().filter(char::is_ascii_digit).collect();
    let (date, time) = digits.split_at(digits.len().min(8));
    format!("story-{date}-{time}-{:04x}", fastrand::u16(..))
}

/// How long [`follow_story`] follows a story.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Read it once.
    Once,
    /// Poll with backoff until nothing is pending, or `timeout` passes.
    UntilSettled { timeout: Option<Duration> },
}

/// Where the story `story_id` stands in the configured store. While following, `moved` is
/// called each time the counts change. `invalid_request` when the store holds neither a
/// plan nor a manifest for it.
pub async fn follow_story(
    config: &Config,
    story_id: &str,
    follow: Follow,
    moved: &mut dyn FnMut(&StoryProgress),
) -> Result<StoryProgress> {
    validate_story_id(story_id)?;
    let store = storage::from_settings(&config.storage, &config.aws).await?;
    let started = Instant::now();
    let mut last = None;
    let mut delay = FIRST_POLL;
    loop {
        let progress = story::story_progress(store.as_ref(), story_id, Deadline::NONE)
            .await?
            .ok_or_else(|| {
                Stage3Error::invalid_request(format!(
                    "no story {story_id:?} in {}: no plan.json and no manifest.json",
                    store.location(&format!("stories/{story_id}/"))
                ))
            })?;
        let timeout = match follow {
            Follow::Once => return Ok(progress),
            Follow::UntilSettled { timeout } => timeout,
        };
        if progress.is_settled() || timeout.is_some_and(|t| started.elapsed() >= t) {
            return Ok(progress);
        }
        let counts = (progress.succeeded, progress.failed, progress.pending);
        if last != Some(counts) {
            delay = FIRST_POLL;
            moved(&progress);
            last = Some(counts);
        } else {
            delay = (delay * 2).min(LONGEST_POLL);
        }
        let wait = match timeout {
            Some(t) => delay.min(t.saturating_sub(started.elapsed())),
            None => delay,
        };
        tokio::time::sleep(wait).await;
    }
}
