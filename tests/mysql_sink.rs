//! The MySQL store against a throwaway MariaDB (`scripts/mariadb`, never the server
//! on 3306): the 100k workload through `caudal run --store mysql://..` and `caudal
//! export` equals the reference; SIGKILL at random points loses nothing; and the
//! sink's own contract (types, keys, idempotence, streams).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

use caudal::event::output::{
    Commit, QuarantineOp, QuarantineRecord, SilverChange, SilverRow, Stage,
};
use caudal::event::{Checkpoint, Key, Value};
use caudal::store::mysql::{read_quarantine_summary, MySqlSink};
use caudal::store::Sink;

use crate::support::mariadb::MariaDb;
use crate::support::*;

const DB: &str = "caudal";

/// A MariaDB with an empty database `caudal`, and a connection to read it from
/// synchronous tests.
struct Store {
    server: MariaDb,
    rt: tokio::runtime::Runtime,
    conn: Option<mysql_async::Conn>,
}

impl Store {
    fn start() -> Self {
        let server = MariaDb::start();
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(server.create_db(DB));
        let conn = Some(rt.block_on(server.conn(DB)));
        Self { server, rt, conn }
    }

    fn url(&self) -> String {
        self.server.url(DB)
    }

    /// The first column of the first row of `sql`, as text.
    fn text(&mut self, sql: &str) -> Option<String> {
        let conn = self.conn.as_mut().expect("connection");
        let got: Option<Option<String>> = self
            .rt
            .block_on(conn.query_first(sql))
            .unwrap_or_else(|e| panic!("`{sql}` failed: {e}"));
        got.flatten()
    }

    /// Events durably committed under stream `main` (0 before the first commit).
    fn committed(&mut self) -> i64 {
        // The table does not exist before the first start.
        let exists = self.text(
            "SELECT COUNT(*) FROM information_schema.tables \
             WHERE table_schema = 'caudal' AND table_name = 'caudal_checkpoint'",
        );
        if exists.as_deref() != Some("1") {
            return 0;
        }
        self.text("SELECT event_count FROM caudal_checkpoint WHERE stream = 'main'")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn count(&mut self, sql: &str) -> i64 {
        self.text(sql).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("`{sql}` counts"))
    }
}

fn run(pipeline: &Path, input: Option<&Path>, store: &str) {
    let mut cmd = caudal();
    cmd.arg("run").arg(pipeline);
    if let Some(input) = input {
        cmd.arg("--input").arg(input);
    }
    ok(cmd.arg("--store").arg(store).arg("-q"));
}

#[test]
fn run_into_mysql_then_export_matches_the_reference() {
    let mut db = Store::start();
    let input = erpgen(100_000, 7);
    let dir = tempfile::tempdir().expect("tempdir");
    let (want, got) = (dir.path().join("want"), dir.path().join("got"));
    reference(&input, &want);
    let started = Instant::now();
    run(&erp_pipeline(), Some(&input), &db.url());
    eprintln!("100k events into mariadb in {:.1}s", started.elapsed().as_secs_f64());
    export_from(&db.url(), &got);
    assert_same_answer(&want, &got);
    let events = db.committed();
    assert!(events >= 100_000, "the checkpoint counts every event ({events})");

    // Running again over the same file is a no-op: everything is already committed.
    run(&erp_pipeline(), Some(&input), &db.url());
    let again = dir.path().join("again");
    export_from(&db.url(), &again);
    assert_same_answer(&want, &again);
    assert_eq!(db.committed(), events, "a second run commits nothing new");

    // Silver holds the clean current state, with exact decimals.
    let lines = db.count("SELECT COUNT(*) FROM silver_order_items");
    assert!(lines > 10_000, "silver_order_items has the current lines ({lines})");
    assert_eq!(
        db.count(
            "SELECT COUNT(*) FROM silver_orders WHERE total NOT REGEXP '^-?[0-9]+[.][0-9]{2}$'"
        ),
        0,
        "order totals keep their two decimals"
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM silver_customers WHERE email <> lower(trim(email))"),
        0,
        "emails are trimmed and lowercased"
    );
}

