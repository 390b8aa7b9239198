//! The Stage 3 service: requests in, stored PNGs and `Stage3Output`s out.
//!
//! This is the one place that knows the whole path of a scene. The CLI and the Lambda
//! function are thin shells around [`Stage3Service`]; everything else is a part it drives.
//! In the order a batch meets them, and where to make a change:
//!
//! 1. **Prepare** ([`PreparedScene::new`], [`prepare_submission`]): each request becomes its
//!    validated [`ImageSpec`], request hash and keys. Costs nothing; a bad request stops
//!    here. What a request may ask is `schema` and `image_spec`.
//! 2. **Plan** ([`Stage3Service::check_batch`]): the provider checks every spec against
//!    its model and prices it; an impossible scene or an estimate over budget refuses the
//!    batch whole, before any call.
//! 3. **Run** ([`Stage3Service::run_scenes`]): scenes run concurrently, at most
//!    `STAGE3_CONCURRENCY` at the provider; identical requests run once.
//! 4. Per scene ([`Stage3Service::run_scene`]): the **cache** (`cached`: a verified record
//!    is the answer, relabelled if the label settings changed), then a **claim** so
//!    concurrent workers pay once, then **generate** (`generate_with_retries` over the
//!    plan's models, `generate_with_model` for one model's retries, under the batch's
//!    [`BatchStop`], the back-pressure and the deadline's [`CallBudget`]s), **normalise**
//!    (`normalize`), **label** (`label`), **store** the image under its content address
//!    (`store_image`), its thumbnail, and last the record (`generate_and_store`).
//!
//! Every storage call runs through the cache's [`Shelf`] under the deadline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::stream::{self, StreamExt};
use tokio::time::Instant;
use tracing::Instrument;

use crate::batch_stop::BatchStop;
use crate::cache::{self, ClaimTiming, ResultKeys, Shelf, StoredImage, Turn};
use crate::config::Config;
use crate::deadline::{CallBudget, Deadline};
use crate::error::{Result, Stage3Error};
use crate::image_spec::{ImageSpec, ModelRef, ProviderKind, SpecSettings};
use crate::labels;
use crate::normalize::{normalize_and_shrink, ImageLimits, SourceFormat};
use crate::provider::{
    AnswerGate, ImageProvider, ImageRequest, Plan, PlannedModel, ProviderImage, Providers,
};
use crate::retry::{Backpressure, RetryPolicy};
use crate::schema::{
    locate_in_batch, BatchAnswer, GenerationParams, GenerationRequest, ReferenceUsed, SceneFailure,
    Stage3Output, Submission,
};
use crate::storage::{self, ObjectStore};
use crate::story;
use crate::urls::{QiniuSigner, UrlPolicy};

/// A provider call is not started with less time than this left before the deadline:
/// images take seconds at best, and a call cut short is paid for and thrown away.
pub(crate) const MIN_CALL_BUDGET: Duration = Duration::from_secs(5);
/// Time kept back from the provider for storing the image and its record.
pub(crate) const STORAGE_RESERVE: Duration = Duration::from_secs(2);

/// Per-run settings that are not configuration: the caller's deadline, cache policy and
/// batch stop.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// When everything must be finished (a Lambda invocation's deadline).
    pub deadline: Deadline,
    /// Regenerate even when a stored result matches; `None` uses `STAGE3_FORCE`.
    pub force: Option<bool>,
    /// Stops the batch from starting provider calls (a 401 or 402, the budget, Ctrl-C).
    /// `Stage3Service::run_scenes` makes one per batch when none is given; give one to
    /// stop the batch from outside (`stop.stop(Stage3Error::Cancelled(..))`).
    pub stop: Option<BatchStop>,
}

/// Every scene of a batch checked and priced before any call (see
/// `Stage3Service::plan_batch`).
#[derive(Debug, Clone)]
pub struct BatchPlan {
    /// Each scene's plan, in input order; an `Err` is why the scene cannot be served.
    pub(crate) plans: Vec<Result<Plan>>,
    /// The sum of every scene's estimate, when every scene has one.
    pub estimated_cost_usd: Option<f64>,
    /// Scenes whose price is not known (no catalogue, no pricing).
    pub unpriced: usize,
}

impl BatchPlan {
    /// The first scene the asked-for model cannot serve (`invalid_request`), or whose
    /// model's provider has no key (`config`), with its place.
    pub(crate) fn first_invalid(&self, scenes: &[PreparedScene]) -> Option<Stage3Error> {
        self.plans
            .iter()
            .zip(scenes)
            .enumerate()
            .find_map(|(index, (plan, scene))| match plan {
                // A model the scene's model cannot serve, or whose provider has no key.
                Err(e @ (Stage3Error::InvalidRequest(_) | Stage3Error::Config(_))) => {
                    Some(locate_in_batch(e.clone(), index, Some(scene.scene_id())))
                }
                _ => None,
            })
    }
}

/// What the store already holds for a batch's scenes, looked up before anything is planned
/// ([`Stage3Service::look_up`]): a scene served from the store needs no catalogue, no
/// price and no provider call, so a batch whose every scene is stored makes no provider
/// request at all.
#[derive(Debug, Default)]
pub(crate) struct CacheLookup {
    found: Vec<Found>,
}

#[derive(Debug, Clone)]
pub(crate) enum Found {
    Hit(Box<Stage3Output>),
    Miss,
    /// The lookup failed (storage unreachable, say): the scene looks again when it runs,
    /// rather than pay for an image that may be stored.
    Unknown,
}

impl CacheLookup {
    pub(crate) fn get(&self, index: usize) -> &Found {
        self.found.get(index).unwrap_or(&Found::Unknown)
    }

    /// The lookup of a batch of `len` scenes of which only those at `positions` were
    /// looked up (`lookup`, in that order): the others look when they run
    /// (`crate::cast`: a scene's key is known once its references are).
    pub(crate) fn placed(lookup: CacheLookup, positions: &[usize], len: usize) -> CacheLookup {
        let mut found = vec![Found::Unknown; len];
        for (position, hit) in positions.iter().zip(lookup.found) {
            if let Some(slot) = found.get_mut(*position) {
                *slot = hit;
            }
        }
        CacheLookup { found }
    }
}

/// A request that passed validation, with everything derived from it: its image spec, the
/// hash that identifies it, and the keys its result lives under.
#[derive(Debug, Clone)]
pub struct PreparedScene {
    pub request: GenerationRequest,
    /// What to draw, resolved once; every later step borrows it (shared, so a provider
    /// call running on a task of its own holds it without a copy).
    pub spec: Arc<ImageSpec>,
    pub request_hash: String,
    pub(crate) keys: ResultKeys,
    /// With a character mode: the characters' references this scene is sent, recorded in
    /// `generation_params.references` (see `crate::cast`). Empty otherwise.
    pub references: Vec<ReferenceUsed>,
}

