//! Stage 3 of the story-illustration pipeline: image prompts in, PNGs on a CDN out.
//!
//! Module map, in layers. A module uses modules of its own layer or below, never above,
//! and no chain of uses comes back to where it started (`tests/layers.rs` checks both).
//!
//! **Shells** — event shapes in, answers out:
//! - [`lambda`] (feature `lambda`, on by default): the AWS Lambda adapter — event shapes,
//!   SQS partial failures, the dead-letter queue, answers under 6 MB. The `stage3` CLI
//!   (`src/bin/stage3/`, feature `cli`) is the other shell.
//!
//! **Service** — one scene's path, and one batch's:
//! - `batch`: the batch path both shells take — prepare, check and plan, run under the
//!   stop signal and deadline, publish the story, send the events, answer.
//! - `service`: one scene — cache, claim, provider with retries and fallbacks, budget,
//!   deadline, normalise, label, store.
//! - `cast`: the same character on every page — character sheets and first appearances
//!   as references, and the order that waits for them (`STAGE3_CHARACTER_MODE`).
//! - `queued_story`: a story run through the request queue — checked whole, its plan
//!   stored, sent (`stage3 submit`), and followed to the end (`stage3 status`).
//!
//! **Configuration**:
//! - `config`: the environment variables, read and checked once at start-up into each
//!   component's own settings (a component is built from its settings alone).
//!
//! **Parts** — each behind its own types, built from its own settings:
//! - [`provider`]: image providers behind one trait — `openrouter`, `ark`, `dashscope`,
//!   `placeholder` (offline) — and their settings.
//! - `normalize`: sniffs, decodes, validates and converts provider images to PNG; keeps
//!   only the PNG chunks it checks and writes the TC260 label.
//! - `labels`: the GB 45438 labels on published images, and relabelling.
//! - `text`: draws Chinese and Latin text (embedded Unifont subset) — the placeholder's
//!   lettering and the visible "AI生成" mark.
//! - [`storage`]: object stores behind one trait — `fs`, `s3` (Qiniu, MinIO, AWS),
//!   `memory` — and their settings.
//! - `urls`: the URLs answers give for stored objects — CDN, Qiniu-signed, presigned.
//! - `cache`: request hashes, content-addressed keys, verified records and claims.
//! - [`story`]: a story's manifest, storyboard page and thumbnails.
//! - [`events`]: completion events (EventBridge, signed webhook) and the dead-letter queue.
//! - [`queue`] (feature `sqs`, on with either shell): a story cut into queue messages the
//!   function accepts, sent with `SendMessageBatch` (`stage3 submit`).
//! - [`metrics`]: CloudWatch Embedded Metric Format lines — images, cache hits, failures,
//!   cost, latency — one batch at a time.
//! - `retry`: backoff with jitter and the back-pressure shared by a batch.
//! - `batch_stop`: the brake of a batch — a 401/402, the spent budget or Ctrl-C.
//! - `aws`: the AWS SDK configuration the S3, EventBridge and SQS clients share.
//! - [`telemetry`]: `tracing` set-up for the binaries.
//! - [`allocator`]: the allocator tuned for the binaries: two arenas, big buffers given back.
//!
//! **Contracts** — import nothing above them:
//! - `schema`: the JSON contracts (`Stage2Output`, requests, `Stage3Output`, the batch
//!   answer with its story links and labels) and the parsing of every accepted input.
//! - `image_spec`: what one image is — model, full prompt, size, quality, seed,
//!   references — resolved and validated once per scene.
//! - `prompt`: composes the text sent to a provider (style tags, negatives).
//! - `deadline`: the time budget every provider, download and storage call runs under.
//! - `error`: the error type and its stable `error_type` identifiers.
//! - `secret`: keys that never print.
//!
//! The binaries `stage3` (feature `cli`) and `stage3-lambda` (feature `lambda`) are the
//! shells; both features are on by default.

#![warn(unreachable_pub)]
// A few helpers exist for the suite alone (`tests/suite/`, built with both shells' features);
// a test build without those features leaves them unused.
#![cfg_attr(
    all(test, not(all(feature = "cli", feature = "lambda"))),
    allow(dead_code)
)]

// Private modules: what an embedding program needs is re-exported below, each item under
// one path. The parts with a namespace of their own (providers, stores, events, stories,
// the request queue, metrics, the Lambda adapter and the binaries' set-up) are public.
pub mod allocator;
mod aws;
mod batch;
mod batch_stop;
mod cache;
mod cast;
mod config;
mod deadline;
mod error;
pub mod events;
mod image_spec;
mod labels;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod metrics;
mod normalize;
mod prompt;
pub mod provider;
#[cfg(feature = "sqs")]
pub mod queue;
mod queued_story;
mod retry;
mod schema;
mod secret;
mod service;
pub mod storage;
pub mod story;
pub mod telemetry;
mod text;
mod urls;

// The service, its options and what it answers.
pub use batch::{BatchOptions, BatchProgress, BatchRun, SubmissionCheck};
pub use batch_stop::BatchStop;
pub use service::{BatchPlan, PreparedScene, RunOptions, Stage3Service};
// A story run through the request queue.
pub use queued_story::{follow_story, Follow, SubmitOptions};
#[cfg(feature = "sqs")]
pub use queued_story::{submit_story, SubmitReport};
// The configuration, read once from the environment.
#[cfg(feature = "cli")]
pub use config::load_dotenv;
pub use config::{Config, Overrides, DEFAULT_MODEL};
// The JSON contracts.
pub use image_spec::{ImageSpec, ModelRef, ProviderKind};
pub use schema::{
    parse_submission, read_submission, AppliedLabels, BatchAnswer, BatchSummary, Cast, Character,
    CharacterMode, GenerationParams, GenerationRequest, ImageQuality, ImageSize, ReferenceUsed,
    RequestOptions, SceneFailure, Stage2Output, Stage3Output, StoryError, StoryLinks, Submission,
};
// Errors, with their stable `error_type`.
pub use error::{ErrorType, ProviderFailure, Result, Stage3Error};
// Time budgets, retries, keys and the AWS set-up the clients share.
pub use aws::AwsConfig;
pub use deadline::{CallBudget, Deadline};
pub use secret::Secret;
// Images: normalising, and the GB 45438 implicit label.
pub use normalize::{
    count_aigc_labels, insert_aigc_label, normalize_image, read_aigc_label, strip_aigc_label,
    AigcLabel, ImageLimits, DEFAULT_MAX_IMAGE_PIXELS,
};
// The URLs answers give for stored objects.
pub use urls::{QiniuSigner, UrlPolicy};

// The suite drives the library's own parts (the scene-level service, the Lambda handler,
// the story publisher) over real sockets: stand-ins, S3 servers, moto. Those parts are
// crate-private, so the suite is compiled into the library's test build rather than as an
// integration test; it lives beside the integration tests, in tests/suite/, and names the
// crate `stage3` as they do.
#[cfg(test)]
extern crate self as stage3;
#[cfg(all(test, feature = "cli", feature = "lambda"))]
#[path = "../tests/suite/mod.rs"]
#[allow(unreachable_pub)]
mod suite;
