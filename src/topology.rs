//! Builds the stages from a spec, spawns them, wires acks and shutdown.
//!
//! ```text
//! source task --bus (bounded)--> processor thread --commits (bounded)--> sink task
//! ```
//!
//! The processor thread cuts a commit every `trigger_interval` (or earlier at
//! `max_batch_events`); the sink writes each commit in one transaction with its
//! checkpoint. On start the sink's last checkpoint and rows rebuild the processor,
//! and the source resumes strictly after that checkpoint: a kill at any moment
//! loses nothing and counts nothing twice. Shutdown (Ctrl-C) stops the source;
//! everything already read is processed and committed before `run` returns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bus;
use crate::bus::kafka::{BusError, InFlight, KafkaPublisher};
use crate::capture::kafka::KafkaSource;
use crate::capture::mysql::{MysqlSource, MysqlSourceConfig};
use crate::capture::{file::FileSource, simulator::SimulatorSource, CaptureError, Source};
use crate::config::spec::{PipelineSpec, SourceSpec, StoreSpec};
use crate::event::output::{Commit, QuarantineOp};
use crate::process::{Processor, Stats};
use crate::store::postgres::PostgresSink;
use crate::store::{sqlite::SqliteSink, Sink, StoreError};
use crate::telemetry;

/// Commits in flight between the processor and the sink: one being written, one
/// being prepared.
const COMMIT_QUEUE: usize = 1;
/// Backoff bounds when the store is unavailable.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Why a pipeline stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("processing thread failed: {0}")]
    Processor(String),
}

/// Runtime knobs that are not part of the pipeline file.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Decoding threads for file sources.
    pub threads: usize,
    /// Write to the store declared in the spec (false: compute only, for benchmarks).
    pub use_store: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { threads: default_threads(), use_store: true }
    }
}

/// Default decoding threads: one per core. Decoding is the larger half of the work
/// (on 2 cores, 1M events: 1.0-1.2 s with two decoders, 1.15-1.5 s with one), and the
/// processor thread takes its share of a core between them.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One gold table's latest window: name, column names, rows.
pub type LatestGold = (String, Vec<String>, Vec<crate::store::export::GoldRow>);

/// A snapshot of a running pipeline, for progress displays.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub stats: Stats,
    /// Events whose commit is durable in the store.
    pub committed_events: u64,
    pub commits: u64,
    /// Open quarantine by reason.
    pub quarantine: Vec<(String, u64)>,
    /// Per gold table: name, column names, rows of the latest window.
    pub latest_gold: Vec<LatestGold>,
    pub last_commit_ms: u64,
    /// The newest source timestamp (epoch ms) of a row durable in the store.
    pub newest_applied_ms: Option<i64>,
    /// Sampled source-commit-to-durable latencies of recent commits.
    pub latency: crate::telemetry::RecentLatency,
}

impl Progress {
    /// How far processing is behind the upstream at `now_ms` (ms since the epoch):
    /// now minus the newest time the source was known complete up to (see
    /// `Batch::caught_up_ms`). Near zero while an idle upstream sends heartbeats;
    /// `None` for sources that cannot tell.
    pub fn lag_ms(&self, now_ms: i64) -> Option<i64> {
        self.stats.caught_up_ms.map(|c| now_ms.saturating_sub(c).max(0))
    }

    /// Now minus the newest source timestamp applied to the store (`None` before
    /// the first row). Unlike [`Progress::lag_ms`] it grows while the upstream is
    /// idle: it is the data's age, what a freshness alert watches.
    pub fn applied_lag_ms(&self, now_ms: i64) -> Option<i64> {
        self.newest_applied_ms.map(|t| now_ms.saturating_sub(t).max(0))
    }
}

/// What a finished run leaves.
pub struct RunSummary {
    pub processor: Processor,
    pub elapsed: Duration,
    pub committed_events: u64,
}

