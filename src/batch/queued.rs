//! The Lambda function's two other paths: one request ([`Stage3Service::run_one`]), and
//! an SQS invocation's messages run as one batch ([`Stage3Service::run_messages`]) and
//! settled one by one — done, redelivered, or sent to the dead-letter queue.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::cast::{CastGroup, Casting};
use crate::deadline::Deadline;
use crate::error::{Result, Stage3Error};
use crate::events::dead_letter::{self, DeadLetter, DeadLetterQueue};
use crate::events::{self, Event};
use crate::schema::{
    parse_submission_bytes, BatchAnswer, BatchSummary, Cast, GenerationRequest, SceneFailure,
    Stage3Output, Submission,
};
use crate::service::{PreparedScene, SceneOrder, Stage3Service};
use crate::story::{self, StoryScene};

use super::BatchOptions;

/// One submission of [`Stage3Service::run_queued`]: each scene's id and outcome, in order,
/// or why the submission was refused before anything ran.
type QueuedOutcome = Result<Vec<(String, Result<Stage3Output>)>>;

/// What [`Stage3Service::run_queued`] did: each submission's outcomes, and the estimate
/// made before the batch started, when prices were known.
#[derive(Debug)]
struct QueuedRun {
    submissions: Vec<QueuedOutcome>,
    estimated_cost_usd: Option<f64>,
}

impl Stage3Service {
    /// One request: its `Stage3Output`, or the error whose `error_type` names the cause.
    /// Once it ran, its scene's event is published either way; its metric lines are
    /// written unless it was refused as it stands (`invalid_request`).
    pub(crate) async fn run_one(
        &self,
        request: GenerationRequest,
        options: &BatchOptions,
    ) -> Result<Stage3Output> {
        let scene_id = request.scene_id.clone();
        let outcome = self.run_one_and_announce(request, options).await;
        match &outcome {
            Ok(output) => self.record_metrics(options, std::slice::from_ref(output), &[]),
            // A request refused as it stands is no scene of a batch.
            Err(Stage3Error::InvalidRequest(_)) => {}
            Err(error) => {
                let failure = SceneFailure::new(scene_id, error);
                self.record_metrics(options, &[], &[failure]);
            }
        }
        outcome
    }

