//! The `caudal` command line. The only place `anyhow` appears: it prints `{:#}`
//! and picks the exit code (2 for a bad pipeline file or usage, 1 otherwise).

use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use caudal::capture::{simulator, CaptureError};
use caudal::config::{self, spec::SourceSpec, spec::StoreSpec, ConfigError, PipelineSpec};
use caudal::store::{export, mysql, postgres, sqlite};
use caudal::topology::{self, Progress, RunOptions};

// mimalloc: the processor allocates many small rows and strings; the system
// allocator costs about a fifth of the throughput on this workload.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process. Why: mimalloc asks the kernel
/// for huge pages on its arenas, and the state this pipeline keeps is many small rows
/// spread over them, so half-filled 2 MiB pages were counted whole: peak memory for
/// 1M workload events was 249-271 MB with them and 206-227 MB without, at the same
/// speed (within the run-to-run noise). The setting belongs to this process (and any
/// child it starts), not to the system. mimalloc makes the same call for
/// `MIMALLOC_ALLOW_THP=0`, but only at its own start, before `main` could set the
/// option, so it is made here.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and touches no memory
    // of ours; on failure (an old kernel) it returns -1 and nothing changes.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// The ERP pipeline shipped with caudal: the gold rules of the shared workload.
const ERP_PIPELINE: &str = include_str!("../config/examples/erp.toml");