/// Builds the configured source.
pub fn build_source(spec: &PipelineSpec, threads: usize) -> Box<dyn Source> {
    match &spec.source {
        SourceSpec::File { path, follow } => {
            Box::new(FileSource::new(path.clone(), *follow, spec.catalog.clone(), threads))
        }
        SourceSpec::Simulate(sim) => {
            Box::new(SimulatorSource::new(sim.clone(), spec.catalog.clone()))
        }
        SourceSpec::Mysql(m) => Box::new(MysqlSource::new(
            MysqlSourceConfig {
                url: m.url.clone(),
                server_id: m.server_id,
                include: m.include.clone(),
                server_name: m.server_name.clone(),
            },
            spec.catalog.clone(),
        )),
        SourceSpec::Kafka(k) => Box::new(KafkaSource::new(
            k.clone(),
            spec.catalog.clone(),
            spec.kafka.unreadable_topic(),
        )),
    }
}

/// Opens the configured store.
///
/// # Errors
/// [`StoreError`] when the store cannot be opened.
pub fn build_sink(spec: &Arc<PipelineSpec>) -> Result<Option<Box<dyn Sink>>, StoreError> {
    match &spec.store {
        Some(StoreSpec::Sqlite { path }) => {
            Ok(Some(Box::new(SqliteSink::open(path, spec.clone())?)))
        }
        Some(StoreSpec::Postgres { url, stream }) => {
            Ok(Some(Box::new(PostgresSink::new(url, spec.clone(), stream)?)))
        }
        None => Ok(None),
    }
}

/// Runs a pipeline until its source ends or `shutdown` is cancelled.
///
/// # Errors
/// A definite source or store error; transient store errors are retried.
pub async fn run(
    spec: Arc<PipelineSpec>,
    options: RunOptions,
    shutdown: CancellationToken,
    progress: Option<watch::Sender<Progress>>,
) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let mut sink = if options.use_store { build_sink(&spec)? } else { None };
    let mut processor = Processor::new(spec.clone(), sink.is_some());
    let mut resume = None;
    if let Some(s) = sink.as_mut() {
        s.healthcheck().await?;
        let recovered = s.recover(&processor.kept_tables()).await?;
        resume = recovered.checkpoint.clone();
        if let Some(cp) = &resume {
            info!(checkpoint = %cp.0, "resuming");
        }
        processor.recover(recovered);
    }

    let source = build_source(&spec, options.threads);
    let (tx, rx) = bus::memory(spec.queue_batches);
    let source_shutdown = shutdown.clone();
    let source_task = tokio::spawn(async move { source.run(resume, tx, source_shutdown).await });

    let (commit_tx, commit_rx) = mpsc::channel::<Commit>(COMMIT_QUEUE);
    let sink_progress = progress.clone();
    let sink_spec = spec.clone();
    let sink_task =
        tokio::spawn(
            async move { write_commits(&sink_spec, sink, commit_rx, sink_progress).await },
        );

    let handle = tokio::runtime::Handle::current();
    let proc_spec = spec.clone();
    let emit = options.use_store && spec.store.is_some();
    let proc_task = tokio::task::spawn_blocking(move || {
        process_loop(&handle, proc_spec, processor, rx, commit_tx, progress, emit)
    });

    let processor = proc_task.await.map_err(|e| RunError::Processor(e.to_string()))?;
    let committed = sink_task.await.map_err(|e| RunError::Processor(e.to_string()))??;
    match source_task.await {
        Ok(Ok(())) | Ok(Err(CaptureError::Closed)) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => return Err(RunError::Processor(e.to_string())),
    }
    Ok(RunSummary { processor, elapsed: started.elapsed(), committed_events: committed })
}

