//! `stage3`: the command-line shell over the Stage 3 service.
//!
//! Prints the batch answer as JSON on stdout and progress on stderr. Exit codes are a
//! contract: 0 every scene done, 1 some failed (or the story's manifest and page could not
//! be published), 2 invalid input or configuration (nothing generated, nothing spent), 130
//! interrupted by Ctrl-C (the answer so far is still printed). `submit` exits 1 when a
//! message could not be sent; `status` exits 3 while scenes are pending.
//!
//! The CLI, and only the CLI, reads `./.env` (the working directory's own file, never a
//! parent's): before the async runtime starts, because loading it sets variables, which is
//! safe only while the process has one thread.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use stage3::provider::{ModelListing, Providers};
use stage3::story;
use stage3::{
    read_submission, telemetry, BatchOptions, BatchStop, Config, Follow, Overrides, ProviderKind,
    RequestOptions, Stage3Error, Stage3Service, SubmitOptions,
};

mod args;
mod progress;

use args::{Cli, Command, GenerateArgs, StatusArgs, SubmitArgs};
use progress::{Progress, StoryWait};

const EXIT_SOME_FAILED: u8 = 1;
const EXIT_INVALID: u8 = 2;
/// `status`: some scenes have no outcome yet.
const EXIT_PENDING: u8 = 3;
/// 128 + SIGINT, as shells report a run stopped by Ctrl-C.
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    stage3::allocator::tune();
    telemetry::init("warn", false);
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error[{}]: {e}", e.error_type());
            ExitCode::from(EXIT_INVALID)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, Stage3Error> {
    // `gallery` reads no configuration; the other commands see `./.env` as part of their
    // environment. Loaded here, while this is the process's only thread.
    if !matches!(cli.command, Command::Gallery { .. }) {
        stage3::load_dotenv()?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Stage3Error::config(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async {
        match cli.command {
            Command::Generate(args) => generate(args).await,
            Command::Validate { input, max_cost } => validate(&input, max_cost).await,
            Command::Models { provider, json } => models(provider, json).await,
            Command::Gallery { story } => gallery(&story),
            Command::Submit(args) => submit(args).await,
            Command::Status(args) => status(args).await,
        }
    })
}

async fn generate(args: GenerateArgs) -> Result<ExitCode, Stage3Error> {
    let mut config = Config::from_env()?;
    config.override_with(Overrides {
        output_dir: args.out,
        concurrency: args.concurrency.map(usize::from),
        provider: args.provider,
        force: args.force,
        fallback_models: args.fallback_models,
        max_cost: args.max_cost,
    })?;

    let mut submission = read_submission(&args.input, config.max_batch)?;
    submission.override_with(&RequestOptions {
        size: args.size,
        quality: args.quality,
        model: args.model,
    });
    submission.override_character_mode(args.character_mode);

    // Ctrl-C stops the batch from starting calls; the calls in flight finish and are stored.
    let stop = BatchStop::new();
    let options = BatchOptions::for_command_line(&config, stop.clone()).await?;
    let service = Stage3Service::from_config(config).await?;
    let progress = Progress::default();
    let interrupts = tokio::spawn(stop_on_ctrl_c(stop.clone()));
    let run = service.run(submission, &options, &progress).await?;
    interrupts.abort();
    progress.finish(&run, options.events.is_enabled());
    let json = serde_json::to_string_pretty(&run.answer).expect("batch answer serializes");
    println!("{json}");
    Ok(match stop.reason() {
        Some(Stage3Error::Cancelled(_)) => ExitCode::from(EXIT_INTERRUPTED),
        _ if run.answer.is_complete() => ExitCode::SUCCESS,
        _ => ExitCode::from(EXIT_SOME_FAILED),
    })
}

/// The first Ctrl-C stops the batch from starting provider calls: calls in flight finish and
/// are stored, the answer so far is printed, and scenes that never started fail
/// `cancelled`. A second Ctrl-C aborts at once (stale temporary files are removed by the
/// next run).
async fn stop_on_ctrl_c(stop: BatchStop) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    eprintln!(
        "interrupted: no new calls start; calls in flight finish and are stored \
         (Ctrl-C again to abort at once)"
    );
    stop.stop(Stage3Error::Cancelled(
        "the run was interrupted (Ctrl-C)".into(),
    ));
    if tokio::signal::ctrl_c().await.is_ok() {
        eprintln!("aborted");
        std::process::exit(i32::from(EXIT_INTERRUPTED));
    }
}

