//! End to end against a real MariaDB: the simulator drives the six ERP tables while
//! `caudal run` captures them (snapshot, then binlog) into SQLite; once caught up,
//! the gold windows equal the gold rules written as one SQL query on MariaDB itself,
//! and the silver tables hold the source rows that pass the cleaning rules. A second
//! test kills `caudal run` with SIGKILL during the snapshot and the stream.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;

use crate::support::mariadb::MariaDb;
use crate::support::*;

/// The gold rules of `shared/workload/README.md` as one query, in the reference CSV format.
const GOLD_SQL: &str = "\
SELECT CONCAT_WS(',', DATE_FORMAT(FROM_UNIXTIME(FLOOR(UNIX_TIMESTAMP(o.order_ts) / 600) * 600), \
'%Y-%m-%dT%H:%i:%sZ'), o.channel, p.category, COUNT(*), SUM(i.quantity), \
SUM(ROUND(i.quantity * i.unit_price * (1 - COALESCE(i.discount, 0)), 2))) \
FROM order_items i JOIN orders o ON o.id = i.order_id JOIN products p ON p.id = i.product_id \
WHERE o.status <> 'cancelled' AND i.quantity BETWEEN 1 AND 100 AND i.unit_price >= 0 \
GROUP BY FLOOR(UNIX_TIMESTAMP(o.order_ts) / 600), o.channel, p.category";

const QUARANTINE_SQL: &str = "\
SELECT CONCAT(reason, ',', COUNT(*)) FROM (SELECT CASE \
WHEN i.quantity <= 0 THEN 'invalid_quantity' WHEN i.quantity > 100 THEN 'outlier_quantity' \
WHEN i.unit_price < 0 THEN 'invalid_price' WHEN p.id IS NULL THEN 'unknown_product' END AS reason \
FROM order_items i LEFT JOIN products p ON p.id = i.product_id) q \
WHERE reason IS NOT NULL GROUP BY reason";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// What MariaDB says the two reference files must contain.
fn expected(db: &MariaDb) -> (String, String) {
    runtime().block_on(async {
        let mut conn = db.conn("erp_db").await;
        conn.query_drop("SET time_zone = '+00:00'").await.expect("time zone");
        let mut gold: Vec<String> = conn.query(GOLD_SQL).await.expect("gold query");
        // Sort as the export does: window, then group values (byte order).
        gold.sort();
        let mut q: Vec<String> = conn.query(QUARANTINE_SQL).await.expect("quarantine query");
        q.sort();
        let gold = format!("window_start,channel,category,lines,units,revenue\n{}", lines(&gold));
        (gold, format!("reason,rows\n{}", lines(&q)))
    })
}

fn lines(rows: &[String]) -> String {
    rows.iter().map(|r| format!("{r}\n")).collect()
}

