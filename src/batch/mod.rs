//! One batch, start to finish: the path both shells take.
//!
//! [`Stage3Service::run`] prepares a submission, checks and plans it (a scene its model
//! cannot serve, or an estimate over the budget, refuses it whole before anything is
//! spent), runs its scenes under the caller's stop signal and deadline, publishes the
//! story when it names one, sends its events and answers. The CLI adds argument parsing,
//! a progress printer and a Ctrl-C hook; the Lambda adapter adds event shapes.
//!
//! [`Stage3Service::run_one`] is a single request's path (a `Stage3Output` or an error);
//! [`Stage3Service::run_queued`] runs several submissions as one batch — an SQS
//! invocation's records — and hands back each one's outcomes for the queue's bookkeeping.

use std::collections::HashSet;
use std::sync::Arc;

use crate::batch_stop::BatchStop;
use crate::cast::{self, CastGroup};
use crate::config::Config;
use crate::deadline::Deadline;
use crate::error::{Result, Stage3Error};
use crate::events::{EventPublisher, EventReport, StoryRef};
use crate::metrics::MetricsSink;
use crate::provider::Providers;
use crate::schema::{BatchAnswer, Cast, Stage3Output, Submission};
use crate::service::{BatchPlan, PreparedScene, RunOptions, SceneOrder, Stage3Service};
use crate::storage::MemoryStore;
use crate::story::{self, StoryScene};

#[cfg(feature = "lambda")]
mod queued;
#[cfg(feature = "lambda")]
pub(crate) use queued::QueueMessage;

/// How a batch runs beyond its scenes: the scenes' own [`RunOptions`] (stop signal,
/// deadline, force), where its events go, and when the story and the events must be done.
#[derive(Debug, Clone, Default)]
pub struct BatchOptions {
    pub run: RunOptions,
    /// Where the batch's events go; the default publishes none.
    pub events: EventPublisher,
    /// Where the batch's metric lines go; the default writes none.
    pub metrics: MetricsSink,
    /// When the story's manifest and page must be written by.
    pub story_deadline: Deadline,
    /// When the events must be delivered by: a receiver that never answers costs the
    /// batch this long at most.
    pub events_deadline: Deadline,
}

impl BatchOptions {
    /// A run from the command line: stopped by `stop` (Ctrl-C), its events sent where the
    /// configuration says within the CLI's one budget (`STAGE3_EVENTS_TIMEOUT_SECS`) — a
    /// receiver that never answers costs the run this long at most, as the invocation
    /// deadline bounds the Lambda function. Its metric lines go to stderr when
    /// `STAGE3_METRICS=emf` (stdout is the answer).
    pub async fn for_command_line(config: &Config, stop: BatchStop) -> Result<Self> {
        Ok(BatchOptions {
            run: RunOptions {
                stop: Some(stop),
                ..RunOptions::default()
            },
            events: EventPublisher::from_settings(&config.events, &config.aws).await?,
            events_deadline: Deadline::after(config.events.cli_budget),
            metrics: MetricsSink::for_command_line(config.metrics),
            ..BatchOptions::default()
        })
    }
}

/// What a batch reports as it goes: the CLI's progress printer. `()` reports nothing.
pub trait BatchProgress: Sync {
    /// The batch passed its checks and `scenes` scenes start.
    fn started(&self, _scenes: usize) {}
    /// A scene finished: stored (`from_cache` when served from the store) or failed.
    fn scene_done(
        &self,
        _scene_id: &str,
        _outcome: std::result::Result<&Stage3Output, &Stage3Error>,
    ) {
    }
}

impl BatchProgress for () {}

/// What a batch did: its answer, and how its events fared.
#[derive(Debug)]
pub struct BatchRun {
    pub answer: BatchAnswer,
    pub events: EventReport,
}

/// What `stage3 validate` learns of a submission without generating anything.
#[derive(Debug)]
pub struct SubmissionCheck {
    pub scenes: usize,
    pub plan: BatchPlan,
}

impl std::fmt::Display for SubmissionCheck {
    /// `valid: N scene(s)` and the estimate, or why there is none.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "valid: {} scene(s)", self.scenes)?;
        match self.plan.estimated_cost_usd {
            Some(cost) => write!(f, "estimated cost: ${cost:.4}"),
            None => write!(
                f,
                "estimated cost: unknown for {} scene(s) (no price in the catalogue, or the \
                 catalogue cannot be read)",
                self.plan.unpriced
            ),
        }
    }
}

impl BatchRun {
    /// The closing lines a person reads: the counts, where the story's page is (or why it
    /// is not), and the events' fate when any were sent.
    pub fn closing_lines(&self, events_sent: bool) -> Vec<String> {
        let summary = &self.answer.summary;
        let mut lines = vec![format!(
            "done: {} succeeded ({} from the cache), {} failed",
            summary.succeeded, summary.from_cache, summary.failed
        )];
        if let Some(story) = &self.answer.story {
            match (&story.story_error, &story.gallery_path) {
                (Some(e), _) => lines.push(format!(
                    "story {}: not published [{}] {}",
                    story.story_id, e.error_type, e.message
                )),
                (None, Some(page)) => lines.push(format!("story {}: {page}", story.story_id)),
                (None, None) => {}
            }
        }
        if events_sent {
            lines.push(format!(
                "events: {} delivered, {} lost",
                self.events.delivered, self.events.lost
            ));
        }
        lines
    }
}

