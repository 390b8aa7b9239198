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

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use stage3::batch::{BatchOptions, BatchProgress, BatchRun};
use stage3::batch_stop::BatchStop;
use stage3::config::{self, Config, Overrides};
use stage3::deadline::Deadline;
use stage3::events::{self, EventPublisher};
use stage3::image_spec::ProviderKind;
use stage3::metrics::{MetricsFormat, MetricsSink};
use stage3::provider::{ModelListing, Providers};
use stage3::queue::{self, RequestQueue};
use stage3::schema::{read_submission, validate_story_id, ImageQuality, ImageSize, RequestOptions};
use stage3::service::{RunOptions, Stage3Service};
use stage3::story::{self, StoryPlan, StoryProgress};
use stage3::{storage, telemetry, Stage3Error};

#[derive(Parser)]
#[command(
    name = "stage3",
    version,
    about = "Turn stage-2 image prompts into stored PNGs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate one image per scene and print the batch answer as JSON.
    Generate(GenerateArgs),
    /// Check an input file without generating anything (exit 0 valid, 2 invalid) and print
    /// the batch's estimated cost.
    Validate {
        /// The input JSON file, or `-` for stdin.
        input: PathBuf,
        /// Check the estimate against this budget in USD (STAGE3_MAX_COST_USD).
        #[arg(long, value_name = "USD")]
        max_cost: Option<String>,
    },
    /// List a provider's image models: sizes, what they take, price per image.
    Models {
        /// openrouter (its catalogue), ark or dashscope (their tables); default
        /// STAGE3_PROVIDER.
        #[arg(long)]
        provider: Option<ProviderKind>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a story's storyboard page (index.html) from its manifest.json.
    Gallery {
        /// The story's directory (`OUT/stories/STORY_ID`) or its manifest.json.
        story: PathBuf,
    },
    /// Put a story on the Lambda function's request queue: checked whole first, its plan
    /// stored beside its manifest, then sent with SendMessageBatch.
    Submit(SubmitArgs),
    /// Where a submitted story stands: total, succeeded, failed, pending, cost (exit 0 all
    /// succeeded, 1 some failed, 3 some pending).
    Status(StatusArgs),
}

#[derive(Args)]
struct SubmitArgs {
    /// The story: one request, an array, or {"scenes": [...]}; `-` reads stdin.
    input: PathBuf,
    /// The request queue's URL (the stack's RequestQueueUrl output). The endpoint comes
    /// from AWS_ENDPOINT_URL_SQS or AWS_ENDPOINT_URL when set.
    #[arg(long, value_name = "URL")]
    queue_url: String,
    /// The story's id (default: the input's story_id, else a new one).
    #[arg(long, value_name = "ID")]
    story_id: Option<String>,
    /// Scenes per message: 1 is the most parallel; the function's queue batch size packs
    /// messages together again.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    scenes_per_message: u32,
    /// Output directory of the filesystem store (STAGE3_OUTPUT_DIR), where the plan goes.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct StatusArgs {
    /// The story's id.
    story_id: String,
    /// Output directory of the filesystem store (STAGE3_OUTPUT_DIR).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print JSON instead of lines.
    #[arg(long)]
    json: bool,
    /// Poll, with backoff, until nothing is pending (a progress bar on a terminal).
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this many seconds (exit 3).
    #[arg(long, value_name = "SECS", requires = "wait")]
    timeout: Option<u64>,
}

#[derive(Args)]
struct GenerateArgs {
    /// The input JSON: one request, an array, or {"scenes": [...]}; `-` reads stdin.
    input: PathBuf,
    /// Output directory of the filesystem store (STAGE3_OUTPUT_DIR).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Image size for every scene: 1024x1024, 1792x1024 or 1024x1792 (overrides the input).
    #[arg(long)]
    size: Option<ImageSize>,
    /// Quality for every scene: standard or hd (overrides the input).
    #[arg(long)]
    quality: Option<ImageQuality>,
    /// Scenes in flight at the provider at once (STAGE3_CONCURRENCY).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    concurrency: Option<u16>,
    /// openrouter, ark, dashscope or placeholder (STAGE3_PROVIDER).
    #[arg(long)]
    provider: Option<ProviderKind>,
    /// The model for every scene, `MODEL` or `PROVIDER:MODEL` (overrides the input and
    /// STAGE3_MODEL).
    #[arg(long)]
    model: Option<String>,
    /// Regenerate even when a stored result matches (STAGE3_FORCE=1).
    #[arg(long)]
    force: bool,
    /// A model to try when the asked-for one is unavailable; repeat for more, in order
    /// (replaces STAGE3_MODEL_FALLBACKS).
    #[arg(long = "fallback-model", value_name = "MODEL")]
    fallback_models: Vec<String>,
    /// Refuse the batch if its estimate passes this many USD, and stop starting calls when
    /// spending would (STAGE3_MAX_COST_USD).
    #[arg(long, value_name = "USD")]
    max_cost: Option<String>,
}