/// The ERP pipeline with frequent, small commits, reading `source`.
fn crashy_pipeline(dir: &Path, source: &str) -> PathBuf {
    let text = std::fs::read_to_string(erp_pipeline()).expect("read pipeline");
    let text = text
        .replace(
            "trigger_interval = \"1s\"",
            "trigger_interval = \"20ms\"\nmax_batch_events = 3000\nqueue_batches = 1",
        )
        .replace("[source]\ntype = \"file\"\npath = \"erp.jsonl\"\n", source);
    let path = dir.join("crashy.toml");
    std::fs::write(&path, text).expect("write pipeline");
    path
}

#[test]
fn kill_nine_and_restart_against_mysql_gives_the_reference_answer() {
    let mut db = Store::start();
    let input = erpgen(100_000, 5);
    let dir = tempfile::tempdir().expect("tempdir");
    let (want, got) = (dir.path().join("want"), dir.path().join("got"));
    reference(&input, &want);
    let source = format!("[source]\ntype = \"file\"\npath = {:?}\n", input.display().to_string());
    let pipeline = crashy_pipeline(dir.path(), &source);
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let (mut kills, mut mid_stream) = (0, 0);
    let mut finished = false;
    for attempt in 0..40 {
        let mut child = caudal()
            .arg("run")
            .arg(&pipeline)
            .arg("--store")
            .arg(db.url())
            .arg("-q")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn caudal run");
        // Kill only once this attempt has committed something, a random moment
        // later: the kills land mid-stream however fast or loaded the machine is.
        let base = db.committed();
        let extra = Duration::from_millis(rng.gen_range(0..150));
        let mut progressed: Option<Instant> = None;
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(status.success(), "caudal run failed on attempt {attempt}: {status}");
                finished = true;
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(90), "attempt {attempt} hangs");
            if progressed.is_none() && attempt < 8 && db.committed() > base {
                progressed = Some(Instant::now());
            }
            if progressed.is_some_and(|p| p.elapsed() >= extra) {
                child.kill().expect("SIGKILL");
                child.wait().expect("reap");
                kills += 1;
                let done = db.committed();
                if done > 0 && done < 100_000 {
                    mid_stream += 1;
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if finished {
            break;
        }
    }
    assert!(finished, "caudal run never finished");
    eprintln!("{kills} kills, {mid_stream} with a partial commit in the store");
    assert!(mid_stream >= 4, "the run was killed mid-stream several times ({mid_stream})");
    export_from(&db.url(), &got);
    assert_same_answer(&want, &got);
}

// ---- the sink's contract, through the library -----------------------------------

const TYPES: &str = r#"
[pipeline]
name = "types"

[source]
type = "file"
path = "x.jsonl"

[tables.all]
key = ["id"]
columns = { id = "int", b = "bool", i = "int", u = "uint", f = "float", d = "decimal", s = "string", by = "bytes", j = "json", ts = "timestamp", tus = "timestamp_us", tz = "timestamptz", dt = "date", tm = "time" }

[tables.pairs]
key = ["k", "n"]
columns = { k = "string", n = "decimal", v = "string" }
"#;

fn dec(s: &str) -> Value {
    Value::Decimal(Decimal::from_str_exact(s).expect("decimal literal"))
}

fn text(s: &str) -> Value {
    Value::Str(s.into())
}

fn upsert(table: usize, key_cols: &[usize], values: Vec<Value>) -> SilverChange {
    let key = Key::of(&values, key_cols).expect("key");
    SilverChange {
        table,
        key,
        row: Some(SilverRow {
            values: values.into_boxed_slice(),
            flags: None,
            extra: Some(r#"{"new_col":"ü"}"#.into()),
            position: Some("f:1".into()),
            source_ts_ms: 1,
            partition: None,
        }),
    }
}

fn commit(n: u64) -> Commit {
    Commit {
        checkpoint: Checkpoint(format!(r#"{{"offset":{n}}}"#)),
        state: format!(r#"{{"n":{n}}}"#),
        event_count: n,
        ..Commit::default()
    }
}

fn sorted(rows: &[(usize, caudal::event::Row)], table: usize) -> Vec<String> {
    let mut out: Vec<String> =
        rows.iter().filter(|(t, _)| *t == table).map(|(_, r)| format!("{r:?}")).collect();
    out.sort();
    out
}

fn micros(iso: &str) -> i64 {
    caudal::event::time::parse_timestamp(iso).expect("timestamp literal")
}

fn record(key: Option<&str>, reason: &str, origin: u64) -> QuarantineOp {
    QuarantineOp::Open(QuarantineRecord {
        table: key.map(|_| "pairs".to_owned()),
        key: key.map(str::to_owned),
        stage: if key.is_some() { Stage::Enrich } else { Stage::Decode },
        reason: reason.into(),
        detail: format!("detail {origin}"),
        position: Some(format!("bin.1:{origin}:0")),
        origin,
        payload: format!("{{\"line\":{origin}}}"),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn sink_round_trips_every_type_and_applies_a_commit_twice_as_once() {
    let server = MariaDb::start();
    server.create_db(DB).await;
    let url = server.url(DB);
    let spec = Arc::new(caudal::config::parse(Path::new("t.toml"), TYPES).expect("spec"));
    let mut a = MySqlSink::new(&url, spec.clone(), "a").expect("sink");
    a.healthcheck().await.expect("healthcheck");
    a.healthcheck().await.expect("healthcheck is idempotent");
    let rows = vec![
        vec![
            Value::Int(1),
            Value::Bool(true),
            Value::Int(i64::MIN),
            Value::UInt(u64::MAX),
            Value::Float(-2.25e-300),
            dec("-0.0050"),
            text("héllo 😀 \"q\" 'a' \\n \0 end"),
            Value::Bytes(vec![0, 255, 10, 0].into()),
            Value::Json(r#"{"b":1, "a":[1,2.50,null]}"#.into()),
            Value::Timestamp(micros("2026-01-05T08:10:00.123Z")),
            Value::Timestamp(micros("2026-01-05T08:10:00.123456Z")),
            Value::Timestamp(micros("2026-01-05T08:10:00Z")),
            Value::Date(20_458),
            Value::Time(-1_500_000),
        ],
        vec![
            Value::Int(2),
            Value::Bool(false),
            Value::Null,
            Value::UInt(0),
            Value::Float(0.1),
            dec("79228162514264337593543950335"),
            text(""),
            Value::Bytes(Vec::new().into()),
            Value::Null,
            Value::Timestamp(-1),
            Value::Timestamp(micros("9999-12-31T23:59:59.999Z")),
            Value::Null,
            Value::Date(-1),
            Value::Time(838 * 3_600_000_000 + 59 * 60_000_000 + 59_000_000),
        ],
        vec![
            Value::Int(3),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            dec("12.50"),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
        ],
        // ERP placeholder dates before MySQL's "supported" year 1000.
        vec![
            Value::Int(4),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
            dec("0"),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Timestamp(micros("0001-01-01T00:00:00.5Z")),
            Value::Timestamp(micros("0999-12-31T23:59:59Z")),
            Value::Null,
            Value::Date(-719_162),
            Value::Null,
        ],
    ];
    // Text keys compare as bytes: case and trailing spaces make distinct keys, and
    // decimals keep their scale (`1.10` is not `1.1`, as in the other stores).
    let pairs = vec![
        vec![text("a\"b"), dec("-1.10"), text("x")],
        vec![text("a"), dec("1.1"), text("lower")],
        vec![text("A"), dec("1.1"), text("upper")],
        vec![text("a "), dec("1.1"), text("space")],
        vec![text("a"), dec("1.10"), text("scale")],
        vec![text("😀"), dec("0"), text("emoji")],
    ];
    let mut c = commit(1);
    for r in &rows {
        c.silver.push(upsert(0, &[0], r.clone()));
    }
    for p in &pairs {
        c.silver.push(upsert(1, &[0, 1], p.clone()));
    }
    c.quarantine.push(record(Some("1"), "unknown_product", 10));
    // Another row's record: keys compare as bytes, `1 ` is not `1`.
    c.quarantine.push(record(Some("1 "), "unknown_product", 11));
    c.quarantine.push(record(None, "malformed_json", 12));
    let c = Arc::new(c);
    a.write(c.clone()).await.expect("write");
    // Applying the same commit again changes nothing (and counts nothing twice).
    a.write(c).await.expect("write again");
    let got = a.recover(&[0, 1]).await.expect("recover");
    let mut want: Vec<String> = rows.iter().map(|r| format!("{:?}", r.as_slice())).collect();
    want.sort();
    assert_eq!(sorted(&got.rows, 0), want);
    let mut want: Vec<String> = pairs.iter().map(|r| format!("{:?}", r.as_slice())).collect();
    want.sort();
    assert_eq!(sorted(&got.rows, 1), want);
    assert_eq!(got.checkpoint, Some(commit(1).checkpoint));
    assert_eq!(got.state.as_deref(), Some(r#"{"n":1}"#));
    assert_eq!(got.open_quarantine.len(), 3);
    assert_eq!(
        read_quarantine_summary(&url).await.expect("summary"),
        vec![("malformed_json".to_owned(), 1), ("unknown_product".to_owned(), 2)]
    );
    let mut conn = server.conn(DB).await;
    let check: Vec<(String, i64)> = conn
        .query("SELECT CAST(stream AS CHAR), event_count FROM caudal_checkpoint ORDER BY stream")
        .await
        .expect("read checkpoints");
    assert_eq!(check, vec![("a".to_owned(), 1)], "the same commit twice counts once");
    let extra: Option<String> =
        conn.query_first("SELECT _extra FROM silver_all WHERE id = 1").await.expect("read _extra");
    assert_eq!(extra.as_deref(), Some(r#"{"new_col":"ü"}"#), "undeclared columns stay in _extra");

    // A delete, a resolve, then another stream in the same database.
    let mut c = commit(2);
    c.silver.push(SilverChange {
        table: 1,
        key: Key::Values(vec![text("a\"b"), dec("-1.10")].into()),
        row: None,
    });
    c.silver.push(SilverChange { table: 0, key: Key::Int(3), row: None });
    c.quarantine.push(QuarantineOp::Resolve { table: "pairs".into(), key: "1".into() });
    a.write(Arc::new(c)).await.expect("write 2");
    let got = a.recover(&[0, 1]).await.expect("recover");
    assert_eq!(got.rows.iter().filter(|(t, _)| *t == 0).count(), rows.len() - 1);
    assert_eq!(got.rows.iter().filter(|(t, _)| *t == 1).count(), pairs.len() - 1);
    let open: Vec<_> = got.open_quarantine.iter().map(|r| r.key.as_deref()).collect();
    assert_eq!(open, vec![Some("1 "), None], "resolving `1` leaves `1 ` open");
    let mut b = MySqlSink::new(&url, spec.clone(), "b").expect("sink b");
    b.healthcheck().await.expect("healthcheck b");
    assert!(b.recover(&[]).await.expect("recover b").checkpoint.is_none());
    b.write(Arc::new(commit(7))).await.expect("write b");
    let check: Vec<(String, i64)> = conn
        .query("SELECT CAST(stream AS CHAR), event_count FROM caudal_checkpoint ORDER BY stream")
        .await
        .expect("read checkpoints");
    assert_eq!(check, vec![("a".to_owned(), 3), ("b".to_owned(), 7)]);

    // A killed connection is transient, and the next write reconnects.
    let ids: Vec<u64> = conn
        .query(
            "SELECT ID FROM information_schema.PROCESSLIST \
             WHERE DB = 'caudal' AND ID <> CONNECTION_ID()",
        )
        .await
        .expect("list connections");
    assert!(!ids.is_empty(), "the sinks hold connections");
    for id in ids {
        conn.query_drop(format!("KILL CONNECTION {id}")).await.expect("kill");
    }
    let err = a.write(Arc::new(commit(2))).await.expect_err("the connection was killed");
    assert!(err.is_transient(), "a killed connection is retried: {err}");
    a.write(Arc::new(commit(2))).await.expect("the retry reconnects");

    // A value MySQL cannot hold fails the whole commit, definitely: nothing of it
    // (nor its checkpoint) is written.
    let mut c = commit(9);
    c.silver.push(upsert(1, &[0, 1], vec![text("z"), dec("9"), text("kept out")]));
    let mut nan = rows[1].clone();
    nan[4] = Value::Float(f64::NAN);
    c.silver.push(upsert(0, &[0], nan));
    let err = a.write(Arc::new(c)).await.expect_err("NaN is refused");
    assert!(!err.is_transient(), "{err}");
    let got = a.recover(&[1]).await.expect("recover after a refused commit");
    assert_eq!(got.checkpoint, Some(commit(2).checkpoint));
    assert_eq!(got.rows.len(), pairs.len() - 1);
    let _ = conn.disconnect().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn large_commits_are_chunked_and_match_small_ones() {
    let server = MariaDb::start();
    server.create_db(DB).await;
    let url = server.url(DB);
    let path = manifest_dir().join("config/examples/erp.toml");
    let spec = Arc::new(caudal::config::load(&path).expect("erp.toml"));
    let items = spec.catalog.id("order_items").expect("order_items");
    let line = |id: i64, round: i64| {
        vec![
            Value::Int(id),
            Value::Int(id / 3),
            Value::Int(id % 1000),
            Value::Int(1 + id % 7 + round),
            Value::Decimal(Decimal::new(1999 + id % 500, 2)),
            dec("0.05"),
        ]
    };
    let mut s = MySqlSink::new(&url, spec.clone(), "main").expect("sink");
    s.healthcheck().await.expect("healthcheck");
    // 12,345 rows in one commit: several statements of up to 2048 rows; then 100 of
    // them again; then 12,345 overlapping ones and a thousand deletes.
    let mut c = commit(1);
    c.silver = (1..=12_345).map(|id| upsert(items, &[0], line(id, 0))).collect();
    s.write(Arc::new(c)).await.expect("large commit");
    let mut c = commit(2);
    c.silver = (1..=100).map(|id| upsert(items, &[0], line(id, 1))).collect();
    s.write(Arc::new(c)).await.expect("small commit");
    let mut c = commit(3);
    c.silver = (1..=12_345).map(|id| upsert(items, &[0], line(id, 2))).collect();
    c.silver.extend((20_001..=21_000).map(|id| SilverChange {
        table: items,
        key: Key::Int(id),
        row: None,
    }));
    c.silver.extend((12_346..=13_000).map(|id| upsert(items, &[0], line(id, 2))));
    s.write(Arc::new(c)).await.expect("large commit into a filled table");
    let mut c = commit(4);
    c.silver = (12_001..=13_000)
        .map(|id| SilverChange { table: items, key: Key::Int(id), row: None })
        .collect();
    s.write(Arc::new(c)).await.expect("deletes");
    let got = s.recover(&[items]).await.expect("recover");
    let mut want: Vec<String> =
        (1..=12_000).map(|id| format!("{:?}", line(id, 2).as_slice())).collect();
    want.sort();
    assert_eq!(sorted(&got.rows, items), want);
}
