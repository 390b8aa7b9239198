//! The Stage 3 benchmark: `cargo bench --bench pipeline`.
//!
//! Drives the real service — real HTTP, real image decoding, real storage — against a local
//! OpenRouter stand-in serving realistic images, and prints the five figures the performance
//! issue asks for, each beside its target:
//!
//! 1. per-image overhead (everything but provider latency), p50/p95, PNG pass-through and
//!    JPEG→PNG, filesystem and S3 (a real S3 server in-process on loopback), where each
//!    image's time goes inside the service (the `image steps` debug events: check, label,
//!    thumbnail, store), one SHA-256, and the cost of writing the AIGC label into the PNG;
//! 2. batch wall time for 16 and 64 scenes at 1 s provider latency, concurrency 8, against
//!    the limit ceil(N / 8) × 1 s;
//! 3. peak RSS of the `stage3` CLI for a 16-scene batch of 1792x1024 images, and for
//!    8 scenes at concurrency 4 whose answers are hostile: a PNG with a ~1 MB colour-profile
//!    chunk that inflates to 1 GiB, and a 40 MP (8000x5000) JPEG;
//! 4. Lambda init time: process start to the first Runtime API poll, beside a hello-world
//!    Rust Lambda (`examples/hello_lambda.rs`, built in release on the first run);
//! 5. the release size of `stage3-lambda`.
//!
//! `STAGE3_BENCH_SAMPLES` sets the samples per overhead case (default 40).
//! `STAGE3_BENCH_SECTIONS` runs only the sections listed (`2,3,3b`; all by default).
//! `STAGE3_BENCH_CLI` runs the whole-process figures (1b, 3, 3b) on another `stage3` binary, e.g. one
//! built from an older commit, to compare before and after.

#[allow(dead_code)]
#[path = "../tests/support/hostile_images.rs"]
mod hostile_images;
#[allow(dead_code)]
#[path = "../tests/support/s3_server.rs"]
mod s3_server;
#[allow(dead_code)]
#[path = "../tests/support/scripted_openrouter.rs"]
mod scripted_openrouter;
// The stand-in can also serve HTTPS; the benchmark only uses plain HTTP.
#[allow(dead_code)]
#[path = "../tests/support/tls.rs"]
mod tls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image::{ImageBuffer, ImageFormat, Rgb};
use scripted_openrouter::{Reply, ScriptedOpenRouter};
use stage3::storage::{FsStore, ObjectStore};
use stage3::{insert_aigc_label, AigcLabel};
use stage3::{Config, RunOptions, Stage3Service};
use stage3::{GenerationRequest, ImageSize, Stage2Output};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;

const KEY: &str = "sk-or-v1-benchmark";

