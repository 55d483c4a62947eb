//! The `mysql` source's positions and liveness against a real, throwaway MariaDB
//! (`scripts/mariadb`): GTIDs on changes and in checkpoints, resuming by GTID after
//! the checkpoint's binlog file was rotated away and purged, heartbeats that bring
//! the pipeline's lag to zero while the database is idle, and golden Debezium
//! envelopes of binlog changes (`tests/golden/envelopes/binlog_*.jsonl`; set
//! `CAUDAL_BLESS=1` to rewrite them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use caudal::capture::mysql::MysqlCheckpoint;
use caudal::capture::CaptureError;
use caudal::event::{Catalog, Change, Op, Value};
use caudal::topology::{self, Progress, RunOptions};
use mysql_async::prelude::Queryable;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::capture_mysql::{
    binlog_pos, checkpoint, start, table, three_row_table, types_insert, value, TYPES, TYPES_DDL,
    WAIT,
};
use crate::support::manifest_dir;
use crate::support::mariadb::MariaDb;

fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(d.as_millis()).expect("ms fit")
}

/// `domain-server-sequence` of a MariaDB GTID.
fn gtid_seq(c: &Change) -> (u32, u32, u64) {
    let g = c.source.gtid.as_deref().unwrap_or_else(|| panic!("change without gtid: {c:?}"));
    let parts: Vec<&str> = g.split('-').collect();
    match parts[..] {
        [d, s, n] => {
            (d.parse().expect("domain"), s.parse().expect("server"), n.parse().expect("sequence"))
        }
        _ => panic!("not a MariaDB GTID: {g}"),
    }
}

async fn scalar(conn: &mut mysql_async::Conn, sql: &str) -> String {
    let v: Option<Option<String>> = conn.query_first(sql).await.expect(sql);
    v.flatten().unwrap_or_default()
}

/// Ends the server's binlog dump threads (the server keeps files they read).
async fn kill_dumps(conn: &mut mysql_async::Conn) {
    let dumps: Vec<u64> = conn
        .query("SELECT ID FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Binlog Dump%'")
        .await
        .expect("processlist");
    for id in dumps {
        let _ = conn.query_drop(format!("KILL {id}")).await;
    }
}