impl PreparedScene {
    /// Validates `request` and derives everything a run needs, for `providers` under
    /// `config`.
    pub(crate) fn new(
        request: GenerationRequest,
        config: &Config,
        providers: &Providers,
    ) -> Result<Self> {
        let request = request.cleaned();
        let spec = ImageSpec::new(
            &request,
            &SpecSettings {
                default_provider: providers.default_kind(),
                default_model: config.model(),
                max_prompt_chars: config.max_prompt_chars,
                character_references: &config.character_references,
            },
        )?;
        let request_hash = cache::request_hash(providers.identity(spec.model.provider), &spec);
        let keys = ResultKeys::new(&request.scene_id, &request_hash);
        Ok(PreparedScene {
            request,
            spec: Arc::new(spec),
            request_hash,
            keys,
            references: Vec::new(),
        })
    }

    pub(crate) fn scene_id(&self) -> &str {
        &self.request.scene_id
    }
}

/// Prepares every request, or names the first invalid one with its position.
pub(crate) fn prepare_all(
    requests: Vec<GenerationRequest>,
    config: &Config,
    providers: &Providers,
) -> Result<Vec<PreparedScene>> {
    requests
        .into_iter()
        .enumerate()
        .map(|(index, request)| {
            let scene_id = request.scene_id.clone();
            PreparedScene::new(request, config, providers)
                .map_err(|e| locate_in_batch(e, index, Some(&scene_id)))
        })
        .collect()
}

/// Prepares a submission's requests: a single request's error as it is, a batch's naming
/// the first invalid request by its place.
pub(crate) fn prepare_submission(
    submission: Submission,
    config: &Config,
    providers: &Providers,
) -> Result<Vec<PreparedScene>> {
    match submission {
        Submission::Single(request) => Ok(vec![PreparedScene::new(request, config, providers)?]),
        batch => prepare_all(batch.into_requests(), config, providers),
    }
}

/// Holds back the scenes of a batch that wait for others to be stored, and hands them over
/// when they may run: `crate::cast` (character references) implements it. Positions are
/// the scenes' places in the batch.
#[async_trait::async_trait]
pub(crate) trait SceneOrder: Send + Sync {
    /// Whether the scene at `position` waits: it is then released, not answered from the
    /// batch's cache lookup.
    fn waits(&self, position: usize) -> bool;
    /// Waits until the scene may run, and returns it as it is to run (its key may change).
    async fn release(
        &self,
        service: &Stage3Service,
        scene: &PreparedScene,
        position: usize,
        options: &RunOptions,
    ) -> Result<PreparedScene>;
    /// Notes how the scene at `position` ended.
    fn finished(&self, position: usize, outcome: &Result<Stage3Output>);
}

/// Called as each scene finishes, for progress reporting.
pub(crate) type SceneCallback<'a> =
    &'a (dyn Fn(&str, std::result::Result<&Stage3Output, &Stage3Error>) + Sync);

pub struct Stage3Service {
    config: Arc<Config>,
    providers: Providers,
    /// `STAGE3_MODEL_FALLBACKS`, each with its provider.
    fallbacks: Vec<ModelRef>,
    store: Arc<dyn ObjectStore>,
    urls: UrlPolicy,
    retry: RetryPolicy,
    /// One pause per provider: a 429 is that account's limit, not every provider's.
    backpressure: HashMap<ProviderKind, Backpressure>,
    limits: ImageLimits,
    /// `STAGE3_CONCURRENCY` permits, one per provider call in flight, given back when the
    /// provider answers (see [`AnswerGate`] and [`Stage3Service::run_scenes`]).
    provider_permits: Arc<tokio::sync::Semaphore>,
    /// `STAGE3_CONCURRENCY` places for answers in memory, from their arrival until a
    /// decoder takes them (see [`AnswerGate`]).
    answer_rooms: Arc<tokio::sync::Semaphore>,
    /// One permit per core for image decoding (see [`Stage3Service::process`]).
    decode_permits: tokio::sync::Semaphore,
    /// The lease of a claim, renewed while the scene is generated.
    claim_timing: ClaimTiming,
}

impl Stage3Service {
    /// Validates `config` and builds the configured provider and store (HTTP client, S3
    /// client): do this once, at start-up.
    pub async fn from_config(config: Config) -> Result<Self> {
        config.validate()?;
        let providers = Providers::new(config.provider, config.providers.clone());
        // The default model's provider is built now, so a key no header can carry fails
        // the start-up rather than the first scene; others when a chain first reaches them.
        let first = ModelRef::resolve(config.model(), config.provider);
        providers.get(first.provider)?;
        let store = storage::from_settings(&config.storage, &config.aws).await?;
        Ok(Stage3Service::with_providers(config, providers, store))
    }

    /// A service over explicit parts (tests, embedding in another program): `provider`
    /// serves `STAGE3_PROVIDER`; any other provider a chain reaches is built from the
    /// configuration.
    pub fn new(
        config: Config,
        provider: Arc<dyn ImageProvider>,
        store: Arc<dyn ObjectStore>,
    ) -> Self {
        let providers = Providers::new(config.provider, config.providers.clone())
            .with(config.provider, provider);
        Stage3Service::with_providers(config, providers, store)
    }