/// The service's `image steps` debug events (target `stage3::steps`): where each image's
/// time went inside the service, as it ran.
#[derive(Clone, Default)]
struct StepLog(Arc<Mutex<Vec<HashMap<&'static str, u64>>>>);

impl StepLog {
    /// The p50 of each step since the last call, in ms, and forgets them.
    fn drain_p50s(&self) -> Vec<(&'static str, f64)> {
        let images = std::mem::take(&mut *self.0.lock().unwrap());
        ["check_us", "label_us", "thumbnail_us", "store_us"]
            .into_iter()
            .map(|step| {
                let mut values: Vec<u64> =
                    images.iter().filter_map(|i| i.get(step)).copied().collect();
                values.sort_unstable();
                let p50 = values.get(values.len() / 2).copied().unwrap_or(0);
                (step.trim_end_matches("_us"), p50 as f64 / 1000.0)
            })
            .collect()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for StepLog {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields(HashMap<&'static str, u64>);
        impl tracing::field::Visit for Fields {
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                self.0.insert(field.name(), value);
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        if event.metadata().target() == "stage3::steps" {
            let mut fields = Fields(HashMap::new());
            event.record(&mut fields);
            self.0.lock().unwrap().push(fields.0);
        }
    }
}

fn main() {
    use tracing_subscriber::layer::SubscriberExt;
    let steps = StepLog::default();
    let only_steps = tracing_subscriber::filter::filter_fn(|m| m.target() == "stage3::steps");
    let subscriber = tracing_subscriber::registry().with(tracing_subscriber::Layer::with_filter(
        steps.clone(),
        only_steps,
    ));
    tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(steps));
}

async fn run(steps: StepLog) {
    let samples: usize = std::env::var("STAGE3_BENCH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    println!(
        "Stage 3 benchmark — {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // `STAGE3_BENCH_SECTIONS=2,3` runs only those sections (all by default).
    let sections = std::env::var("STAGE3_BENCH_SECTIONS").ok();
    let wants = |section: &str| {
        sections
            .as_deref()
            .is_none_or(|list| list.split(',').any(|s| s.trim() == section))
    };
    let s3 = s3_server::S3Target::start().await;
    let png = photo_like(1024, 1024, ImageFormat::Png);
    let jpeg = photo_like(1792, 1024, ImageFormat::Jpeg);
    println!(
        "images: 1024x1024 PNG {:.2} MB, 1792x1024 JPEG {:.2} MB\n",
        mb(png.len()),
        mb(jpeg.len())
    );

    if wants("1") {
        println!(
            "1. per-image overhead (no provider latency; target: PNG pass-through on fs p50 <= 25 ms)"
        );
        for (format_name, bytes, size, media) in [
            ("PNG pass-through", &png, ImageSize::Square, "image/png"),
            ("JPEG->PNG", &jpeg, ImageSize::Landscape, "image/jpeg"),
        ] {
            let reply = Reply::image(bytes, media);
            let server = ScriptedOpenRouter::start(move |_, _| reply.clone()).await;
            for backend in ["fs", "s3"] {
                let dir = tempfile::tempdir().expect("tempdir");
                let store: Arc<dyn ObjectStore> = match backend {
                    "fs" => Arc::new(FsStore::new(dir.path()).expect("fs store")),
                    _ => Arc::new(s3.store()),
                };
                let service = service(&server.base_url, store, &[]);
                let mut timings = Vec::with_capacity(samples);
                for i in 0..samples + 3 {
                    if i == 3 {
                        steps.drain_p50s(); // the warm-up's
                    }
                    let started = Instant::now();
                    service
                        .generate_scene_image(request(&format!("overhead-{i}"), size))
                        .await
                        .expect("scene generated");
                    if i >= 3 {
                        timings.push(started.elapsed());
                    }
                }
                let (p50, p95) = percentiles(&mut timings);
                println!(
                    "   {format_name:<17} {backend:<3}  p50 {:>7.1} ms   p95 {:>7.1} ms",
                    ms(p50),
                    ms(p95)
                );
                let parts: Vec<String> = steps
                    .drain_p50s()
                    .into_iter()
                    .map(|(step, p50)| format!("{step} {p50:.2}"))
                    .collect();
                println!("      steps, p50 ms: {}", parts.join(", "));
            }
        }
        // Of the check and label steps: one SHA-256 over the stored bytes.
        let (p50, _) = time_each(samples.max(10), || {
            use sha2::Digest;
            std::hint::black_box(sha2::Sha256::digest(&png));
        });
        println!(
            "   of which one SHA-256 of the {:.2} MB PNG  p50 {:>7.3} ms",
            mb(png.len()),
            ms(p50)
        );

        // The AIGC label is one chunk spliced into the stored PNG: a copy, no re-encode.
        let label = AigcLabel::new(
            "stage3",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "benchmark",
            "scene-0001",
        );
        let (p50, p95) = time_each(samples.max(10), || {
            std::hint::black_box(insert_aigc_label(&png, &label).expect("label"));
        });
        println!(
            "   AIGC label into the {:.2} MB PNG  p50 {:>7.3} ms   p95 {:>7.3} ms",
            mb(png.len()),
            ms(p50),
            ms(p95)
        );
    }

    if wants("1b") {
        println!(
            "\n1b. whole-process overhead of `stage3 generate`, 10 x {:.2} MB PNG at concurrency 4: \
             wall time less a plain client's fetching the same answers (target: <= 0.12 s)",
            mb(png.len())
        );
        {
            let reply = Reply::image(&png, "image/png");
            let server = ScriptedOpenRouter::start(move |_, _| reply.clone()).await;
            let mut floors = Vec::new();
            let mut walls = Vec::new();
            for _ in 0..7 {
                floors.push(client_floor(&server.base_url, 10, 4, SlotBack::AfterBody).await);
                walls.push(cli_wall_time(&server.base_url, 10, 4).await);
            }
            let (floor, _) = percentiles(&mut floors);
            let (wall, _) = percentiles(&mut walls);
            println!(
                "   stage3 {:.3} s, floor {:.3} s: overhead {:.3} s (p50 of 7)",
                wall.as_secs_f64(),
                floor.as_secs_f64(),
                wall.saturating_sub(floor).as_secs_f64()
            );
        }
    }

    if wants("2") {
        println!("\n2. batch wall time at 1 s provider latency, concurrency 8 (target: within 3% of the limit)");
        let reply = Reply::image(&png, "image/png").after(Duration::from_secs(1));
        let server = ScriptedOpenRouter::start(move |_, _| reply.clone()).await;
        for scenes in [16usize, 64] {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Arc::new(FsStore::new(dir.path()).expect("fs store"));
            let service = service(&server.base_url, store, &[("STAGE3_CONCURRENCY", "8")]);
            let prepared = service
                .prepare_all(
                    (0..scenes)
                        .map(|i| request(&format!("batch-{i}"), ImageSize::Square))
                        .collect(),
                )
                .expect("valid batch");
            let calls_before = server.requests().len();
            let cpu_before = process_cpu();
            let started = Instant::now();
            let answer = service
                .run_batch(prepared, &RunOptions::default(), &|_, _| {})
                .await;
            let wall = started.elapsed();
            let cpu = process_cpu().saturating_sub(cpu_before);
            assert_eq!(answer.results.len(), scenes, "{:?}", answer.failures);
            let limit = Duration::from_secs(scenes.div_ceil(8) as u64);
            println!(
                "   {scenes:>2} scenes: {:>6.3} s   limit {:>2} s   {:+.1}% over the limit",
                wall.as_secs_f64(),
                limit.as_secs(),
                (wall.as_secs_f64() / limit.as_secs_f64() - 1.0) * 100.0
            );
            // Where the time over the limit went: before the first call, between a wave's
            // answers and the next wave's calls, and after the last answer.
            let spans = server.spans().split_off(calls_before);
            let at = |instant: Instant| ms(instant.saturating_duration_since(started));
            let starts: Vec<f64> = spans.iter().map(|(call, _)| at(call.at)).collect();
            let answered: Vec<f64> = spans.iter().filter_map(|(_, end)| end.map(at)).collect();
            let last = |values: &[f64]| values.iter().copied().fold(0.0, f64::max);
            let last_wave = &starts[starts.len().saturating_sub(8)..];
            println!(
                "      first call +{:.0} ms, last wave's calls +{:.0}..+{:.0} ms, last answer \
                 written +{:.0} ms, batch done +{:.0} ms",
                starts.first().copied().unwrap_or(0.0),
                last_wave.iter().copied().fold(f64::INFINITY, f64::min),
                last(last_wave),
                last(&answered),
                ms(wall)
            );
            // The stand-in's serving is in this process too, as it shares the machine's
            // cores in any local run.
            println!(
                "      CPU {:.1} ms per image (this process, the stand-in included)",
                ms(cpu) / scenes as f64
            );
            // The same answers fetched by a plain client that does nothing with them: the
            // part of the time over the limit that is the stand-in's and the transport's.
            let floor = client_floor(&server.base_url, scenes, 8, SlotBack::AtStatus).await;
            println!(
                "      floor {:.3} s (a plain client fetching the same answers): stage3 {:+.0} ms over it",
                floor.as_secs_f64(),
                ms(wall) - ms(floor)
            );
        }
    }

    if wants("3") {
        println!(
            "\n3. peak memory of `stage3 generate`, 16 scenes at 1792x1024 (target: <= 150 MiB)"
        );
        let reply = Reply::image(&jpeg, "image/jpeg");
        let server = ScriptedOpenRouter::start(move |_, _| reply.clone()).await;
        let run = peak_rss_of_cli_batch(&server.base_url, 16, 8).await;
        println!("   peak RSS {:.1} MiB ({})", mib(run.peak_rss), run.outcome);
    }

    if wants("3b") {
        println!(
            "\n3b. peak memory of `stage3 generate`, 8 scenes at concurrency 4, hostile answers \
             (target: <= 200 MiB)"
        );
        let png_1792 = photo_like(1792, 1024, ImageFormat::Png);
        let icc_bomb = hostile_images::png_with_icc_bomb(&png_1792, 1 << 30);
        let big_jpeg = hostile_images::large_photo_jpeg(8000, 5000);
        for (name, bytes, media) in [
            (
                format!(
                    "PNG, {:.2} MB iCCP chunk inflating to 1 GiB",
                    mb(icc_bomb.len() - png_1792.len())
                ),
                &icc_bomb,
                "image/png",
            ),
            (
                format!("8000x5000 JPEG, {:.2} MB", mb(big_jpeg.len())),
                &big_jpeg,
                "image/jpeg",
            ),
        ] {
            let reply = Reply::image(bytes, media);
            let server = ScriptedOpenRouter::start(move |_, _| reply.clone()).await;
            let run = peak_rss_of_cli_batch(&server.base_url, 8, 4).await;
            println!(
                "   {name:<45} peak RSS {:>6.1} MiB ({})",
                mib(run.peak_rss),
                run.outcome
            );
        }
    }

    if wants("4") {
        println!(
            "\n4. Lambda init: process start to first Runtime API poll (target: <= a hello-world \
             Rust Lambda + 5 ms)"
        );
        let stage3_env = [
            ("OPENROUTER_API_KEY", KEY),
            ("STAGE3_STORAGE", "s3"),
            ("STAGE3_S3_BUCKET", "bench"),
            ("STAGE3_S3_ENDPOINT", s3.endpoint.as_str()),
        ];
        let hello = hello_lambda();
        let mut baseline = None;
        for (name, binary, env) in [
            ("hello-world", hello.as_deref(), &[][..]),
            (
                "stage3-lambda",
                Some(env!("CARGO_BIN_EXE_stage3-lambda")),
                &stage3_env[..],
            ),
        ] {
            let Some(binary) = binary else {
                println!("   {name:<14} not built (see above)");
                continue;
            };
            let mut inits = Vec::new();
            for _ in 0..20 {
                inits.push(lambda_init_time(binary, env).await);
            }
            let (p50, p95) = percentiles(&mut inits);
            let over = baseline.map_or(String::new(), |base: Duration| {
                format!(
                    "   (+{:.1} ms over hello-world)",
                    ms(p50.saturating_sub(base))
                )
            });
            baseline.get_or_insert(p50);
            println!(
                "   {name:<14} p50 {:>5.1} ms   p95 {:>5.1} ms (20 starts){over}",
                ms(p50),
                ms(p95)
            );
        }
    }

    if wants("5") {
        println!("\n5. release binary size (target: <= 20 MB stripped)");
        for (name, path) in [
            ("stage3-lambda", env!("CARGO_BIN_EXE_stage3-lambda")),
            ("stage3", env!("CARGO_BIN_EXE_stage3")),
        ] {
            let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            println!("   {name:<14} {:.1} MB", bytes as f64 / 1e6);
        }
    }
}

fn service(base_url: &str, store: Arc<dyn ObjectStore>, extra: &[(&str, &str)]) -> Stage3Service {
    let mut vars: HashMap<String, String> = HashMap::from([
        ("OPENROUTER_API_KEY".into(), KEY.into()),
        ("OPENROUTER_BASE_URL".into(), base_url.into()),
    ]);
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    let config = Config::from_lookup(|name| vars.get(name).cloned()).expect("config");
    let providers = stage3::provider::Providers::new(config.provider, config.providers.clone());
    // Built now, as `Stage3Service::from_config` (the CLI, the Lambda function) builds the
    // default provider at start-up: a batch's timings do not include making its client.
    providers.get(config.provider).expect("the provider");
    Stage3Service::with_providers(config, providers, store)
}

fn request(scene_id: &str, size: ImageSize) -> GenerationRequest {
    let mut request: GenerationRequest = Stage2Output {
        scene_id: format!("{scene_id}-{}", unique()),
        image_prompt: "A lighthouse keeper's cat watching ships at dawn".into(),
        negative_prompt: "blurry, text".into(),
        style_tags: vec!["watercolor".into()],
        characters_in_scene: vec![],
    }
    .into();
    request.size = Some(size);
    request
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Incompressible, photo-like pixels: a gradient under strong noise.
fn photo_like(width: u32, height: u32, format: ImageFormat) -> Vec<u8> {
    let mut state = 0x9e37_79b9_u32;
    let image = ImageBuffer::from_fn(width, height, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let [a, b, c, _] = state.to_le_bytes();
        Rgb([
            ((x * 255 / width) as u8).wrapping_add(a),
            ((y * 255 / height) as u8).wrapping_add(b),
            c,
        ])
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, format).expect("encode");
    bytes.into_inner()
}

/// What one run of the CLI cost, and how its scenes ended.
struct CliRun {
    /// Peak resident set, in bytes.
    peak_rss: u64,
    /// "N stored, M refused (error types)".
    outcome: String,
}

/// Runs the real CLI on `scenes` 1792x1024 scenes with `concurrency` provider calls in
/// flight and returns its peak resident set. Retries wait 50 ms, not seconds: a refused
/// answer is asked for again (up to `STAGE3_MAX_RETRIES`), and that repetition is part of
/// what a hostile answer costs, but the wait is not.
async fn peak_rss_of_cli_batch(base_url: &str, scenes: usize, concurrency: usize) -> CliRun {
    let dir = tempfile::tempdir().expect("tempdir");
    let batch: Vec<serde_json::Value> = (0..scenes)
        .map(|i| {
            serde_json::json!({
                "scene_id": format!("mem-{i}"),
                "image_prompt": format!("Scene {i}: a harbour town at night"),
                "size": "1792x1024",
            })
        })
        .collect();
    let input = dir.path().join("batch.json");
    std::fs::write(&input, serde_json::to_vec(&batch).expect("json")).expect("write input");
    let answer_path = dir.path().join("answer.json");
    let answer_file = std::fs::File::create(&answer_path).expect("answer file");
    let mut child = tokio::process::Command::new(cli_binary())
        .args([
            "generate",
            input.to_str().expect("utf-8 path"),
            "--concurrency",
            &concurrency.to_string(),
        ])
        .current_dir(dir.path())
        .env("OPENROUTER_API_KEY", KEY)
        .env("OPENROUTER_BASE_URL", base_url)
        .env("STAGE3_RETRY_BASE_MS", "50")
        .stdout(answer_file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn stage3");
    let pid = child.id().expect("pid");
    let mut peak_kb = 0u64;
    // VmHWM is the process's own high-water mark; poll it until the process exits.
    loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kb) = status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
            {
                peak_kb = peak_kb.max(kb);
            }
        }
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let answer: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&answer_path).unwrap_or_default())
            .unwrap_or_default();
    let count = |list: &str| answer[list].as_array().map_or(0, Vec::len);
    let mut error_types: Vec<&str> = answer["failures"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|failure| failure["error_type"].as_str())
        .collect();
    error_types.sort_unstable();
    error_types.dedup();
    CliRun {
        peak_rss: peak_kb * 1024,
        outcome: format!(
            "{} stored, {} refused{}",
            count("results"),
            count("failures"),
            if error_types.is_empty() {
                String::new()
            } else {
                format!(": {}", error_types.join(", "))
            }
        ),
    }
}

/// The `stage3` binary the whole-process figures (1b, 3, 3b) run: this build's, or
/// `STAGE3_BENCH_CLI`.
fn cli_binary() -> String {
    std::env::var("STAGE3_BENCH_CLI").unwrap_or_else(|_| env!("CARGO_BIN_EXE_stage3").to_string())
}

/// Starts `stage3-lambda` against a fake Runtime API and times its first poll.
async fn lambda_init_time(binary: &str, env: &[(&str, &str)]) -> Duration {
    let api = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = api.local_addr().expect("address");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(binary)
        .env_clear()
        .env("AWS_LAMBDA_RUNTIME_API", address.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", "stage3")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "bench")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "bench")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", "bench-secret")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn stage3-lambda");
    let (stream, _) = tokio::time::timeout(Duration::from_secs(10), api.accept())
        .await
        .expect("the function polled within 10 s")
        .expect("accept");
    let mut first_line = String::new();
    BufReader::new(stream)
        .read_line(&mut first_line)
        .await
        .expect("read poll");
    let elapsed = started.elapsed();
    assert!(
        first_line.contains("/runtime/invocation/next"),
        "{first_line}"
    );
    let _ = child.kill().await;
    elapsed
}

/// When a plain client's call gives its slot back.
#[derive(Clone, Copy, PartialEq)]
enum SlotBack {
    AfterBody,
    /// At the status line, as stage3's batches do (`src/provider/gate.rs`).
    AtStatus,
}

/// The stand-in's own floor: the wall time of a plain HTTP client's fetching `answers`
/// answers, `concurrency` at a time, and reading each body whole — what any client pays,
/// the stand-in and the transport, before doing anything with the images.
async fn client_floor(
    base_url: &str,
    answers: usize,
    concurrency: usize,
    slot_back: SlotBack,
) -> Duration {
    let client = reqwest::Client::new();
    let url = format!("{base_url}/chat/completions");
    let started = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let fetches: Vec<_> = (0..answers)
        .map(|_| {
            let (client, url, slots) = (client.clone(), url.clone(), slots.clone());
            tokio::spawn(async move {
                let slot = slots.acquire().await.expect("semaphore");
                let answer = client.post(&url).body("{}").send().await.expect("answer");
                if slot_back == SlotBack::AtStatus {
                    drop(slot);
                }
                answer.bytes().await.expect("body").len()
            })
        })
        .collect();
    for fetch in fetches {
        fetch.await.expect("fetch");
    }
    started.elapsed()
}

/// The wall time of one `stage3 generate` process over `scenes` 1024x1024 scenes.
async fn cli_wall_time(base_url: &str, scenes: usize, concurrency: usize) -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let batch: Vec<serde_json::Value> = (0..scenes)
        .map(|i| serde_json::json!({"scene_id": format!("wall-{i}"), "image_prompt": format!("Scene {i}")}))
        .collect();
    let input = dir.path().join("batch.json");
    std::fs::write(&input, serde_json::to_vec(&batch).expect("json")).expect("write input");
    let started = Instant::now();
    let status = tokio::process::Command::new(cli_binary())
        .args(["generate", input.to_str().expect("utf-8 path")])
        .args(["--concurrency", &concurrency.to_string()])
        .current_dir(dir.path())
        .env("OPENROUTER_API_KEY", KEY)
        .env("OPENROUTER_BASE_URL", base_url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .expect("run stage3");
    let wall = started.elapsed();
    assert!(status.success(), "stage3 generate failed: {status}");
    wall
}

/// Builds `examples/hello_lambda.rs` in release, in a target directory of its own (the
/// benchmark's own build holds the usual one), and returns its path; `None` with the reason
/// printed when it cannot be built.
fn hello_lambda() -> Option<String> {
    let manifest_dir = env!("CARGO_MANIFEST_DIR");
    let target_dir = format!("{manifest_dir}/target/bench-baseline");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = std::process::Command::new(cargo)
        .args(["build", "--release", "--quiet", "--example", "hello_lambda"])
        .args(["--no-default-features", "--features", "lambda"])
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(manifest_dir)
        .status();
    match built {
        Ok(status) if status.success() => {
            Some(format!("{target_dir}/release/examples/hello_lambda"))
        }
        other => {
            println!("   the hello-world baseline did not build: {other:?}");
            None
        }
    }
}

/// CPU time this process has used (user and system, every thread).
fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `getrusage` fills the struct it is given; zeroed is a valid `rusage`.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Runs `work` `samples` times and returns the p50 and p95 of its durations.
fn time_each(samples: usize, mut work: impl FnMut()) -> (Duration, Duration) {
    let mut timings: Vec<Duration> = (0..samples)
        .map(|_| {
            let started = Instant::now();
            work();
            started.elapsed()
        })
        .collect();
    percentiles(&mut timings)
}

fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.95))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}