/// Purges `file` and the binlog files before it, keeping the ones after it.
async fn purge_through(conn: &mut mysql_async::Conn, file: &str) {
    let mut files = binlog_files(conn).await;
    let next = files
        .iter()
        .skip_while(|f| *f != file)
        .nth(1)
        .cloned()
        .unwrap_or_else(|| panic!("no binlog file after {file}: {files:?}"));
    // MariaDB keeps a file until its binlog checkpoint moves on, and killed dump
    // threads take a moment to go: retry until it is gone.
    for _ in 0..50 {
        kill_dumps(conn).await;
        conn.query_drop(format!("PURGE BINARY LOGS TO '{next}'")).await.expect("purge");
        files = binlog_files(conn).await;
        if !files.iter().any(|f| f == file) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{file} was not purged: {files:?}");
}

async fn binlog_files(conn: &mut mysql_async::Conn) -> Vec<String> {
    let rows: Vec<mysql_async::Row> = conn.query("SHOW BINARY LOGS").await.expect("logs");
    rows.into_iter().filter_map(|mut r| r.take::<String, _>(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_carry_gtids_and_resume_by_gtid_after_the_file_was_purged() {
    let server = MariaDb::start();
    let db = "cdc_gtid";
    let catalog = three_row_table(&server, db).await;
    let mut conn = server.conn(db).await;

    // The snapshot's GTID position is the server's for the snapshot's file/offset.
    let mut first = start(&server.url(db), &catalog, None);
    let snap = first.batches(3).await;
    let snap_cp = checkpoint(&snap.last().expect("snapshot batch").1);
    let snap_gtid = snap_cp.gtid.clone().expect("the snapshot records a GTID position");
    let at_offset =
        scalar(&mut conn, &format!("SELECT BINLOG_GTID_POS('{}', {})", snap_cp.file, snap_cp.pos))
            .await;
    assert_eq!(snap_gtid, at_offset, "GTID and file/offset name the same point");
    assert_eq!(snap_gtid, scalar(&mut conn, "SELECT @@gtid_binlog_pos").await);
    assert!(snap.iter().flat_map(|(c, _)| c).all(|c| c.source.gtid.is_none()), "snapshot rows");

    server.exec(db, &["INSERT INTO t VALUES (10, 'x')", "INSERT INTO t VALUES (11, 'y')"]).await;
    let streamed = first.batches(2).await;
    first.stop().await;
    let changes: Vec<&Change> = streamed.iter().flat_map(|(c, _)| c).collect();
    let (a, b) = (gtid_seq(changes[0]), gtid_seq(changes[1]));
    assert_eq!((a.0, a.1, b.0, b.1), (0, 1, 0, 1), "domain 0, server 1");
    assert_eq!(b.2, a.2 + 1, "one transaction each");
    let cp_token = streamed.last().expect("batches").1.clone();
    let cp = checkpoint(&cp_token);
    assert_eq!(cp.gtid.as_deref(), changes[1].source.gtid.as_deref(), "checkpoint after both");
    assert_eq!(cp.gtid, Some(scalar(&mut conn, "SELECT @@gtid_binlog_pos").await));

    // While caudal is away: a rotation, a transaction, another rotation, two more.
    conn.query_drop("FLUSH BINARY LOGS").await.expect("flush");
    conn.query_drop("INSERT INTO t VALUES (12, 'z')").await.expect("insert");
    conn.query_drop("FLUSH BINARY LOGS").await.expect("flush");
    conn.query_drop("INSERT INTO t VALUES (13, 'w')").await.expect("insert");
    conn.query_drop("UPDATE t SET v = 'zz' WHERE id = 12").await.expect("update");

    // By file/offset (a checkpoint without GTID, as older versions wrote).
    let by_file = MysqlCheckpoint { gtid: None, ..cp.clone() }.token();
    let mut second = start(&server.url(db), &catalog, Some(by_file));
    let via_file = second.batches(3).await;
    second.assert_quiet(Duration::from_millis(300)).await;
    second.stop().await;
    let via_file_changes: Vec<Change> = via_file.iter().flat_map(|(c, _)| c.clone()).collect();
    let last_cp = checkpoint(&via_file.last().expect("batches").1);
    assert_eq!(
        last_cp.gtid.as_deref(),
        via_file_changes[2].source.gtid.as_deref(),
        "a file/offset resume looks up its GTID position and carries it on"
    );

    // The checkpoint's file is purged: only the GTID position can resume.
    purge_through(&mut conn, &cp.file).await;
    let mut third = start(&server.url(db), &catalog, Some(cp_token));
    let via_gtid: Vec<Change> = third.changes(3).await;
    third.assert_quiet(Duration::from_millis(500)).await;
    third.stop().await;

    let ids: Vec<(Op, &Value)> =
        via_gtid.iter().map(|c| (c.op, value(&catalog, c, "id"))).collect();
    assert_eq!(
        ids,
        [
            (Op::Insert, &Value::Int(12)),
            (Op::Insert, &Value::Int(13)),
            (Op::Update, &Value::Int(12))
        ],
        "no gap, no overlap"
    );
    for (g, f) in via_gtid.iter().zip(&via_file_changes) {
        assert_eq!(binlog_pos(g), binlog_pos(f), "same positions either way");
        assert_eq!((&g.source.gtid, g.origin), (&f.source.gtid, f.origin));
    }
    assert_ne!(binlog_pos(&via_gtid[0]).0, cp.file, "read from a later file");
    assert_eq!(gtid_seq(&via_gtid[0]).2, b.2 + 1, "the next transaction after the checkpoint");

    // Once the transactions after the checkpoint are purged too, the GTID resume
    // fails definitely, with the hint to take a new snapshot.
    let (next_file, ..) = binlog_pos(&via_gtid[0]);
    purge_through(&mut conn, &next_file).await;
    match start(&server.url(db), &catalog, Some(cp.token())).failure().await {
        CaptureError::Definite { message, hint } => {
            assert!(message.contains("GTID") && message.contains("purged"), "{message}");
            assert!(hint.unwrap_or_default().contains("new snapshot"));
        }
        other => panic!("not definite: {other}"),
    }
    let _ = conn.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_by_gtid_inside_a_transaction_skips_the_rows_delivered() {
    let server = MariaDb::start();
    let db = "cdc_gtid_txn";
    server.create_db(db).await;
    server.exec(db, &["CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20))"]).await;
    let catalog =
        Arc::new(Catalog::new(vec![table("t", &[("id", "int"), ("v", "string")], &["id"])]));
    let mut first = start(&server.url(db), &catalog, None);
    first.assert_quiet(Duration::from_millis(300)).await;
    server
        .exec(
            db,
            &[
                "INSERT INTO t VALUES (0, 'before')",
                // One transaction of several rows events, so batches end inside it.
                "INSERT INTO t SELECT seq, 'x' FROM seq_1_to_1500",
                "INSERT INTO t VALUES (5000, 'a')",
            ],
        )
        .await;
    let batches = first.batches(1502).await;
    first.stop().await;
    let k = batches
        .iter()
        .position(|(_, cp)| checkpoint(cp).skip.is_some())
        .expect("a batch ends inside the 1500-row transaction");
    let inside = checkpoint(&batches[k].1);
    assert!(inside.gtid.is_some(), "{inside:?}");
    let expected: Vec<&Change> = batches[k + 1..].iter().flat_map(|(c, _)| c).collect();

    // Point the checkpoint's offset at the file's start: read from there, the
    // transaction of row 0 would come again; the GTID position starts at the open
    // transaction, whose delivered rows are skipped.
    let cp = MysqlCheckpoint { pos: 4, ..inside }.token();
    let mut second = start(&server.url(db), &catalog, Some(cp));
    let got = second.changes(expected.len()).await;
    second.assert_quiet(Duration::from_millis(500)).await;
    second.stop().await;
    assert_eq!(got.len(), expected.len());
    for (want, got) in expected.iter().zip(&got) {
        assert_eq!(binlog_pos(want), binlog_pos(got));
        assert_eq!(
            (want.op, want.origin, &want.source.gtid),
            (got.op, got.origin, &got.source.gtid)
        );
    }
}

fn receive_progress(rx: &watch::Receiver<Progress>) -> Progress {
    rx.borrow().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_reads_zero_while_the_database_is_idle() {
    let server = MariaDb::start();
    let db = "cdc_idle";
    server.create_db(db).await;
    server
        .exec(
            db,
            &[
                "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20))",
                "INSERT INTO t VALUES (1, 'a')",
            ],
        )
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        r#"
[pipeline]
name = "idle"
trigger_interval = "100ms"

[source]
type = "mysql"
url = "{url}"
server_id = 4243
server_name = "erp"

[store]
type = "sqlite"
path = "{store}"

[tables.t]
key = ["id"]
columns = {{ id = "int", v = "string" }}
"#,
        url = server.url(db),
        store = dir.path().join("idle.db").display()
    );
    let spec = caudal::config::parse(&dir.path().join("idle.toml"), &text).expect("valid pipeline");
    let (tx, rx) = watch::channel(Progress::default());
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(topology::run(
        Arc::new(spec),
        RunOptions::default(),
        shutdown.clone(),
        Some(tx),
    ));

    let wait_for = |events: u64| {
        let rx = rx.clone();
        async move {
            let deadline = Instant::now() + WAIT;
            while receive_progress(&rx).committed_events < events {
                assert!(
                    Instant::now() < deadline,
                    "only {:?} committed",
                    receive_progress(&rx).committed_events
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(1).await;
    server.exec(db, &["INSERT INTO t VALUES (2, 'b')", "UPDATE t SET v = 'c' WHERE id = 1"]).await;
    let last_change_ms = now_ms();
    wait_for(3).await;

    // Idle for four heartbeat periods: the age of the last change grows, the lag not.
    let heartbeat = caudal::capture::mysql::binlog::HEARTBEAT;
    tokio::time::sleep(heartbeat * 4).await;
    let mut worst = 0;
    let until = Instant::now() + heartbeat * 3;
    while Instant::now() < until {
        let p = receive_progress(&rx);
        let now = now_ms();
        let lag = p.lag_ms(now).expect("the mysql source reports how far it has read");
        worst = worst.max(lag);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let age = now_ms() - last_change_ms;
    eprintln!(
        "idle: worst lag {worst} ms over {} ms; age of the last change {age} ms",
        (heartbeat * 3).as_millis()
    );
    // A heartbeat every period, then at most one trigger interval to reach the progress.
    let bound = i64::try_from((heartbeat + Duration::from_millis(500)).as_millis()).expect("ms");
    assert!(worst <= bound, "lag {worst} ms while idle (bound {bound} ms)");
    assert!(age > 6_000, "the test did idle: {age} ms");

    shutdown.cancel();
    let summary = tokio::time::timeout(WAIT, run).await.expect("stops").expect("task");
    summary.expect("run ends cleanly");
}

/// Debezium envelopes of a fixed set of statements on a table of every type, with
/// the fields that change from run to run blanked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binlog_envelopes_match_the_golden_file() {
    let server = MariaDb::start();
    let db = "erp_db";
    server.create_db(db).await;
    server.exec(db, &[TYPES_DDL, "SET time_zone = '+02:00'", &types_insert(1)]).await;
    let mut columns = vec![("id", "int")];
    columns.extend(TYPES.iter().map(|t| (t.0, t.1)));
    let catalog = Arc::new(Catalog::new(vec![table("types", &columns, &["id"])]));
    let mut run = start(&server.url(db), &catalog, None);
    let mut changes = run.changes(1).await;
    let statements = [
        "SET time_zone = '+02:00'",
        &types_insert(11),
        "INSERT INTO types (id) VALUES (12)",
        // Minimum and boundary values.
        "INSERT INTO types (id, i, iu, bu, bi, ti, d, dt, ts, dd, tm, s, e, b, j, f, en, st, y, bit1, l) \
         VALUES (13, -2147483648, 0, 0, 9223372036854775807, 127, 0.0001, '1000-01-01 00:00:00', \
         '1970-01-01 02:00:01', '1000-01-01', '838:59:59.999999', '', NULL, '', 'null', -0.25, 'a', '', 1901, \
         b'0', 'ÿ')",
        "UPDATE types SET s = 'updated ✓', d = -0.5, j = '[]', st = 'x,y,z', bit1 = b'1' WHERE id = 11",
        // One rows event with two rows.
        "UPDATE types SET i = 7 WHERE id IN (11, 13)",
        "DELETE FROM types WHERE id = 12",
    ];
    server.exec(db, &statements).await;
    changes.extend(run.changes(7).await);
    run.stop().await;

    let mut text = String::new();
    for c in &changes {
        let envelope = caudal::event::debezium::encode_envelope(&catalog, c);
        let mut v: serde_json::Value = serde_json::from_str(&envelope).expect("envelope is JSON");
        v["ts_ms"] = serde_json::json!(0);
        let source = &mut v["source"];
        for field in ["ts_ms", "file", "pos", "server_id"] {
            assert!(!source[field].is_null(), "source.{field} is set: {envelope}");
            source[field] = serde_json::json!("<volatile>");
        }
        if !source["gtid"].is_null() {
            source["gtid"] = serde_json::json!("<gtid>");
        }
        text.push_str(&serde_json::to_string(&v).expect("json"));
        text.push('\n');
    }
    let golden = manifest_dir().join("tests/golden/envelopes/binlog_types.jsonl");
    if std::env::var_os("CAUDAL_BLESS").is_some() {
        std::fs::write(&golden, &text).expect("bless");
    } else {
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {e} (run with CAUDAL_BLESS=1)", golden.display()));
        for (i, (got, want)) in text.lines().zip(want.lines()).enumerate() {
            assert_eq!(got, want, "envelope {i} of {}", golden.display());
        }
        assert_eq!(text.lines().count(), want.lines().count(), "envelope count");
    }
}