    async fn run_one_and_announce(
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
    async fn run_queued(
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

/// One queue message: the id the queue redelivers it by, and its body as it arrived.
#[derive(Debug, Clone)]
pub(crate) struct QueueMessage {
    pub id: String,
    pub body: String,
}

/// What a run of queue messages came to: the ids of the messages to redeliver, and the
/// batch's summary (its scenes; a body that was no request counts as one failure).
#[derive(Debug)]
pub(crate) struct MessagesRun {
    pub redeliver: Vec<String>,
    pub summary: BatchSummary,
}

impl Stage3Service {
    /// Runs every valid message's scenes in one batch (see [`Self::run_queued`]) and settles
    /// each message. A message whose failures are all permanent
    /// ([`dead_letter::is_permanent`]) goes to `dead_letters` when there is one, and is
    /// redelivered only if that send fails; any other failure redelivers it. Events:
    /// every stored scene is announced at once; a message's failures and its `Batch Done`
    /// only once it is settled (not going back to the queue), so a scene about to be
    /// retried is never announced as failed.
    pub(crate) async fn run_messages(
        &self,
        messages: Vec<QueueMessage>,
        options: &BatchOptions,
        dead_letters: Option<&DeadLetterQueue>,
    ) -> MessagesRun {
        let max_batch = self.config().max_batch;
        let submissions = messages
            .iter()
            .map(|message| parse_submission_bytes(message.body.as_bytes(), max_batch))
            .collect();
        let mut records: Vec<Settling> = messages.into_iter().map(Settling::new).collect();
        let run = self.run_queued(submissions, options).await;
        // The summary counts scenes that ran; a body that was no request is reported per
        // message.
        let mut total = BatchAnswer::default();
        for (record, outcome) in records.iter_mut().zip(run.submissions) {
            let scenes = match outcome {
                Ok(scenes) => scenes,
                Err(error) => {
                    // A malformed body never gets better: permanent. Without a dead-letter
                    // queue it is redelivered until the queue's maxReceiveCount moves it
                    // there; this line tells whoever looks there why.
                    tracing::warn!(
                        message_id = %record.message.id,
                        error_type = %error.error_type(),
                        error = %error,
                        "SQS record rejected"
                    );
                    let scene_id = body_scene_id(&record.message.body);
                    record.fail(&scene_id, &error);
                    continue;
                }
            };
            for (scene_id, outcome) in scenes {
                match outcome {
                    Ok(output) => {
                        total.results.push(output.clone());
                        record.answer.results.push(output);
                    }
                    Err(error) => {
                        tracing::warn!(
                            message_id = %record.message.id,
                            scene_id = %scene_id,
                            error_type = %error.error_type(),
                            permanent = dead_letter::is_permanent(&error),
                            error = %error,
                            "scene failed"
                        );
                        total.failures.push(SceneFailure::new(&scene_id, &error));
                        record.fail(&scene_id, &error);
                    }
                }
            }
        }

        // Messages that failed only for good go to the dead-letter queue, all at once.
        let deadline = options.run.deadline;
        let dead_lettered: Vec<bool> = match dead_letters {
            Some(queue) => {
                futures::future::join_all(
                    records
                        .iter()
                        .map(|record| record.dead_letter(queue, deadline)),
                )
                .await
            }
            None => vec![false; records.len()],
        };

        let mut redeliver = Vec::new();
        let mut announcements = Vec::new();
        for (mut record, dead_lettered) in records.into_iter().zip(dead_lettered) {
            record.answer.summarize();
            if record.first_error.is_some() && !dead_lettered {
                tracing::warn!(
                    message_id = %record.message.id,
                    failed = record.answer.failures.len(),
                    "SQS message will be redelivered"
                );
                if options.events.is_enabled() {
                    announcements.extend(record.answer.results.iter().map(Event::scene_ready));
                }
                redeliver.push(record.message.id);
            } else if options.events.is_enabled() {
                announcements.extend(events::batch_events(&record.answer, None));
            }
        }
        options
            .events
            .publish(&announcements, options.events_deadline)
            .await;
        self.record_metrics(options, &total.results, &total.failures);
        total.summarize();
        total.summary.estimated_cost_usd = run.estimated_cost_usd;
        MessagesRun {
            redeliver,
            summary: total.summary,
        }
    }
}

/// One queue message being settled.
struct Settling {
    message: QueueMessage,
    answer: BatchAnswer,
    /// The first failure, which names the cause in the dead-letter attributes.
    first_error: Option<Stage3Error>,
    /// Some failure may go away on another try: the message must be redelivered.
    retry: bool,
}

impl Settling {
    fn new(message: QueueMessage) -> Self {
        Settling {
            message,
            answer: BatchAnswer::default(),
            first_error: None,
            retry: false,
        }
    }

    fn fail(&mut self, scene_id: &str, error: &Stage3Error) {
        self.answer
            .failures
            .push(SceneFailure::new(scene_id, error));
        self.retry |= !dead_letter::is_permanent(error);
        if self.first_error.is_none() {
            self.first_error = Some(error.clone());
        }
    }

    /// Sends the message to `queue` when every failure in it is permanent; answers whether
    /// it is now there (and so must not be redelivered). A send the deadline cuts short
    /// counts as failed: the message is redelivered rather than risk the whole answer
    /// missing the deadline.
    async fn dead_letter(&self, queue: &DeadLetterQueue, deadline: Deadline) -> bool {
        let Some(error) = self.first_error.as_ref().filter(|_| !self.retry) else {
            return false;
        };
        let letter = DeadLetter {
            error_type: error.error_type(),
            error_message: error.to_string(),
            scene_ids: self
                .answer
                .failures
                .iter()
                .map(|f| f.scene_id.clone())
                .filter(|id| !id.is_empty())
                .collect(),
        };
        let send = queue.send(&self.message.id, &self.message.body, &letter);
        let sent = deadline
            .within(send)
            .await
            .unwrap_or_else(|| Err("the invocation's deadline came first".to_string()));
        match sent {
            Ok(()) => {
                tracing::warn!(
                    message_id = %self.message.id,
                    error_type = %letter.error_type,
                    scene_ids = %letter.scene_ids.join(","),
                    queue = queue.queue_url(),
                    "SQS message failed for good; sent to the dead-letter queue"
                );
                true
            }
            Err(send_error) => {
                tracing::warn!(
                    message_id = %self.message.id,
                    error = %send_error,
                    "dead-letter queue unreachable; the message will be redelivered instead"
                );
                false
            }
        }
    }
}

/// The `scene_id` a rejected body names at its top level, if any, for its failure report.
fn body_scene_id(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|value| value.get("scene_id")?.as_str().map(str::to_string))
        .unwrap_or_default()
}