    /// A service over a set of providers (see [`Providers`]) and a store.
    pub fn with_providers(
        config: Config,
        providers: Providers,
        store: Arc<dyn ObjectStore>,
    ) -> Self {
        let urls = match &config.public_base_url {
            Some(base) => UrlPolicy::Cdn {
                base: base.clone(),
                signer: config
                    .cdn_signing
                    .as_ref()
                    .map(|signing| QiniuSigner::new(signing.key.clone(), signing.ttl)),
            },
            None => UrlPolicy::Store,
        };
        Stage3Service {
            urls,
            retry: config.retry_policy(),
            limits: ImageLimits {
                max_pixels: config.max_image_pixels,
            },
            backpressure: ProviderKind::ALL
                .into_iter()
                .map(|kind| (kind, Backpressure::new()))
                .collect(),
            fallbacks: config.fallbacks(),
            provider_permits: Arc::new(tokio::sync::Semaphore::new(config.concurrency)),
            answer_rooms: Arc::new(tokio::sync::Semaphore::new(config.concurrency)),
            decode_permits: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |cores| cores.get()),
            ),
            config: Arc::new(config),
            providers,
            store,
            claim_timing: ClaimTiming::default(),
        }
    }

    /// The same service with another claim lease (tests shorten it to watch renewals).
    #[cfg(test)]
    pub(crate) fn with_claim_timing(mut self, timing: ClaimTiming) -> Self {
        self.claim_timing = timing;
        self
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// How answers point at stored objects (CDN, signed, presigned).
    pub(crate) fn urls(&self) -> &UrlPolicy {
        &self.urls
    }

    /// The store images go to (story manifests and pages go beside them).
    pub(crate) fn store(&self) -> &dyn ObjectStore {
        self.store.as_ref()
    }

    /// The providers scenes are drawn by.
    pub(crate) fn providers(&self) -> &Providers {
        &self.providers
    }

    /// Validates a request and derives its prompt, options, hash and keys. Costs nothing.
    pub(crate) fn prepare(&self, request: GenerationRequest) -> Result<PreparedScene> {
        PreparedScene::new(request, &self.config, &self.providers)
    }

    /// Prepares every request, or says which one is invalid: a batch with a bad request is
    /// rejected whole, before anything is spent.
    pub fn prepare_all(&self, requests: Vec<GenerationRequest>) -> Result<Vec<PreparedScene>> {
        prepare_all(requests, &self.config, &self.providers)
    }

    /// [`Stage3Service::prepare_all`] for a parsed submission: see [`prepare_submission`].
    pub(crate) fn prepare_submission(&self, submission: Submission) -> Result<Vec<PreparedScene>> {
        prepare_submission(submission, &self.config, &self.providers)
    }

    /// Checks one scene against what its model can do and prices it, and assembles its
    /// chain: the asked-for model, then each fallback that can serve the scene, whichever
    /// provider it belongs to. Costs nothing.
    ///
    /// The asked-for model decides: if it cannot serve the scene (`invalid_request`) or its
    /// provider has no key (`config`), the scene is refused. If it is unknown or gone, the
    /// fallbacks serve, with a warning, or the scene fails `model_unavailable` naming what
    /// was tried. A fallback that cannot serve is left out, with a warning.
    pub(crate) async fn plan_scene(&self, scene: &PreparedScene) -> Result<Plan> {
        self.plan_spec(&scene.spec)
            .instrument(tracing::info_span!("plan", scene_id = %scene.scene_id()))
            .await
    }

    async fn plan_spec(&self, spec: &ImageSpec) -> Result<Plan> {
        let mut models: Vec<PlannedModel> = Vec::new();
        let mut unavailable: Option<String> = None;
        let mut skipped: Vec<String> = Vec::new();
        let chain = std::iter::once(&spec.model).chain(&self.fallbacks);
        for (index, model) in chain.enumerate() {
            if models.iter().any(|planned| &planned.model == model)
                || (index > 0 && *model == spec.model)
            {
                continue;
            }
            match self.check_model(spec, model).await {
                Ok(estimate_usd) => models.push(PlannedModel {
                    model: model.clone(),
                    estimate_usd,
                }),
                Err(Stage3Error::ModelUnavailable(why)) if index == 0 => unavailable = Some(why),
                Err(error) if index == 0 => return Err(error),
                Err(error) => skipped.push(format!(
                    "{}: {error}",
                    model.written_for(self.providers.default_kind())
                )),
            }
        }
        if !skipped.is_empty() {
            tracing::warn!(
                skipped = %skipped.join("; "),
                "fallback models left out of the chain"
            );
        }
        match (unavailable, models.first()) {
            (None, Some(_)) => Ok(Plan { models }),
            (Some(why), Some(first)) => {
                tracing::warn!(
                    requested_model = %spec.model,
                    model = %first.model,
                    why = %why,
                    "the requested model cannot be used; using the fallback"
                );
                Ok(Plan { models })
            }
            (why, None) => {
                let mut message =
                    why.unwrap_or_else(|| format!("no model to try for {}", spec.model));
                if !skipped.is_empty() {
                    message.push_str(&format!("; fallbacks: {}", skipped.join("; ")));
                }
                Err(Stage3Error::ModelUnavailable(message))
            }
        }
    }

    /// One model of a chain: callable (its provider's key is set) and able to serve `spec`,
    /// with its price per image when known.
    async fn check_model(&self, spec: &ImageSpec, model: &ModelRef) -> Result<Option<f64>> {
        self.providers.callable(model.provider).map_err(|missing| {
            Stage3Error::config(format!(
                "{missing}; the model {} needs it",
                model.written_for(self.providers.default_kind())
            ))
        })?;
        let provider = self.providers.get(model.provider)?;
        Ok(provider.check(spec, &model.model).await?.estimate_usd)
    }

    /// Checks and prices every scene before any call (identical scenes once), planning only
    /// the scenes `lookup` did not find stored: a stored scene is served by its own model at
    /// no cost. Costs nothing; the provider may read its catalogue the first time.
    pub(crate) async fn plan_batch(
        &self,
        scenes: &[PreparedScene],
        lookup: &CacheLookup,
    ) -> BatchPlan {
        let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
        let mut plans: Vec<Result<Plan>> = Vec::with_capacity(scenes.len());
        let mut total = 0.0;
        let mut unpriced = 0;
        for scene in scenes {
            let key = (scene.scene_id(), scene.request_hash.as_str());
            if let Some(&first) = seen.get(&key) {
                plans.push(plans[first].clone());
                continue;
            }
            seen.insert(key, plans.len());
            let plan = match lookup.get(plans.len()) {
                Found::Hit(_) => Ok(Plan {
                    models: vec![PlannedModel {
                        model: scene.spec.model.clone(),
                        estimate_usd: Some(0.0),
                    }],
                }),
                Found::Miss | Found::Unknown => self.plan_scene(scene).await,
            };
            match plan.as_ref().map(Plan::estimate_usd) {
                Ok(Some(estimate)) => total += estimate,
                Ok(None) => unpriced += 1,
                // A scene that cannot be served makes no call and costs nothing.
                Err(_) => {}
            }
            plans.push(plan);
        }
        BatchPlan {
            plans,
            estimated_cost_usd: (unpriced == 0).then_some(total),
            unpriced,
        }
    }

    /// `Err(budget_exceeded)` when the batch's estimate passes `STAGE3_MAX_COST_USD`.
    pub(crate) fn check_budget(&self, plan: &BatchPlan) -> Result<()> {
        let Some(max) = self.config.max_cost_usd else {
            return Ok(());
        };
        let known: f64 = plan
            .plans
            .iter()
            .filter_map(|p| p.as_ref().ok().and_then(Plan::estimate_usd))
            .sum();
        if plan.unpriced > 0 {
            tracing::warn!(
                unpriced = plan.unpriced,
                "some scenes have no price estimate; the budget can only count what is billed"
            );
        }
        if known > max + 1e-9 {
            return Err(Stage3Error::BudgetExceeded(format!(
                "the batch is estimated at ${known:.4}, over the ${max:.2} budget \
                 (STAGE3_MAX_COST_USD / --max-cost); nothing was generated"
            )));
        }
        Ok(())
    }

    /// Plans a batch and refuses it whole when a scene asks what its model cannot do
    /// (`invalid_request`, naming the scene) or the estimate passes the budget
    /// (`budget_exceeded`). Nothing is spent either way.
    pub(crate) async fn check_batch(&self, scenes: &[PreparedScene]) -> Result<BatchPlan> {
        self.check_batch_with(scenes, &CacheLookup::default()).await
    }

    /// [`Self::check_batch`] for the scenes `lookup` did not find stored.
    pub(crate) async fn check_batch_with(
        &self,
        scenes: &[PreparedScene],
        lookup: &CacheLookup,
    ) -> Result<BatchPlan> {
        let plan = self.plan_batch(scenes, lookup).await;
        if let Some(invalid) = plan.first_invalid(scenes) {
            return Err(invalid);
        }
        self.check_budget(&plan)?;
        Ok(plan)
    }

    /// The seed's `generate_scene_image`: one scene, start to finish.
    pub async fn generate_scene_image(&self, request: GenerationRequest) -> Result<Stage3Output> {
        let scene = self.prepare(request)?;
        self.run_scene(&scene, &RunOptions::default()).await
    }

    /// The seed's `generate_all_images`, concurrently: invalid requests are reported as
    /// failures without any provider call; the rest run with `STAGE3_CONCURRENCY` in flight.
    #[cfg(test)]
    pub(crate) async fn generate_all_images(
        &self,
        requests: Vec<GenerationRequest>,
    ) -> BatchAnswer {
        let mut rejected = Vec::new();
        let mut prepared = Vec::new();
        for request in requests {
            let scene_id = request.scene_id.clone();
            match self.prepare(request) {
                Ok(scene) => prepared.push(scene),
                Err(e) => rejected.push(SceneFailure::new(scene_id, &e)),
            }
        }
        let mut answer = self
            .run_batch(prepared, &RunOptions::default(), &|_, _| {})
            .await;
        answer.failures.splice(0..0, rejected);
        answer.summarize();
        answer
    }

    /// Runs prepared scenes with bounded concurrency and answers the batch. Results and
    /// failures keep the input order; one scene's failure never stops the others.
    ///
    /// The batch is planned first (see `Stage3Service::plan_batch`): its estimate goes in
    /// the summary, and a batch estimated above `STAGE3_MAX_COST_USD` makes no call — every
    /// scene fails `budget_exceeded`. Callers that can refuse a batch whole (the CLI's exit
    /// 2, a Lambda error) call `Stage3Service::check_batch` first.
    pub async fn run_batch(
        &self,
        scenes: Vec<PreparedScene>,
        options: &RunOptions,
        on_done: SceneCallback<'_>,
    ) -> BatchAnswer {
        let lookup = self.look_up(&scenes, options).await;
        self.run_batch_with(scenes, &lookup, None, options, on_done)
            .await
    }

    /// [`Self::run_batch`] after the cache was looked up ([`Self::look_up`]), its
    /// characters cast by `cast` when it has any (see [`crate::cast`]).
    pub(crate) async fn run_batch_with(
        &self,
        scenes: Vec<PreparedScene>,
        lookup: &CacheLookup,
        cast: Option<&dyn SceneOrder>,
        options: &RunOptions,
        on_done: SceneCallback<'_>,
    ) -> BatchAnswer {
        let plan = self.plan_batch(&scenes, lookup).await;
        let outcomes = match self.check_budget(&plan) {
            Ok(()) => {
                self.run_scenes_with(&scenes, lookup, cast, options, on_done)
                    .await
            }
            Err(refusal) => scenes
                .iter()
                .map(|scene| {
                    on_done(scene.scene_id(), Err(&refusal));
                    Err(refusal.clone())
                })
                .collect(),
        };
        let mut answer = BatchAnswer::default();
        answer.summary.estimated_cost_usd = plan.estimated_cost_usd;
        for (scene, outcome) in scenes.iter().zip(outcomes) {
            match outcome {
                Ok(output) => answer.results.push(output),
                Err(e) => answer
                    .failures
                    .push(SceneFailure::new(scene.scene_id(), &e)),
            }
        }
        answer.summarize();
        answer
    }

    /// Runs prepared scenes with at most `STAGE3_CONCURRENCY` at the provider at once and
    /// returns each scene's outcome, in input order. Identical requests for the same scene
    /// are generated once and share the outcome.
    ///
    /// The limit is on provider calls, not on whole scenes: a scene whose image has arrived
    /// is checked and stored without its slot, so the next scene's call starts at once
    /// instead of waiting out that CPU and storage work (a whole wave's worth, when the
    /// provider answers a wave together). Up to as many scenes again are in that second
    /// phase, or in their cache lookup, which bounds the images held in memory.
    #[cfg(test)]
    pub(crate) async fn run_scenes(
        &self,
        scenes: &[PreparedScene],
        options: &RunOptions,
        on_done: SceneCallback<'_>,
    ) -> Vec<Result<Stage3Output>> {
        self.run_scenes_with(scenes, &CacheLookup::default(), None, options, on_done)
            .await
    }

    /// Looks every scene up in the store (identical scenes once), before anything is
    /// planned or called. With `force`, nothing is looked up.
    pub(crate) async fn look_up(
        &self,
        scenes: &[PreparedScene],
        options: &RunOptions,
    ) -> CacheLookup {
        if options.force.unwrap_or(self.config.force) {
            return CacheLookup {
                found: vec![Found::Miss; scenes.len()],
            };
        }
        let (unique, slots) = unique_scenes(scenes);
        let found: Vec<Found> = stream::iter(unique)
            .map(|scene| async move {
                let span = tracing::info_span!("scene", scene_id = %scene.scene_id());
                // A bug on an edited record fails no batch here either: the scene looks
                // again, isolated, when it runs.
                let lookup =
                    std::panic::AssertUnwindSafe(self.cached(scene, options).instrument(span));
                match futures::FutureExt::catch_unwind(lookup).await {
                    Ok(Ok(Some(hit))) => Found::Hit(Box::new(hit)),
                    Ok(Ok(None)) => Found::Miss,
                    Ok(Err(_)) | Err(_) => Found::Unknown,
                }
            })
            .buffered(self.config.concurrency * 2)
            .collect()
            .await;
        CacheLookup {
            found: slots.into_iter().map(|slot| found[slot].clone()).collect(),
        }
    }

    /// [`Self::run_scenes`] after the cache was looked up: a stored scene is answered from
    /// `lookup`, a missing one generated without looking again. With `cast`, a scene that
    /// waits for its characters' references runs once they are stored, with them.
    pub(crate) async fn run_scenes_with(
        &self,
        scenes: &[PreparedScene],
        lookup: &CacheLookup,
        cast: Option<&dyn SceneOrder>,
        options: &RunOptions,
        on_done: SceneCallback<'_>,
    ) -> Vec<Result<Stage3Output>> {
        // One brake for the whole batch: a 401/402 or the budget stops every scene's calls.
        let stop = options.stop.clone().unwrap_or_default();
        stop.limit_spending(self.config.max_cost_usd);
        let options = &RunOptions {
            stop: Some(stop),
            ..options.clone()
        };
        let (unique, slots) = unique_scenes(scenes);
        // The first of identical scenes stands for them all, and its lookup with it.
        let mut firsts = vec![0; unique.len()];
        for (index, slot) in slots.iter().enumerate().rev() {
            firsts[*slot] = index;
        }

        // Unordered, so a slow scene never holds a free slot hostage (`buffered` would wait
        // for the oldest scene before starting the next); the order is restored after.
        let mut outcomes: Vec<(usize, Result<Stage3Output>)> =
            stream::iter(unique.into_iter().enumerate())
                .map(|(index, scene)| {
                    let position = firsts[index];
                    let found = lookup.get(position);
                    async move {
                        let outcome = match (found, cast) {
                            (_, Some(cast)) if cast.waits(position) => {
                                match cast.release(self, scene, position, options).await {
                                    Ok(cast_scene) => {
                                        self.run_scene_with(&cast_scene, options, true).await
                                    }
                                    Err(e) => Err(e),
                                }
                            }
                            (Found::Hit(hit), _) => Ok(hit.as_ref().clone()),
                            (Found::Miss, _) => self.run_scene_with(scene, options, false).await,
                            (Found::Unknown, _) => self.run_scene_with(scene, options, true).await,
                        };
                        if let Some(cast) = cast {
                            cast.finished(position, &outcome);
                        }
                        on_done(scene.scene_id(), outcome.as_ref());
                        (index, outcome)
                    }
                })
                .buffer_unordered(self.config.concurrency * 2)
                .collect()
                .await;
        outcomes.sort_unstable_by_key(|(index, _)| *index);
        slots
            .into_iter()
            .map(|slot| outcomes[slot].1.clone())
            .collect()
    }

    /// One prepared scene: the cache, then generation and storage.
    ///
    /// A panic while handling it — a bug, say on a record some neighbour edited — fails this
    /// scene alone, as `internal`, instead of unwinding through the batch: in a Lambda
    /// invocation it would otherwise lose every healthy scene's answer with it, on every
    /// redelivery. A claim the scene held lapses by itself.
    pub(crate) async fn run_scene(
        &self,
        scene: &PreparedScene,
        options: &RunOptions,
    ) -> Result<Stage3Output> {
        self.run_scene_with(scene, options, true).await
    }

    /// [`Self::run_scene`]; `look_up_first: false` when the batch's lookup found nothing.
    pub(crate) async fn run_scene_with(
        &self,
        scene: &PreparedScene,
        options: &RunOptions,
        look_up_first: bool,
    ) -> Result<Stage3Output> {
        let span = tracing::info_span!("scene", scene_id = %scene.scene_id());
        async {
            let isolated =
                std::panic::AssertUnwindSafe(self.run_scene_inner(scene, options, look_up_first));
            let result = match futures::FutureExt::catch_unwind(isolated).await {
                Ok(result) => result,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "no message".into());
                    tracing::error!(panic = %what, "the scene panicked; the others go on");
                    Err(Stage3Error::Internal(format!(
                        "this service failed on the scene (a bug: {}); the batch's other \
                         scenes are unaffected",
                        what.chars().take(200).collect::<String>()
                    )))
                }
            };
            match &result {
                Ok(output) => tracing::info!(
                    image_path = %output.image_path,
                    attempts = output.generation_params.attempts,
                    "scene done"
                ),
                Err(e) => tracing::warn!(error_type = %e.error_type(), error = %e, "scene failed"),
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn run_scene_inner(
        &self,
        scene: &PreparedScene,
        options: &RunOptions,
        look_up_first: bool,
    ) -> Result<Stage3Output> {
        let force = options.force.unwrap_or(self.config.force);
        if !force && look_up_first {
            if let Some(hit) = self.cached(scene, options).await? {
                return Ok(hit);
            }
        }
        // One worker per request pays; the others wait for its result.
        let shelf = self.shelf(options);
        let turn = shelf
            .claim_or_wait(
                &scene.keys,
                self.claim_timing,
                options.stop.as_ref(),
                MIN_CALL_BUDGET + STORAGE_RESERVE,
                || self.cached(scene, options),
            )
            .await?;
        match turn {
            Turn::Served(hit) => Ok(hit),
            Turn::Ours(lease) => {
                let work = self.generate_and_store(scene, options);
                shelf
                    .while_held(&scene.keys, lease, self.claim_timing, work)
                    .await
            }
        }
    }

    /// A verified stored result for `scene`, rebuilt from the request: only what cannot be
    /// derived (pixel size, cost, timings) comes from the record. A result whose labels
    /// differ from today's settings is relabelled from its source, not regenerated.
    async fn cached(
        &self,
        scene: &PreparedScene,
        options: &RunOptions,
    ) -> Result<Option<Stage3Output>> {
        let expected = cache::Expected {
            scene_id: scene.scene_id(),
            request_hash: &scene.request_hash,
            size: scene.spec.size,
            max_pixels: self.limits.max_pixels,
            max_image_bytes: self.config.max_stored_image_bytes(),
        };
        let verified = self
            .shelf(options)
            .call("looking up the stored result", || {
                cache::lookup(self.store.as_ref(), &scene.keys, &expected)
            })
            .await?;
        let Some(cache::Verified { record, image_key }) = verified else {
            return Ok(None);
        };
        let stored = record.generation_params;
        // A fallback may have made it, maybe another provider's: the record names the
        // model that did (`cache::lookup` checked the provider is one we know).
        let drawn_by = ModelRef {
            provider: stored.provider.parse().unwrap_or(scene.spec.model.provider),
            model: stored.model,
        };
        let mut params = GenerationParams {
            cost: stored.cost,
            content_sha256: stored.content_sha256,
            bytes: stored.bytes,
            etag: stored.etag,
            aigc_label: stored.aigc_label,
            source_format: stored.source_format,
            attempts: stored.attempts,
            started_at: stored.started_at,
            finished_at: stored.finished_at,
            duration_ms: stored.duration_ms,
            ..self.params_for(scene, &drawn_by)
        };
        let mut image_key = image_key;
        let mut relabelled_png = None;
        let labelled_as_asked = params
            .aigc_label
            .as_ref()
            .is_some_and(|applied| applied.matches(&self.config.labels));
        if !labelled_as_asked {
            let Some(relabelled) = self.relabel(scene, &image_key, &params, options).await? else {
                return Ok(None);
            };
            image_key = relabelled.image_key;
            relabelled_png = Some(relabelled.published.png.clone());
            params.content_sha256 = relabelled.published.sha256;
            params.bytes = relabelled.published.png.len() as u64;
            params.etag = relabelled.etag;
            params.aigc_label = Some(relabelled.published.applied);
        }
        let (thumbnail_path, thumbnail_url) = match (&relabelled_png, &record.thumbnail_path) {
            (Some(png), _) => self.store_thumbnail(&image_key, png).await?,
            (None, Some(_)) => {
                let key = story::thumbnail_key(&image_key);
                (Some(self.store.location(&key)), self.image_url(&key).await?)
            }
            (None, None) => (None, None),
        };
        let output = Stage3Output {
            scene_id: scene.scene_id().to_string(),
            image_path: self.store.location(&image_key),
            image_url: self.image_url(&image_key).await?,
            width: record.width,
            height: record.height,
            generation_params: params,
            thumbnail_path,
            thumbnail_url,
            from_cache: true,
        };
        if !labelled_as_asked {
            self.shelf(options)
                .call("storing the result record", || {
                    cache::save_record(self.store.as_ref(), &scene.keys, &output)
                })
                .await?;
            tracing::info!("cache hit relabelled to today's label settings; no provider call");
        } else {
            tracing::info!("cache hit: returning the stored result, no provider call");
        }
        Ok(Some(output))
    }

    /// Publishes a stored result again with today's label settings, from its unlabelled
    /// source. `None` when the source cannot be had (then the scene is generated again).
    async fn relabel(
        &self,
        scene: &PreparedScene,
        image_key: &str,
        params: &GenerationParams,
        options: &RunOptions,
    ) -> Result<Option<StoredImage>> {
        let shelf = self.shelf(options);
        let max_bytes = self.config.max_stored_image_bytes();
        let found = shelf
            .source_to_relabel(scene.scene_id(), image_key, params, max_bytes)
            .await?;
        let Some((source, applied)) = found else {
            return Ok(None);
        };
        let published = self
            .label(scene, source.clone(), applied.source_sha256)
            .await?;
        Ok(Some(
            shelf
                .store_image(scene.scene_id(), &published, Some(&source))
                .await?,
        ))
    }

    /// Applies the configured labels to a checked source image (CPU work when a mark is
    /// drawn, so it shares the decode permits).
    async fn label(
        &self,
        scene: &PreparedScene,
        source: bytes::Bytes,
        source_sha256: String,
    ) -> Result<labels::Published> {
        let settings = self.config.labels.clone();
        let propagate_id = scene.keys.stem().to_string();
        if !settings.visible {
            return labels::publish(source, &source_sha256, &settings, &propagate_id);
        }
        let _permit =
            self.decode_permits.acquire().await.map_err(|e| {
                Stage3Error::InvalidImage(format!("image decoding unavailable: {e}"))
            })?;
        tokio::task::spawn_blocking(move || {
            labels::publish(source, &source_sha256, &settings, &propagate_id)
        })
        .await
        .map_err(|e| Stage3Error::InvalidImage(format!("drawing the label panicked: {e}")))?
    }

    /// Generates the image, publishes it under its content address, then writes the record.
    async fn generate_and_store(
        &self,
        scene: &PreparedScene,
        options: &RunOptions,
    ) -> Result<Stage3Output> {
        let started_at = SystemTime::now();
        let clock = Instant::now();
        let generated = self.generate_with_retries(scene, options).await?;
        let image = generated.image;
        let storing = Instant::now();
        let stored = self
            .shelf(options)
            .store_image(scene.scene_id(), &image.published, image.source.as_ref())
            .await?;

        let mut params = self.params_for(scene, &generated.model);
        params.cost = generated.cost;
        params.content_sha256 = stored.published.sha256.clone();
        params.bytes = stored.published.png.len() as u64;
        params.etag = stored.etag;
        params.aigc_label = Some(stored.published.applied);
        params.source_format = image.source_format.as_str().to_string();
        params.attempts = generated.attempts;
        params.started_at = rfc3339(started_at);
        params.finished_at = rfc3339(SystemTime::now());
        params.duration_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
        let (thumbnail_path, thumbnail_url) = match image.thumbnail {
            Some(thumbnail) => self.put_thumbnail(&stored.image_key, thumbnail).await?,
            None => (None, None),
        };
        let output = Stage3Output {
            scene_id: scene.scene_id().to_string(),
            image_path: self.store.location(&stored.image_key),
            image_url: self.image_url(&stored.image_key).await?,
            width: image.width,
            height: image.height,
            generation_params: params,
            thumbnail_path,
            thumbnail_url,
            from_cache: false,
        };
        // The record goes last: it is what makes the stored image a result.
        self.shelf(options)
            .call("storing the result record", || {
                cache::save_record(self.store.as_ref(), &scene.keys, &output)
            })
            .await?;
        let steps = image.steps;
        tracing::debug!(
            target: "stage3::steps",
            check_us = steps.check.as_micros() as u64,
            label_us = steps.label.as_micros() as u64,
            thumbnail_us = steps.thumbnail.as_micros() as u64,
            store_us = storing.elapsed().as_micros() as u64,
            "image steps"
        );
        Ok(output)
    }

    /// The gallery thumbnail of a stored image (`thumbnails/{image key}`), and its location
    /// and URL. Only a convenience: a thumbnail that cannot be stored is logged, the scene
    /// still succeeds, and pages fall back to the full image.
    async fn store_thumbnail(
        &self,
        image_key: &str,
        png: &bytes::Bytes,
    ) -> Result<(Option<String>, Option<String>)> {
        let stored = {
            let _decoding = self.decode_permits.acquire().await;
            story::store_thumbnail(self.store.as_ref(), image_key, png.clone())
                .await
                .inspect_err(|e| tracing::warn!(error = %e, "thumbnail not stored"))
                .ok()
        };
        self.thumbnail_links(stored).await
    }

    /// Stores a thumbnail made in the image's CPU pass; as [`Self::store_thumbnail`].
    async fn put_thumbnail(
        &self,
        image_key: &str,
        thumbnail: bytes::Bytes,
    ) -> Result<(Option<String>, Option<String>)> {
        let stored = story::put_thumbnail(self.store.as_ref(), image_key, thumbnail)
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "thumbnail not stored"))
            .ok();
        self.thumbnail_links(stored).await
    }

    /// Where a stored thumbnail is, and its URL.
    async fn thumbnail_links(
        &self,
        stored: Option<String>,
    ) -> Result<(Option<String>, Option<String>)> {
        Ok(match stored {
            Some(key) => (Some(self.store.location(&key)), self.image_url(&key).await?),
            None => (None, None),
        })
    }

    /// The generation parameters that follow from the request and the model that drew it
    /// (`drawn_by`, a fallback's when one served); what the generation measured (hash,
    /// size, cost, timings) is filled in by the caller.
    fn params_for(&self, scene: &PreparedScene, drawn_by: &ModelRef) -> GenerationParams {
        let spec = &scene.spec;
        let identity = self.providers.identity(drawn_by.provider);
        let sent = spec.prompt_for(drawn_by.provider);
        GenerationParams {
            model: drawn_by.model.clone(),
            requested_model: (*drawn_by != spec.model)
                .then(|| spec.model.written_for(drawn_by.provider)),
            size: spec.size,
            quality: spec.quality,
            prompt: sent.prompt.to_string(),
            negative_prompt: sent.negative_prompt.map(str::to_string),
            provider: identity.name().to_string(),
            api: identity.variant.map(str::to_string),
            aspect_ratio: spec.size.aspect_ratio().to_string(),
            resolution: spec.quality.resolution().to_string(),
            seed: spec.seed,
            reference_images: spec.recorded_references(),
            references: scene.references.clone(),
            cost: None,
            request_hash: scene.request_hash.clone(),
            content_sha256: String::new(),
            bytes: 0,
            etag: None,
            aigc_label: None,
            source_format: String::new(),
            attempts: 0,
            started_at: String::new(),
            finished_at: String::new(),
            duration_ms: 0,
        }
    }

    /// Generates the scene's image with the first model of its plan that can, falling back
    /// to the next when a model is unavailable or its transient retries are spent (never
    /// silently: each fallback is logged, and the result names the model that made it).
    async fn generate_with_retries(
        &self,
        scene: &PreparedScene,
        options: &RunOptions,
    ) -> Result<Generated> {
        let own_stop;
        let stop = match &options.stop {
            Some(stop) => stop,
            None => {
                own_stop = BatchStop::with_budget(self.config.max_cost_usd);
                &own_stop
            }
        };
        let plan = self.plan_scene(scene).await?;
        let mut tally = CallTally::default();
        let mut earlier: Vec<String> = Vec::new();
        for (index, planned) in plan.models.iter().enumerate() {
            if index > 0 {
                tracing::warn!(
                    requested_model = %scene.spec.model,
                    model = %planned.model,
                    after = %earlier.join("; "),
                    "falling back to the next model"
                );
            }
            match self
                .generate_with_model(scene, planned, options, stop, &mut tally)
                .await
            {
                Ok(image) => {
                    return Ok(Generated {
                        image,
                        cost: tally.cost,
                        attempts: tally.attempts,
                        model: planned.model.clone(),
                    })
                }
                Err(error)
                    if plan.models.get(index + 1).is_some_and(|next| {
                        self.falls_back(&error, &planned.model, &next.model)
                    }) =>
                {
                    earlier.push(format!("{}: {error}", planned.model));
                }
                Err(Stage3Error::ModelUnavailable(message)) if !earlier.is_empty() => {
                    return Err(Stage3Error::ModelUnavailable(format!(
                        "{message}; tried before: {}",
                        earlier.join("; ")
                    )))
                }
                Err(error) => return Err(error),
            }
        }
        Err(Stage3Error::ModelUnavailable(format!(
            "no model to try for {}",
            scene.spec.model
        )))
    }

    /// Whether a model's final failure moves on to the next model of the chain.
    fn falls_back(&self, error: &Stage3Error, failed: &ModelRef, next: &ModelRef) -> bool {
        match error {
            Stage3Error::ModelUnavailable(_) => true,
            Stage3Error::ContentPolicy(_) => self.config.fallback_on_refusal,
            // One provider's account said no: another provider's may say yes.
            Stage3Error::Auth(_)
            | Stage3Error::InsufficientCredits(_)
            | Stage3Error::PermissionDenied(_) => next.provider != failed.provider,
            // Retries spent on something that may be the model's own trouble.
            other => other.is_transient(),
        }
    }

    /// Calls the provider with one model and validates its image until one is good, a
    /// permanent error arrives, the retry budget is spent, or the deadline leaves no room.
    async fn generate_with_model(
        &self,
        scene: &PreparedScene,
        planned: &PlannedModel,
        options: &RunOptions,
        stop: &BatchStop,
        tally: &mut CallTally,
    ) -> Result<Processed> {
        let kind = planned.model.provider;
        let provider = self.providers.get(kind)?;
        let backpressure = &self.backpressure[&kind];
        let model_name = planned.model.to_string();
        let mut attempts = 0u32;
        loop {
            let provider_slot = Arc::clone(&self.provider_permits)
                .acquire_owned()
                .await
                .expect("the provider semaphore is never closed");
            stop.check_provider(kind)?;
            // Checked with the slot held: a scene that waited for it may have been
            // overtaken by one that learnt the model is gone.
            if stop.is_unavailable(&model_name) {
                return Err(Stage3Error::ModelUnavailable(format!(
                    "{} answered unavailable earlier in this batch",
                    planned.model.model
                )));
            }
            backpressure.wait().await;
            // Checked again: the pause may have been long, and the batch stopped meanwhile.
            stop.check_provider(kind)?;
            // Measured after the wait for a slot, which spends the same deadline.
            let budget = self.call_budget(options)?;
            let reserved = stop.reserve(planned.estimate_usd)?;
            attempts += 1;
            tally.attempts += 1;
            let gate = Arc::new(AnswerGate::new(
                provider_slot,
                self.answer_rooms.clone(),
                stop.limits_spending(),
            ));
            let answer = call_apart(
                provider.clone(),
                scene.scene_id().to_string(),
                scene.spec.clone(),
                planned.model.model.clone(),
                budget,
                gate.clone(),
            )
            .await;
            let billed = match &answer {
                Ok(image) => image.cost,
                Err(error) => error.cost(),
            };
            if let Some(cost) = billed {
                *tally.cost.get_or_insert(0.0) += cost;
            }
            // An image of unknown price counts at its estimate: the budget must not drift low.
            let counted = match &answer {
                Ok(_) => billed.or(planned.estimate_usd),
                Err(_) => billed,
            };
            stop.settle(reserved, counted);
            gate.call_returned();
            if let Err(Stage3Error::ModelUnavailable(_)) = &answer {
                stop.mark_unavailable(&model_name);
            }
            if let Err(error @ (Stage3Error::Auth(_) | Stage3Error::InsufficientCredits(_))) =
                &answer
            {
                // The account, not the scene: every other call to this provider would be
                // refused the same way.
                stop.stop_provider(kind, error.clone());
            }
            let mut retry_delay = None;
            if let Err(error @ Stage3Error::RateLimited(_)) = &answer {
                // Everyone waits, not just this scene: the limit is the account's. The pause
                // is set while this scene still holds its slot, so no queued scene can slip a
                // call in between.
                let delay = self.retry.delay_before(attempts, error);
                backpressure.pause_for(delay).await;
                retry_delay = Some(delay);
            }
            // An answer sits in memory until it is decoded: the gate keeps its room (or,
            // from a provider that never said it answered, its provider slot) until a
            // decoder takes it, so the answers waiting for one are at most the concurrency
            // however fast the provider answers.
            let outcome = match answer {
                Ok(image) => {
                    let decoding = self.decode_permits.acquire().await.map_err(|e| {
                        Stage3Error::InvalidImage(format!("image decoding unavailable: {e}"))
                    })?;
                    drop(gate);
                    self.process(decoding, image.bytes, scene).await
                }
                Err(e) => {
                    drop(gate);
                    Err(e)
                }
            };
            let error = match outcome {
                Ok(image) => return Ok(image),
                Err(e) => e,
            };

            let delay = retry_delay.unwrap_or_else(|| self.retry.delay_before(attempts, &error));
            let next_call_needs = STORAGE_RESERVE + MIN_CALL_BUDGET;
            if !self
                .retry
                .allows_retry(attempts, &error, delay, &options.deadline, next_call_needs)
            {
                return Err(error);
            }
            tracing::warn!(
                attempt = attempts,
                model = %planned.model,
                error_type = %error.error_type(),
                error = %error,
                delay_ms = delay.as_millis() as u64,
                "transient failure; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// Decoding is CPU work: keep it off the async workers so other scenes' I/O flows, and
    /// run no more decodes at once than there are cores (`_decoding`, the caller's permit). More would not finish sooner, but
    /// each holds a full frame and its PNG (tens of MB at 2K), so they would only add memory.
    ///
    /// One pass per image, under that one permit: the answer is checked and converted,
    /// labelled, and its thumbnail made, so a scene that starts on its pixels finishes
    /// with them before the next answer is decoded — no finished PNG waits in memory for
    /// a second turn at a decoder, as every one of a batch's did when the thumbnail queued
    /// behind the other scenes' answers.
    async fn process(
        &self,
        _decoding: tokio::sync::SemaphorePermit<'_>,
        bytes: bytes::Bytes,
        scene: &PreparedScene,
    ) -> Result<Processed> {
        let limits = self.limits;
        let size = scene.spec.size;
        let settings = self.config.labels.clone();
        let propagate_id = scene.keys.stem().to_string();
        tokio::task::spawn_blocking(move || {
            let clock = Instant::now();
            let (image, shrunk) =
                normalize_and_shrink(bytes, size, &limits, Some(story::THUMBNAIL_MAX_SIDE))?;
            let checked = clock.elapsed();
            // Kept only where it is stored: beside a visibly marked image. Otherwise the
            // buffer is handed to the label, which is spliced into it.
            let source = settings.visible.then(|| image.png.clone());
            let published =
                labels::publish(image.png, &image.content_sha256, &settings, &propagate_id)?;
            let labelled = clock.elapsed();
            // The thumbnail comes from the rows just checked, unless a visible mark changed
            // the pixels since (or the PNG was interlaced): then from the published PNG.
            let thumbnail = match shrunk.filter(|_| !published.applied.visible) {
                Some(shrunk) => story::encode_thumbnail(&shrunk, published.xmp_packet.as_deref()),
                None => story::make_thumbnail(&published.png, story::THUMBNAIL_MAX_SIDE),
            }
            .inspect_err(|e| tracing::warn!(error = %e, "thumbnail not made"))
            .ok();
            let steps = ImageSteps {
                check: checked,
                label: labelled - checked,
                thumbnail: clock.elapsed() - labelled,
            };
            Ok(Processed {
                width: image.width,
                height: image.height,
                source_format: image.source_format,
                source,
                published,
                thumbnail,
                steps,
            })
        })
        .await
        .map_err(|e| Stage3Error::InvalidImage(format!("image decoding panicked: {e}")))?
    }

    /// The budget of the next provider call: its own timeout, or what the deadline leaves
    /// after the storage reserve. Refused when the deadline leaves too little to be worth
    /// paying for.
    fn call_budget(&self, options: &RunOptions) -> Result<CallBudget> {
        let budget = options
            .deadline
            .budget(self.config.request_timeout, STORAGE_RESERVE);
        if budget.cut_by_deadline() && budget.timeout() < MIN_CALL_BUDGET {
            return Err(Stage3Error::DeadlineExceeded(format!(
                "{} ms left before the deadline; not starting a provider call",
                budget.timeout().as_millis()
            )));
        }
        Ok(budget)
    }

    /// The store as the cache writes it, for calls within `options`' deadline.
    fn shelf(&self, options: &RunOptions) -> Shelf<'_> {
        Shelf {
            store: self.store.as_ref(),
            retry: &self.retry,
            deadline: options.deadline,
        }
    }

    /// `image_url`: the CDN URL (signed if so configured) or what the store offers.
    async fn image_url(&self, key: &str) -> Result<Option<String>> {
        self.urls.url(self.store.as_ref(), key).await
    }
}

/// One provider call, on a task of its own.
///
/// A batch's scenes are driven by one task, on one thread; an answer read there (megabytes
/// copied out of the socket, then searched for the image) held up every other scene's
/// answer and the next calls behind it, while the other core stood idle. On its own task
/// the runtime spreads the answers over every core. Dropping the future (the batch
/// stopped, the deadline passed) cancels the call as before.
async fn call_apart(
    provider: Arc<dyn ImageProvider>,
    scene_id: String,
    spec: Arc<ImageSpec>,
    model: String,
    budget: CallBudget,
    gate: Arc<AnswerGate>,
) -> Result<ProviderImage> {
    let call = tokio::spawn(
        async move {
            let request = ImageRequest {
                scene_id: &scene_id,
                spec: &spec,
                model: &model,
                budget,
                gate: Some(&gate),
            };
            provider.generate(&request).await
        }
        .in_current_span(),
    );
    let _cancel_on_drop = AbortOnDrop(call.abort_handle());
    match call.await {
        Ok(answer) => answer,
        // The scene's own panic, raised where it would have been raised inline, so the
        // scene fails alone as `internal` (see `Stage3Service::run_scene`).
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(Stage3Error::Internal(format!(
            "the provider call was cancelled: {e}"
        ))),
    }
}

/// Aborts a spawned task when its awaiting future is dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The distinct scenes of a batch (identical requests for the same scene once), and for
/// each scene the index of its distinct one.
pub(crate) fn unique_scenes(scenes: &[PreparedScene]) -> (Vec<&PreparedScene>, Vec<usize>) {
    let mut first_index: HashMap<(&str, &str), usize> = HashMap::new();
    let mut unique: Vec<&PreparedScene> = Vec::new();
    let slots = scenes
        .iter()
        .map(|scene| {
            *first_index
                .entry((scene.scene_id(), scene.request_hash.as_str()))
                .or_insert_with(|| {
                    unique.push(scene);
                    unique.len() - 1
                })
        })
        .collect();
    (unique, slots)
}

/// An image after its one CPU pass ([`Stage3Service::process`]).
struct Processed {
    width: u32,
    height: u32,
    source_format: SourceFormat,
    /// The unlabelled PNG, when a visible mark was drawn (it is stored beside the image).
    source: Option<bytes::Bytes>,
    published: labels::Published,
    /// The gallery thumbnail of the published image; `None` if it could not be made.
    thumbnail: Option<bytes::Bytes>,
    /// How long each step of the pass took.
    steps: ImageSteps,
}

/// Where one image's time went, logged at debug level as `image steps` (target
/// `stage3::steps`) so a slow image can be taken apart, and read by the benchmark.
#[derive(Debug, Default, Clone, Copy)]
struct ImageSteps {
    /// Sniffing, decoding and checking the answer (geometry, blank test), converting it to
    /// PNG when it was not one, shrinking the thumbnail's pixels, hashing the PNG.
    check: Duration,
    /// Writing the labels, and hashing the labelled PNG (its content address).
    label: Duration,
    /// Encoding the thumbnail.
    thumbnail: Duration,
}

struct Generated {
    image: Processed,
    cost: Option<f64>,
    attempts: u32,
    /// The model that made the image.
    model: ModelRef,
}

/// Calls and billing of one scene, across its models.
#[derive(Default)]
struct CallTally {
    attempts: u32,
    cost: Option<f64>,
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}
