//! The library and the Lambda handler end to end, compiled into the library's own test build
//! (`src/lib.rs` includes this module under `cfg(test)`), so it reaches the crate-private
//! parts it drives and links the crate (and the AWS SDKs) once. Each module is one area,
//! driven over real sockets: the OpenRouter client and its error mapping, the fault table,
//! the cache, S3 storage, stories, events, the Lambda handler, and long stories
//! (`stage3 submit` and `status` against moto with the handler draining the queue).
//!
//! `cargo test --lib -- suite::s3_storage:: suite::s3_service::` runs one area;
//! `.ci/garage-s3.sh` runs the S3-facing ones against a real Garage server. The tests that
//! run the `stage3` binary find it beside the test build (`assert_cmd::cargo::cargo_bin`):
//! `cargo test` builds it first, for the integration tests.

#[path = "../support/mod.rs"]
mod support;

mod cache;
mod characters;
mod china;
mod events;
mod faults;
mod lambda_handler;
mod long_stories;
mod openrouter;
mod references;
mod s3_service;
mod s3_storage;
mod story;
