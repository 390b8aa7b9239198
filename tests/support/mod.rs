//! Helpers shared by the integration tests: one way to configure the service, real servers
//! on loopback (an S3 server, a scripted OpenRouter stand-in, over HTTP or HTTPS), an
//! in-process scripted provider for tests on a paused clock, a store whose writes wait at a
//! gate, a store whose reads are slow, SQS events, and real image bytes.
//!
//! Each test binary includes this module and uses a different part of it, so the parts a
//! given binary leaves unused are not dead code.
#![allow(dead_code)]

pub mod config;
pub mod gated_store;
pub mod label_readers;
pub mod moto;
pub mod s3_server;
pub mod scripted_china;
pub mod scripted_openrouter;
pub mod scripted_provider;
pub mod slow_store;
pub mod sqs;
pub mod sqs_stand_in;
pub mod tls;

use std::io::Cursor;
use std::path::Path;

use bytes::Bytes;

/// A real PNG of `width` × `height` noisy pixels (noise, so it compresses like a picture
/// rather than to a few bytes, and two calls with different seeds differ).
pub fn noisy_png(width: u32, height: u32, seed: u64) -> Bytes {
    let mut rng = fastrand::Rng::with_seed(seed);
    let pixels = image::RgbImage::from_fn(width, height, |_, _| {
        image::Rgb([rng.u8(..), rng.u8(..), rng.u8(..)])
    });
    let mut out = Cursor::new(Vec::new());
    pixels
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encoding a PNG in memory cannot fail");
    Bytes::from(out.into_inner())
}

/// The `stage3` binary run in `workdir` with a clean environment: nothing from the
/// developer's shell or `.env` leaks in. PATH stays, for what the binary may start.
pub fn stage3_command(workdir: &Path) -> assert_cmd::Command {
    let mut command = assert_cmd::Command::cargo_bin("stage3").unwrap();
    command
        .current_dir(workdir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command
}