fn process_loop(
    handle: &tokio::runtime::Handle,
    spec: Arc<PipelineSpec>,
    mut processor: Processor,
    mut rx: bus::Receiver,
    commits: mpsc::Sender<Commit>,
    progress: Option<watch::Sender<Progress>>,
    emit: bool,
) -> Processor {
    let mut deadline = Instant::now() + spec.trigger_interval;
    // After recovery the first commit rewrites gold: send it right away.
    let mut due_now = true;
    let mut counted = Counted::default();
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        let next = handle.block_on(async { tokio::time::timeout(wait, rx.recv()).await });
        let ended = match next {
            Ok(Some(batch)) => {
                let started = Instant::now();
                processor.process(batch);
                metrics::histogram!(telemetry::PROCESS_BATCH_SECONDS)
                    .record(started.elapsed().as_secs_f64());
                false
            }
            Ok(None) => true,
            Err(_) => false,
        };
        let due = due_now
            || ended
            || Instant::now() >= deadline
            || processor.pending_events() as usize >= spec.max_batch_events;
        if due {
            due_now = false;
            if emit {
                let commit = processor.flush();
                let worth_writing = commit.event_count > 0
                    || commit.gold_reset
                    || !commit.quarantine.is_empty()
                    || ended;
                if worth_writing && commits.blocking_send(commit).is_err() {
                    warn!("store stopped; processing stops");
                    break;
                }
            }
            counted.record(&spec, processor.stats());
            if let Some(p) = &progress {
                publish(p, &spec, &processor);
            }
            deadline = Instant::now() + spec.trigger_interval;
        }
        if ended {
            break;
        }
    }
    processor
}

/// What the processor counters stood at when last recorded: metrics get deltas
/// once per commit, not a call per event.
#[derive(Default)]
struct Counted {
    table_events: Vec<u64>,
    duplicates: u64,
    bad_events: u64,
}

impl Counted {
    fn record(&mut self, spec: &PipelineSpec, stats: &Stats) {
        self.table_events.resize(stats.table_events.len(), 0);
        for (i, (now, before)) in
            stats.table_events.iter().zip(self.table_events.iter_mut()).enumerate()
        {
            if *now > *before {
                if let Some(t) = spec.catalog.tables().get(i) {
                    metrics::counter!(telemetry::PROCESS_EVENTS_IN, "table" => t.name.to_string())
                        .increment(*now - *before);
                }
                *before = *now;
            }
        }
        metrics::counter!(telemetry::PROCESS_DUPLICATES)
            .increment(stats.duplicates.saturating_sub(self.duplicates));
        metrics::counter!(telemetry::PROCESS_UNREADABLE)
            .increment(stats.bad_events.saturating_sub(self.bad_events));
        self.duplicates = stats.duplicates;
        self.bad_events = stats.bad_events;
    }
}

fn publish(p: &watch::Sender<Progress>, spec: &PipelineSpec, processor: &Processor) {
    let latest_gold = spec
        .gold
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let rows = processor.gold_rows(i);
            let last = rows.last().map(|r| r.0);
            let latest: Vec<_> = rows.into_iter().filter(|r| Some(r.0) == last).collect();
            let mut cols: Vec<String> = g.group_by.iter().map(|(n, _)| n.clone()).collect();
            cols.extend(g.measures.iter().map(|m| m.name.clone()));
            (g.name.clone(), cols, latest)
        })
        .collect();
    let quarantine = processor.quarantine_summary();
    for (reason, n) in &quarantine {
        metrics::gauge!(telemetry::QUARANTINE_OPEN_ROWS, "reason" => reason.clone()).set(*n as f64);
    }
    p.send_modify(|pr| {
        pr.stats = processor.stats().clone();
        pr.quarantine = quarantine;
        pr.latest_gold = latest_gold;
    });
}

