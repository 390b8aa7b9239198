//! Operators' numbers as CloudWatch Embedded Metric Format (EMF): one JSON line per batch
//! that CloudWatch Logs turns into metrics, with no SDK and no API call.
//!
//! The Lambda function writes the lines to stdout, which Lambda hands to CloudWatch Logs
//! (it does not re-encode a line that is JSON already, whatever the function's log
//! format); the CLI writes them to stderr with `STAGE3_METRICS=emf`, since its stdout is
//! the batch answer. Namespace `Stage3`, dimension `Provider`:
//!
//! | metric | unit | value |
//! |---|---|---|
//! | `ImagesGenerated` | Count | images the provider drew in this batch (cache hits excluded) |
//! | `CacheHits` | Count | scenes served from the store at no cost |
//! | `Failures` | Count | scenes that failed |
//! | `CostUSD` | None | what the provider billed for this batch's images |
//! | `ImageLatencyMs` | Milliseconds | each generated image's time, first call to stored (an array) |
//!
//! One line per provider that drew an image in the batch (a fallback can make two); failed
//! scenes, which no provider finished, count under the configured provider
//! (`STAGE3_PROVIDER`). Each error type among the failures adds a line with dimensions
//! `Provider` and `ErrorType` and the metric `Failures` alone. So over a batch's lines, each
//! dimension set adds up to the batch's summary: `ImagesGenerated` + `CacheHits` is
//! `succeeded`, `Failures` (by `Provider`) and `Failures` (by `Provider`, `ErrorType`) are
//! each `failed`, `CostUSD` is `cost_usd`. EMF takes at most 100 values per metric, so a
//! batch of more than 100 generated images carries the rest of `ImageLatencyMs` on further
//! lines that hold nothing else.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde_json::{json, Map, Value};

use crate::error::{Result, Stage3Error};
use crate::schema::{SceneFailure, Stage3Output};

/// The CloudWatch namespace of every metric.
pub(crate) const NAMESPACE: &str = "Stage3";
/// The variable that turns the CLI's metric lines on (`emf`) or the function's off (`off`).
pub(crate) const METRICS_VARIABLE: &str = "STAGE3_METRICS";
/// EMF's limit on the values of one metric in one line.
pub(crate) const MAX_VALUES_PER_METRIC: usize = 100;

/// `STAGE3_METRICS`: whether metric lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsFormat {
    Off,
    Emf,
}

impl std::str::FromStr for MetricsFormat {
    type Err = Stage3Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "emf" => Ok(MetricsFormat::Emf),
            "off" | "none" => Ok(MetricsFormat::Off),
            _ => Err(Stage3Error::config(format!(
                "{METRICS_VARIABLE}: expected emf or off, got {text:?}"
            ))),
        }
    }
}

/// Where a batch's metric lines go. The default writes none.
#[derive(Clone, Default)]
pub enum MetricsSink {
    #[default]
    Off,
    /// The Lambda function's: CloudWatch Logs reads the function's stdout.
    Stdout,
    /// The CLI's: its stdout is the batch answer.
    Stderr,
    /// Kept in memory, for a program that forwards them itself (and for tests).
    Memory(Arc<Mutex<Vec<String>>>),
}

impl std::fmt::Debug for MetricsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MetricsSink::Off => "Off",
            MetricsSink::Stdout => "Stdout",
            MetricsSink::Stderr => "Stderr",
            MetricsSink::Memory(_) => "Memory",
        })
    }
}

impl MetricsSink {
    /// The CLI's sink: stderr with `STAGE3_METRICS=emf` (stdout is the batch answer),
    /// none otherwise.
    pub fn for_command_line(format: Option<MetricsFormat>) -> Self {
        match format {
            Some(MetricsFormat::Emf) => MetricsSink::Stderr,
            _ => MetricsSink::Off,
        }
    }

    /// A sink that keeps its lines; read them with [`MetricsSink::lines`].
    #[cfg(test)]
    pub(crate) fn memory() -> Self {
        MetricsSink::Memory(Arc::default())
    }

    pub(crate) fn is_enabled(&self) -> bool {
        !matches!(self, MetricsSink::Off)
    }

