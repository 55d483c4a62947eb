//! Telemetry: the one list of metric names and the helpers that record them.
//!
//! The pipeline records through the `metrics` facade, which is a no-op until a
//! recorder is installed: `caudal run`/`bench` without `--listen` pay one relaxed
//! atomic load per call. `serve` installs the Prometheus recorder and renders it on
//! `/metrics`. Everything is recorded per batch or per commit, never per event, so
//! the hot path stays as it was.
//!
//! Names follow `caudal_<stage>_<noun>_<unit>[_total]`; labels come from a fixed,
//! low-cardinality set: `table`, `gold`, `reason`, `alert`, `severity`, `notifier`.

use std::collections::VecDeque;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Events read by the processor, per source table (`table`).
pub const PROCESS_EVENTS_IN: &str = "caudal_process_events_in_total";
/// Re-delivered events the processor skipped.
pub const PROCESS_DUPLICATES: &str = "caudal_process_duplicates_total";
/// Inputs that could not be decoded (they go to quarantine).
pub const PROCESS_UNREADABLE: &str = "caudal_process_unreadable_total";
/// Time the processor spent on one batch from the bus.
pub const PROCESS_BATCH_SECONDS: &str = "caudal_process_batch_seconds";
/// Silver rows written (upserts and deletes), per table (`table`).
pub const STORE_ROWS_OUT: &str = "caudal_store_rows_out_total";
/// Gold rows written (upserts and deletes), per gold table (`gold`).
pub const STORE_GOLD_ROWS_OUT: &str = "caudal_store_gold_rows_out_total";
/// Source events covered by durable commits.
pub const STORE_EVENTS_COMMITTED: &str = "caudal_store_events_committed_total";
/// Quarantine records opened, per reason (`reason`).
pub const STORE_QUARANTINED: &str = "caudal_store_quarantined_total";
/// Time one commit took to become durable, retries included.
pub const STORE_COMMIT_SECONDS: &str = "caudal_store_commit_seconds";
/// Open quarantine rows per reason (`reason`), as the processor holds them.
pub const QUARANTINE_OPEN_ROWS: &str = "caudal_quarantine_open_rows";
/// Now minus the newest source timestamp applied to the store.
pub const PIPELINE_LAG_SECONDS: &str = "caudal_pipeline_lag_seconds";
/// Source commit to durable in the store, sampled per commit.
pub const PIPELINE_LATENCY_SECONDS: &str = "caudal_pipeline_latency_seconds";
/// 1 while an alert rule fires, 0 otherwise (`alert`, `severity`).
pub const ALERT_FIRING: &str = "caudal_alert_firing";
/// Notifications that failed after their retries (`notifier`).
pub const ALERT_NOTIFY_FAILURES: &str = "caudal_alert_notify_failures_total";

/// Histogram buckets in seconds: batches take milliseconds, commits up to seconds,
/// latency from milliseconds (binlog, 10 ms trigger) to minutes (a stalled store).
const SECONDS_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Rows sampled per commit for the latency histogram: enough for percentiles, few
/// enough that a 100k-row commit costs nothing measurable.
pub const LATENCY_SAMPLES_PER_COMMIT: usize = 32;

/// Latency samples kept for the dashboard's percentiles (the last few minutes at
/// one commit per second).
const RECENT_LATENCY_CAP: usize = 4096;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and returns its handle.
///
/// If another recorder is already installed (a test harness, say), the handle of a
/// recorder of our own is returned; it renders the metric descriptions only.
pub fn prometheus() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = || {
            PrometheusBuilder::new()
                .set_buckets(&SECONDS_BUCKETS)
                .expect("the bucket list is a non-empty constant")
        };
        match builder().install_recorder() {
            Ok(handle) => {
                describe();
                handle
            }
            Err(err) => {
                tracing::warn!(error = %err, "a metrics recorder is already installed");
                builder().build_recorder().handle()
            }
        }
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(PROCESS_EVENTS_IN, "events read by the processor, per table");
    describe_counter!(PROCESS_DUPLICATES, "re-delivered events skipped");
    describe_counter!(PROCESS_UNREADABLE, "inputs that could not be decoded");
    describe_histogram!(PROCESS_BATCH_SECONDS, Unit::Seconds, "processing time of one batch");
    describe_counter!(STORE_ROWS_OUT, "silver rows written, per table");
    describe_counter!(STORE_GOLD_ROWS_OUT, "gold rows written, per gold table");
    describe_counter!(STORE_EVENTS_COMMITTED, "source events covered by durable commits");
    describe_counter!(STORE_QUARANTINED, "quarantine records opened, per reason");
    describe_histogram!(STORE_COMMIT_SECONDS, Unit::Seconds, "time for a commit to be durable");
    describe_gauge!(QUARANTINE_OPEN_ROWS, "open quarantine rows, per reason");
    describe_gauge!(PIPELINE_LAG_SECONDS, Unit::Seconds, "now minus newest source time applied");
    describe_histogram!(
        PIPELINE_LATENCY_SECONDS,
        Unit::Seconds,
        "source commit to durable in the store (sampled)"
    );
    describe_gauge!(ALERT_FIRING, "1 while an alert rule fires");
    describe_counter!(ALERT_NOTIFY_FAILURES, "notifications that failed after retries");
}

/// Recent end-to-end latencies in milliseconds, for the dashboard's percentiles.
#[derive(Debug, Clone, Default)]
pub struct RecentLatency {
    samples: VecDeque<u64>,
}

impl RecentLatency {
    pub fn push(&mut self, ms: i64) {
        if self.samples.len() == RECENT_LATENCY_CAP {
            self.samples.pop_front();
        }
        self.samples.push_back(u64::try_from(ms.max(0)).unwrap_or(0));
    }

    /// The `q` quantiles (0..=1) of the samples, nearest rank; `None` when empty.
    pub fn quantiles(&self, qs: &[f64]) -> Option<Vec<u64>> {
        if self.samples.is_empty() {
            return None;
        }
        let mut sorted: Vec<u64> = self.samples.iter().copied().collect();
        sorted.sort_unstable();
        let last = sorted.len() - 1;
        Some(
            qs.iter()
                .map(|q| {
                    let rank = (q.clamp(0.0, 1.0) * last as f64).round() as usize;
                    sorted.get(rank.min(last)).copied().unwrap_or(0)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_nearest_rank_and_a_bounded_window() {
        let mut r = RecentLatency::default();
        assert_eq!(r.quantiles(&[0.5]), None);
        for ms in 1..=100 {
            r.push(ms);
        }
        assert_eq!(r.quantiles(&[0.0, 0.5, 0.99, 1.0]), Some(vec![1, 51, 99, 100]));
        for _ in 0..RECENT_LATENCY_CAP {
            r.push(7);
        }
        assert_eq!(r.quantiles(&[0.0, 1.0]), Some(vec![7, 7]));
        r.push(-5);
        assert_eq!(r.quantiles(&[0.0]), Some(vec![0]));
    }
}