impl Stage3Service {
    /// A service that checks and prices submissions but never generates or stores: its
    /// providers are built for checking (catalogues and tables, which need no key and bill
    /// nothing) and its store is an empty one in memory, since opening a real store is not
    /// free of effects (the filesystem store clears its stale temporary files).
    pub fn for_checking(config: Config) -> Self {
        let providers = Providers::for_checking(config.provider, config.providers.clone());
        Stage3Service::with_providers(config, providers, Arc::new(MemoryStore::new()))
    }

    /// Everything [`Stage3Service::run`] checks before it spends: each scene prepared and
    /// served by its model, the estimate within the budget.
    pub async fn check(&self, submission: Submission) -> Result<SubmissionCheck> {
        let cast = submission.cast().cloned();
        let story_id = submission.story_id().map(str::to_string);
        let scenes = self.prepare_submission(submission)?;
        let group = CastGroup {
            scenes: scenes.len(),
            cast: cast.as_ref(),
            story_id: story_id.as_deref(),
        };
        // Sheets are estimated and budgeted like scenes.
        let (scenes, _) = self.cast_batch(scenes, &[group]).await;
        let plan = self.check_batch(&scenes).await?;
        Ok(SubmissionCheck {
            scenes: scenes.len(),
            plan,
        })
    }

    /// The whole path of one submission (see the module notes). `Err` only when the
    /// submission is refused before anything is spent; a scene's failure is in the answer.
    pub async fn run(
        &self,
        submission: Submission,
        options: &BatchOptions,
        progress: &dyn BatchProgress,
    ) -> Result<BatchRun> {
        let story_id = submission.story_id().map(str::to_string);
        let cast = submission.cast().cloned();
        let scenes = self.prepare_submission(submission)?;
        let story_scenes = story_id.as_ref().map(|_| story_scenes(&scenes));
        let group = CastGroup {
            scenes: scenes.len(),
            cast: cast.as_ref(),
            story_id: story_id.as_deref(),
        };
        let (scenes, casting) = self.cast_batch(scenes, &[group]).await;
        // The store first: a stored scene needs no catalogue, no estimate and no call.
        let lookup = self
            .look_up_cast(&scenes, casting.as_ref(), &options.run)
            .await;
        self.check_batch_with(&scenes, &lookup).await?;
        progress.started(scenes.len());
        let on_done =
            |scene_id: &str, outcome: std::result::Result<&Stage3Output, &Stage3Error>| {
                progress.scene_done(scene_id, outcome)
            };
        let order = casting.as_ref().map(|c| c as &dyn SceneOrder);
        let mut answer = self
            .run_batch_with(scenes, &lookup, order, &options.run, &on_done)
            .await;
        if casting.is_some() {
            cast::take_sheets(&mut answer);
        }
        if let (Some(story_id), Some(story_scenes)) = (story_id, story_scenes) {
            if !answer.characters.is_empty() {
                self.put_cast(&story_id, cast.as_ref(), &answer.characters)
                    .await;
            }
            let entries = story::entries_from_answer(&story_scenes, &answer);
            answer.story = Some(
                story::publish_or_report(
                    self.store(),
                    self.urls(),
                    &story_id,
                    entries,
                    options.story_deadline,
                )
                .await,
            );
        }
        self.record_metrics(options, &answer.results, &answer.failures);
        let story = answer.story.as_ref().map(StoryRef::from);
        let events = options
            .events
            .publish_batch(&answer, story.as_ref(), options.events_deadline)
            .await;
        Ok(BatchRun { answer, events })
    }

    /// Writes a batch's metric lines where `options` says: failures count under the
    /// configured provider.
    fn record_metrics(
        &self,
        options: &BatchOptions,
        results: &[Stage3Output],
        failures: &[crate::schema::SceneFailure],
    ) {
        let provider = self.config().provider.as_str();
        options.metrics.record(results, failures, provider);
    }
}

impl Stage3Service {
    /// Writes the story's cast from its sheets, names from `cast`. Only a page's
    /// convenience: a failure is logged, and the page shows the cast stored before.
    async fn put_cast(&self, story_id: &str, cast: Option<&Cast>, sheets: &[Stage3Output]) {
        let members: Vec<story::CastMember> = sheets
            .iter()
            .filter_map(|sheet| {
                let id = sheet.scene_id.rsplit('/').next()?;
                let name = cast
                    .and_then(|cast| cast.characters.get(id))
                    .and_then(|character| character.name.clone());
                story::CastMember::of_sheet(sheet, name)
            })
            .collect();
        if let Err(e) = story::put_cast(self.store(), story_id, &members).await {
            tracing::warn!(story_id, error = %e, "the story's cast could not be stored");
        }
    }
}

impl From<&PreparedScene> for StoryScene {
    fn from(scene: &PreparedScene) -> Self {
        StoryScene {
            scene_id: scene.scene_id().to_string(),
            prompt: scene.request.image_prompt.clone(),
            size: scene.spec.size.as_str().to_string(),
            model: scene.spec.model.model.clone(),
        }
    }
}

/// The story scenes of prepared scenes, in input order (an identical repeat once).
fn story_scenes(scenes: &[PreparedScene]) -> Vec<StoryScene> {
    let mut seen = HashSet::new();
    scenes
        .iter()
        .filter(|scene| seen.insert(scene.scene_id().to_string()))
        .map(StoryScene::from)
        .collect()
}
