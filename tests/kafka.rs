//! Kafka between capture and processing, on a real broker (tansu, started per test
//! by `scripts/tansu`): `caudal capture` publishes the workload to one topic per
//! table, `caudal run` with a `kafka` source reads it back into SQLite, and the
//! export equals `reference.py` byte for byte; also after kill -9 of the capture,
//! across a broker restart, and read by a Kafka client we did not write.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::support::tansu::{confluent_python, Tansu};
use crate::support::*;

/// The ERP pipeline reading the topics `caudal capture` wrote, until their end at start.
fn kafka_pipeline(dir: &Path, brokers: &str, settings: &str) -> PathBuf {
    let text = std::fs::read_to_string(erp_pipeline()).expect("read pipeline");
    let source = format!("[source]\ntype = \"kafka\"\nbrokers = {brokers:?}\nexit_at_end = true\n");
    let replaced = text.replace("[source]\ntype = \"file\"\npath = \"erp.jsonl\"\n", &source);
    assert_ne!(replaced, text, "erp.toml's [source] section moved: update this test");
    let replaced = replaced.replace("trigger_interval = \"1s\"", settings);
    let path = dir.join("from_kafka.toml");
    std::fs::write(&path, replaced).expect("write pipeline");
    path
}

/// Lines of a workload file: the events `caudal capture` publishes.
fn line_count(input: &Path) -> usize {
    std::fs::read_to_string(input).expect("read input").lines().count()
}

fn capture(input: &Path, brokers: &str) -> std::process::Output {
    ok(caudal()
        .arg("capture")
        .arg(erp_pipeline())
        .arg("--input")
        .arg(input)
        .arg("--brokers")
        .arg(brokers))
}

/// `caudal run` of `pipeline` into `store`, then the export compared with `want`.
fn run_and_compare(pipeline: &Path, store: &Path, want: &Path, got: &Path) {
    ok(caudal().arg("run").arg(pipeline).arg("--store").arg(store).arg("-q"));
    export(store, got);
    assert_same_answer(want, got);
}

/// Events durably committed in the store so far.
fn committed(store: &Path) -> i64 {
    let Ok(db) = rusqlite::Connection::open(store) else { return 0 };
    db.query_row("SELECT event_count FROM caudal_checkpoint", [], |r| r.get(0)).unwrap_or(0)
}

#[test]
fn capture_to_kafka_then_run_from_kafka_matches_the_reference() {
    let input = erpgen(100_000, 7);
    let dir = tempfile::tempdir().expect("tempdir");
    let (want, got, store) =
        (dir.path().join("want"), dir.path().join("got"), dir.path().join("erp.db"));
    reference(&input, &want);
    let broker = Tansu::start();

    let out = capture(&input, broker.brokers());
    let text = String::from_utf8_lossy(&out.stderr);
    let published = format!("published {} events", line_count(&input));
    assert!(text.contains(&published), "capture publishes every line: {text}");

    let pipeline = kafka_pipeline(dir.path(), broker.brokers(), "trigger_interval = \"1s\"");
    run_and_compare(&pipeline, &store, &want, &got);

    // Capturing again resumes from its checkpoint in Kafka: nothing is published twice.
    let out = capture(&input, broker.brokers());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("published 0 events"), "a finished capture resumes at the end: {text}");

    // Running again reads nothing new: the offsets are in the store's checkpoint.
    let again = dir.path().join("again");
    run_and_compare(&pipeline, &store, &want, &again);
}

