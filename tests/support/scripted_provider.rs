//! The tests' in-process provider: every call is answered as a script says (an image, at a
//! price if it likes, or an error such as a 429 with its `Retry-After` or a 403 refusal),
//! chosen by scene or by prompt, after a scripted latency, and noted.
//! Wrapped around the real placeholder, its images are real, distinct PNGs per request;
//! `varying` makes every call's bytes differ (a model never draws the same picture twice).
//!
//! No socket is involved, so a test can run the service's scheduling on tokio's paused
//! clock: latencies and back-off pauses then take no real time and happen at exact
//! instants. What a real socket adds (the HTTP shape, the client's own timeouts) is for
//! `scripted_openrouter`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use stage3::provider::{
    ImageProvider, ImageRequest, PlaceholderProvider, ProviderIdentity, ProviderImage,
};
use stage3::Stage3Error;
use stage3::{ProviderFailure, Result};
use tokio::time::Instant;

/// What one call gets, and how long it takes to get it.
pub struct Answer {
    outcome: Outcome,
    latency: Duration,
    /// The price the provider reports for an image; `None` keeps the outcome's own.
    cost: Option<f64>,
}

enum Outcome {
    /// The placeholder's drawing for the request.
    Drawing,
    /// These bytes, as a PNG.
    Png(Bytes),
    Error(Stage3Error),
    /// A bug in the call path: the provider panics.
    Panic(&'static str),
}

impl Answer {
    /// The placeholder's drawing for the request, at once.
    pub fn image() -> Answer {
        Answer::now(Outcome::Drawing)
    }

    /// `png`, at once: cheaper than a drawing, for tests that make many calls and look
    /// only at when they happen.
    pub fn png(png: Bytes) -> Answer {
        Answer::now(Outcome::Png(png))
    }

    /// `error`, at once.
    pub fn error(error: Stage3Error) -> Answer {
        Answer::now(Outcome::Error(error))
    }

    /// The call panics with `message`, as a bug would.
    pub fn panic(message: &'static str) -> Answer {
        Answer::now(Outcome::Panic(message))
    }

    /// The same answer, `latency` after the call started.
    pub fn after(self, latency: Duration) -> Answer {
        Answer { latency, ..self }
    }

    /// The same image, billed at `usd` (the placeholder's drawings are free).
    pub fn costing(self, usd: f64) -> Answer {
        Answer {
            cost: Some(usd),
            ..self
        }
    }

    fn now(outcome: Outcome) -> Answer {
        Answer {
            outcome,
            latency: Duration::ZERO,
            cost: None,
        }
    }
}

/// A 429 as the OpenRouter client reports one that asked for `retry_after`.
pub fn rate_limited(retry_after: Duration) -> Stage3Error {
    let mut failure = ProviderFailure::new(Some(429), "slow down");
    failure.retry_after = Some(retry_after);
    Stage3Error::RateLimited(failure)
}

/// A 402 as the OpenRouter client reports it.
pub fn insufficient_credits() -> Stage3Error {
    Stage3Error::InsufficientCredits(ProviderFailure::new(Some(402), "Insufficient credits"))
}

/// A 403 moderation refusal, as the OpenRouter client reports one.
pub fn content_refused() -> Stage3Error {
    let mut failure = ProviderFailure::new(Some(403), "the prompt was flagged");
    failure.provider_error_type = Some("content_policy_violation".into());
    Stage3Error::ContentPolicy(failure)
}

/// One call as the provider saw it start.
#[derive(Debug, Clone)]
pub struct Call {
    pub scene_id: String,
    /// The full prompt sent, style tags and all.
    pub prompt: String,
    pub at: Instant,
}

/// Given the request and how many calls its scene made before, the answer.
type Script = Box<dyn Fn(&ImageRequest<'_>, usize) -> Answer + Send + Sync>;

pub struct ScriptedProvider {
    inner: PlaceholderProvider,
    script: Script,
    calls: Mutex<Vec<Call>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: AtomicUsize,
    varying: bool,
}

impl ScriptedProvider {
    /// Answers the `nth` call (0-based) for a scene with `script(scene_id, nth)`.
    pub fn new(script: impl Fn(&str, usize) -> Answer + Send + Sync + 'static) -> Self {
        ScriptedProvider::scripted(Box::new(move |request: &ImageRequest<'_>, nth| {
            script(request.scene_id, nth)
        }))
    }

    /// Answers every call with `script(prompt)`, the full prompt sent: for tests where one
    /// scene id stands for different requests.
    pub fn by_prompt(script: impl Fn(&str) -> Answer + Send + Sync + 'static) -> Self {
        ScriptedProvider::scripted(Box::new(move |request: &ImageRequest<'_>, _| {
            script(request.prompt())
        }))
    }