async fn write_commits(
    spec: &PipelineSpec,
    mut sink: Option<Box<dyn Sink>>,
    mut rx: mpsc::Receiver<Commit>,
    progress: Option<watch::Sender<Progress>>,
) -> Result<u64, StoreError> {
    let mut committed = 0u64;
    let Some(sink) = sink.as_mut() else {
        rx.close();
        return Ok(0);
    };
    while let Some(commit) = rx.recv().await {
        let commit = Arc::new(commit);
        let mut backoff = RETRY_MIN;
        let events = commit.event_count;
        let started = Instant::now();
        loop {
            match sink.write(Arc::clone(&commit)).await {
                Ok(_) => break,
                Err(e) if e.is_transient() => {
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "store unavailable, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
                Err(e) => return Err(e),
            }
        }
        committed += events;
        let took = started.elapsed();
        let durable = record_commit(spec, &commit, took);
        if let Some(p) = &progress {
            let ms = took.as_millis() as u64;
            p.send_modify(|pr| {
                pr.committed_events = committed;
                pr.commits += 1;
                pr.last_commit_ms = ms;
                if let Some(newest) = durable.newest_ms {
                    pr.newest_applied_ms =
                        Some(pr.newest_applied_ms.map_or(newest, |n| n.max(newest)));
                }
                for ms in durable.latencies_ms {
                    pr.latency.push(ms);
                }
            });
        }
    }
    Ok(committed)
}

/// What a durable commit tells about freshness.
struct Durable {
    newest_ms: Option<i64>,
    latencies_ms: Vec<i64>,
}

/// Records a durable commit's metrics: rows out per table, commit time, lag and a
/// sample of end-to-end latencies (source commit to durable here).
fn record_commit(spec: &PipelineSpec, commit: &Commit, took: Duration) -> Durable {
    metrics::histogram!(telemetry::STORE_COMMIT_SECONDS).record(took.as_secs_f64());
    metrics::counter!(telemetry::STORE_EVENTS_COMMITTED).increment(commit.event_count);
    let tables = spec.catalog.tables();
    let mut rows = vec![0u64; tables.len()];
    let mut newest: Option<i64> = None;
    for s in &commit.silver {
        if let Some(n) = rows.get_mut(s.table) {
            *n += 1;
        }
        if let Some(r) = &s.row {
            newest = Some(newest.map_or(r.source_ts_ms, |n| n.max(r.source_ts_ms)));
        }
    }
    for (t, n) in tables.iter().zip(rows).filter(|(_, n)| *n > 0) {
        metrics::counter!(telemetry::STORE_ROWS_OUT, "table" => t.name.to_string()).increment(n);
    }
    let mut gold = vec![0u64; spec.gold.len()];
    for g in &commit.gold {
        if let Some(n) = gold.get_mut(g.gold) {
            *n += 1;
        }
    }
    for (g, n) in spec.gold.iter().zip(gold).filter(|(_, n)| *n > 0) {
        metrics::counter!(telemetry::STORE_GOLD_ROWS_OUT, "gold" => g.name.clone()).increment(n);
    }
    for op in &commit.quarantine {
        if let QuarantineOp::Open(r) = op {
            metrics::counter!(telemetry::STORE_QUARANTINED, "reason" => r.reason.to_string())
                .increment(1);
        }
    }
    let now_ms = crate::event::time::now_ms();
    if let Some(n) = newest {
        metrics::gauge!(telemetry::PIPELINE_LAG_SECONDS)
            .set(now_ms.saturating_sub(n).max(0) as f64 / 1000.0);
    }
    // Evenly spaced rows, not all of them: percentiles need a sample, and a large
    // commit must not pay a histogram update per row.
    let step = (commit.silver.len() / telemetry::LATENCY_SAMPLES_PER_COMMIT).max(1);
    let latencies_ms: Vec<i64> = commit
        .silver
        .iter()
        .step_by(step)
        .filter_map(|s| s.row.as_ref())
        .map(|r| now_ms.saturating_sub(r.source_ts_ms).max(0))
        .collect();
    for ms in &latencies_ms {
        metrics::histogram!(telemetry::PIPELINE_LATENCY_SECONDS).record(*ms as f64 / 1000.0);
    }
    Durable { newest_ms: newest, latencies_ms }
}

/// What `caudal capture` published.
#[derive(Debug, Clone, Default)]
pub struct CaptureSummary {
    /// Events (changes and unreadable inputs) acknowledged by the broker.
    pub events: u64,
    /// Messages acknowledged (a delete is two: the envelope and its tombstone).
    pub messages: u64,
    pub elapsed: Duration,
}

/// Runs the pipeline's source and publishes every event to Kafka, one topic per
/// table (`caudal capture`), until the source ends or `shutdown` is cancelled.
///
/// The source resumes from the checkpoint stored in Kafka; a batch's checkpoint is
/// stored only once it and every batch before it are acknowledged by the broker
/// (see `bus::kafka`). Shutdown stops the source; what it already read is
/// published and checkpointed before this returns.
///
/// # Errors
/// A definite source error, or a bus error (a broker unreachable for longer
/// than the producer's delivery timeout ends the run; restarting resumes).
pub async fn capture(
    spec: Arc<PipelineSpec>,
    threads: usize,
    shutdown: CancellationToken,
) -> Result<CaptureSummary, RunError> {
    let started = Instant::now();
    let kafka = spec.kafka.clone();
    let publisher = KafkaPublisher::new(&kafka, spec.catalog.clone())?;
    let mut backoff = RETRY_MIN;
    let resume = loop {
        let read = async {
            publisher.ensure_topics().await?;
            let (kafka, name) = (kafka.clone(), spec.name.clone());
            tokio::task::spawn_blocking(move || {
                crate::bus::kafka::read_capture_checkpoint(&kafka, &name)
            })
            .await
            .map_err(|e| BusError::Transient { message: e.to_string(), source: None })?
        };
        match read.await {
            Ok(resume) => break resume,
            Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "kafka unavailable, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
            Err(e) => return Err(e.into()),
        }
    };
    if let Some(cp) = &resume {
        info!(checkpoint = %cp.0, "capture resuming");
    }

    let source = build_source(&spec, threads);
    let (tx, mut rx) = bus::memory(spec.queue_batches);
    let source_shutdown = shutdown.clone();
    let source_task = tokio::spawn(async move { source.run(resume, tx, source_shutdown).await });

    let mut summary = CaptureSummary::default();
    let mut in_flight = InFlight::default();
    let mut last_checkpoint = None;
    let published = async {
        loop {
            // Store the checkpoints of acknowledged batches, oldest first; wait for
            // the oldest when too many are in flight.
            while in_flight.full() || in_flight.front_done() {
                if let Some((cp, events)) = in_flight.pop().await? {
                    last_checkpoint = Some(publisher.write_checkpoint(&spec.name, &cp).await?);
                    summary.events += events;
                }
            }
            let next = if in_flight.is_empty() {
                rx.recv().await
            } else {
                // A slow source must not hold back acknowledged checkpoints.
                match tokio::time::timeout(Duration::from_millis(20), rx.recv()).await {
                    Ok(next) => next,
                    Err(_) => continue,
                }
            };
            let Some(batch) = next else { break };
            let pending = publisher.publish(&batch).await?;
            summary.messages += pending.messages;
            in_flight.push(pending, batch.checkpoint.clone(), batch.events.len() as u64);
        }
        while let Some((cp, events)) = in_flight.pop().await? {
            last_checkpoint = Some(publisher.write_checkpoint(&spec.name, &cp).await?);
            summary.events += events;
        }
        if let Some(delivery) = last_checkpoint.take() {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((err, _))) => {
                    return Err(BusError::from_kafka("cannot store the capture checkpoint", err))
                }
                Err(_) => {
                    return Err(BusError::Transient {
                        message: "producer dropped a delivery report".into(),
                        source: None,
                    })
                }
            }
        }
        publisher.flush(Duration::from_secs(30))
    };
    let published: Result<(), BusError> = published.await;
    if published.is_err() {
        // Stop reading: what is not acknowledged is re-published after a restart.
        shutdown.cancel();
    }
    drop(rx);
    let source_result = source_task.await;
    published?;
    match source_result {
        Ok(Ok(())) | Ok(Err(CaptureError::Closed)) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => return Err(RunError::Processor(e.to_string())),
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}
