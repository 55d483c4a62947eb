//! The PostgreSQL store against a throwaway server (`scripts/postgres`): the 100k
//! workload through `caudal run --store postgres://..` and `caudal export` equals the
//! reference; SIGKILL at random points loses nothing; a server restart mid-run is
//! retried; and the sink's own contract (types, idempotence, streams, COPY path).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

use caudal::event::output::{
    Commit, GoldChange, QuarantineOp, QuarantineRecord, SilverChange, SilverRow, Stage,
};
use caudal::event::{Checkpoint, Key, Value};
use caudal::store::postgres::{read_quarantine_summary, PostgresSink};
use caudal::store::Sink;

use crate::support::postgres::Postgres;
use crate::support::*;

/// Events durably committed under stream `main` (0 before the first commit).
fn committed(pg: &Postgres) -> i64 {
    pg.query_text("SELECT event_count FROM caudal_checkpoint WHERE stream = 'main'")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn count(pg: &Postgres, sql: &str) -> i64 {
    pg.query_text(sql).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("`{sql}` counts"))
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
fn run_into_postgres_then_export_matches_the_reference() {
    let pg = Postgres::start();
    let input = erpgen(100_000, 7);
    let dir = tempfile::tempdir().expect("tempdir");
    let (want, got) = (dir.path().join("want"), dir.path().join("got"));
    reference(&input, &want);
    run(&erp_pipeline(), Some(&input), pg.url());
    export_from(pg.url(), &got);
    assert_same_answer(&want, &got);
    let events = committed(&pg);
    assert!(events >= 100_000, "the checkpoint counts every event ({events})");

    // Running again over the same file is a no-op: everything is already committed.
    run(&erp_pipeline(), Some(&input), pg.url());
    let again = dir.path().join("again");
    export_from(pg.url(), &again);
    assert_same_answer(&want, &again);
    assert_eq!(committed(&pg), events, "a second run commits nothing new");

    // Silver holds the clean current state, with exact types.
    let lines = count(&pg, "SELECT COUNT(*) FROM silver_order_items");
    assert!(lines > 10_000, "silver_order_items has the current lines ({lines})");
    assert_eq!(
        pg.query_text(
            "SELECT data_type FROM information_schema.columns \
             WHERE table_name = 'silver_orders' AND column_name = 'total'"
        )
        .as_deref(),
        Some("numeric")
    );
    assert_eq!(
        count(&pg, "SELECT COUNT(*) FROM silver_customers WHERE email <> lower(trim(email))"),
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
fn kill_nine_and_restart_against_postgres_gives_the_reference_answer() {
    let pg = Postgres::start();
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
            .arg(pg.url())
            .arg("-q")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn caudal run");
        // Kill only once this attempt has committed something, a random moment
        // later: the kills land mid-stream however fast or loaded the machine is.
        let base = committed(&pg);
        let extra = Duration::from_millis(rng.gen_range(0..150));
        let mut progressed: Option<Instant> = None;
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(status.success(), "caudal run failed on attempt {attempt}: {status}");
                finished = true;
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "attempt {attempt} hangs");
            if progressed.is_none() && attempt < 8 && committed(&pg) > base {
                progressed = Some(Instant::now());
            }
            if progressed.is_some_and(|p| p.elapsed() >= extra) {
                child.kill().expect("SIGKILL");
                child.wait().expect("reap");
                kills += 1;
                let done = committed(&pg);
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
    export_from(pg.url(), &got);
    assert_same_answer(&want, &got);
}

#[test]
fn postgres_restart_mid_run_is_retried_and_loses_nothing() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (want, got) = (dir.path().join("want"), dir.path().join("got"));
    let events = 45_000;
    let file = dir.path().join("sim.jsonl");
    ok(caudal()
        .args(["simulate", "--events", &events.to_string(), "--seed", "9", "--out"])
        .arg(&file));
    reference(&file, &want);
    // The simulator paces the run (about 3 s), so the restart lands mid-stream.
    let source = format!(
        "[source]\ntype = \"simulate\"\nseed = 9\nrate = \"15000/s\"\nevents = {events}\nstart = \"2026-01-05T08:00:00Z\"\n"
    );
    let pipeline = crashy_pipeline(dir.path(), &source);
    let log = dir.path().join("caudal.log");
    let mut child = caudal()
        .arg("run")
        .arg(&pipeline)
        .arg("--store")
        .arg(pg.url())
        .arg("-q")
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn caudal run");
    let started = Instant::now();
    while committed(&pg) == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "nothing committed in 30 s");
        assert!(child.try_wait().expect("wait").is_none(), "caudal run ended before any commit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = committed(&pg);
    pg.restart();
    let status = child.wait().expect("wait for caudal run");
    let text = std::fs::read_to_string(&log).expect("read log");
    assert!(status.success(), "caudal run failed after the restart:\n{text}");
    assert!(before < events, "the restart landed mid-stream ({before} of {events} committed)");
    assert!(text.contains("retrying"), "caudal logs that it retries:\n{text}");
    export_from(pg.url(), &got);
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
            extra: None,
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
async fn sink_round_trips_every_type_and_keeps_streams_apart() {
    let pg = Postgres::start();
    let spec = Arc::new(caudal::config::parse(Path::new("t.toml"), TYPES).expect("spec"));
    let mut a = PostgresSink::new(pg.url(), spec.clone(), "a").expect("sink");
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
            text("héllo 😀 \"q\""),
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
            Value::Float(f64::INFINITY),
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
    ];
    let pair = vec![text("a\"b"), dec("-1.10"), text("x")];
    let mut c = commit(1);
    for r in &rows {
        c.silver.push(upsert(0, &[0], r.clone()));
    }
    c.silver.push(upsert(1, &[0, 1], pair.clone()));
    c.quarantine.push(record(Some("1"), "unknown_product", 10));
    c.quarantine.push(record(None, "malformed_json", 12));
    let c = Arc::new(c);
    a.write(c.clone()).await.expect("write");
    // Applying the same commit again changes nothing (and counts nothing twice).
    a.write(c).await.expect("write again");
    let got = a.recover(&[0, 1]).await.expect("recover");
    let mut want: Vec<String> = rows.iter().map(|r| format!("{:?}", r.as_slice())).collect();
    want.sort();
    assert_eq!(sorted(&got.rows, 0), want);
    assert_eq!(sorted(&got.rows, 1), vec![format!("{:?}", pair.as_slice())]);
    assert_eq!(got.checkpoint, Some(commit(1).checkpoint));
    assert_eq!(got.open_quarantine.len(), 2);
    assert_eq!(
        read_quarantine_summary(pg.url()).await.expect("summary"),
        vec![("malformed_json".to_owned(), 1), ("unknown_product".to_owned(), 1)]
    );

    // A delete, a resolve, then another stream in the same database.
    let mut c = commit(2);
    c.silver.push(SilverChange {
        table: 1,
        key: Key::Values(vec![text("a\"b"), dec("-1.10")].into()),
        row: None,
    });
    c.quarantine.push(QuarantineOp::Resolve { table: "pairs".into(), key: "1".into() });
    a.write(Arc::new(c)).await.expect("write 2");
    let got = a.recover(&[1]).await.expect("recover");
    assert!(got.rows.is_empty() && got.open_quarantine.len() == 1);
    let mut b = PostgresSink::new(pg.url(), spec, "b").expect("sink b");
    b.healthcheck().await.expect("healthcheck b");
    assert!(b.recover(&[]).await.expect("recover b").checkpoint.is_none());
    b.write(Arc::new(commit(7))).await.expect("write b");
    assert_eq!(
        pg.query_text("SELECT string_agg(stream || '=' || event_count, ',' ORDER BY stream) FROM caudal_checkpoint")
            .as_deref(),
        Some("a=3,b=7")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn large_commits_go_through_copy_and_match_small_ones() {
    let pg = Postgres::start();
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
    let mut s = PostgresSink::new(pg.url(), spec.clone(), "main").expect("sink");
    s.healthcheck().await.expect("healthcheck");
    // 12,000 rows into the empty table: a plain COPY into it; then 100 of them again
    // in a small commit: unnest arrays; then 12,000 overlapping ones into the
    // filled table: COPY into staging and upsert.
    let mut c = commit(1);
    c.silver = (1..=12_000).map(|id| upsert(items, &[0], line(id, 0))).collect();
    s.write(Arc::new(c)).await.expect("large commit");
    let stamped = "SELECT count(*) FROM silver_order_items WHERE _updated_at IS NOT NULL \
                   AND _position = 'f:1' AND _source_ts_ms = 1";
    assert_eq!(count(&pg, stamped), 12_000, "the direct COPY fills every column");
    let mut c = commit(2);
    c.silver = (1..=100).map(|id| upsert(items, &[0], line(id, 1))).collect();
    s.write(Arc::new(c)).await.expect("small commit");
    let got = s.recover(&[items]).await.expect("recover");
    assert_eq!(got.rows.len(), 12_000);
    let round = |id: i64| i64::from(id <= 100);
    let mut want: Vec<String> =
        (1..=12_000).map(|id| format!("{:?}", line(id, round(id)).as_slice())).collect();
    want.sort();
    assert_eq!(sorted(&got.rows, items), want);

    let mut c = commit(3);
    c.silver = (6_001..=18_000).map(|id| upsert(items, &[0], line(id, 2))).collect();
    s.write(Arc::new(c)).await.expect("large commit into a filled table");
    let got = s.recover(&[items]).await.expect("recover");
    let round = |id: i64| if id > 6_000 { 2 } else { round(id) };
    let mut want: Vec<String> =
        (1..=18_000).map(|id| format!("{:?}", line(id, round(id)).as_slice())).collect();
    want.sort();
    assert_eq!(sorted(&got.rows, items), want);
    assert_eq!(count(&pg, stamped), 18_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn undeclared_columns_become_typed_columns_and_misfits_stay_in_extra() {
    let pg = Postgres::start();
    let spec = Arc::new(
        caudal::config::parse(
            Path::new("t.toml"),
            "[source]\ntype = \"file\"\npath = \"x.jsonl\"\n\
             [tables.t]\nkey = [\"id\"]\ncolumns = { id = \"int\", a = \"string\" }\n",
        )
        .expect("spec"),
    );
    let row = |id: i64, extra: Option<&str>| {
        let mut c = upsert(0, &[0], vec![Value::Int(id), text("x")]);
        if let Some(r) = c.row.as_mut() {
            r.extra = extra.map(Into::into);
        }
        c
    };
    let learned_types = || {
        pg.query_text(
            "SELECT string_agg(column_name || ':' || data_type, ',' ORDER BY ordinal_position) \
             FROM information_schema.columns WHERE table_name = 'silver_t' \
             AND column_name NOT IN ('id', 'a') AND column_name NOT LIKE '\\_%'",
        )
    };
    let rows = |cols: &str| {
        let shown: Vec<String> =
            cols.split(',').map(|c| format!("coalesce({c}::text, 'NULL')")).collect();
        pg.query_text(&format!(
            "SELECT string_agg(concat_ws('|', {}), ' ; ' ORDER BY id) FROM silver_t",
            shown.join(", ")
        ))
        .unwrap_or_default()
    };

    let mut s = PostgresSink::new(pg.url(), spec.clone(), "main").expect("sink");
    s.healthcheck().await.expect("healthcheck");
    let mut c = commit(1);
    c.silver.push(row(
        1,
        Some(
            r#"{"n":7,"big":18446744073709551615,"d":1.50,"s":"hé","b":true,"o":{"k":[1]},"z":null,"A":"clash","_x":1}"#,
        ),
    ));
    c.silver.push(row(2, None));
    s.write(Arc::new(c)).await.expect("write 1");
    // Each column typed by its first value; a key seen only as null waits in `_extra`.
    assert_eq!(
        learned_types().as_deref(),
        Some("n:bigint,big:numeric,d:numeric,s:text,b:boolean,o:jsonb")
    );
    assert_eq!(
        rows("id,n,big,d,s,b,o,_extra"),
        r#"1|7|18446744073709551615|1.50|hé|true|{"k": [1]}|{"z":null,"A":"clash","_x":1} ; 2|NULL|NULL|NULL|NULL|NULL|NULL|NULL"#
    );

    // Values their column cannot hold exactly stay in `_extra`, for that row only;
    // a key absent from a newer version of a row makes its column NULL.
    let mut c = commit(2);
    c.silver.push(row(1, Some(r#"{"n":8}"#)));
    c.silver.push(row(
        3,
        Some(r#"{"n":1.5,"big":1e5000,"d":2,"s":"nul\u0000","b":"yes","o":[1],"z":5}"#),
    ));
    c.silver.push(row(4, Some(r#"{"n":99999999999999999999,"s":"ok","d":"1.0"}"#)));
    s.write(Arc::new(c)).await.expect("write 2");
    assert_eq!(
        learned_types().as_deref(),
        Some("n:bigint,big:numeric,d:numeric,s:text,b:boolean,o:jsonb,z:bigint")
    );
    assert_eq!(
        rows("id,n,big,d,s,b,o,z,_extra"),
        [
            "1|8|NULL|NULL|NULL|NULL|NULL|NULL|NULL",
            "2|NULL|NULL|NULL|NULL|NULL|NULL|NULL|NULL",
            r#"3|NULL|NULL|2|NULL|NULL|[1]|5|{"n":1.5,"big":1e5000,"s":"nul\u0000","b":"yes"}"#,
            r#"4|NULL|NULL|NULL|ok|NULL|NULL|NULL|{"n":99999999999999999999,"d":"1.0"}"#,
        ]
        .join(" ; ")
    );

    // A failed commit rolls its ALTER back; the sink forgets the column too.
    let mut c = commit(3);
    c.silver.push(row(5, Some(r#"{"q":1}"#)));
    c.silver.push(upsert(0, &[0], vec![Value::Int(6)]));
    assert!(s.write(Arc::new(c)).await.is_err(), "a row of the wrong width fails");
    assert_eq!(pg.query_text("SELECT count(*) FROM silver_t").as_deref(), Some("4"));
    let mut c = commit(3);
    c.silver.push(row(5, Some(r#"{"q":1}"#)));
    s.write(Arc::new(c)).await.expect("write 3");
    drop(s);

    // A restarted sink reads the learned columns and their types back.
    let mut s = PostgresSink::new(pg.url(), spec.clone(), "main").expect("sink");
    s.healthcheck().await.expect("healthcheck");
    let mut c = commit(4);
    c.silver.push(row(6, Some(r#"{"n":"six","q":6,"z":6}"#)));
    s.write(Arc::new(c)).await.expect("write 4");
    assert_eq!(rows("id,n,q,z,_extra").rsplit(" ; ").next(), Some(r#"6|NULL|6|6|{"n":"six"}"#));

    // The COPY path carries the learned columns (and learns new ones) too.
    let mut c = commit(5);
    c.silver = (1_000..6_000)
        .map(|id| row(id, Some(&format!(r#"{{"n":{id},"w":"w{id}","o":{{"id":{id}}}}}"#))))
        .collect();
    s.write(Arc::new(c)).await.expect("write 5 (copy)");
    assert_eq!(
        pg.query_text(
            "SELECT count(w) || '|' || sum(n) || '|' || count(*) FILTER (WHERE (o->>'id')::bigint = id) \
             || '|' || count(_extra) FROM silver_t WHERE id >= 1000"
        )
        .as_deref(),
        Some("5000|17497500|5000|0")
    );
    let got = s.recover(&[0]).await.expect("recover");
    assert_eq!(got.rows.len(), 5_006);
    assert!(got.rows.iter().all(|(_, r)| r.len() == 2), "recovery reads declared columns");
}

const MERGED: &str = r#"
[pipeline]
name = "merged"

[source]
type = "file"
path = "x.jsonl"

[tables.lines]
key = ["id"]
columns = { id = "int", shop = "string", ts = "timestamp", price = "decimal", sku = "string" }

[[gold]]
name = "prices"
table = "lines"
time = "ts"
window = "10m"
group_by = ["shop"]
measures = ["count() as n", "avg(price) as mean", "min(price) as low", "max(price) as high", "max(sku) as last_sku",
            "min(ts) as first_ts", "max(ts) as last_ts"]
trend = "mean"
"#;

/// One worker's share of a window: (partition, lines, avg sum and count, low, high, sku,
/// first and last line times).
#[allow(clippy::too_many_arguments)]
fn share(
    part: &str,
    n: i64,
    sum: &str,
    low: &str,
    high: &str,
    sku: &str,
    first: &str,
    last: &str,
) -> GoldChange {
    let d = |s: &str| Decimal::from_str_exact(s).expect("decimal literal");
    GoldChange {
        gold: 0,
        window_start: micros("2026-01-05T09:00:00Z"),
        group: [text("s1")].into(),
        measures: Some(
            [
                Value::Int(n),
                Value::Decimal(d(sum) / Decimal::from(n)),
                dec(low),
                dec(high),
                text(sku),
                Value::Timestamp(micros(first)),
                Value::Timestamp(micros(last)),
                Value::Null,
            ]
            .into(),
        ),
        partition: Some(part.into()),
        avg_parts: [(d(sum), n)].into(),
    }
}

/// Workers of a consumer group each store their partitions' share of a window; the
/// view merges them: an average from the shares' sums and counts (not an average of
/// averages), and min and max comparing numbers as numbers ("10.00" > "9.50").
#[tokio::test(flavor = "multi_thread")]
async fn gold_shares_of_several_partitions_merge_exactly() {
    let pg = Postgres::start();
    let spec = Arc::new(caudal::config::parse(Path::new("m.toml"), MERGED).expect("spec"));
    let mut s = PostgresSink::new(pg.url(), spec.clone(), "main").expect("sink");
    s.healthcheck().await.expect("healthcheck");
    let mut c = commit(1);
    // Partition a: 9.50 and 2.00 (avg 5.75); b: 10.00 (avg 10.00). Together:
    // 21.50 / 3 = 7.1666..., low 2.00, high 10.00. Times: their texts differ in
    // width (`09:00:00Z` against `09:00:00.250Z`), so only numbers order them.
    let (t0, t1) = ("2026-01-05T09:00:00.250Z", "2026-01-05T09:05:00Z");
    let (t2, t3) = ("2026-01-05T09:00:00Z", "2026-01-05T09:05:00.500Z");
    c.gold.push(share("t/0", 2, "11.50", "2.00", "9.50", "sku-9", t0, t1));
    c.gold.push(share("t/1", 1, "10.00", "10.00", "10.00", "sku-10", t2, t3));
    let ts = |iso: &str| text(&Value::Timestamp(micros(iso)).to_string());
    s.write(Arc::new(c)).await.expect("write");
    let rows = caudal::store::postgres::read_gold(pg.url(), &spec, 0).await.expect("read gold");
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (_, group, measures) = &rows[0];
    assert_eq!(group, &vec![text("s1")]);
    let want_mean = Decimal::from_str_exact("21.50").expect("sum") / Decimal::from(3);
    assert_eq!(
        measures,
        &vec![
            Value::Int(3),
            Value::Decimal(want_mean),
            text("2.00"),
            text("10.00"),
            text("sku-9"),
            ts(t2),
            ts(t3)
        ],
        "exports merge the shares as one worker would have computed them"
    );
    // The view itself, as dashboards read it.
    assert_eq!(
        pg.query_text(
            "SELECT n || ' ' || round(mean, 4) || ' ' || low || ' ' || high || ' ' || last_sku \
             FROM gold_prices"
        )
        .as_deref(),
        Some("3 7.1667 2.00 10.00 sku-9")
    );
    // One share retracted entirely: the other alone remains.
    let mut c = commit(2);
    c.gold.push(GoldChange {
        measures: None,
        avg_parts: [].into(),
        ..share("t/0", 1, "0", "0", "0", "", t0, t1)
    });
    s.write(Arc::new(c)).await.expect("write 2");
    let rows = caudal::store::postgres::read_gold(pg.url(), &spec, 0).await.expect("read gold");
    assert_eq!(
        rows[0].2,
        vec![
            Value::Int(1),
            dec("10.00"),
            text("10.00"),
            text("10.00"),
            text("sku-10"),
            ts(t2),
            ts(t3)
        ]
    );
}
