//! `stage3-lambda`: the AWS Lambda function. Everything it does lives in [`stage3::lambda`];
//! this main only builds the service once per sandbox and hands events to it.

use std::process::ExitCode;

use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::Value;
use stage3::{lambda, telemetry, Config, Stage3Service};

fn main() -> ExitCode {
    // Before the runtime's threads start allocating.
    stage3::allocator::tune();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("error[config]: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    // Lambda's advanced logging controls set `JSON` (any case) when JSON logs are wanted.
    let json = std::env::var("AWS_LAMBDA_LOG_FORMAT")
        .is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    telemetry::init("info", json);

    // Built before the first event, outside any invocation: the HTTP connection pool and
    // the S3 client are reused by every event this sandbox serves. A bad configuration
    // fails the init phase, where Lambda reports it as `Runtime.ExitError` with our message.
    // The event and dead-letter clients wait for the first invocation (`LazyOutlets`), so
    // the init phase loads no AWS profile for them.
    // The configuration is the function's environment alone: no `.env` is looked for, so a
    // file in the deployment package or the working directory cannot change where keys go.
    let built = match Config::from_env() {
        Ok(config) => {
            // Metric lines go to stdout, where CloudWatch Logs reads them (STAGE3_METRICS=off
            // turns them off).
            let outlets = lambda::LazyOutlets::new(config.events.clone(), config.aws.clone())
                .with_metrics(lambda::metrics_sink(config.metrics));
            Stage3Service::from_config(config)
                .await
                .map(|service| (service, outlets))
        }
        Err(e) => Err(e),
    };
    let (service, outlets) = match built {
        Ok(built) => built,
        Err(e) => {
            // One line on stderr, which Lambda keeps in the function's log next to the
            // init failure.
            tracing::error!(error_type = %e.error_type(), error = %e, "start-up failed");
            return ExitCode::FAILURE;
        }
    };

    let (service, outlets) = (&service, &outlets);
    let handler = service_fn(move |event: LambdaEvent<Value>| {
        lambda::handle_invocation_lazily(service, outlets, event)
    });
    match lambda_runtime::run(handler).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the Lambda runtime stopped");
            ExitCode::FAILURE
        }
    }
}
