//! The smallest Rust Lambda function — the benchmark's baseline for init time: what the
//! runtime itself costs from process start to the first poll, beside which `stage3-lambda`'s
//! own start-up is measured (`cargo bench --bench pipeline`, section 4).

use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| async move {
        Ok::<Value, Error>(event.payload)
    }))
    .await
}
