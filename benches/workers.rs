//! `caudal process` as a consumer group of 1 or 2 workers: capture -> broker ->
//! workers -> PostgreSQL, on a throwaway tansu (`scripts/tansu`) and PostgreSQL
//! (`scripts/postgres`).
//!
//! Per worker count:
//! 1. the workers start and join the group on empty topics (created by a capture
//!    of nothing), so no partition starts mid-stream;
//! 2. end to end: `caudal capture` of the ERP workload (`erpgen.py --events N
//!    --seed 7`) starts the clock; it stops when PostgreSQL has every partition
//!    committed to its end. events/s = events / that time. The export is then
//!    compared with `reference.py`;
//! 3. commit-to-visible: probe orders are produced one at a time (about 20/s),
//!    first with the workers idle, then while `--load` other orders per second
//!    (5,000 by default) stream in; each probe's latency runs from the broker's
//!    acknowledgement to its silver row being visible in PostgreSQL (polled every
//!    millisecond).
//!
//! `cargo bench --bench workers -- [--events N] [--workers 1,2] [--storage memory|sqlite]
//! [--probes N] [--load EVENTS_PER_S] [--linger MS]` (the load producer's `linger.ms`, 5 by default). The pipeline uses `trigger_interval = "10ms"` (the default 1 s
//! trades latency for larger commits). Prints figures; asserts nothing about them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

mod common;
use common::arg;

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn workload_dir() -> PathBuf {
    std::env::var_os("CAUDAL_WORKLOAD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest().join("../shared/workload"))
}

fn caudal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_caudal"))
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A throwaway server started by `scripts/<name> start DIR`, stopped when dropped.
struct Service {
    script: &'static str,
    dir: tempfile::TempDir,
    address: String,
}

impl Service {
    fn start(script: &'static str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let address = ok(Command::new(manifest().join("scripts").join(script))
            .arg("start")
            .arg(dir.path())
            .args(extra));
        Self { script, dir, address }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = Command::new(manifest().join("scripts").join(self.script))
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

fn query(url: &str, sql: &str) -> Option<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.ok()?;
        tokio::spawn(conn);
        let rows = client.simple_query(sql).await.ok()?;
        rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
    })
}

/// The fact partitions of a worker's last generation, from its log.
fn assigned(log: &Path) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rfind(|l| l.contains("worker generation starts"))
        .map_or(0, |l| l.matches("erp_db.").count())
}

/// An order insert in the workload's envelope, at binlog position `pos`.
fn order(id: i64, pos: u64) -> (String, String) {
    let key = format!("{{\"id\":{id}}}");
    let value = format!(
        "{{\"before\":null,\"after\":{{\"id\":{id},\"customer_id\":1,\"employee_id\":1,\
         \"channel\":\"web\",\"status\":\"paid\",\"order_ts\":1767600000000,\"currency\":\"EUR\",\
         \"total\":\"1.00\",\"city\":\"x\"}},\"source\":{{\"file\":\"mysql-bin.999999\",\
         \"pos\":{pos},\"row\":0,\"table\":\"orders\",\"db\":\"erp_db\",\"snapshot\":\"false\",\
         \"ts_ms\":1767600000000}},\"op\":\"c\",\"ts_ms\":1767600000000}}"
    );
    (key, value)
}

type ProbeRequest = (i64, mpsc::Sender<Option<Instant>>);

/// One producer thread: order events at a steady rate (none for 0), and the probes
/// in between. Why one producer: positions must rise in the order messages reach
/// a partition, or deduplication would drop a probe overtaken by a higher position.
struct Feed {
    probes: mpsc::Sender<ProbeRequest>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, f64)>,
}

/// Positions continue across feeds (each worker count's feeds share the topics).
static NEXT_POS: AtomicU64 = AtomicU64::new(1_000);