async fn validate(input: &Path, max_cost: Option<String>) -> Result<ExitCode, Stage3Error> {
    let mut config = Config::from_env()?;
    config.override_with(Overrides {
        max_cost,
        ..Overrides::default()
    })?;
    let submission = read_submission(input, config.max_batch)?;
    // Validation calls nobody who bills, and writes and deletes nothing.
    let check = Stage3Service::for_checking(config)
        .check(submission)
        .await?;
    eprintln!("{check}");
    Ok(ExitCode::SUCCESS)
}

async fn models(provider: Option<ProviderKind>, json: bool) -> Result<ExitCode, Stage3Error> {
    let config = Config::from_env()?;
    let kind = provider.unwrap_or(config.provider);
    let models = Providers::for_checking(kind, config.providers)
        .get(kind)?
        .list_models()
        .await?;
    if json {
        let text = serde_json::to_string_pretty(&models).expect("model listings serialize");
        println!("{text}");
    } else {
        let (table, note) = ModelListing::table(kind, &models);
        print!("{table}");
        eprintln!("{note}");
    }
    Ok(ExitCode::SUCCESS)
}

fn gallery(story: &Path) -> Result<ExitCode, Stage3Error> {
    let page = stage3::story::rebuild_gallery(story)?;
    println!("{}", page.display());
    Ok(ExitCode::SUCCESS)
}

async fn submit(args: SubmitArgs) -> Result<ExitCode, Stage3Error> {
    let config = config_with_store(args.out)?;
    // The whole story, however long: it is cut into messages.
    let submission = read_submission(&args.input, story::MAX_STORY_SCENES)?;
    let options = SubmitOptions {
        queue_url: args.queue_url,
        story_id: args.story_id,
        scenes_per_message: args.scenes_per_message as usize,
    };
    let report = stage3::submit_story(config, submission, options).await?;
    for line in report.closing_lines() {
        eprintln!("{line}");
    }
    let json = serde_json::to_string_pretty(&report).expect("the report serializes");
    println!("{json}");
    Ok(match report.unsent.is_empty() {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(EXIT_SOME_FAILED),
    })
}

async fn status(args: StatusArgs) -> Result<ExitCode, Stage3Error> {
    let config = config_with_store(args.out)?;
    let follow = match args.wait {
        true => Follow::UntilSettled {
            timeout: args.timeout.map(Duration::from_secs),
        },
        false => Follow::Once,
    };
    let mut waiting = StoryWait::default();
    let progress =
        stage3::follow_story(&config, &args.story_id, follow, &mut |p| waiting.show(p)).await?;
    waiting.finish();
    match args.json {
        true => println!(
            "{}",
            serde_json::to_string_pretty(&progress).expect("serializes")
        ),
        false => print!("{progress}"),
    }
    Ok(if progress.pending > 0 {
        ExitCode::from(EXIT_PENDING)
    } else if progress.failed > 0 {
        ExitCode::from(EXIT_SOME_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

/// The configuration, with `--out` over `STAGE3_OUTPUT_DIR`.
fn config_with_store(out: Option<PathBuf>) -> Result<Config, Stage3Error> {
    let mut config = Config::from_env()?;
    config.override_with(Overrides {
        output_dir: out,
        ..Overrides::default()
    })?;
    Ok(config)
}
