//! The Prometheus endpoint of the examples: a `metrics` recorder installed for the
//! process (metrics-exporter-prometheus, the example's choice, not the library's),
//! rendered as text at [`METRICS_PATH`].

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// The path the examples serve their metrics on (never cached).
pub const METRICS_PATH: &str = "/metrics";

/// Buckets of the `_seconds` histograms: from a memory lookup (microseconds) to a
/// Redis deadline and beyond.
const SECONDS_BUCKETS: [f64; 14] = [
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.05, 0.25, 1.0,
];

/// Installs the process's recorder; its handle renders what it holds.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &SECONDS_BUCKETS)?
        .install_recorder()
}

/// The `Content-Type` of the rendered text (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