const EXIT_SOME_FAILED: u8 = 1;
const EXIT_INVALID: u8 = 2;
/// `status`: some scenes have no outcome yet.
const EXIT_PENDING: u8 = 3;
/// 128 + SIGINT, as shells report a run stopped by Ctrl-C.
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
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
        config::load_dotenv()?;
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

    // Checked with the rest of the configuration, before anything is generated or spent.
    let events_budget = events::cli_budget(|name| std::env::var(name).ok())?;

    let mut submission = read_submission(&args.input, config.max_batch)?;
    submission.override_with(&RequestOptions {
        size: args.size,
        quality: args.quality,
        model: args.model,
    });

    let events = EventPublisher::from_settings(&config.events, &config.aws).await?;
    // STAGE3_METRICS=emf: the batch's metric lines on stderr (stdout is the answer).
    let metrics = match config.metrics {
        Some(MetricsFormat::Emf) => MetricsSink::Stderr,
        _ => MetricsSink::Off,
    };
    let provider = config.provider.as_str();
    let service = Stage3Service::from_config(config).await?;
    let progress = Progress::default();
    // Ctrl-C stops the batch from starting calls; the calls in flight finish and are stored.
    let stop = BatchStop::new();
    let interrupts = tokio::spawn(stop_on_ctrl_c(stop.clone()));
    let options = BatchOptions {
        run: RunOptions {
            stop: Some(stop.clone()),
            ..RunOptions::default()
        },
        events,
        // One budget for every sink, event and retry: a receiver that never answers costs
        // the run this long at most, as the invocation deadline bounds the Lambda function.
        events_deadline: Deadline::after(events_budget),
        ..BatchOptions::default()
    };
    let run = service.run(submission, &options, &progress).await?;
    interrupts.abort();
    progress.finish(&run, options.events.is_enabled());
    metrics.record(&run.answer.results, &run.answer.failures, provider);
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
    eprintln!("valid: {} scene(s)", check.scenes);
    match check.plan.estimated_cost_usd {
        Some(cost) => eprintln!("estimated cost: ${cost:.4}"),
        None => eprintln!(
            "estimated cost: unknown for {} scene(s) (no price in the catalogue, or the \
             catalogue cannot be read)",
            check.plan.unpriced
        ),
    }
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

fn gallery(story: &std::path::Path) -> Result<ExitCode, Stage3Error> {
    let page = stage3::story::rebuild_gallery(story)?;
    println!("{}", page.display());
    Ok(ExitCode::SUCCESS)
}

async fn submit(args: SubmitArgs) -> Result<ExitCode, Stage3Error> {
    let mut config = Config::from_env()?;
    config.override_with(Overrides {
        output_dir: args.out,
        ..Overrides::default()
    })?;
    let per_message = args.scenes_per_message as usize;
    if per_message > config.max_batch {
        return Err(Stage3Error::config(format!(
            "--scenes-per-message {per_message}: the function takes at most {} scenes a \
             message (STAGE3_MAX_BATCH)",
            config.max_batch
        )));
    }
    // The whole story, however long: it is cut into messages below.
    let submission = read_submission(&args.input, story::MAX_STORY_SCENES)?;
    let story_id = match args
        .story_id
        .or_else(|| submission.story_id().map(str::to_string))
    {
        Some(id) => id,
        None => new_story_id(),
    };
    validate_story_id(&story_id)?;
    // What `generate` checks before it spends, against nobody who bills.
    let check = Stage3Service::for_checking(config.clone())
        .check(submission.clone())
        .await?;
    let requests = submission.into_requests();
    let messages = queue::story_messages(&story_id, &requests, per_message)?;
    let queue = RequestQueue::from_aws(&args.queue_url, &config.aws).await?;
    eprintln!(
        "story {story_id}: {} scene(s) in {} message(s){}",
        check.scenes,
        messages.len(),
        check
            .plan
            .estimated_cost_usd
            .map(|cost| format!(", estimated cost ${cost:.4}"))
            .unwrap_or_default()
    );

    let store = storage::from_settings(&config.storage, &config.aws).await?;
    let plan = StoryPlan::new(
        &story_id,
        messages.iter().flat_map(|m| m.scene_ids.clone()).collect(),
        std::time::SystemTime::now(),
    );
    let plan_path = story::write_plan(store.as_ref(), &plan, Deadline::NONE).await?;
    eprintln!("plan: {plan_path}");

    let report = queue.send_all(&messages, Deadline::NONE).await;
    if !report.unsent.is_empty() {
        let scenes: usize = report.unsent.iter().map(|u| u.scene_ids.len()).sum();
        eprintln!(
            "not sent: {} message(s), {scenes} scene(s); run the same command with \
             --story-id {story_id} to send them (scenes already drawn come from the cache)",
            report.unsent.len()
        );
    }
    let answer = SubmitAnswer {
        story_id: &story_id,
        queue_url: &args.queue_url,
        messages: report.sent,
        scenes: report.sent_scenes,
        plan_path: &plan_path,
        unsent: &report.unsent,
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&answer).expect("the answer serializes")
    );
    Ok(if report.unsent.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_SOME_FAILED)
    })
}