#[derive(Parser)]
#[command(
    name = "caudal",
    version,
    about = "Real-time change-data pipeline: capture, clean, enrich, aggregate, store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the ERP demo on embedded defaults: simulator -> pipeline -> SQLite, with live progress.
    Demo {
        /// Events per second, e.g. 200/s, or max.
        #[arg(long, default_value = "200/s")]
        rate: String,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// SQLite file; running again resumes where the last run stopped.
        #[arg(long, default_value = "caudal-demo.db")]
        store: PathBuf,
        /// Stop after this many events.
        #[arg(long)]
        events: Option<u64>,
        /// Where the dashboard listens, HOST:PORT or PORT. If it is taken, the demo
        /// says so and runs without the dashboard.
        #[arg(long, default_value = caudal::serve::DEFAULT_LISTEN)]
        listen: String,
        /// Do not serve the dashboard.
        #[arg(long)]
        no_serve: bool,
    },
    /// Serves the dashboard, /metrics, /health and the alert rules over a store that a
    /// pipeline writes (here or in another process).
    Serve {
        /// Pipeline file (default: the shipped ERP pipeline); its gold tables, alert
        /// rules and notifiers are used.
        pipeline: Option<PathBuf>,
        /// A SQLite path, a postgres:// or a mysql:// URL (default: the pipeline file's store).
        #[arg(long)]
        store: Option<PathBuf>,
        /// HOST:PORT or PORT.
        #[arg(long, default_value = caudal::serve::DEFAULT_LISTEN)]
        listen: String,
        /// ISO 4217 currency of money measures on the dashboard.
        #[arg(long, default_value = "PEN")]
        currency: String,
    },
    /// Runs a pipeline until its source ends or Ctrl-C.
    Run {
        pipeline: PathBuf,
        /// Overrides a file source's path.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Overrides the store: a SQLite path, or a postgres:// or mysql:// URL.
        #[arg(long)]
        store: Option<PathBuf>,
        /// Decoding threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// No progress lines.
        #[arg(long, short)]
        quiet: bool,
        /// Also serve the dashboard, /metrics and the alert rules, e.g. 127.0.0.1:8080.
        #[arg(long)]
        listen: Option<String>,
    },
    /// The processing role: reads the pipeline's tables from Kafka (the topics
    /// `caudal capture` writes, or Debezium's), processes and stores them, whatever
    /// the file's `[source]` says. Offsets are committed in the store's transaction.
    Process {
        pipeline: PathBuf,
        /// Overrides `kafka.brokers`, e.g. 127.0.0.1:9092.
        #[arg(long)]
        brokers: Option<String>,
        /// Overrides the store: a SQLite path, or a postgres:// or mysql:// URL.
        #[arg(long)]
        store: Option<PathBuf>,
        /// Stop once every partition reached the end it had at start (replays, tests).
        #[arg(long)]
        exit_at_end: bool,
        /// No progress lines.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Runs a pipeline's source and publishes every change to Kafka, one topic per
    /// table (`[kafka]` in the pipeline file), until the source ends or Ctrl-C.
    Capture {
        pipeline: PathBuf,
        /// Overrides a file source's path.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Overrides `kafka.brokers`, e.g. 127.0.0.1:9092.
        #[arg(long)]
        brokers: Option<String>,
        /// Decoding threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Checks a pipeline file; exit code 2 and every problem when it is not valid.
    Validate { pipeline: PathBuf },
    /// Runs the ERP pipeline over a workload file, writes the reference CSVs, prints figures.
    Bench {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Pipeline file (default: the shipped ERP pipeline).
        #[arg(long)]
        pipeline: Option<PathBuf>,
        /// Decoding threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Also write everything to this store, a SQLite path, a postgres:// or a mysql:// URL
        /// (default: compute only).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Skip the JSON-parse-only baseline.
        #[arg(long)]
        no_baseline: bool,
        /// Serve the dashboard while benchmarking (needs --store), e.g. 127.0.0.1:8080.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Writes the stored gold and quarantine tables in the reference CSV format.
    Export {
        /// A SQLite path, a postgres:// or a mysql:// URL.
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Pipeline file (default: the shipped ERP pipeline).
        #[arg(long)]
        pipeline: Option<PathBuf>,
    },
    /// Writes simulated ERP change events as Debezium JSON lines, or applies them to a
    /// real MySQL/MariaDB database (`--mysql URL`) as an ERP's activity.
    Simulate {
        #[arg(long)]
        events: u64,
        /// Create the ERP tables in this database and drive them instead of writing JSON.
        #[arg(long)]
        mysql: Option<String>,
        /// With --mysql: statements per second, e.g. 200/s (default: max).
        #[arg(long, default_value = "max")]
        rate: String,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Event-time origin, ISO-8601 UTC (default: 2026-01-05T08:00:00Z, like erpgen.py).
        #[arg(long, default_value = "2026-01-05T08:00:00Z")]
        start: String,
    },
}

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    init_tracing();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            // Exit code 2: the operator must fix something (the pipeline file, the
            // server's settings, credentials or grants); retrying will not help.
            let definite = err.chain().any(|e| {
                e.downcast_ref::<ConfigError>().is_some()
                    || matches!(
                        e.downcast_ref::<CaptureError>(),
                        Some(CaptureError::Definite { .. })
                    )
                    || matches!(
                        e.downcast_ref::<topology::RunError>(),
                        Some(topology::RunError::Capture(CaptureError::Definite { .. }))
                    )
            });
            if let Some(hint) =
                err.chain().find_map(|e| match e.downcast_ref::<topology::RunError>() {
                    Some(topology::RunError::Capture(CaptureError::Definite {
                        hint: Some(h),
                        ..
                    })) => Some(h.clone()),
                    _ => None,
                })
            {
                eprintln!("hint: {hint}");
            }
            if definite {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

fn load_or_default(pipeline: Option<&Path>) -> Result<PipelineSpec, ConfigError> {
    match pipeline {
        Some(p) => config::load(p),
        None => config::parse(Path::new("config/examples/erp.toml"), ERP_PIPELINE),
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Validate { pipeline } => {
            let spec = config::load(&pipeline)?;
            println!(
                "{}: ok ({} tables, {} gold tables, source {})",
                pipeline.display(),
                spec.catalog.tables().len(),
                spec.gold.len(),
                match spec.source {
                    SourceSpec::File { .. } => "file",
                    SourceSpec::Mysql(_) => "mysql",
                    SourceSpec::Simulate(_) => "simulate",
                    SourceSpec::Kafka(_) => "kafka",
                }
            );
            Ok(())
        }
        Command::Run { pipeline, input, store, threads, quiet, listen } => {
            let mut spec = config::load(&pipeline)?;
            if let Some(input) = input {
                match &mut spec.source {
                    SourceSpec::File { path, .. } => *path = input,
                    SourceSpec::Simulate(_) | SourceSpec::Mysql(_) | SourceSpec::Kafka(_) => {
                        anyhow::bail!(
                            "--input overrides a file source, but `{}` has another source type",
                            pipeline.display()
                        )
                    }
                }
            }
            if let Some(store) = store {
                spec.store = Some(store_arg(store, spec.store.as_ref()));
            }
            let options = RunOptions {
                threads: threads.unwrap_or_else(topology::default_threads),
                use_store: true,
            };
            let listen = listen.map(|l| Listen { addr: l, required: true });
            run_with_progress(Arc::new(spec), options, !quiet, false, listen, false)
        }
        Command::Serve { pipeline, store, listen, currency } => {
            let mut spec = load_or_default(pipeline.as_deref())?;
            if let Some(store) = store {
                spec.store = Some(store_arg(store, spec.store.as_ref()));
            }
            let store = spec
                .store
                .clone()
                .context("no store to read: pass --store PATH_OR_URL or declare [store]")?;
            let addr = listen_addr(&listen)?;
            let rt = runtime()?;
            rt.block_on(async move {
                let shutdown = ctrl_c_token("stopping the dashboard");
                let listener = caudal::serve::bind(addr).await?;
                eprintln!("caudal serve: dashboard on http://{addr}/ (Ctrl-C stops)");
                let options = caudal::serve::ServeOptions { currency };
                caudal::serve::serve(listener, Arc::new(spec), store, options, None, shutdown)
                    .await?;
                Ok(())
            })
        }
        Command::Process { pipeline, brokers, store, exit_at_end, quiet } => {
            let mut spec = config::load(&pipeline)?;
            if let Some(brokers) = brokers {
                spec.kafka.brokers = brokers;
            }
            // A `[source] type = "kafka"` keeps its topics; any other source is what
            // `capture` reads, so this role reads the topics capture writes.
            let topics = match &spec.source {
                SourceSpec::Kafka(k) => k.topics.clone(),
                _ => spec.kafka.data_topics(&spec.catalog),
            };
            spec.source = SourceSpec::Kafka(config::spec::KafkaSourceSpec {
                brokers: spec.kafka.brokers.clone(),
                topics,
                exit_at_end,
                group: spec.kafka.group.clone(),
            });
            if let Some(store) = store {
                spec.store = Some(store_arg(store, spec.store.as_ref()));
            }
            let options = RunOptions { threads: 1, use_store: true };
            // Into PostgreSQL, `process` is a worker of the consumer group
            // `kafka.group`: start several and they share the partitions. Into
            // SQLite (one writer), it reads every partition itself.
            let group = matches!(spec.store, Some(StoreSpec::Postgres { .. }));
            run_with_progress(Arc::new(spec), options, !quiet, false, None, group)
        }
        Command::Capture { pipeline, input, brokers, threads } => {
            let mut spec = config::load(&pipeline)?;
            if let Some(input) = input {
                match &mut spec.source {
                    SourceSpec::File { path, .. } => *path = input,
                    _ => anyhow::bail!(
                        "--input overrides a file source, but `{}` has another source type",
                        pipeline.display()
                    ),
                }
            }
            if let Some(brokers) = brokers {
                spec.kafka.brokers = brokers;
            }
            let threads = threads.unwrap_or_else(topology::default_threads);
            let rt = runtime()?;
            let summary = rt.block_on(async move {
                let shutdown = CancellationToken::new();
                let ctrl_c = shutdown.clone();
                tokio::spawn(async move {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        eprintln!("\nstopping: publishing what was read (Ctrl-C again to abort)");
                        ctrl_c.cancel();
                        if tokio::signal::ctrl_c().await.is_ok() {
                            std::process::exit(130);
                        }
                    }
                });
                topology::capture(Arc::new(spec), threads, shutdown).await
            })?;
            let secs = summary.elapsed.as_secs_f64();
            eprintln!(
                "published {} events ({} messages) in {:.2}s ({:.0} events/s)",
                summary.events,
                summary.messages,
                secs,
                summary.events as f64 / secs.max(1e-9)
            );
            Ok(())
        }
        Command::Demo { rate, seed, store, events, listen, no_serve } => {
            // The shipped ERP pipeline, fed by the simulator instead of a file.
            let mut spec = config::parse(Path::new("config/examples/erp.toml"), ERP_PIPELINE)?;
            spec.name = "erp-demo".into();
            spec.source = SourceSpec::Simulate(config::spec::SimulateSpec {
                seed,
                rate: config::spec::parse_rate(&rate).with_context(|| {
                    format!("--rate {rate:?} is not a rate (e.g. 200/s or max)")
                })?,
                burst: config::spec::parse_burst("5x for 2m every 10m"),
                events,
                ..Default::default()
            });
            spec.store = Some(StoreSpec::Sqlite { path: store.clone() });
            eprintln!(
                "caudal demo: simulated ERP at {rate} -> {} (Ctrl-C stops; run again to resume)",
                store.display()
            );
            let listen = (!no_serve).then_some(Listen { addr: listen, required: false });
            run_with_progress(
                Arc::new(spec),
                RunOptions::default(),
                true,
                std::io::stderr().is_terminal(),
                listen,
                false,
            )
        }
        Command::Bench { input, out, pipeline, threads, store, no_baseline, listen } => {
            bench(input, out, pipeline, threads, store, no_baseline, listen)
        }
        Command::Export { store, out, pipeline } => {
            let spec = load_or_default(pipeline.as_deref())?;
            match store_arg(store, None) {
                StoreSpec::Sqlite { path } => {
                    for (i, g) in spec.gold.iter().enumerate() {
                        let rows = sqlite::read_gold(&path, &spec, i)?;
                        export::write_gold(&out, g, rows)?;
                    }
                    export::write_quarantine_summary(
                        &out,
                        sqlite::read_quarantine_summary(&path)?,
                    )?;
                }
                StoreSpec::Postgres { url, .. } => {
                    let rt = runtime()?;
                    for (i, g) in spec.gold.iter().enumerate() {
                        let rows = rt.block_on(postgres::read_gold(&url, &spec, i))?;
                        export::write_gold(&out, g, rows)?;
                    }
                    let summary = rt.block_on(postgres::read_quarantine_summary(&url))?;
                    export::write_quarantine_summary(&out, summary)?;
                }
                StoreSpec::Mysql { url, .. } => {
                    let rt = runtime()?;
                    for (i, g) in spec.gold.iter().enumerate() {
                        let rows = rt.block_on(mysql::read_gold(&url, &spec, i))?;
                        export::write_gold(&out, g, rows)?;
                    }
                    let summary = rt.block_on(mysql::read_quarantine_summary(&url))?;
                    export::write_quarantine_summary(&out, summary)?;
                }
            }
            println!(
                "exported {} gold table(s) and the quarantine summary to {}",
                spec.gold.len(),
                out.display()
            );
            Ok(())
        }
        Command::Simulate { events, seed, out, start, mysql, rate } => {
            let spec = config::parse(Path::new("config/examples/erp.toml"), ERP_PIPELINE)?;
            let start_ms = caudal::event::time::parse_timestamp(&start)
                .with_context(|| format!("--start {start:?} is not an ISO-8601 timestamp"))?
                / 1000;
            let mut sim =
                config::spec::SimulateSpec { seed, events: Some(events), ..Default::default() };
            if let Some(url) = mysql {
                sim.rate = config::spec::parse_rate(&rate).with_context(|| {
                    format!("--rate {rate:?} is not a rate (e.g. 200/s or max)")
                })?;
                let drive =
                    caudal::capture::erp_db::drive(&url, &sim, spec.catalog.clone(), start_ms);
                let n = runtime()?.block_on(drive)?;
                eprintln!("applied {n} statements");
                return Ok(());
            }
            let n = match out {
                Some(path) => {
                    let file = std::fs::File::create(&path)
                        .with_context(|| format!("cannot create `{}`", path.display()))?;
                    let mut w = std::io::BufWriter::new(file);
                    let n = simulator::write_jsonl(&sim, spec.catalog.clone(), start_ms, &mut w)?;
                    w.flush()?;
                    n
                }
                None => {
                    let mut w = std::io::BufWriter::new(std::io::stdout().lock());
                    let n = simulator::write_jsonl(&sim, spec.catalog.clone(), start_ms, &mut w)?;
                    w.flush()?;
                    n
                }
            };
            eprintln!("wrote {n} events");
            Ok(())
        }
    }
}

/// `--listen`: where to serve, and whether a taken port ends the command (`run`)
/// or only the dashboard (`demo`, which should run anyway).
struct Listen {
    addr: String,
    required: bool,
}

fn listen_addr(s: &str) -> anyhow::Result<SocketAddr> {
    caudal::serve::parse_listen(s)
        .with_context(|| format!("--listen {s:?} is not HOST:PORT or PORT (e.g. 127.0.0.1:8080)"))
}

/// A token cancelled by the first Ctrl-C; the second one exits at once.
fn ctrl_c_token(what: &'static str) -> CancellationToken {
    let shutdown = CancellationToken::new();
    let ctrl_c = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\n{what} (Ctrl-C again to abort)");
            ctrl_c.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    shutdown
}

/// Binds `listen` and serves the dashboard over the pipeline's store beside the run;
/// the returned token stops it. `None` when there is nothing to serve.
async fn start_serving(
    spec: &Arc<PipelineSpec>,
    listen: Option<Listen>,
    progress: watch::Receiver<Progress>,
) -> anyhow::Result<Option<(CancellationToken, tokio::task::JoinHandle<()>)>> {
    let Some(listen) = listen else { return Ok(None) };
    let store = spec.store.clone().context("--listen needs a store to read (--store)")?;
    let addr = listen_addr(&listen.addr)?;
    let listener = match caudal::serve::bind(addr).await {
        Ok(l) => l,
        Err(e) if !listen.required => {
            eprintln!(
                "warning: {e}; running without the dashboard (--listen picks another address)"
            );
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    eprintln!("dashboard: http://{addr}/");
    // The recorder must be in place before the pipeline's first batch, or /metrics
    // misses what was counted before the serving task got to run.
    caudal::telemetry::prometheus();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let spec = spec.clone();
    let handle = tokio::spawn(async move {
        let options = caudal::serve::ServeOptions::default();
        if let Err(e) =
            caudal::serve::serve(listener, spec, store, options, Some(progress), token).await
        {
            // The pipeline goes on: serving is a view, never a reason to stop.
            tracing::error!(error = %e, "dashboard stopped");
        }
    });
    Ok(Some((stop, handle)))
}

fn run_with_progress(
    spec: Arc<PipelineSpec>,
    options: RunOptions,
    show: bool,
    redraw: bool,
    listen: Option<Listen>,
    group: bool,
) -> anyhow::Result<()> {
    let rt = runtime()?;
    rt.block_on(async move {
        let shutdown = ctrl_c_token("stopping: finishing the current batch");
        let (tx, rx) = watch::channel(Progress::default());
        let serving = start_serving(&spec, listen, rx.clone()).await?;
        let printer = show.then(|| tokio::spawn(print_progress(spec.clone(), rx, redraw)));
        let summary = if group {
            topology::run_group(spec.clone(), shutdown, Some(tx)).await
        } else {
            topology::run(spec.clone(), options, shutdown, Some(tx)).await
        };
        if let Some(p) = printer {
            p.abort();
        }
        if let Some((stop, handle)) = serving {
            stop.cancel();
            let _ = handle.await;
        }
        let summary = summary?;
        let stats = summary.processor.stats();
        let secs = summary.elapsed.as_secs_f64();
        eprintln!(
            "done: {} events in {:.1}s ({:.0}/s), {} duplicates dropped, {} unreadable, {} committed",
            stats.events,
            secs,
            stats.events as f64 / secs.max(1e-9),
            stats.duplicates,
            stats.bad_events,
            summary.committed_events
        );
        let q = summary.processor.quarantine_summary();
        if !q.is_empty() {
            let parts: Vec<String> = q.iter().map(|(r, n)| format!("{r}={n}")).collect();
            eprintln!("quarantined (open): {}", parts.join(" "));
        }
        Ok(())
    })
}

async fn print_progress(spec: Arc<PipelineSpec>, mut rx: watch::Receiver<Progress>, redraw: bool) {
    let start = Instant::now();
    let mut last_tables: Vec<u64> = Vec::new();
    let mut last_at = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let p = rx.borrow_and_update().clone();
        let dt = last_at.elapsed().as_secs_f64().max(1e-3);
        last_at = Instant::now();
        let mut text = String::new();
        let rates: Vec<String> = spec
            .catalog
            .tables()
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let now = p.stats.table_events.get(i).copied().unwrap_or(0);
                let before = last_tables.get(i).copied().unwrap_or(0);
                format!("{} {:.0}/s", t.name, (now.saturating_sub(before)) as f64 / dt)
            })
            .collect();
        last_tables = p.stats.table_events.clone();
        text.push_str(&format!(
            "[{:>5}s] events {} | committed {} | duplicates {} | unreadable {}\n  {}\n",
            start.elapsed().as_secs(),
            p.stats.events,
            p.committed_events,
            p.stats.duplicates,
            p.stats.bad_events,
            rates.join("  ")
        ));
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        if let Some(lag) = p.lag_ms(now_ms) {
            text.push_str(&format!("  source lag {:.1}s\n", lag as f64 / 1000.0));
        }
        if !p.quarantine.is_empty() {
            let q: Vec<String> = p.quarantine.iter().map(|(r, n)| format!("{r}={n}")).collect();
            text.push_str(&format!("  quarantine: {}\n", q.join(" ")));
        }
        for (name, cols, rows) in &p.latest_gold {
            if let Some((w, _, _)) = rows.first() {
                text.push_str(&format!(
                    "  gold {name} window {}:\n",
                    caudal::event::time::format_timestamp(*w, 0)
                ));
                for (_, group, measures) in rows.iter().take(8) {
                    let vals: Vec<String> = group
                        .iter()
                        .chain(measures)
                        .zip(cols)
                        .map(|(v, c)| format!("{c}={v}"))
                        .collect();
                    text.push_str(&format!("    {}\n", vals.join(" ")));
                }
            }
        }
        if redraw {
            eprint!("\x1b[2J\x1b[H{text}");
        } else {
            eprint!("{text}");
        }
    }
}

/// `--store`: a PostgreSQL URL (keeping the stream the pipeline file names, if it
/// names one) or else a SQLite path.
fn store_arg(store: PathBuf, configured: Option<&StoreSpec>) -> StoreSpec {
    match store.to_str() {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let stream = match configured {
                Some(StoreSpec::Postgres { stream, .. }) => stream.clone(),
                _ => postgres::DEFAULT_STREAM.to_owned(),
            };
            StoreSpec::Postgres { url: url.to_owned(), stream }
        }
        Some(url) if url.starts_with("mysql://") => {
            let stream = match configured {
                Some(StoreSpec::Mysql { stream, .. }) => stream.clone(),
                _ => mysql::DEFAULT_STREAM.to_owned(),
            };
            StoreSpec::Mysql { url: url.to_owned(), stream }
        }
        _ => StoreSpec::Sqlite { path: store },
    }
}