    fn scripted(script: Script) -> Self {
        ScriptedProvider {
            inner: PlaceholderProvider::new(),
            script,
            calls: Mutex::new(Vec::new()),
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: AtomicUsize::new(0),
            varying: false,
        }
    }

    /// Draws every image, after `latency`.
    pub fn placeholder(latency: Duration) -> Self {
        ScriptedProvider::new(move |_, _| Answer::image().after(latency))
    }

    /// Every call draws different bytes (the call number goes into the seed).
    pub fn varying(mut self) -> Self {
        self.varying = true;
        self
    }

    pub fn calls(&self) -> usize {
        self.lock().len()
    }

    pub fn calls_for(&self, scene_id: &str) -> usize {
        self.lock()
            .iter()
            .filter(|c| c.scene_id == scene_id)
            .count()
    }

    /// Every call, in the order they started.
    pub fn started(&self) -> Vec<Call> {
        self.lock().clone()
    }

    /// The most calls that were ever in progress at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Call>> {
        self.calls.lock().unwrap()
    }

    /// The placeholder's drawing for the request; with `varying`, for call `number`.
    async fn draw(&self, request: &ImageRequest<'_>, number: usize) -> Result<ProviderImage> {
        if !self.varying {
            return self.inner.generate(request).await;
        }
        let mut spec = request.spec.clone();
        spec.seed = Some(spec.seed.unwrap_or(0).wrapping_add(1000 + number as i64));
        let varied = ImageRequest {
            spec: &spec,
            ..*request
        };
        self.inner.generate(&varied).await
    }
}

/// Counts a call out of flight however it ends, cancelled included.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl ImageProvider for ScriptedProvider {
    fn identity(&self) -> ProviderIdentity {
        self.inner.identity()
    }

    async fn generate(&self, request: &ImageRequest<'_>) -> Result<ProviderImage> {
        // Scripts choose by scene or by prompt; the request goes to the placeholder as is.
        let scene_id = request.scene_id;
        let (number, nth) = {
            let mut calls = self.lock();
            let nth = calls.iter().filter(|c| c.scene_id == scene_id).count();
            calls.push(Call {
                scene_id: scene_id.to_string(),
                prompt: request.prompt().to_string(),
                at: Instant::now(),
            });
            (calls.len() - 1, nth)
        };
        let now_in_flight = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let _in_flight = InFlight(self.in_flight.clone());
        self.max_in_flight
            .fetch_max(now_in_flight, Ordering::SeqCst);

        let answer = (self.script)(request, nth);
        tokio::time::sleep(answer.latency).await;
        let mut image = match answer.outcome {
            Outcome::Drawing => self.draw(request, number).await?,
            Outcome::Png(bytes) => ProviderImage {
                bytes,
                claimed_media_type: Some("image/png".into()),
                cost: None,
            },
            Outcome::Error(error) => return Err(error),
            Outcome::Panic(message) => panic!("{message}"),
        };
        if answer.cost.is_some() {
            image.cost = answer.cost;
        }
        Ok(image)
    }
}