fn exported(store: &Path) -> Option<(String, String)> {
    let out = tempfile::tempdir().expect("tempdir");
    let status = caudal()
        .arg("export")
        .arg("--store")
        .arg(store)
        .arg("--out")
        .arg(out.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    if !status.success() {
        return None;
    }
    let read = |n: &str| std::fs::read_to_string(out.path().join(n)).ok();
    Some((read("gold_sales_10m.csv")?, read("quarantine_summary.csv")?))
}

fn pipeline(dir: &Path, url: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(manifest_dir().join("config/examples/erp_mysql.toml"))
        .expect("example pipeline")
        .replace("mysql://caudal:secret@127.0.0.1:3306/erp_db", url)
        .replace("trigger_interval = \"1s\"", "trigger_interval = \"100ms\"");
    assert!(text.contains("snapshot = \"incremental\""), "the example names its snapshot mode");
    let path = dir.join("erp_mysql.toml");
    std::fs::write(&path, text).expect("write pipeline");
    path
}

fn spawn_run(pipeline: &Path, store: &Path) -> Child {
    caudal()
        .arg("run")
        .arg(pipeline)
        .arg("--store")
        .arg(store)
        .arg("-q")
        .stderr(if std::env::var_os("CAUDAL_TEST_LOGS").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("spawn caudal run")
}

fn spawn_simulate(url: &str, events: u64, rate: &str) -> Child {
    caudal()
        .args([
            "simulate",
            "--events",
            &events.to_string(),
            "--seed",
            "5",
            "--rate",
            rate,
            "--mysql",
            url,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn caudal simulate --mysql")
}

/// Waits until the store's export equals MariaDB's answer; panics with both after `limit`.
fn wait_for_equal(db: &MariaDb, store: &Path, limit: Duration) {
    let want = expected(db);
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < limit {
        let got = exported(store);
        if got.as_ref() == Some(&want) {
            return;
        }
        last = got;
        std::thread::sleep(Duration::from_millis(300));
    }
    let (g, q) = last.unwrap_or_default();
    panic!(
        "the store did not catch up with MariaDB in {limit:?}\nwant quarantine:\n{}\ngot quarantine:\n{q}\nwant gold rows: {}, got: {}",
        want.1,
        want.0.lines().count(),
        g.lines().count()
    );
}

fn stop(mut child: Child) {
    let pid = child.id().to_string();
    // SIGINT: the pipeline finishes its batch and commits before exiting.
    let _ = Command::new("kill").args(["-INT", &pid]).status();
    let status = child.wait().expect("wait for caudal run");
    assert!(status.success(), "caudal run exited with {status}");
}

fn count(conn: &rusqlite::Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// A MariaDB with an empty `erp_db`, and the ERP pipeline capturing it into a store.
fn erp_capture() -> (MariaDb, String, tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let db = MariaDb::start();
    runtime().block_on(db.create_db("erp_db"));
    let url = db.url("erp_db");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("live.db");
    let pipeline = pipeline(dir.path(), &url);
    (db, url, dir, store, pipeline)
}

#[test]
fn captured_gold_equals_the_gold_query_on_mariadb() {
    let (db, url, _dir, store, pipeline) = erp_capture();

    // The ERP is busy before caudal starts (snapshot) and while it runs (binlog).
    let mut sim = spawn_simulate(&url, 30_000, "6000/s");
    std::thread::sleep(Duration::from_millis(1500));
    let run = spawn_run(&pipeline, &store);
    let sim_status = sim.wait().expect("wait simulate");
    assert!(sim_status.success(), "caudal simulate --mysql failed");
    wait_for_equal(&db, &store, Duration::from_secs(90));
    stop(run);

    // Silver holds the source rows that pass the cleaning rules.
    let sqlite = rusqlite::Connection::open(&store).expect("open store");
    let (orders, items) = runtime().block_on(async {
        let mut conn = db.conn("erp_db").await;
        let orders: Option<i64> = conn.query_first("SELECT COUNT(*) FROM orders").await.expect("count");
        let items: Option<i64> = conn
            .query_first(
                "SELECT COUNT(*) FROM order_items WHERE quantity BETWEEN 1 AND 100 AND unit_price >= 0",
            )
            .await
            .expect("count");
        (orders.unwrap_or(-1), items.unwrap_or(-1))
    });
    assert_eq!(count(&sqlite, "SELECT COUNT(*) FROM silver_orders"), orders);
    assert_eq!(count(&sqlite, "SELECT COUNT(*) FROM silver_order_items"), items);
}

/// The source checkpoint the store holds, if any.
fn stored_checkpoint(store: &Path) -> Option<String> {
    let db = rusqlite::Connection::open_with_flags(
        store,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ok()?;
    db.query_row(r#"SELECT "checkpoint" FROM "caudal_checkpoint""#, [], |r| r.get(0)).ok()
}

/// Silver holds exactly the source rows (no duplicates, none lost).
fn assert_silver_equals_source(db: &MariaDb, store: &Path) {
    let sqlite = rusqlite::Connection::open(store).expect("open store");
    for table in ["customers", "products", "employees", "orders", "payments"] {
        let want: i64 = runtime().block_on(async {
            let mut conn = db.conn("erp_db").await;
            let n: Option<i64> =
                conn.query_first(format!("SELECT COUNT(*) FROM {table}")).await.expect("count");
            n.unwrap_or(-1)
        });
        let got = count(&sqlite, &format!("SELECT COUNT(*) FROM silver_{table}"));
        assert_eq!(got, want, "silver_{table} rows");
    }
}

/// Kills `caudal run` with SIGKILL three times while its snapshot is unfinished
/// (the stored checkpoint says so), each time right after a commit, with the ERP
/// writing throughout; the fourth run must end with the store equal to MariaDB.
fn kill_nine_mid_snapshot(mode: &str, unfinished: &str) {
    let (db, url, dir, store, _) = erp_capture();
    let pipeline = dir.path().join(format!("erp_{mode}.toml"));
    let text = std::fs::read_to_string(self::pipeline(dir.path(), &url)).expect("pipeline");
    // Frequent commits, so each run commits mid-snapshot before it is killed.
    let text = text
        .replace("snapshot = \"incremental\"", &format!("snapshot = \"{mode}\""))
        .replace("trigger_interval = \"100ms\"", "trigger_interval = \"20ms\"");
    std::fs::write(&pipeline, text).expect("write pipeline");

    // A snapshot big enough to be interrupted, then changes while caudal is killed.
    let mut seed = spawn_simulate(&url, 60_000, "max");
    assert!(seed.wait().expect("wait").success());
    let mut sim = spawn_simulate(&url, 40_000, "4000/s");
    let mut kills = Vec::new();
    for _ in 0..3 {
        let before = stored_checkpoint(&store);
        let mut run = spawn_run(&pipeline, &store);
        let started = Instant::now();
        // Kill as soon as this run committed a checkpoint of an unfinished snapshot.
        loop {
            let cp = stored_checkpoint(&store);
            if cp != before && cp.as_deref().is_some_and(|c| c.contains(unfinished)) {
                kills.push(cp);
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no unfinished snapshot checkpoint ({unfinished}); last: {cp:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        run.kill().expect("SIGKILL");
        run.wait().expect("reap");
    }
    let run = spawn_run(&pipeline, &store);
    assert!(sim.wait().expect("wait simulate").success());
    wait_for_equal(&db, &store, Duration::from_secs(120));
    stop(run);
    assert_silver_equals_source(&db, &store);
    assert_eq!(kills.len(), 3);
}

#[test]
fn kill_nine_mid_incremental_snapshot_and_stream_loses_and_doubles_nothing() {
    kill_nine_mid_snapshot("incremental", r#""stage":"chunks""#);
}

#[test]
fn kill_nine_mid_consistent_snapshot_and_stream_loses_and_doubles_nothing() {
    kill_nine_mid_snapshot("consistent", r#""snapshot":{"#);
}

/// What one snapshot of the big table showed.
struct SnapshotRun {
    seconds: f64,
    writes: i64,
    /// Sightings of caudal's InnoDB transactions.
    sightings: usize,
    /// The largest age seen, as now minus `trx_started`. That column has whole
    /// seconds, so the transaction was open at least this minus one second.
    oldest: Duration,
}

const BIG_ROWS: i64 = 800_000;

/// Snapshots `big.t` in `mode` into a new store while the ERP writes to it, and
/// watches the InnoDB transactions of every connection but the ERP's and the
/// watcher's; returns once the store equals the table.
fn snapshot_under_writes(db: &Arc<MariaDb>, mode: &str, server_id: u32) -> SnapshotRun {
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = dir.path().join("big.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[pipeline]\ntrigger_interval = \"100ms\"\n[source]\ntype = \"mysql\"\nurl = {:?}\n\
             server_id = {server_id}\nsnapshot = \"{mode}\"\n[store]\ntype = \"sqlite\"\npath = \"unused.db\"\n\
             [tables.t]\nkey = [\"id\"]\ncolumns = {{ id = \"int\", a = \"string\", n = \"int\" }}\n",
            db.url("big")
        ),
    )
    .expect("write pipeline");
    let store = dir.path().join("big.db");
    let done = Arc::new(AtomicBool::new(false));

    // The ERP: updates spread over the table and new rows, until the snapshot ends.
    let writes = Arc::new(AtomicI64::new(0));
    // The ERP's connection id: its own transactions are not caudal's.
    let erp_thread = Arc::new(AtomicI64::new(-1));
    let writer = {
        let (db, done, writes) = (db.clone(), done.clone(), writes.clone());
        let erp_thread = erp_thread.clone();
        std::thread::spawn(move || {
            runtime().block_on(async {
                let mut conn = db.conn("big").await;
                let id: Option<i64> =
                    conn.query_first("SELECT CONNECTION_ID()").await.expect("connection id");
                erp_thread.store(id.expect("an id"), Ordering::SeqCst);
                let first: Option<i64> =
                    conn.query_first("SELECT MAX(id) FROM t").await.expect("max id");
                let first = first.expect("rows");
                let mut i: i64 = 0;
                while !done.load(Ordering::Relaxed) {
                    i += 1;
                    let sql = if i % 10 == 0 {
                        format!("INSERT INTO t VALUES ({}, 'new', 1)", first + i)
                    } else {
                        format!("UPDATE t SET n = n + 1 WHERE id = {}", (i * 7919) % BIG_ROWS + 1)
                    };
                    conn.query_drop(sql).await.expect("erp write");
                    writes.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
    };
    while erp_thread.load(Ordering::SeqCst) < 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Every 150 ms, the age of the InnoDB transactions open.
    let poller = {
        let (db, done) = (db.clone(), done.clone());
        let erp_thread = erp_thread.load(Ordering::SeqCst);
        std::thread::spawn(move || {
            runtime().block_on(async {
                let mut conn = db.conn("big").await;
                let (mut sightings, mut oldest_us) = (0usize, 0i64);
                while !done.load(Ordering::Relaxed) {
                    let ages: Vec<i64> = conn
                        .exec(
                            "SELECT TIMESTAMPDIFF(MICROSECOND, trx_started, NOW(6)) \
                             FROM information_schema.innodb_trx \
                             WHERE trx_mysql_thread_id NOT IN (CONNECTION_ID(), ?)",
                            (erp_thread,),
                        )
                        .await
                        .expect("innodb_trx");
                    sightings += ages.len();
                    oldest_us = ages.into_iter().fold(oldest_us, i64::max);
                    // InnoDB refreshes this table's cache only when it was not
                    // read for 100 ms: polling faster would see a frozen copy.
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                (sightings, Duration::from_micros(u64::try_from(oldest_us).unwrap_or(0)))
            })
        })
    };

    let started = Instant::now();
    let run = spawn_run(&pipeline, &store);
    // The snapshot is over once the stored checkpoint no longer names one and
    // every row of the table is in.
    loop {
        let cp = stored_checkpoint(&store);
        let in_silver = rusqlite::Connection::open(&store)
            .ok()
            .and_then(|c| c.query_row("SELECT count(*) FROM silver_t", [], |r| r.get(0)).ok())
            .unwrap_or(0i64);
        if in_silver >= BIG_ROWS && cp.as_deref().is_some_and(|c| !c.contains("\"snapshot\"")) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "the snapshot did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let seconds = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let (sightings, oldest) = poller.join().expect("poller");

    // Then the store equals the table, changes during the snapshot included.
    let (want_rows, want_sum) = runtime().block_on(async {
        let mut conn = db.conn("big").await;
        let r: Option<(i64, i64)> =
            conn.query_first("SELECT COUNT(*), SUM(n) FROM t").await.expect("count");
        r.expect("a row")
    });
    let sql = "SELECT count(*) || '|' || sum(n) FROM silver_t";
    wait_for_rows(&store, sql, &[format!("{want_rows}|{want_sum}")], Duration::from_secs(60));
    stop(run);
    let run = SnapshotRun { seconds, writes: writes.load(Ordering::Relaxed), sightings, oldest };
    eprintln!(
        "{mode} snapshot of {BIG_ROWS} rows with {} ERP writes: {:.1} s; {} sightings of \
         caudal's InnoDB transactions, the oldest seen {:?} after its trx_started (whole seconds)",
        run.writes, run.seconds, run.sightings, run.oldest
    );
    run
}

#[test]
fn the_incremental_snapshot_holds_no_long_transaction_while_the_erp_writes() {
    let db = Arc::new(MariaDb::start());
    runtime().block_on(async {
        db.create_db("big").await;
        db.exec(
            "big",
            &[
                "CREATE TABLE t (id INT PRIMARY KEY, a VARCHAR(20), n INT NOT NULL)",
                "INSERT INTO t SELECT seq, CONCAT('row ', seq), 0 FROM seq_1_to_800000",
            ],
        )
        .await;
    });
    // The control: the watch sees the consistent snapshot's one long transaction.
    let consistent = snapshot_under_writes(&db, "consistent", 80);
    assert!(
        consistent.oldest >= Duration::from_secs(1),
        "the watch did not see the consistent snapshot's transaction: {:?}",
        consistent.oldest
    );
    let incremental = snapshot_under_writes(&db, "incremental", 79);
    assert!(incremental.writes > 0, "the ERP wrote during the snapshot");
    // Seen 2 s after its whole-second start, a transaction was open 1 s or more.
    assert!(
        incremental.oldest < Duration::from_secs(2),
        "a transaction was open 1 s or more ({:?} after its trx_started)",
        incremental.oldest
    );
}

/// Waits until `sql` on the store returns `want`.
fn wait_for_rows(store: &Path, sql: &str, want: &[String], limit: Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    while started.elapsed() < limit {
        if let Ok(db) = rusqlite::Connection::open(store) {
            if let Ok(mut stmt) = db.prepare(sql) {
                got = stmt
                    .query_map([], |r| r.get::<_, String>(0))
                    .map(|rows| rows.filter_map(Result::ok).collect())
                    .unwrap_or_default();
                if got == want {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{sql}\nwant {want:?}\n got {got:?}");
}

#[test]
fn columns_added_and_dropped_mid_stream_lose_nothing() {
    let db = MariaDb::start();
    runtime().block_on(async {
        db.create_db("shop").await;
        db.exec(
            "shop",
            &[
                "CREATE TABLE t (id INT PRIMARY KEY, a VARCHAR(20))",
                "INSERT INTO t VALUES (1, 'one')",
            ],
        )
        .await;
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = dir.path().join("t.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[pipeline]\ntrigger_interval = \"50ms\"\n[source]\ntype = \"mysql\"\nurl = {:?}\nserver_id = 77\n\
             [store]\ntype = \"sqlite\"\npath = \"unused.db\"\n\
             [tables.t]\nkey = [\"id\"]\ncolumns = {{ id = \"int\", a = \"string\" }}\n",
            db.url("shop")
        ),
    )
    .expect("write pipeline");
    let store = dir.path().join("t.db");
    let run = spawn_run(&pipeline, &store);
    // `id|a|<column>...|_extra`, each undeclared column as `typeof:value`: they exist
    // only once the source has added them.
    let row = |added: &[&str]| {
        let added: String = added
            .iter()
            .map(|c| format!(" || typeof({c}) || ':' || COALESCE({c}, '') || '|'"))
            .collect();
        format!(
            "SELECT id || '|' || COALESCE(a, 'NULL') || '|'{added} || COALESCE(_extra, '') \
             FROM silver_t ORDER BY id"
        )
    };
    wait_for_rows(&store, &row(&[]), &["1|one|".into()], Duration::from_secs(30));
    // While caudal follows the binlog live.
    runtime().block_on(db.exec(
        "shop",
        &[
            "INSERT INTO t VALUES (2, 'two')",
            "ALTER TABLE t ADD COLUMN b INT",
            "INSERT INTO t VALUES (3, 'three', 33)",
            "ALTER TABLE t DROP COLUMN a",
            "INSERT INTO t VALUES (4, 44)",
        ],
    ));
    // Rows before and after each change are right; the added column becomes a
    // silver column (NULL for the rows written before it), `_extra` stays empty.
    let want: Vec<String> =
        ["1|one|null:|", "2|two|null:|", "3|three|integer:33|", "4|NULL|integer:44|"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    wait_for_rows(&store, &row(&["b"]), &want, Duration::from_secs(30));
    stop(run);
    // While caudal is down: on restart it reads these rows from the binlog, with the
    // server's schema already past all of them. Each row must be read with the
    // schema of its own point in the binlog (the schema history), not today's.
    runtime().block_on(db.exec(
        "shop",
        &[
            "ALTER TABLE t ADD COLUMN a VARCHAR(20) CHARACTER SET latin1 AFTER id",
            "INSERT INTO t VALUES (5, 'cinq é', 55)",
            "ALTER TABLE t CHANGE b c BIGINT UNSIGNED, ADD COLUMN d DECIMAL(10,2) FIRST",
            "INSERT INTO t (d, id, a, c) VALUES (1.50, 6, 'six', 18446744073709551615)",
            "ALTER TABLE t DROP COLUMN d, RENAME COLUMN c TO e",
            "INSERT INTO t VALUES (7, 'sept', 77)",
            "ALTER TABLE t DROP COLUMN e",
            "UPDATE t SET a = 'quatre' WHERE id = 4",
        ],
    ));
    let run = spawn_run(&pipeline, &store);
    // Every column the source ever had is a silver column, holding each row's value
    // exactly (a BIGINT UNSIGNED beyond i64 and a DECIMAL as their text); row 4's
    // newest version has no `b` any more, so its `b` is NULL.
    let want: Vec<String> = [
        "1|one|null:|null:|null:|null:|",
        "2|two|null:|null:|null:|null:|",
        "3|three|integer:33|null:|null:|null:|",
        "4|quatre|null:|null:|null:|null:|",
        "5|cinq é|integer:55|null:|null:|null:|",
        "6|six|null:|text:18446744073709551615|text:1.50|null:|",
        "7|sept|null:|null:|null:|integer:77|",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    wait_for_rows(&store, &row(&["b", "c", "d", "e"]), &want, Duration::from_secs(30));
    stop(run);
    let conn = rusqlite::Connection::open(&store).expect("open store");
    assert_eq!(count(&conn, "SELECT count(*) FROM quarantine"), 0, "no row was quarantined");
}

#[test]
fn every_type_reads_the_same_from_snapshot_and_binlog_into_silver() {
    let db = MariaDb::start();
    let values = "'18446744073709551615', '-12345678901234.5678', '2026-01-05 08:10:00.123456', \
                  '2026-01-05 08:10:00.123', '1999-12-31', 'ñandú 🦜', '', NULL, X'00FF10', \
                  '{\"k\": [1, 2]}', '-838:59:59', 2026, 'b', 1";
    runtime().block_on(async {
        db.create_db("types").await;
        let insert_1 = format!("INSERT INTO t VALUES (1, {values})");
        db.exec(
            "types",
            &[
                "CREATE TABLE t (id INT PRIMARY KEY, u BIGINT UNSIGNED, d DECIMAL(20,4), \
                 dt DATETIME(6), ts TIMESTAMP(3) NULL, da DATE, s VARCHAR(40) CHARACTER SET utf8mb4, \
                 e VARCHAR(5), n VARCHAR(5), bl BLOB, j JSON, ti TIME, y YEAR, en ENUM('a','b'), \
                 bo TINYINT(1))",
                "SET time_zone = '+02:00'",
                &insert_1,
            ],
        )
        .await;
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let pipeline = dir.path().join("types.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[pipeline]\ntrigger_interval = \"50ms\"\n[source]\ntype = \"mysql\"\nurl = {:?}\nserver_id = 78\n\
             [tables.t]\nkey = [\"id\"]\ncolumns = {{ id = \"int\", u = \"uint\", d = \"decimal\", \
             dt = \"timestamp_us\", ts = \"timestamptz\", da = \"date\", s = \"string\", e = \"string\", \
             n = \"string\", bl = \"bytes\", j = \"json\", ti = \"time\", y = \"int\", en = \"string\", bo = \"int\" }}\n",
            db.url("types")
        ),
    )
    .expect("write pipeline");
    let store = dir.path().join("types.db");
    let run = spawn_run(&pipeline, &store);
    let cols = "u, d, dt, ts, da, s, e, n, hex(bl), j, ti, y, en, bo";
    let row = format!(
        "SELECT id || '|' || concat_ws('|', {}) FROM silver_t ORDER BY id",
        cols.split(", ").map(|c| format!("quote({c})")).collect::<Vec<_>>().join(", ")
    );
    let want_values =
        "'18446744073709551615'|'-12345678901234.5678'|'2026-01-05T08:10:00.123456Z'|\
                       '2026-01-05T06:10:00.123Z'|'1999-12-31'|'ñandú 🦜'|''|NULL|'00FF10'|\
                       '{\"k\": [1, 2]}'|'-838:59:59'|2026|'b'|1";
    wait_for_rows(&store, &row, &[format!("1|{want_values}")], Duration::from_secs(30));
    // The same values through the binlog, written in a session with another time zone.
    let insert_2 = format!("INSERT INTO t VALUES (2, {values})");
    runtime().block_on(db.exec("types", &["SET time_zone = '+02:00'", &insert_2]));
    wait_for_rows(
        &store,
        &row,
        &[format!("1|{want_values}"), format!("2|{want_values}")],
        Duration::from_secs(30),
    );
    stop(run);
}