fn bench(
    input: PathBuf,
    out: PathBuf,
    pipeline: Option<PathBuf>,
    threads: Option<usize>,
    store: Option<PathBuf>,
    no_baseline: bool,
    listen: Option<String>,
) -> anyhow::Result<()> {
    let mut spec = load_or_default(pipeline.as_deref())?;
    spec.source = SourceSpec::File { path: input.clone(), follow: false };
    let use_store = store.is_some();
    let store = store.map(|path| store_arg(path, spec.store.as_ref()));
    let store_name = match &store {
        Some(StoreSpec::Postgres { .. }) => ", with PostgreSQL store",
        Some(StoreSpec::Mysql { .. }) => ", with MySQL store",
        Some(StoreSpec::Sqlite { .. }) => ", with SQLite store",
        None => ", compute only (no store)",
    };
    spec.store = store;
    let threads = threads.unwrap_or_else(topology::default_threads);
    let bytes = std::fs::metadata(&input)
        .with_context(|| format!("cannot read `{}`", input.display()))?
        .len();
    let spec = Arc::new(spec);
    let rt = runtime()?;
    let summary = rt.block_on(async {
        // With --listen the dashboard reads the store while the benchmark writes it:
        // the figure with a browser (or `curl -N .../events`) attached.
        let (tx, rx) = watch::channel(Progress::default());
        let listen = listen.map(|addr| Listen { addr, required: true });
        let serving = start_serving(&spec, listen, rx).await?;
        let progress = serving.is_some().then_some(tx);
        let summary = topology::run(
            spec.clone(),
            RunOptions { threads, use_store },
            CancellationToken::new(),
            progress,
        )
        .await;
        if let Some((stop, handle)) = serving {
            stop.cancel();
            let _ = handle.await;
        }
        anyhow::Ok(summary?)
    })?;
    let peak = peak_rss_bytes();
    let p = &summary.processor;
    for (i, g) in spec.gold.iter().enumerate() {
        export::write_gold(&out, g, p.gold_rows(i))?;
    }
    export::write_quarantine_summary(&out, p.quarantine_summary())?;
    let stats = p.stats();
    let secs = summary.elapsed.as_secs_f64();
    println!("input: {} ({:.1} MB, {} events)", input.display(), bytes as f64 / 1e6, stats.events);
    println!(
        "pipeline: {:.3} s, {:.0} events/s, {:.0} MB/s, {} threads{}",
        secs,
        stats.events as f64 / secs,
        bytes as f64 / 1e6 / secs,
        threads,
        store_name
    );
    println!(
        "duplicates dropped: {}, unreadable lines: {}, peak memory: {:.0} MB",
        stats.duplicates,
        stats.bad_events,
        peak as f64 / 1e6
    );
    if !no_baseline {
        // The baseline uses every core: the fairest floor for "merely parsing".
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (base, lines) = parse_baseline(&input, cores)?;
        println!(
            "json parse only (serde_json::Value, {cores} threads): {:.3} s, {:.0} lines/s; pipeline/parse = {:.2}x",
            base,
            lines as f64 / base,
            secs / base
        );
    }
    println!("wrote {}", out.display());
    Ok(())
}

/// Time to merely parse every line into `serde_json::Value`, on `threads` threads.
fn parse_baseline(input: &Path, threads: usize) -> anyhow::Result<(f64, u64)> {
    let data = std::fs::read(input)?;
    let started = Instant::now();
    let per = data.len() / threads.max(1) + 1;
    let mut cuts = vec![0usize];
    for t in 1..threads {
        let at = (t * per).min(data.len());
        let nl = memchr::memchr(b'\n', &data[at..]).map_or(data.len(), |i| at + i + 1);
        cuts.push(nl);
    }
    cuts.push(data.len());
    let lines: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = cuts
            .windows(2)
            .map(|w| {
                let part = &data[w[0]..w[1]];
                s.spawn(move || {
                    let mut n = 0u64;
                    for line in part.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                        if serde_json::from_slice::<serde_json::Value>(line).is_ok() {
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    Ok((started.elapsed().as_secs_f64(), lines))
}

/// Peak resident set size of this process (Linux `VmHWM`), 0 where unknown.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