    /// The lines a memory sink holds (none for the others).
    #[cfg(test)]
    pub(crate) fn lines(&self) -> Vec<String> {
        match self {
            MetricsSink::Memory(lines) => lines.lock().map(|l| l.clone()).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Writes the lines of one batch: its stored scenes and its failures, failures counted
    /// under `default_provider`. A write that fails is ignored: metrics are a report.
    pub fn record(
        &self,
        results: &[Stage3Output],
        failures: &[SceneFailure],
        default_provider: &str,
    ) {
        if !self.is_enabled() {
            return;
        }
        let lines = emf_lines(results, failures, default_provider, SystemTime::now());
        let write = |out: &mut dyn Write| {
            // One write per line, so a line is never split by another writer's output.
            for line in &lines {
                let _ = out.write_all(format!("{line}\n").as_bytes());
            }
            let _ = out.flush();
        };
        match self {
            MetricsSink::Off => {}
            MetricsSink::Stdout => write(&mut std::io::stdout().lock()),
            MetricsSink::Stderr => write(&mut std::io::stderr().lock()),
            MetricsSink::Memory(kept) => {
                if let Ok(mut kept) = kept.lock() {
                    kept.extend(lines);
                }
            }
        }
    }
}

/// What one provider did in a batch.
#[derive(Debug, Default)]
struct ProviderTotals {
    generated: usize,
    cache_hits: usize,
    failures: usize,
    cost_usd: f64,
    latencies_ms: Vec<u64>,
    by_error_type: BTreeMap<String, usize>,
}

/// The EMF lines of one batch (see the module notes), stamped `at`.
pub(crate) fn emf_lines(
    results: &[Stage3Output],
    failures: &[SceneFailure],
    default_provider: &str,
    at: SystemTime,
) -> Vec<String> {
    let timestamp = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut providers: BTreeMap<&str, ProviderTotals> = BTreeMap::new();
    for result in results {
        let totals = providers
            .entry(result.generation_params.provider.as_str())
            .or_default();
        if result.from_cache {
            totals.cache_hits += 1;
        } else {
            totals.generated += 1;
            totals
                .latencies_ms
                .push(result.generation_params.duration_ms);
            if let Some(cost) = result.generation_params.cost {
                totals.cost_usd += cost;
            }
        }
    }
    if !failures.is_empty() || providers.is_empty() {
        let totals = providers.entry(default_provider).or_default();
        for failure in failures {
            totals.failures += 1;
            *totals
                .by_error_type
                .entry(failure.error_type.as_str().to_string())
                .or_default() += 1;
        }
    }

    let mut lines = Vec::new();
    for (provider, totals) in providers {
        let mut latencies = totals.latencies_ms.chunks(MAX_VALUES_PER_METRIC);
        let first = latencies.next().unwrap_or_default();
        let mut metrics = vec![
            ("ImagesGenerated", "Count", json!(totals.generated)),
            ("CacheHits", "Count", json!(totals.cache_hits)),
            ("Failures", "Count", json!(totals.failures)),
            ("CostUSD", "None", json!(totals.cost_usd)),
        ];
        // An empty array is no value: the metric is left out of a line without images.
        if !first.is_empty() {
            metrics.push(("ImageLatencyMs", "Milliseconds", json!(first)));
        }
        lines.push(document(timestamp, &[("Provider", provider)], metrics));
        for rest in latencies {
            lines.push(document(
                timestamp,
                &[("Provider", provider)],
                vec![("ImageLatencyMs", "Milliseconds", json!(rest))],
            ));
        }
        for (error_type, count) in &totals.by_error_type {
            lines.push(document(
                timestamp,
                &[("Provider", provider), ("ErrorType", error_type)],
                vec![("Failures", "Count", json!(count))],
            ));
        }
    }
    lines
}

/// One EMF document: the `_aws` directive naming `metrics` under one dimension set, and
/// the dimension and metric values at the top level.
fn document(
    timestamp: u64,
    dimensions: &[(&str, &str)],
    metrics: Vec<(&str, &str, Value)>,
) -> String {
    let mut root = Map::new();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [dimensions.iter().map(|(name, _)| *name).collect::<Vec<_>>()],
                "Metrics": metrics
                    .iter()
                    .map(|(name, unit, _)| json!({"Name": name, "Unit": unit}))
                    .collect::<Vec<_>>(),
            }],
        }),
    );
    for (name, value) in dimensions {
        root.insert((*name).into(), json!(value));
    }
    for (name, _, value) in metrics {
        root.insert(name.into(), value);
    }
    Value::Object(root).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ProviderFailure;
    use crate::schema::{GenerationParams, ImageQuality, ImageSize};

    fn output(
        scene_id: &str,
        provider: &str,
        cost: f64,
        ms: u64,
        from_cache: bool,
    ) -> Stage3Output {
        Stage3Output {
            scene_id: scene_id.into(),
            image_path: format!("/out/{scene_id}.png"),
            image_url: None,
            width: 1024,
            height: 1024,
            generation_params: GenerationParams {
                model: "m".into(),
                requested_model: None,
                size: ImageSize::Square,
                quality: ImageQuality::Standard,
                prompt: "p".into(),
                negative_prompt: None,
                provider: provider.into(),
                api: None,
                aspect_ratio: "1:1".into(),
                resolution: "1K".into(),
                seed: None,
                reference_images: Vec::new(),
                references: Vec::new(),
                cost: Some(cost),
                request_hash: "h".into(),
                content_sha256: "c".into(),
                bytes: 1,
                etag: None,
                aigc_label: None,
                source_format: "png".into(),
                attempts: 1,
                started_at: String::new(),
                finished_at: String::new(),
                duration_ms: ms,
            },
            thumbnail_path: None,
            thumbnail_url: None,
            from_cache,
        }
    }

    fn parse(lines: &[String]) -> Vec<Value> {
        lines
            .iter()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    #[test]
    fn a_batch_is_one_line_per_provider_and_error_type_and_adds_up() {
        let results = vec![
            output("a", "openrouter", 0.039, 1200, false),
            output("b", "openrouter", 0.039, 1800, false),
            output("c", "openrouter", 0.039, 900, true),
            output("d", "ark", 0.03, 2500, false),
        ];
        let refused = Stage3Error::ContentPolicy(ProviderFailure::new(Some(403), "no"));
        let failures = vec![
            SceneFailure::new("e", &refused),
            SceneFailure::new("f", &refused),
            SceneFailure::new("g", &Stage3Error::Timeout("slow".into())),
        ];
        let lines = parse(&emf_lines(
            &results,
            &failures,
            "openrouter",
            SystemTime::now(),
        ));
        assert_eq!(lines.len(), 4, "{lines:#?}");
        let ark = &lines[0];
        assert_eq!(ark["Provider"], "ark");
        assert_eq!(ark["ImagesGenerated"], 1);
        assert_eq!(ark["ImageLatencyMs"], json!([2500]));
        let openrouter = &lines[1];
        assert_eq!(
            openrouter["_aws"]["CloudWatchMetrics"][0]["Namespace"],
            "Stage3"
        );
        assert_eq!(
            openrouter["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            json!([["Provider"]])
        );
        assert_eq!(openrouter["ImagesGenerated"], 2);
        assert_eq!(openrouter["CacheHits"], 1);
        assert_eq!(openrouter["Failures"], 3);
        assert!((openrouter["CostUSD"].as_f64().unwrap() - 0.078).abs() < 1e-12);
        assert_eq!(openrouter["ImageLatencyMs"], json!([1200, 1800]));
        let by_type: Vec<(&str, u64)> = lines[2..]
            .iter()
            .map(|l| {
                (
                    l["ErrorType"].as_str().unwrap(),
                    l["Failures"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(by_type, [("content_policy", 2), ("timeout", 1)]);
        assert_eq!(
            lines[2]["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            json!([["Provider", "ErrorType"]])
        );
        assert_eq!(
            lines[2]["_aws"]["CloudWatchMetrics"][0]["Metrics"],
            json!([{"Name": "Failures", "Unit": "Count"}])
        );
    }

    #[test]
    fn every_declared_metric_has_a_value_and_arrays_hold_at_most_100() {
        let results: Vec<Stage3Output> = (0..250)
            .map(|i| output(&format!("s{i}"), "openrouter", 0.01, i, false))
            .collect();
        let lines = parse(&emf_lines(&results, &[], "openrouter", SystemTime::now()));
        assert_eq!(lines.len(), 3);
        let mut latencies = Vec::new();
        for line in &lines {
            for metric in line["_aws"]["CloudWatchMetrics"][0]["Metrics"]
                .as_array()
                .unwrap()
            {
                let name = metric["Name"].as_str().unwrap();
                assert!(!line[name].is_null(), "{name} has no value in {line}");
            }
            let values = line["ImageLatencyMs"].as_array().unwrap();
            assert!(values.len() <= MAX_VALUES_PER_METRIC);
            latencies.extend(values.iter().map(|v| v.as_u64().unwrap()));
        }
        assert_eq!(latencies, (0..250).collect::<Vec<u64>>());
        assert_eq!(lines[0]["ImagesGenerated"], 250);
        assert!(lines[1].get("ImagesGenerated").is_none());
    }

    #[test]
    fn an_empty_batch_is_one_line_of_zeros_without_latencies() {
        let lines = parse(&emf_lines(&[], &[], "placeholder", SystemTime::now()));
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["Provider"], "placeholder");
        assert_eq!(lines[0]["ImagesGenerated"], 0);
        assert!(lines[0].get("ImageLatencyMs").is_none());
        let declared = lines[0]["_aws"]["CloudWatchMetrics"][0]["Metrics"].to_string();
        assert!(!declared.contains("ImageLatencyMs"), "{declared}");
    }

    #[test]
    fn the_sinks_write_only_when_on_and_the_variable_reads_two_words() {
        let sink = MetricsSink::memory();
        sink.record(
            &[output("a", "placeholder", 0.0, 5, false)],
            &[],
            "placeholder",
        );
        assert_eq!(sink.lines().len(), 1);
        MetricsSink::Off.record(&[], &[], "x");
        assert_eq!("EMF".parse::<MetricsFormat>().unwrap(), MetricsFormat::Emf);
        assert_eq!("off".parse::<MetricsFormat>().unwrap(), MetricsFormat::Off);
        assert!("statsd".parse::<MetricsFormat>().is_err());
    }
}
