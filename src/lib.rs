//! Stage 3 of the story-illustration pipeline: image prompts in, PNGs on a CDN out.
//!
//! Module map, in layers. A module uses modules of its own layer or below, never above,
//! and no chain of uses comes back to where it started (`tests/layers.rs` checks both).
//!
//! **Shells** — event shapes in, answers out:
//! - [`lambda`] (feature `lambda`, on by default): the AWS Lambda adapter — event shapes,
//!   SQS partial failures, the dead-letter queue, answers under 6 MB. The `stage3` CLI
//!   (`src/bin/stage3.rs`, feature `cli`) is the other shell.
//!
//! **Service** — one scene's path, and one batch's:
//! - [`batch`]: the batch path both shells take — prepare, check and plan, run under the
//!   stop signal and deadline, publish the story, send the events, answer.
//! - [`service`]: one scene — cache, claim, provider with retries and fallbacks, budget,
//!   deadline, normalise, label, store.
//!
//! **Configuration**:
//! - [`config`]: the environment variables, read and checked once at start-up into each
//!   component's own settings (a component is built from its settings alone).
//!
//! **Parts** — each behind its own types, built from its own settings:
//! - [`provider`]: image providers behind one trait — `openrouter`, `ark`, `dashscope`,
//!   `placeholder` (offline) — and their settings.
//! - [`normalize`]: sniffs, decodes, validates and converts provider images to PNG; keeps
//!   only the PNG chunks it checks and writes the TC260 label.
//! - [`labels`]: the GB 45438 labels on published images, and relabelling.
//! - [`text`]: draws Chinese and Latin text (embedded Unifont subset) — the placeholder's
//!   lettering and the visible "AI生成" mark.
//! - [`storage`]: object stores behind one trait — `fs`, `s3` (Qiniu, MinIO, AWS),
//!   `memory` — and their settings.
//! - [`urls`]: the URLs answers give for stored objects — CDN, Qiniu-signed, presigned.
//! - [`cache`]: request hashes, content-addressed keys, verified records and claims.
//! - [`story`]: a story's manifest, storyboard page and thumbnails.
//! - [`events`]: completion events (EventBridge, signed webhook) and the dead-letter queue.
//! - [`queue`] (feature `sqs`, on with either shell): a story cut into queue messages the
//!   function accepts, sent with `SendMessageBatch` (`stage3 submit`).
//! - [`metrics`]: CloudWatch Embedded Metric Format lines — images, cache hits, failures,
//!   cost, latency — one batch at a time.
//! - [`retry`]: backoff with jitter and the back-pressure shared by a batch.
//! - [`batch_stop`]: the brake of a batch — a 401/402, the spent budget or Ctrl-C.
//! - [`aws`]: the AWS SDK configuration the S3, EventBridge and SQS clients share.
//! - [`telemetry`]: `tracing` set-up for the binaries.
//!
//! **Contracts** — import nothing above them:
//! - [`schema`]: the JSON contracts (`Stage2Output`, requests, `Stage3Output`, the batch
//!   answer with its story links and labels) and the parsing of every accepted input.
//! - [`image_spec`]: what one image is — model, full prompt, size, quality, seed,
//!   references — resolved and validated once per scene.
//! - [`prompt`]: composes the text sent to a provider (style tags, negatives).
//! - [`deadline`]: the time budget every provider, download and storage call runs under.
//! - [`error`]: the error type and its stable `error_type` identifiers.
//! - [`secret`]: keys that never print.
//!
//! The binaries `stage3` (feature `cli`) and `stage3-lambda` (feature `lambda`) are the
//! shells; both features are on by default.

pub mod aws;
pub mod batch;
pub mod batch_stop;
pub mod cache;
pub mod config;
pub mod deadline;
pub mod error;
pub mod events;
pub mod image_spec;
pub mod labels;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod metrics;
pub mod normalize;
pub mod prompt;
pub mod provider;
#[cfg(feature = "sqs")]
pub mod queue;
pub mod retry;
pub mod schema;
pub mod secret;
pub mod service;
pub mod storage;
pub mod story;
pub mod telemetry;
pub mod text;
pub mod urls;

pub use config::Config;
pub use error::{ErrorType, Stage3Error};
pub use schema::{BatchAnswer, GenerationRequest, Stage2Output, Stage3Output};
pub use service::{RunOptions, Stage3Service};