/// What `submit` prints: the messages and scenes the queue took, and what it did not.
#[derive(serde::Serialize)]
struct SubmitAnswer<'a> {
    story_id: &'a str,
    queue_url: &'a str,
    messages: usize,
    scenes: usize,
    plan_path: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    unsent: &'a [queue::Unsent],
}

/// `story-YYYYMMDD-HHMMSS-xxxx`: sortable by time, unlikely to meet another.
fn new_story_id() -> String {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let digits: String = now.chars().filter(char::is_ascii_digit).collect();
    let (date, time) = digits.split_at(digits.len().min(8));
    format!("story-{date}-{time}-{:04x}", fastrand::u16(..))
}

async fn status(args: StatusArgs) -> Result<ExitCode, Stage3Error> {
    let mut config = Config::from_env()?;
    config.override_with(Overrides {
        output_dir: args.out,
        ..Overrides::default()
    })?;
    validate_story_id(&args.story_id)?;
    let store = storage::from_settings(&config.storage, &config.aws).await?;
    let started = std::time::Instant::now();
    let timeout = args.timeout.map(std::time::Duration::from_secs);
    let mut bar: Option<ProgressBar> = None;
    let mut last: Option<(usize, usize, usize)> = None;
    let mut delay = STATUS_FIRST_POLL;
    let progress = loop {
        let progress = story::story_progress(store.as_ref(), &args.story_id, Deadline::NONE)
            .await?
            .ok_or_else(|| {
                Stage3Error::invalid_request(format!(
                    "no story {:?} in {}: no plan.json and no manifest.json",
                    args.story_id,
                    store.location(&format!("stories/{}/", args.story_id))
                ))
            })?;
        if !args.wait || progress.is_settled() || timeout.is_some_and(|t| started.elapsed() >= t) {
            break progress;
        }
        let counts = (progress.succeeded, progress.failed, progress.pending);
        if last != Some(counts) {
            delay = STATUS_FIRST_POLL;
            show_wait(&mut bar, &progress);
            last = Some(counts);
        } else {
            delay = (delay * 2).min(STATUS_LONGEST_POLL);
        }
        let wait = match timeout {
            Some(t) => delay.min(t.saturating_sub(started.elapsed())),
            None => delay,
        };
        tokio::time::sleep(wait).await;
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if args.json {
        let text = serde_json::to_string_pretty(&progress).expect("the progress serializes");
        println!("{text}");
    } else {
        print!("{}", status_lines(&progress));
    }
    Ok(if progress.pending > 0 {
        ExitCode::from(EXIT_PENDING)
    } else if progress.failed > 0 {
        ExitCode::from(EXIT_SOME_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

/// The first wait between polls, and again whenever the story moved.
const STATUS_FIRST_POLL: std::time::Duration = std::time::Duration::from_secs(2);
/// The longest wait between polls of a story that does not move.
const STATUS_LONGEST_POLL: std::time::Duration = std::time::Duration::from_secs(30);

/// While waiting: a bar on a terminal, a line per change otherwise (CI logs).
fn show_wait(bar: &mut Option<ProgressBar>, progress: &StoryProgress) {
    let done = (progress.succeeded + progress.failed) as u64;
    if !std::io::stderr().is_terminal() {
        eprintln!(
            "[{done}/{}] {} succeeded, {} failed, {} pending",
            progress.total, progress.succeeded, progress.failed, progress.pending
        );
        return;
    }
    let bar = bar.get_or_insert_with(|| {
        let bar = ProgressBar::new(progress.total as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .expect("valid template"),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    });
    bar.set_length(progress.total as u64);
    bar.set_position(done);
    bar.set_message(format!(
        "{} failed, {} pending",
        progress.failed, progress.pending
    ));
}

/// `status` for a person.
fn status_lines(progress: &StoryProgress) -> String {
    let mut text = format!(
        "story {}: {} scene(s): {} succeeded, {} failed, {} pending; cost ${:.4}\n",
        progress.story_id,
        progress.total,
        progress.succeeded,
        progress.failed,
        progress.pending,
        progress.cost_usd
    );
    if !progress.error_types.is_empty() {
        let types: Vec<String> = progress
            .error_types
            .iter()
            .map(|(error_type, count)| format!("{error_type} {count}"))
            .collect();
        text.push_str(&format!("failed: {}\n", types.join(", ")));
        for failure in progress.failures.iter().take(STATUS_LINES_SHOWN) {
            text.push_str(&format!(
                "  {} [{}] {}\n",
                failure.scene_id, failure.error_type, failure.message
            ));
        }
        if progress.failures.len() > STATUS_LINES_SHOWN {
            text.push_str(&format!(
                "  … {} more (--json lists them all)\n",
                progress.failures.len() - STATUS_LINES_SHOWN
            ));
        }
    }
    if !progress.pending_scene_ids.is_empty() {
        let shown: Vec<&str> = progress
            .pending_scene_ids
            .iter()
            .take(STATUS_LINES_SHOWN)
            .map(String::as_str)
            .collect();
        let more = progress.pending_scene_ids.len() - shown.len();
        text.push_str(&format!(
            "pending: {}{}\n",
            shown.join(", "),
            if more > 0 {
                format!(", … {more} more")
            } else {
                String::new()
            }
        ));
    }
    text
}

/// Failed and pending scenes named in `status`'s lines; `--json` has them all.
const STATUS_LINES_SHOWN: usize = 10;

/// Progress on stderr: a bar on a terminal, one plain line per scene otherwise (CI logs).
#[derive(Default)]
struct Progress {
    bar: OnceLock<Option<ProgressBar>>,
    total: AtomicUsize,
    done: AtomicUsize,
}

impl BatchProgress for Progress {
    fn started(&self, total: usize) {
        self.total.store(total, Ordering::SeqCst);
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
                )
                .expect("valid template"),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        if bar.is_none() {
            eprintln!("generating {total} scene(s)");
        }
        let _ = self.bar.set(bar);
    }

    /// `scene: path` for a fresh image, `scene: cached → path` for one served from the
    /// store at no cost, `scene: failed [type] why` otherwise.
    fn scene_done(&self, scene_id: &str, outcome: Result<&stage3::Stage3Output, &Stage3Error>) {
        let done = self.done.fetch_add(1, Ordering::SeqCst) + 1;
        let line = match outcome {
            Ok(output) if output.from_cache => {
                format!("{scene_id}: cached → {}", output.image_path)
            }
            Ok(output) => format!("{scene_id}: {}", output.image_path),
            Err(e) => format!("{scene_id}: failed [{}] {e}", e.error_type()),
        };
        match self.bar.get().and_then(Option::as_ref) {
            Some(bar) => {
                bar.inc(1);
                bar.println(line);
            }
            None => eprintln!("[{done}/{}] {line}", self.total.load(Ordering::SeqCst)),
        }
    }
}

impl Progress {
    /// The closing lines: the counts, the story's page, the events' fate.
    fn finish(&self, run: &BatchRun, events_enabled: bool) {
        if let Some(bar) = self.bar.get().and_then(Option::as_ref) {
            bar.finish_and_clear();
        }
        let summary = &run.answer.summary;
        eprintln!(
            "done: {} succeeded ({} from the cache), {} failed",
            summary.succeeded, summary.from_cache, summary.failed
        );
        if let Some(story) = &run.answer.story {
            match (&story.story_error, &story.gallery_path) {
                (Some(e), _) => eprintln!(
                    "story {}: not published [{}] {}",
                    story.story_id, e.error_type, e.message
                ),
                (None, Some(page)) => eprintln!("story {}: {page}", story.story_id),
                (None, None) => {}
            }
        }
        if events_enabled {
            let events = &run.events;
            eprintln!(
                "events: {} delivered, {} lost",
                events.delivered, events.lost
            );
        }
    }
}
