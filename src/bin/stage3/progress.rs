//! The progress printer: a bar on a terminal, one plain line per scene otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use indicatif::{ProgressBar, ProgressStyle};
use stage3::story::StoryProgress;
use stage3::{BatchProgress, BatchRun, Stage3Error, Stage3Output};

/// Progress on stderr: a bar on a terminal, one plain line per scene otherwise (CI logs).
#[derive(Default)]
pub(crate) struct Progress {
    bar: OnceLock<Option<ProgressBar>>,
    total: AtomicUsize,
    done: AtomicUsize,
}

impl BatchProgress for Progress {
    fn started(&self, total: usize) {
        self.total.store(total, Ordering::SeqCst);
        let bar = std::io::stderr().is_terminal().then(|| bar(total as u64));
        if bar.is_none() {
            eprintln!("generating {total} scene(s)");
        }
        let _ = self.bar.set(bar);
    }

    /// `scene: path` for a fresh image, `scene: cached → path` for one served from the
    /// store at no cost, `scene: failed [type] why` otherwise.
    fn scene_done(&self, scene_id: &str, outcome: Result<&Stage3Output, &Stage3Error>) {
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
    pub(crate) fn finish(&self, run: &BatchRun, events_enabled: bool) {
        if let Some(bar) = self.bar.get().and_then(Option::as_ref) {
            bar.finish_and_clear();
        }
        for line in run.closing_lines(events_enabled) {
            eprintln!("{line}");
        }
    }
}

/// `status --wait` on stderr: a bar on a terminal, a line each time the story moves
/// otherwise (CI logs).
#[derive(Default)]
pub(crate) struct StoryWait {
    bar: Option<ProgressBar>,
}

impl StoryWait {
    pub(crate) fn show(&mut self, progress: &StoryProgress) {
        let done = (progress.succeeded + progress.failed) as u64;
        let counts = format!("{} failed, {} pending", progress.failed, progress.pending);
        if !std::io::stderr().is_terminal() {
            eprintln!(
                "[{done}/{}] {} succeeded, {counts}",
                progress.total, progress.succeeded
            );
            return;
        }
        let bar = self.bar.get_or_insert_with(|| bar(progress.total as u64));
        bar.set_length(progress.total as u64);
        bar.set_position(done);
        bar.set_message(counts);
    }

    pub(crate) fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The bar both printers show on a terminal.
fn bar(length: u64) -> ProgressBar {
    let bar = ProgressBar::new(length);
    let style =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}");
    bar.set_style(style.expect("valid template"));
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}
