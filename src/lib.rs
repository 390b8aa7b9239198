//! Stage 3 of the story-illustration pipeline: image prompts in, PNGs on a CDN out.
//!
//! Module map — the request's path through the crate, top to bottom:
//!
//! - [`schema`]: the JSON contracts (`Stage2Output`, requests, `Stage3Output`, batch answer)
//!   and the parsing of every accepted input shape.
//! - [`image_spec`]: what one image is — model, full prompt, size, quality, seed,
//!   references — resolved and validated once per scene, then borrowed by planning, the
//!   provider call, the cache key and the output.
//! - [`prompt`]: composes the text sent to the provider (style tags, "Avoid:" negatives).
//! - [`config`]: the environment variables, read and checked once at start-up, grouped
//!   into each component's settings (a component is built from its own settings alone).
//! - [`service`]: the orchestration — cache, provider, retries, deadline, storage.
//! - [`provider`]: image providers behind one trait — `openrouter`, `placeholder` (offline).
//! - [`normalize`]: sniffs, decodes, validates and converts provider images to PNG; keeps
//!   only the PNG chunks it checks (`normalize::chunks`) and writes the AIGC label
//!   (`normalize::aigc`).
//! - [`labels`]: the GB 45438 AIGC labels on published images, and relabelling.
//! - [`text`]: draws Chinese and Latin text on images (embedded Unifont subset) — the
//!   placeholder's lettering and the visible "AI生成" mark.
//! - [`storage`]: object stores behind one trait — `fs` (local), `s3` (Qiniu, MinIO, AWS),
//!   `memory` (tests, embedding).
//! - [`urls`]: the URLs answers give for stored objects — CDN, Qiniu-signed, presigned.
//! - [`deadline`]: the time budget every provider, download and storage call runs under.
//! - [`story`]: a story's manifest, storyboard page and thumbnails, published per batch.
//! - [`batch_stop`]: the brake of a batch — a 401/402, the spent budget or Ctrl-C stops
//!   every later provider call; also keeps the batch's spending.
//! - [`cache`]: request hashes, content-addressed keys, verified records and claims.
//! - [`retry`]: backoff with jitter and the back-pressure shared by a batch.
//! - [`aws`]: the AWS SDK configuration the S3, EventBridge and SQS clients share, loaded once.
//! - [`lambda`] (feature `lambda`, on by default): the AWS Lambda adapter — event shapes, SQS partial failures, deadlines.
//! - [`events`]: completion events (EventBridge, signed webhook) and the dead-letter queue.
//! - [`telemetry`]: `tracing` set-up for the binaries.
//! - [`error`]: the error type and its stable `error_type` identifiers.
//!
//! The binaries `stage3` (CLI, feature `cli`) and `stage3-lambda` (feature `lambda`) are thin
//! shells over [`service`]; both features are on by default.

pub mod aws;
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
pub mod normalize;
pub mod prompt;
pub mod provider;
pub mod retry;
pub mod schema;
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
