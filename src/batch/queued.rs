//! The Lambda adapter's two paths: one request ([`Stage3Service::run_one`]) and an SQS
//! invocation's records run as one batch ([`Stage3Service::run_queued`]), each
//! submission's outcomes handed back for the queue's bookkeeping.

use std::collections::BTreeMap;

use crate::cast::{CastGroup, Casting};
use crate::error::{Result, Stage3Error};
use crate::events::Event;
use crate::schema::{Cast, GenerationRequest, SceneFailure, Stage3Output, Submission};
use crate::service::{PreparedScene, SceneOrder, Stage3Service};
use crate::story::{self, StoryScene};

use super::BatchOptions;

/// One submission of [`Stage3Service::run_queued`]: each scene's id and outcome, in order,
/// or why the submission was refused before anything ran.
pub(crate) type QueuedOutcome = Result<Vec<(String, Result<Stage3Output>)>>;

/// What [`Stage3Service::run_queued`] did: each submission's outcomes, and the estimate
/// made before the batch started, when prices were known.

#[derive(Debug)]
pub(crate) struct QueuedRun {
    pub submissions: Vec<QueuedOutcome>,
    pub estimated_cost_usd: Option<f64>,
}

impl Stage3Service {
    /// One request: its `Stage3Output`, or the error whose `error_type` names the cause.
    /// Its scene's event is published either way.
    pub(crate) async fn run_one(
        &self,
        request: GenerationRequest,
        options: &BatchOptions,
    ) -> Result<Stage3Output> {
        let scenes = [self.prepare(request)?];
        let lookup = self.look_up(&scenes, &options.run).await;
        self.check_batch_with(&scenes, &lookup).await?;
        let outcome = self
            .run_scenes_with(&scenes, &lookup, None, &options.run, &|_, _| {})
            .await
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(Stage3Error::Internal("no outcome for the scene".into())));
        let [scene] = scenes;
        if options.events.is_enabled() {
            let event = match &outcome {
                Ok(output) => Event::scene_ready(output),
                Err(error) => Event::scene_failed(&SceneFailure::new(scene.scene_id(), error)),
            };
            options
                .events
                .publish(&[event], options.events_deadline)
                .await;
        }
        outcome
    }

    /// Several submissions as one batch, sharing its concurrency and back-pressure: an
    /// SQS invocation's records. A submission that cannot be prepared is refused alone;
    /// over the budget, every scene fails `budget_exceeded` and nothing is called. Each
    /// story named is published once, with all its submissions' scenes; a story that
    /// cannot be published is logged, never failed: its scenes are stored, and the story's
    /// next batch merges the fragment this one left. Events are the caller's: which
    /// failures to announce depends on what the queue does with them.
    pub(crate) async fn run_queued(
        &self,
        submissions: Vec<Result<Submission>>,
        options: &BatchOptions,
    ) -> QueuedRun {
        let mut prepared: Vec<Result<(Option<String>, usize)>> = Vec::new();
        let mut scenes: Vec<PreparedScene> = Vec::new();
        let mut casts: Vec<Option<Cast>> = Vec::new();
        for submission in submissions {
            let entry = submission.and_then(|submission| {
                let story_id = submission.story_id().map(str::to_string);
                let cast = submission.cast().cloned();
                let own = self.prepare_submission(submission)?;
                let count = own.len();
                scenes.extend(own);
                casts.push(cast);
                Ok((story_id, count))
            });
            prepared.push(entry);
        }
        // Each submission's characters are its own.
        let groups: Vec<CastGroup> = prepared
            .iter()
            .flatten()
            .zip(&casts)
            .map(|((story_id, count), cast)| CastGroup {
                scenes: *count,
                cast: cast.as_ref(),
                story_id: story_id.as_deref(),
            })
            .collect();
        let (all, casting) = self.cast_batch(scenes, &groups).await;
        let sheets = casting.as_ref().map_or(0, Casting::sheets);

        let lookup = self
            .look_up_cast(&all, casting.as_ref(), &options.run)
            .await;
        let plan = self.plan_batch(&all, &lookup).await;
        let order = casting.as_ref().map(|c| c as &dyn SceneOrder);
        let mut outcomes = match self.check_budget(&plan) {
            Ok(()) => {
                self.run_scenes_with(&all, &lookup, order, &options.run, &|_, _| {})
                    .await
            }
            Err(refusal) => all.iter().map(|_| Err(refusal.clone())).collect(),
        };
        // Sheets belong to no submission: they are stored and cached, and that is all.
        outcomes.drain(..sheets);
        let scenes = all.get(sheets..).unwrap_or_default();

        // Each story's scenes and outcomes, gathered across submissions.
        let mut stories: BTreeMap<&str, (Vec<StoryScene>, Vec<Result<Stage3Output>>)> =
            BTreeMap::new();
        let mut next = 0;
        for (story_id, count) in prepared.iter().flatten() {
            if let Some(story_id) = story_id {
                let (story_scenes, story_outcomes) = stories.entry(story_id).or_default();
                story_scenes.extend(scenes[next..next + count].iter().map(StoryScene::from));
                story_outcomes.extend(outcomes[next..next + count].iter().cloned());
            }
            next += count;
        }
        for (story_id, (story_scenes, story_outcomes)) in stories {
            let entries = story::entries_from_outcomes(&story_scenes, &story_outcomes);
            story::publish_or_report(
                self.store(),
                self.urls(),
                story_id,
                entries,
                options.story_deadline,
            )
            .await;
        }

        let mut results = scenes
            .iter()
            .map(|scene| scene.scene_id().to_string())
            .zip(outcomes);
        let submissions = prepared
            .into_iter()
            .map(|entry| entry.map(|(_, count)| results.by_ref().take(count).collect()))
            .collect();
        QueuedRun {
            submissions,
            estimated_cost_usd: plan.estimated_cost_usd,
        }
    }
}
