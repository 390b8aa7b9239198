//! The command line's shape: subcommands and flags, with their `--help` texts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use stage3::{CharacterMode, ImageQuality, ImageSize, ProviderKind};

#[derive(Parser)]
#[command(
    name = "stage3",
    version,
    about = "Turn stage-2 image prompts into stored PNGs"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
pub(crate) struct SubmitArgs {
    /// The story: one request, an array, or {"scenes": [...]}; `-` reads stdin.
    pub(crate) input: PathBuf,
    /// The request queue's URL (the stack's RequestQueueUrl output). The endpoint comes
    /// from AWS_ENDPOINT_URL_SQS or AWS_ENDPOINT_URL when set.
    #[arg(long, value_name = "URL")]
    pub(crate) queue_url: String,
    /// The story's id (default: the input's story_id, else a new one).
    #[arg(long, value_name = "ID")]
    pub(crate) story_id: Option<String>,
    /// Scenes per message: 1 is the most parallel; the function's queue batch size packs
    /// messages together again.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) scenes_per_message: u32,
    /// Output directory of the filesystem store (STAGE3_OUTPUT_DIR), where the plan goes.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct StatusArgs {
    /// The story's id.
    pub(crate) story_id: String,
    /// Output directory of the filesystem store (STAGE3_OUTPUT_DIR).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Print JSON instead of lines.
    #[arg(long)]
    pub(crate) json: bool,
    /// Poll, with backoff, until nothing is pending (a progress bar on a terminal).
    #[arg(long)]
    pub(crate) wait: bool,
    /// With --wait: give up after this many seconds (exit 3).
    #[arg(long, value_name = "SECS", requires = "wait")]
    pub(crate) timeout: Option<u64>,
}

#[derive(Args)]
pub(crate) struct GenerateArgs {
    /// The input JSON: one request, an array, or {"scenes": [...]}; `-` reads stdin.
    pub(crate) input: PathBuf,
    /// Output directory of the filesystem store (STAGE3_OUTPUT_DIR).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Image size for every scene: 1024x1024, 1792x1024 or 1024x1792 (overrides the input).
    #[arg(long)]
    pub(crate) size: Option<ImageSize>,
    /// Quality for every scene: standard or hd (overrides the input).
    #[arg(long)]
    pub(crate) quality: Option<ImageQuality>,
    /// Scenes in flight at the provider at once (STAGE3_CONCURRENCY).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub(crate) concurrency: Option<u16>,
    /// openrouter, ark, dashscope or placeholder (STAGE3_PROVIDER).
    #[arg(long)]
    pub(crate) provider: Option<ProviderKind>,
    /// The model for every scene, `MODEL` or `PROVIDER:MODEL` (overrides the input and
    /// STAGE3_MODEL).
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// Regenerate even when a stored result matches (STAGE3_FORCE=1).
    #[arg(long)]
    pub(crate) force: bool,
    /// A model to try when the asked-for one is unavailable; repeat for more, in order
    /// (replaces STAGE3_MODEL_FALLBACKS).
    #[arg(long = "fallback-model", value_name = "MODEL")]
    pub(crate) fallback_models: Vec<String>,
    /// Refuse the batch if its estimate passes this many USD, and stop starting calls when
    /// spending would (STAGE3_MAX_COST_USD).
    #[arg(long, value_name = "USD")]
    pub(crate) max_cost: Option<String>,
    /// off, first-appearance or sheet: how characters stay the same from page to page
    /// (overrides the input's character_mode and STAGE3_CHARACTER_MODE).
    #[arg(long)]
    pub(crate) character_mode: Option<CharacterMode>,
}