impl Feed {
    fn start(brokers: &str, rate: u64, linger_ms: &str) -> Self {
        let (probes, requests) = mpsc::channel::<ProbeRequest>();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let brokers = brokers.to_owned();
        let linger_ms = linger_ms.to_owned();
        let thread = std::thread::spawn(move || {
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("partitioner", "murmur2_random")
                // 5 ms by default, as `caudal capture` produces (src/bus/kafka.rs):
                // 5,000 requests a second of one message each (`--linger 0`) load
                // the broker more than a batching producer does.
                .set("linger.ms", &linger_ms)
                .create()
                .expect("producer");
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
            let to = "erp_db.orders";
            let started = Instant::now();
            let mut sent = 0u64;
            rt.block_on(async {
                while !stopped.load(Ordering::Relaxed) {
                    while let Ok((id, reply)) = requests.try_recv() {
                        let (key, value) = order(id, NEXT_POS.fetch_add(1, Ordering::Relaxed));
                        let record = FutureRecord::to(to).key(&key).payload(&value);
                        let acked = producer.send(record, Duration::from_secs(10)).await;
                        let _ = reply.send(acked.ok().map(|_| Instant::now()));
                    }
                    let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                    while sent < due {
                        let id = 800_000_000 + sent as i64;
                        let (key, value) = order(id, NEXT_POS.fetch_add(1, Ordering::Relaxed));
                        // Queued in librdkafka; its delivery is not awaited.
                        if producer
                            .send_result(FutureRecord::to(to).key(&key).payload(&value))
                            .is_err()
                        {
                            break;
                        }
                        sent += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
            let _ = producer.flush(Duration::from_secs(10));
            (sent, started.elapsed().as_secs_f64())
        });
        Self { probes, stop, thread }
    }

    /// Sends probe order `id`; the instant the broker acknowledged it.
    fn probe(&self, id: i64) -> Option<Instant> {
        let (reply, acked) = mpsc::channel();
        self.probes.send((id, reply)).ok()?;
        acked.recv().ok().flatten()
    }

    /// Stops the feed: orders sent besides the probes, and over how many seconds.
    fn stop(self) -> (u64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("feed thread")
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn main() {
    let events: u64 = arg("--events", "100000").parse().expect("--events N");
    let counts: Vec<usize> =
        arg("--workers", "1,2").split(',').map(|n| n.parse().expect("--workers 1,2")).collect();
    let storage = arg("--storage", "sqlite");
    let probes: usize = arg("--probes", "200").parse().expect("--probes N");
    let load: u64 = arg("--load", "5000").parse().expect("--load EVENTS_PER_S");
    let linger = arg("--linger", "5");
    let work = tempfile::tempdir().expect("tempdir");
    let input = work.path().join("erp.jsonl");
    let out = Command::new("python3")
        .arg(workload_dir().join("erpgen.py"))
        .args(["--events", &events.to_string(), "--seed", "7"])
        .output()
        .expect("erpgen.py");
    std::fs::write(&input, &out.stdout).expect("write workload");
    let want = work.path().join("want");
    let status = Command::new("python3")
        .arg(workload_dir().join("reference.py"))
        .arg("--out")
        .arg(&want)
        .stdin(std::fs::File::open(&input).expect("input"))
        .stderr(Stdio::null())
        .status()
        .expect("reference.py");
    assert!(status.success());
    let empty = work.path().join("empty.jsonl");
    std::fs::write(&empty, "").expect("write empty");
    let text = std::fs::read_to_string(manifest().join("config/examples/erp.toml")).expect("erp");
    let pipeline = work.path().join("erp.toml");
    std::fs::write(
        &pipeline,
        text.replace("trigger_interval = \"1s\"", "trigger_interval = \"10ms\""),
    )
    .expect("write pipeline");

    println!("caudal process, {events} events, tansu {storage} storage, PostgreSQL, 2 cores");
    for &n in &counts {
        let broker = Service::start("tansu", &[&storage]);
        let pg = Service::start("postgres", &[]);
        let capture = |file: &Path| {
            let out = caudal()
                .arg("capture")
                .arg(&pipeline)
                .arg("--input")
                .arg(file)
                .arg("--brokers")
                .arg(&broker.address)
                .output()
                .expect("capture");
            assert!(out.status.success(), "capture: {}", String::from_utf8_lossy(&out.stderr));
        };
        capture(&empty);
        let logs: Vec<PathBuf> =
            (0..n).map(|i| work.path().join(format!("w{n}-{i}.log"))).collect();
        let mut workers: Vec<Child> = logs
            .iter()
            .map(|log| {
                caudal()
                    .arg("process")
                    .arg(&pipeline)
                    .arg("--brokers")
                    .arg(&broker.address)
                    .arg("--store")
                    .arg(&pg.address)
                    .arg("-q")
                    .stderr(std::fs::File::create(log).expect("log"))
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("spawn worker")
            })
            .collect();
        // Every worker has its share of the 28 partitions (7 topics x 4).
        let deadline = Instant::now() + Duration::from_secs(60);
        while logs.iter().map(|l| assigned(l)).sum::<usize>() < 28
            || logs.iter().any(|l| assigned(l) == 0)
        {
            assert!(Instant::now() < deadline, "the workers did not share the partitions");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(1));

        let started = Instant::now();
        capture(&input);
        let captured = started.elapsed();
        // Done when the sum of committed offsets stopped moving (2 s): the clock
        // stops at its last move.
        let mut last = -1i64;
        let mut stable_since = Instant::now();
        let done_at = loop {
            let sum: i64 = query(
                &pg.address,
                "SELECT COALESCE(SUM(event_count), 0) FROM caudal_checkpoint WHERE stream LIKE 'main@%'",
            )
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
            if sum != last {
                last = sum;
                stable_since = Instant::now();
            } else if sum > 0 && stable_since.elapsed() > Duration::from_secs(2) {
                break stable_since;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let secs = done_at.duration_since(started).as_secs_f64();
        let got = work.path().join(format!("got{n}"));
        ok(caudal().arg("export").arg("--store").arg(&pg.address).arg("--out").arg(&got));
        let same = ["gold_sales_10m.csv", "quarantine_summary.csv"]
            .iter()
            .all(|f| std::fs::read(want.join(f)).ok() == std::fs::read(got.join(f)).ok());
        println!(
            "{n} worker(s): {events} events end to end in {secs:.2}s ({:.0} events/s; capture alone {:.2}s); export equals reference.py: {same}",
            events as f64 / secs,
            captured.as_secs_f64()
        );

        // Commit-to-visible: probe orders one at a time, with the workers idle, then
        // while `--load` order events per second stream in beside them.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        let client = rt.block_on(async {
            let (client, conn) =
                tokio_postgres::connect(&pg.address, tokio_postgres::NoTls).await.expect("connect");
            tokio::spawn(conn);
            client
        });
        let mut first_id = 900_000_000;
        for rate in [0, load] {
            let feed = Feed::start(&broker.address, rate, &linger);
            let mut latencies = Vec::with_capacity(probes);
            for _ in 0..probes {
                let id = first_id;
                first_id += 1;
                let Some(acked) = feed.probe(id) else { continue };
                let limit = Instant::now() + Duration::from_secs(10);
                loop {
                    let seen = rt.block_on(async {
                        client
                            .query_opt("SELECT 1 FROM silver_orders WHERE id = $1", &[&id])
                            .await
                            .ok()
                            .flatten()
                            .is_some()
                    });
                    if seen || Instant::now() > limit {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                latencies.push(acked.elapsed().as_secs_f64() * 1000.0);
                std::thread::sleep(Duration::from_millis(50));
            }
            let (sent, secs) = feed.stop();
            latencies.sort_by(f64::total_cmp);
            let during = if rate == 0 {
                "idle".to_owned()
            } else {
                format!(
                    "under load: {sent} other orders in {secs:.1}s, {:.0}/s",
                    sent as f64 / secs
                )
            };
            println!(
                "{n} worker(s): commit-to-visible over {} probes, {during}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                latencies.len(),
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99),
                latencies.last().copied().unwrap_or(f64::NAN)
            );
        }
        for w in &mut workers {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}
