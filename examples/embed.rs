//! The README's library example, compiled with the tests so it cannot drift from the API.
//! Run it offline with `STAGE3_PROVIDER=placeholder cargo run --example embed`.

use stage3::parse_submission;
use stage3::BatchOptions;
use stage3::{Config, Stage3Error, Stage3Service};

#[tokio::main]
async fn main() -> Result<(), Stage3Error> {
    let service = Stage3Service::from_config(Config::from_env()?).await?;
    let input = serde_json::json!([{"scene_id": "scene_001", "image_prompt": "A fox in the snow"}]);
    let submission = parse_submission(input, service.config().max_batch)?;
    let run = service
        .run(submission, &BatchOptions::default(), &())
        .await?;
    println!(
        "{} stored, {} failed",
        run.answer.results.len(),
        run.answer.failures.len()
    );
    Ok(())
}