#[test]
fn capture_killed_with_sigkill_and_restarted_still_gives_the_reference() {
    let input = erpgen(100_000, 7);
    let dir = tempfile::tempdir().expect("tempdir");
    let (want, got, store) =
        (dir.path().join("want"), dir.path().join("got"), dir.path().join("erp.db"));
    reference(&input, &want);
    let broker = Tansu::start();

    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut resumed = 0;
    let mut kills = 0;
    let mut finished = false;
    for attempt in 0..30 {
        let log = dir.path().join(format!("capture-{attempt}.log"));
        let mut child = caudal()
            .arg("capture")
            .arg(erp_pipeline())
            .arg("--input")
            .arg(&input)
            .arg("--brokers")
            .arg(broker.brokers())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn caudal capture");
        let started = Instant::now();
        // Publishing 100k events takes 0.4-2 s here, depending on the machine's load;
        // setting up (topics, the stored checkpoint) varies as much. The clock for
        // the kill starts once the capture says it is set up, so kills land mid-stream.
        // Under a heavy load the first checkpoint can take longer than that to be
        // acknowledged: once six kills have not given two resumes, wait longer.
        let longest = if kills >= 6 && resumed < 2 { 1_500 } else { 300 };
        let wait = Duration::from_millis(rng.gen_range(20..longest));
        let kill = kills < 6 || (resumed < 2 && kills < 16);
        let mut ready_at: Option<Instant> = None;
        loop {
            if ready_at.is_none() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let set_up = text.contains("capture resuming") || text.contains("capture starting");
                if set_up || started.elapsed() > Duration::from_secs(3) {
                    ready_at = Some(Instant::now());
                }
            }
            if let Some(status) = child.try_wait().expect("wait") {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                assert!(status.success(), "capture failed on attempt {attempt}: {text}");
                finished = true;
                break;
            }
            if ready_at.is_some_and(|r| r.elapsed() >= wait) && kill {
                child.kill().expect("SIGKILL");
                child.wait().expect("reap");
                kills += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if attempt > 0 {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("capture resuming") {
                resumed += 1;
            }
        }
        if finished {
            break;
        }
    }
    assert!(finished, "caudal capture never finished");
    assert!(resumed >= 2, "restarts resumed from a stored checkpoint several times ({resumed})");

    let pipeline = kafka_pipeline(dir.path(), broker.brokers(), "trigger_interval = \"1s\"");
    run_and_compare(&pipeline, &store, &want, &got);
}

/// Java's `Utils.murmur2` and the default partitioner's `toPositive(hash) % n`,
/// to check that keys land where Kafka's Java clients would put them.
const READ_TOPIC: &str = r#"
import json, sys
from confluent_kafka import Consumer, KafkaError, TopicPartition, OFFSET_BEGINNING

def murmur2(data):
    m, h = 0x5BD1E995, (0x9747B28C ^ len(data)) & 0xFFFFFFFF
    n4 = len(data) // 4
    for i in range(n4):
        k = int.from_bytes(data[4 * i:4 * i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    rest = data[4 * n4:]
    if len(rest) == 3:
        h ^= rest[2] << 16
    if len(rest) >= 2:
        h ^= rest[1] << 8
    if len(rest) >= 1:
        h ^= rest[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h

brokers, topic, table = sys.argv[1], sys.argv[2], sys.argv[3]
# Read each partition to its end as fetches report it (partition EOF): tansu's
# in-memory storage answers ListOffsets (get_watermark_offsets) with too low an end.
c = Consumer({"bootstrap.servers": brokers, "group.id": "not-caudal",
              "enable.auto.commit": False, "auto.offset.reset": "earliest",
              "enable.partition.eof": True})
parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
ends = set(parts)
c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
stats = {"partitions": len(parts), "messages": 0, "tombstones": 0, "ops": {}}
deadline = __import__("time").time() + 60
while ends:
    assert __import__("time").time() < deadline, f"timed out, {ends} left"
    msg = c.poll(1.0)
    if msg is None:
        continue
    if msg.error() is not None and msg.error().code() == KafkaError._PARTITION_EOF:
        ends.discard(msg.partition())
        continue
    assert msg.error() is None, msg.error()
    key = json.loads(msg.key())
    assert isinstance(key, dict) and list(key) == ["id"], key
    assert (murmur2(msg.key()) & 0x7FFFFFFF) % len(parts) == msg.partition(), (key, msg.partition())
    stats["messages"] += 1
    if msg.value() is None:
        stats["tombstones"] += 1
    else:
        v = json.loads(msg.value())
        assert v["op"] in ("r", "c", "u", "d"), v
        assert v["source"]["table"] == table and v["source"]["db"] == "erp_db", v["source"]
        image = v["before"] if v["op"] == "d" else v["after"]
        assert isinstance(image, dict) and image["id"] == key["id"], (key, v)
        if v["op"] == "d":
            assert v["after"] is None, v
        stats["ops"][v["op"]] = stats["ops"].get(v["op"], 0) + 1
c.close()
print(json.dumps(stats))
"#;

#[test]
fn a_client_we_did_not_write_reads_our_topics_as_debezium_envelopes() {
    let input = erpgen(20_000, 7);
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Tansu::start();
    capture(&input, broker.brokers());

    let script = dir.path().join("read_topic.py");
    std::fs::write(&script, READ_TOPIC).expect("write script");
    let out = ok(std::process::Command::new(confluent_python()).arg(&script).args([
        broker.brokers(),
        "erp_db.order_items",
        "order_items",
    ]));
    let stats: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the reader prints its counts as JSON");

    // What the topic must hold: every order_items line of the input, and a tombstone per delete.
    let text = std::fs::read_to_string(&input).expect("read input");
    let mut want_ops = std::collections::BTreeMap::<String, u64>::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["topic"] == "erp_db.order_items" {
            if let Some(op) = v["value"]["op"].as_str() {
                *want_ops.entry(op.to_owned()).or_default() += 1;
            }
        }
    }
    let deletes = want_ops.get("d").copied().unwrap_or(0);
    let envelopes: u64 = want_ops.values().sum();
    assert!(envelopes > 1000 && deletes > 0, "the workload has order lines and deletes");
    assert_eq!(stats["partitions"], 4, "topics get the configured partition count: {stats}");
    assert_eq!(stats["tombstones"], deletes, "a tombstone follows each delete: {stats}");
    assert_eq!(stats["messages"], envelopes + deletes, "every order line change is there: {stats}");
    for (op, n) in &want_ops {
        assert_eq!(stats["ops"][op], *n, "op {op}: {stats}");
    }
}

#[test]
fn broker_restart_while_run_consumes_still_gives_the_reference() {
    let input = erpgen(100_000, 7);
    let dir = tempfile::tempdir().expect("tempdir");
    let (want, got, store) =
        (dir.path().join("want"), dir.path().join("got"), dir.path().join("erp.db"));
    reference(&input, &want);
    let text = std::fs::read_to_string(&input).expect("read input");
    let lines: Vec<&str> = text.lines().collect();
    let half = dir.path().join("half.jsonl");
    std::fs::write(&half, lines[..lines.len() / 2].join("\n") + "\n").expect("write half");
    let mut broker = Tansu::start_sqlite();

    // The first half is in Kafka; `caudal run` (not stopping at the end) consumes it.
    capture(&half, broker.brokers());
    let settings = "trigger_interval = \"20ms\"";
    let pipeline = kafka_pipeline(dir.path(), broker.brokers(), settings);
    let pipeline_text = std::fs::read_to_string(&pipeline).expect("read pipeline");
    std::fs::write(&pipeline, pipeline_text.replace("exit_at_end = true", "exit_at_end = false"))
        .expect("write pipeline");
    let log = dir.path().join("run.log");
    let mut child = caudal()
        .arg("run")
        .arg(&pipeline)
        .arg("--store")
        .arg(&store)
        .arg("-q")
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn caudal run");
    let wait_for = |n: usize, child: &mut std::process::Child| {
        let started = Instant::now();
        while committed(&store) < n as i64 {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(child.try_wait().expect("wait").is_none(), "run ended early: {text}");
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "{n} events not committed: {text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(lines.len() / 2, &mut child);

    // The broker goes away under the consumer and comes back with its log.
    broker.stop();
    std::thread::sleep(Duration::from_secs(2));
    broker.start_again();

    // The rest: capture resumes after the half file's last line (same bytes), and
    // the same `caudal run` reads it through its reconnected consumer.
    capture(&input, broker.brokers());
    wait_for(lines.len(), &mut child);
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("send SIGINT");
    assert!(status.success(), "kill -INT");
    let status = child.wait().expect("wait");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "run failed: {text}");
    assert!(
        text.contains("retrying") || text.contains("kafka client error"),
        "the consumer saw the broker go: {text}"
    );
    export(&store, &got);
    assert_same_answer(&want, &got);
}

#[test]
fn unreadable_inputs_go_through_kafka_to_quarantine_with_their_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(erpgen(20_000, 7)).expect("read input");
    let mut lines: Vec<&str> = text.lines().take(300).collect();
    let malformed = "{\"topic\": \"erp_db.orders\", \"value\": {not json";
    let unknown = r#"{"topic":"erp_db.invoices","key":{"id":1},"value":{"before":null,"after":{"id":1},"source":{"table":"invoices","db":"erp_db"},"op":"c","ts_ms":1}}"#;
    lines.insert(100, malformed);
    lines.push(unknown);
    let input = dir.path().join("dirty.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").expect("write input");
    let broker = Tansu::start();
    capture(&input, broker.brokers());
    let pipeline = kafka_pipeline(dir.path(), broker.brokers(), "trigger_interval = \"1s\"");
    let store = dir.path().join("erp.db");
    ok(caudal().arg("run").arg(&pipeline).arg("--store").arg(&store).arg("-q"));

    let db = rusqlite::Connection::open(&store).expect("open store");
    let mut stmt = db
        .prepare(
            "SELECT reason, origin, payload FROM quarantine WHERE stage = 'decode' ORDER BY origin",
        )
        .expect("prepare");
    let rows: Vec<(String, i64, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .map(|r| r.expect("row"))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("malformed_json".to_owned(), 101, malformed.to_owned()),
            ("unknown_table".to_owned(), lines.len() as i64, unknown.to_owned()),
        ],
        "each unreadable line is quarantined once, with its line number and bytes"
    );
}

/// The simulator keeps no input bytes: capture encodes each envelope itself. Through
/// Kafka, the result equals the simulator run straight into SQLite.
#[test]
fn simulator_through_kafka_equals_the_direct_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Tansu::start();
    let text = std::fs::read_to_string(erp_pipeline()).expect("read pipeline");
    let simulate = "[source]\ntype = \"simulate\"\nrate = \"max\"\nevents = 30000\nstart = \"2026-01-05T08:00:00Z\"\n";
    let sim = dir.path().join("sim.toml");
    std::fs::write(
        &sim,
        text.replace("[source]\ntype = \"file\"\npath = \"erp.jsonl\"\n", simulate),
    )
    .expect("write pipeline");
    let (direct, via) = (dir.path().join("direct.db"), dir.path().join("via.db"));
    ok(caudal().arg("run").arg(&sim).arg("--store").arg(&direct).arg("-q"));
    ok(caudal().arg("capture").arg(&sim).arg("--brokers").arg(broker.brokers()));
    let pipeline = kafka_pipeline(dir.path(), broker.brokers(), "trigger_interval = \"1s\"");
    ok(caudal().arg("run").arg(&pipeline).arg("--store").arg(&via).arg("-q"));
    let (want, got) = (dir.path().join("want"), dir.path().join("got"));
    export(&direct, &want);
    export(&via, &got);
    assert_same_answer(&want, &got);
}

/// The split deployment: `caudal capture` into the broker, then the `caudal process`
/// role into PostgreSQL, killed with SIGKILL mid-stream and restarted: the offsets
/// live in PostgreSQL's transaction, so the export still equals the reference.
#[test]
fn process_role_into_postgres_survives_sigkill_and_matches_the_reference() {
    let ToPostgres { dir: _dir, want, got, broker, pg } = to_postgres(11);

    let process = || {
        let mut cmd = caudal();
        cmd.arg("process")
            .arg(erp_pipeline())
            .arg("--brokers")
            .arg(broker.brokers())
            .arg("--store")
            .arg(pg.url())
            .arg("--exit-at-end")
            .arg("-q");
        cmd
    };
    // One checkpoint row per partition (the worker is a group of one).
    let committed = || {
        pg.query_text("SELECT COALESCE(SUM(event_count), 0) FROM caudal_checkpoint")
            .and_then(|s| s.trim().parse::<i64>().ok())
            .unwrap_or(0)
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut kills = 0;
    for _ in 0..6 {
        if kills >= 2 {
            break;
        }
        let before = committed();
        let mut child = process().stderr(Stdio::null()).spawn().expect("spawn caudal process");
        let deadline = Instant::now() + Duration::from_secs(30);
        // Kill only after this run made progress, so each kill lands mid-stream.
        while committed() == before && Instant::now() < deadline {
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..80)));
        if child.try_wait().expect("wait").is_none() {
            child.kill().expect("kill -9");
            kills += 1;
        }
        let _ = child.wait();
    }
    assert!(kills >= 1, "at least one kill landed mid-stream");
    ok(&mut process());
    export_from(pg.url(), &got);
    assert_same_answer(&want, &got);
}

