//! The library and the Lambda handler end to end, in one test binary: every suite here links
//! the whole crate (and the AWS SDKs) once, instead of once per file. Each module is one
//! area, driven over real sockets: the OpenRouter client and its error mapping, the fault
//! table, the cache, S3 storage, stories, events, the Lambda handler, and long stories
//! (`stage3 submit` and `status` against moto with the handler draining the queue).
//!
//! `cargo test --test suite -- s3_storage:: s3_service::` runs one area; `.ci/garage-s3.sh`
//! runs the S3-facing ones against a real Garage server.

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
