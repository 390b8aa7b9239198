//! The tests' in-process provider: every call is answered as a script says (an image, or
//! an error such as a 429 with its `Retry-After`), after a scripted latency, and noted.
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
use stage3::error::{ProviderFailure, Result};
use stage3::provider::{
    ImageProvider, ImageRequest, PlaceholderProvider, ProviderIdentity, ProviderImage,
};
use stage3::Stage3Error;
use tokio::time::Instant;

/// What one call gets, and how long it takes to get it.
pub struct Answer {
    outcome: Outcome,
    latency: Duration,
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

    fn now(outcome: Outcome) -> Answer {
        Answer {
            outcome,
            latency: Duration::ZERO,
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

/// One call as the provider saw it start.
#[derive(Debug, Clone)]
pub struct Call {
    pub scene_id: String,
    pub at: Instant,
}

type Script = Box<dyn Fn(&str, usize) -> Answer + Send + Sync>;

pub struct ScriptedProvider {
    inner: PlaceholderProvider,
    /// Given the scene and how many calls that scene made before, the answer.
    script: Script,
    calls: Mutex<Vec<Call>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: AtomicUsize,
    varying: bool,
}

impl ScriptedProvider {
    /// Answers the `nth` call (0-based) for a scene with `script(scene_id, nth)`.
    pub fn new(script: impl Fn(&str, usize) -> Answer + Send + Sync + 'static) -> Self {
        ScriptedProvider {
            inner: PlaceholderProvider::new(),
            script: Box::new(script),
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
        // Scripts choose by scene; the rest of the request goes to the placeholder as is.
        let scene_id = request.scene_id;
        let (number, nth) = {
            let mut calls = self.lock();
            let nth = calls.iter().filter(|c| c.scene_id == scene_id).count();
            calls.push(Call {
                scene_id: scene_id.to_string(),
                at: Instant::now(),
            });
            (calls.len() - 1, nth)
        };
        let now_in_flight = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let _in_flight = InFlight(self.in_flight.clone());
        self.max_in_flight
            .fetch_max(now_in_flight, Ordering::SeqCst);

        let answer = (self.script)(scene_id, nth);
        tokio::time::sleep(answer.latency).await;
        match answer.outcome {
            Outcome::Drawing => {}
            Outcome::Png(bytes) => {
                return Ok(ProviderImage {
                    bytes,
                    claimed_media_type: Some("image/png".into()),
                    cost: None,
                })
            }
            Outcome::Error(error) => return Err(error),
            Outcome::Panic(message) => panic!("{message}"),
        }
        if self.varying {
            let mut spec = request.spec.clone();
            spec.seed = Some(spec.seed.unwrap_or(0).wrapping_add(1000 + number as i64));
            let varied = ImageRequest {
                spec: &spec,
                ..*request
            };
            return self.inner.generate(&varied).await;
        }
        self.inner.generate(request).await
    }
}