/// `caudal process` into PostgreSQL, started as a worker of the consumer group
/// `kafka.group`, with its log in `log`.
/// A workload captured into a broker, its reference answer, and an empty
/// PostgreSQL store: the start of every `process`-into-PostgreSQL test.
struct ToPostgres {
    dir: tempfile::TempDir,
    want: std::path::PathBuf,
    got: std::path::PathBuf,
    broker: Tansu,
    pg: crate::support::postgres::Postgres,
}

/// The 100k workload of `seed`, captured into a broker with tansu's sqlite storage:
/// tansu 0.6's memory storage answers a fetch at an offset inside a record batch
/// from the next batch on, skipping messages, which a worker restarting or taking
/// over a partition mid-stream exposes (checked with confluent-kafka too).
fn to_postgres(seed: u64) -> ToPostgres {
    let input = erpgen(100_000, seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let (want, got) = (dir.path().join("want"), dir.path().join("got"));
    reference(&input, &want);
    let broker = Tansu::start_sqlite();
    let pg = crate::support::postgres::Postgres::start();
    capture(&input, broker.brokers());
    ToPostgres { dir, want, got, broker, pg }
}

fn spawn_worker(broker: &str, pg: &str, log: &Path) -> std::process::Child {
    caudal()
        .arg("process")
        .arg(erp_pipeline())
        .arg("--brokers")
        .arg(broker)
        .arg("--store")
        .arg(pg)
        .arg("--exit-at-end")
        .arg("-q")
        .stderr(std::fs::File::create(log).expect("log file"))
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn caudal process")
}

/// Kills the workers a failed test leaves behind.
struct Reaper(Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// Waits for `child` to exit successfully, within `limit`.
fn wait_ok(child: &mut std::process::Child, log: &Path, limit: Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            assert!(status.success(), "worker failed ({status}): {text}");
            return;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("worker did not finish within {limit:?}: {text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The fact partitions a worker was last assigned, from its log.
fn last_fact_partitions(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let Some(line) = text.lines().rfind(|l| l.contains("worker generation starts")) else {
        return Vec::new();
    };
    line.split(['"', '[', ']', ','])
        .map(str::trim)
        .filter(|s| s.starts_with("erp_db.order_items/"))
        .map(str::to_owned)
        .collect()
}

/// Every fact partition a worker was assigned in any generation, from its log.
fn fact_partitions_ever(log: &Path) -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("worker generation starts"))
        .flat_map(|l| l.split(['"', '[', ']', ',']).map(str::trim))
        .filter(|s| s.starts_with("erp_db.order_items/"))
        .map(str::to_owned)
        .collect()
}

/// No row is in PostgreSQL twice: one open quarantine record per row, and the
/// partition gold rows of one fact partition per window and group.
fn assert_no_duplicates(pg: &crate::support::postgres::Postgres) {
    let dup = pg.query_text(
        "SELECT COUNT(*) FROM (SELECT table_name, row_key FROM quarantine \
         WHERE resolved_at IS NULL AND row_key IS NOT NULL \
         GROUP BY table_name, row_key HAVING COUNT(*) > 1) d",
    );
    assert_eq!(dup.as_deref(), Some("0"), "an open quarantine record per row");
    let dup = pg.query_text(
        "SELECT COUNT(*) FROM (SELECT origin, payload FROM quarantine WHERE stage = 'decode' \
         GROUP BY origin, payload HAVING COUNT(*) > 1) d",
    );
    assert_eq!(dup.as_deref(), Some("0"), "an unreadable input once");
}

/// Issue 4: the 100k workload through `capture` -> broker -> two `process`
/// workers of one consumer group -> PostgreSQL. The workers share the order line
/// partitions, each reads the looked-up tables in full, and gold and quarantine
/// equal the reference files.
#[test]
fn two_process_workers_share_the_partitions_and_match_the_reference() {
    let ToPostgres { dir, want, got, broker, pg } = to_postgres(7);

    let logs = [dir.path().join("a.log"), dir.path().join("b.log")];
    let mut workers: Vec<_> =
        logs.iter().map(|log| spawn_worker(broker.brokers(), pg.url(), log)).collect();
    let _reaper = Reaper(workers.iter().map(std::process::Child::id).collect());
    for (w, log) in workers.iter_mut().zip(&logs) {
        wait_ok(w, log, Duration::from_secs(300));
    }
    // Both shared the work. Their last assignments may overlap: the worker that
    // finishes first leaves the group, and the other is then given every
    // partition for its last check. One writer per partition at a time is what
    // the exact answer and the duplicate checks below show.
    let (a, b) = (fact_partitions_ever(&logs[0]), fact_partitions_ever(&logs[1]));
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both workers were assigned order line partitions: {a:?} {b:?}"
    );
    let parts = pg.query_text("SELECT COUNT(DISTINCT _partition) FROM gold_sales_10m_part");
    assert_eq!(parts.as_deref(), Some("4"), "gold is kept per order line partition");
    export_from(pg.url(), &got);
    assert_same_answer(&want, &got);
    assert_no_duplicates(&pg);
}

/// Issue 4's fault test: one of two workers killed with SIGKILL mid-stream; the
/// other takes its partitions over, the killed one is restarted and rejoins, and
/// the tables still equal the reference, with nothing twice.
#[test]
fn a_process_worker_killed_with_sigkill_is_replaced_and_the_result_is_exact() {
    let ToPostgres { dir, want, got, broker, pg } = to_postgres(11);
    let progress = || {
        pg.query_text(
            "SELECT COALESCE(SUM(event_count), 0) FROM caudal_checkpoint WHERE stream LIKE 'main@%'",
        )
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or(0)
    };

    let (log_a, log_b, log_c) =
        (dir.path().join("a.log"), dir.path().join("b.log"), dir.path().join("a2.log"));
    let mut a = spawn_worker(broker.brokers(), pg.url(), &log_a);
    let mut b = spawn_worker(broker.brokers(), pg.url(), &log_b);
    let mut reaper = Reaper(vec![a.id(), b.id()]);
    // Kill once both workers had partitions and some progress is committed.
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let deadline = Instant::now() + Duration::from_secs(120);
    while (progress() < 20_000
        || last_fact_partitions(&log_a).is_empty()
        || last_fact_partitions(&log_b).is_empty())
        && Instant::now() < deadline
    {
        assert!(a.try_wait().expect("wait").is_none(), "worker a ended before the kill");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
    assert!(a.try_wait().expect("wait").is_none(), "worker a ended before the kill");
    let before = progress();
    a.kill().expect("kill -9");
    let _ = a.wait();
    assert!(
        !last_fact_partitions(&log_a).is_empty(),
        "the killed worker had order line partitions"
    );

    // Restarted once the dead member's session (6 s) has expired: its join makes
    // the group share out again, without the dead member. tansu 0.6 only drops an
    // expired member when somebody (re)joins: it moves the group to "forming"
    // without telling the live members to rejoin, so until a join the killed
    // worker's partitions stay assigned to nobody alive; and a join within the
    // session timeout forms a group that still counts the dead member.
    std::thread::sleep(Duration::from_secs(8));
    let mut a2 = spawn_worker(broker.brokers(), pg.url(), &log_c);
    reaper.0.push(a2.id());
    wait_ok(&mut b, &log_b, Duration::from_secs(300));
    wait_ok(&mut a2, &log_c, Duration::from_secs(300));
    let total = progress();
    assert!(before < total, "the kill landed mid-stream ({before} of {total} committed)");
    export_from(pg.url(), &got);
    assert_same_answer(&want, &got);
    assert_no_duplicates(&pg);
}

/// Events the processor has taken in so far, from `/metrics`.
fn processed(addr: std::net::SocketAddr) -> u64 {
    let (_, body) = crate::support::serve::http_get(addr, "/metrics").expect("GET /metrics");
    body.lines()
        .filter(|l| l.starts_with("caudal_process_events_in_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Backpressure end to end: while PostgreSQL takes no commit (another session holds
/// a lock on `caudal_checkpoint`), `caudal run` from Kafka stops taking events in,
/// and its memory stays flat; it does not buffer the rest of the topics. Once the
/// lock goes, it finishes, and nothing was lost or counted twice.
#[test]
fn a_stalled_postgres_holds_consumption_back_with_flat_memory_and_loses_nothing() {
    let input = erpgen(100_000, 7);
    let dir = tempfile::tempdir().expect("tempdir");
    let (want, got) = (dir.path().join("want"), dir.path().join("got"));
    reference(&input, &want);
    let broker = Tansu::start();
    let pg = crate::support::postgres::Postgres::start();
    capture(&input, broker.brokers());
    // Small commits, so that the stall comes early in the stream.
    let pipeline = kafka_pipeline(
        dir.path(),
        broker.brokers(),
        "trigger_interval = \"1s\"\nmax_batch_events = 2000\nqueue_batches = 2",
    );
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], crate::support::serve::free_port()).into();
    let log = dir.path().join("run.log");
    let child = caudal()
        .arg("run")
        .arg(&pipeline)
        .arg("--store")
        .arg(pg.url())
        .arg("--listen")
        .arg(addr.to_string())
        .arg("-q")
        .stderr(std::fs::File::create(&log).expect("log file"))
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn caudal run");
    let mut child = crate::support::serve::Running(child);
    let committed = || {
        pg.query_text("SELECT COALESCE(SUM(event_count), 0) FROM caudal_checkpoint")
            .and_then(|s| s.trim().parse::<i64>().ok())
            .unwrap_or(0)
    };
    let started = Instant::now();
    while committed() == 0 {
        assert!(started.elapsed() < Duration::from_secs(60), "nothing committed in 60 s");
        assert!(child.0.try_wait().expect("wait").is_none(), "caudal run ended early");
        std::thread::sleep(Duration::from_millis(5));
    }

    // Another session locks the checkpoint table against writes (reads still work).
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let url = pg.url().to_owned();
    let holder = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let (mut client, conn) =
                tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
            tokio::spawn(conn);
            let tx = client.transaction().await.expect("begin");
            tx.batch_execute("LOCK TABLE caudal_checkpoint IN EXCLUSIVE MODE").await.expect("lock");
            locked_tx.send(()).expect("report the lock");
            // The server keeps the lock while this session is open and idle.
            let _ = released.recv();
            tx.rollback().await.expect("release the lock");
        });
    });
    locked.recv().expect("lock taken");
    let stalled_at = committed();
    // Let the stages between Kafka and the store fill up, then watch them.
    std::thread::sleep(Duration::from_millis(1500));
    let (taken_in, memory) = (processed(addr), rss(child.0.id()));
    std::thread::sleep(Duration::from_secs(3));
    let (taken_in_later, memory_later) = (processed(addr), rss(child.0.id()));
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "caudal run ended while stalled: {logged}"
    );
    assert_eq!(committed(), stalled_at, "nothing commits while the table is locked");
    assert_eq!(taken_in, taken_in_later, "processing waits for the store");
    assert!(
        taken_in < 90_000,
        "at least a tenth of the topics stays unread while the store stalls ({taken_in} taken in)"
    );
    assert!(
        memory_later < memory + (8 << 20),
        "memory stays flat while stalled ({memory} -> {memory_later} bytes)"
    );
    eprintln!(
        "stalled at {stalled_at} committed, {taken_in} taken in; rss {} -> {} MiB",
        memory >> 20,
        memory_later >> 20
    );

    release.send(()).expect("release");
    holder.join().expect("lock holder");
    let until = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < until, "caudal run did not finish after the stall");
        std::thread::sleep(Duration::from_millis(50));
    };
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "caudal run failed after the stall: {logged}");
    export_from(pg.url(), &got);
    assert_same_answer(&want, &got);
}
