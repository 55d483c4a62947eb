//! The `mysql` source against a real, throwaway MariaDB (`scripts/mariadb`, one
//! server per test): snapshot then streaming, resume from a checkpoint, value
//! types read identically by the snapshot and from the binlog, and the definite
//! errors for a misconfigured server, a missing grant and a purged binlog.

use std::sync::Arc;
use std::time::Duration;

use caudal::capture::mysql::{
    MysqlCheckpoint, MysqlSource, MysqlSourceConfig, SnapshotMode, SnapshotStage,
};
use caudal::capture::{CaptureError, Source};
use caudal::event::{
    Catalog, Change, Checkpoint, Column, ColumnType, Event, Op, Position, Snapshot, TableSchema,
    Value,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::mariadb::MariaDb;

/// How long a test waits for changes before failing.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

pub(crate) fn table(name: &str, columns: &[(&str, &str)], key: &[&str]) -> TableSchema {
    let columns: Vec<Column> = columns
        .iter()
        .map(|(n, t)| Column {
            name: (*n).into(),
            ty: ColumnType::from_name(t).unwrap_or_else(|| panic!("type `{t}`")),
        })
        .collect();
    let key = key
        .iter()
        .map(|k| columns.iter().position(|c| &*c.name == *k).expect("key column"))
        .collect();
    TableSchema { name: name.into(), columns, key }
}

pub(crate) struct Running {
    pub(crate) rx: caudal::bus::Receiver,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), CaptureError>>,
}

/// The source with the default (incremental) snapshot.
pub(crate) fn start(url: &str, catalog: &Arc<Catalog>, resume: Option<Checkpoint>) -> Running {
    start_with(url, catalog, resume, SnapshotMode::default())
}

pub(crate) fn start_with(
    url: &str,
    catalog: &Arc<Catalog>,
    resume: Option<Checkpoint>,
    snapshot: SnapshotMode,
) -> Running {
    let config = MysqlSourceConfig {
        url: url.to_owned(),
        server_id: 4242,
        include: Vec::new(),
        server_name: "erp".into(),
        snapshot,
    };
    // Logs show up in a failing test's output (RUST_LOG overrides the filter).
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "caudal=info".into());
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter(filter).try_init();
    let (tx, rx) = caudal::bus::memory(4);
    let shutdown = CancellationToken::new();
    let source: Box<dyn Source> = Box::new(MysqlSource::new(config, catalog.clone()));
    let handle = tokio::spawn(source.run(resume, tx, shutdown.clone()));
    Running { rx, shutdown, handle }
}

impl Running {
    /// Batches until at least `n` changes arrived, each with its checkpoint.
    pub(crate) async fn batches(&mut self, n: usize) -> Vec<(Vec<Change>, Checkpoint)> {
        let mut out = Vec::new();
        let mut count = 0;
        while count < n {
            let batch = match tokio::time::timeout(WAIT, self.rx.recv()).await {
                Ok(Some(b)) => b,
                Ok(None) => {
                    let result = (&mut self.handle).await;
                    panic!("the source stopped after {count} of {n} changes: {result:?}")
                }
                Err(_) => panic!("timed out after {count} of {n} changes"),
            };
            let mut changes = Vec::new();
            for e in batch.events {
                match e {
                    Event::Change(c) => changes.push(c),
                    Event::Bad(b) => panic!("bad event: {} {} {}", b.reason, b.detail, b.payload),
                }
            }
            count += changes.len();
            out.push((changes, batch.checkpoint));
        }
        assert_eq!(count, n, "more changes than expected");
        out
    }

    pub(crate) async fn changes(&mut self, n: usize) -> Vec<Change> {
        self.batches(n).await.into_iter().flat_map(|(c, _)| c).collect()
    }

    /// Asserts no change arrives for `quiet`.
    pub(crate) async fn assert_quiet(&mut self, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        while let Ok(Some(batch)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            assert!(batch.events.is_empty(), "unexpected events: {:?}", batch.events);
        }
    }

    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("source stops on shutdown")
            .expect("source task");
        result.expect("source ends cleanly");
    }

    /// The source's result when it fails by itself.
    pub(crate) async fn failure(self) -> CaptureError {
        let result = tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("source fails within the wait")
            .expect("source task");
        match result {
            Ok(()) => panic!("the source ended without an error"),
            Err(e) => e,
        }
    }
}

pub(crate) fn value<'a>(catalog: &Catalog, change: &'a Change, column: &str) -> &'a Value {
    let schema = catalog.table(change.table);
    let i = schema.column_index(column).expect("declared column");
    &change.image().expect("row image")[i]
}

pub(crate) fn binlog_pos(c: &Change) -> (String, u64, u32) {
    match &c.source.position {
        Some(Position::Binlog { file, pos, row }) => (file.to_string(), *pos, *row),
        other => panic!("not a binlog position: {other:?}"),
    }
}

pub(crate) fn checkpoint(cp: &Checkpoint) -> MysqlCheckpoint {
    MysqlCheckpoint::parse(cp).expect("mysql checkpoint").expect("non-empty checkpoint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_streamed_inserts_updates_and_deletes_arrive_in_order() {
    let server = MariaDb::start();
    let db = "cdc_stream";
    server.create_db(db).await;
    server
        .exec(
            db,
            &[
                "CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(50), price DECIMAL(10,2), note VARCHAR(20))",
                // More rows than one chunk, so the snapshot pages by key.
                "INSERT INTO items SELECT seq, CONCAT('item ', seq), seq * 1.25, 'n' FROM seq_1_to_1200",
            ],
        )
        .await;
    let catalog = Arc::new(Catalog::new(vec![table(
        "items",
        &[("id", "int"), ("name", "string"), ("price", "decimal"), ("colour", "string")],
        &["id"],
    )]));
    let mut run = start(&server.url(db), &catalog, None);

    let snapshot = run.batches(1200).await;
    assert!(snapshot.len() >= 3, "the snapshot came in chunks");
    let snap: Vec<Change> = snapshot.iter().flat_map(|(c, _)| c.clone()).collect();
    for (i, c) in snap.iter().enumerate() {
        assert_eq!(c.op, Op::Read);
        assert_eq!(value(&catalog, c, "id"), &Value::Int(i as i64 + 1));
        let want = if i + 1 == snap.len() { Snapshot::Last } else { Snapshot::True };
        assert_eq!(c.source.snapshot, want, "row {i}");
        assert_eq!(
            binlog_pos(c),
            binlog_pos(&snap[0]),
            "snapshot rows share the snapshot position"
        );
    }
    let third = &snap[2];
    assert_eq!(value(&catalog, third, "price").to_string(), "3.75");
    assert_eq!(value(&catalog, third, "name").as_str(), Some("item 3"));
    assert!(value(&catalog, third, "colour").is_null(), "a column the table lacks is null");
    assert_eq!(third.extra.as_deref(), Some(r#"{"note":"n"}"#), "undeclared columns go to extra");
    let done = checkpoint(&snapshot.last().expect("batches").1);
    assert!(done.snapshot.is_none(), "the last snapshot checkpoint marks it finished: {done:?}");

    server
        .exec(
            db,
            &[
                "INSERT INTO items VALUES (2000, 'new', 9.99, NULL)",
                "UPDATE items SET name = 'renamed' WHERE id = 1",
                "DELETE FROM items WHERE id = 2",
                "INSERT INTO items VALUES (3000, 'a', 1, NULL), (3001, 'b', 2, NULL)",
            ],
        )
        .await;
    let streamed = run.changes(5).await;
    let ops: Vec<Op> = streamed.iter().map(|c| c.op).collect();
    assert_eq!(ops, [Op::Insert, Op::Update, Op::Delete, Op::Insert, Op::Insert]);
    assert_eq!(value(&catalog, &streamed[0], "price").to_string(), "9.99");
    assert_eq!(value(&catalog, &streamed[0], "name").as_str(), Some("new"));
    let update = &streamed[1];
    let name = catalog.table(0).column_index("name").expect("name");
    assert_eq!(update.before.as_ref().expect("before")[name].as_str(), Some("item 1"));
    assert_eq!(update.after.as_ref().expect("after")[name].as_str(), Some("renamed"));
    let delete = &streamed[2];
    assert!(delete.after.is_none());
    assert_eq!(value(&catalog, delete, "id"), &Value::Int(2));
    assert_eq!(binlog_pos(&streamed[3]).2, 0);
    assert_eq!(binlog_pos(&streamed[4]).2, 1, "rows of one event count up");

    let mut previous = snap[0].source.position.clone().expect("position");
    for c in &streamed {
        let p = c.source.position.clone().expect("position");
        assert!(p > previous, "{p} after {previous}");
        previous = p;
        assert_eq!(c.source.snapshot, Snapshot::False);
        let meta = &c.source.meta;
        assert_eq!((&*meta.server, &*meta.db, &*meta.connector), ("erp", db, "mysql"));
        assert_eq!((meta.server_id, &*meta.version), (1, "caudal"), "the upstream server id");
        assert!((c.source.ts_ms - c.ts_ms).abs() < 600_000, "commit time is now-ish");
    }
    let origins: Vec<u64> = snap.iter().chain(&streamed).map(|c| c.origin).collect();
    assert_eq!(origins, (1..=1205).collect::<Vec<u64>>());
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_from_a_checkpoint_yields_exactly_the_changes_after_it() {
    let server = MariaDb::start();
    let db = "cdc_resume";
    let catalog = three_row_table(&server, db).await;
    let mut first = start(&server.url(db), &catalog, None);
    first.batches(3).await;
    server
        .exec(
            db,
            &[
                // One transaction of several rows events, so batches end inside it.
                "INSERT INTO t SELECT seq, REPEAT('x', 10) FROM seq_10_to_1509",
                "INSERT INTO t VALUES (5000, 'a')",
                "UPDATE t SET v = 'b' WHERE id = 5000",
            ],
        )
        .await;
    let batches = first.batches(1502).await;
    first.stop().await;

    let k = batches
        .iter()
        .position(|(_, cp)| checkpoint(cp).skip.is_some())
        .expect("a batch ends inside the 1500-row transaction");
    let expected: Vec<&Change> = batches[k + 1..].iter().flat_map(|(c, _)| c).collect();
    assert!(!expected.is_empty());

    server.exec(db, &["DELETE FROM t WHERE id = 5000"]).await;
    let mut second = start(&server.url(db), &catalog, Some(batches[k].1.clone()));
    let got = second.changes(expected.len() + 1).await;
    second.assert_quiet(Duration::from_millis(500)).await;
    second.stop().await;

    for (want, got) in expected.iter().zip(&got) {
        assert_eq!(binlog_pos(want), binlog_pos(got));
        assert_eq!((want.op, want.origin), (got.op, got.origin));
        assert_eq!(format!("{:?}", want.after), format!("{:?}", got.after));
    }
    let last = got.last().expect("changes");
    assert_eq!(last.op, Op::Delete);
    assert_eq!(value(&catalog, last, "id"), &Value::Int(5000));
}

/// Columns of the type table and the expected value (kind, rendering).
pub(crate) const TYPES: &[(&str, &str, &str, &str, &str)] = &[
    // (column, declared type, SQL literal, value kind, value display)
    ("i", "int", "2147483647", "int", "2147483647"),
    ("iu", "uint", "4294967295", "uint", "4294967295"),
    ("bu", "uint", "18446744073709551615", "uint", "18446744073709551615"),
    ("bi", "int", "-9223372036854775808", "int", "-9223372036854775808"),
    ("ti", "int", "-128", "int", "-128"),
    ("d", "decimal", "-1234567890123456.7890", "decimal", "-1234567890123456.7890"),
    (
        "dt",
        "timestamp_us",
        "'2026-01-05 08:10:00.123456'",
        "timestamp",
        "2026-01-05T08:10:00.123456Z",
    ),
    // Written in a +02:00 session: stored and read as UTC.
    ("ts", "timestamptz", "'2026-01-05 10:10:00.5'", "timestamp", "2026-01-05T08:10:00.500Z"),
    ("dd", "date", "'2026-01-05'", "date", "2026-01-05"),
    ("tm", "time", "'-838:59:59'", "time", "-838:59:59"),
    ("s", "string", "'emoji 🎉 𝄞'", "string", "emoji 🎉 𝄞"),
    ("e", "string", "''", "string", ""),
    ("b", "bytes", "x'00FF10'", "bytes", "00ff10"),
    ("j", "json", r#"'{"a": [1, 2], "b": "ü"}'"#, "json", r#"{"a": [1, 2], "b": "ü"}"#),
    ("f", "float", "1.5", "float", "1.5"),
    ("en", "string", "'b'", "string", "b"),
    ("st", "string", "'x,z'", "string", "x,z"),
    ("y", "int", "2024", "int", "2024"),
    ("bit1", "bool", "b'1'", "bool", "true"),
    ("l", "string", "'café'", "string", "café"),
];

pub(crate) const TYPES_DDL: &str =
    "CREATE TABLE types (id INT PRIMARY KEY, i INT, iu INT UNSIGNED, \
    bu BIGINT UNSIGNED, bi BIGINT, ti TINYINT, d DECIMAL(20,4), dt DATETIME(6), \
    ts TIMESTAMP(6) NULL DEFAULT NULL, dd DATE, tm TIME(6), s VARCHAR(50) CHARACTER SET utf8mb4, \
    e VARCHAR(10), b BLOB, j JSON, f DOUBLE, en ENUM('a','b','c'), st SET('x','y','z'), y YEAR, \
    bit1 BIT(1), l VARCHAR(10) CHARACTER SET latin1)";

pub(crate) fn types_insert(id: i64) -> String {
    let values: Vec<&str> = TYPES.iter().map(|t| t.2).collect();
    format!("INSERT INTO types VALUES ({id}, {})", values.join(", "))
}

fn assert_types(catalog: &Catalog, c: &Change, path: &str) {
    for (column, _, _, kind, shown) in TYPES {
        let v = value(catalog, c, column);
        assert_eq!(
            (v.kind(), v.to_string().as_str()),
            (*kind, *shown),
            "column `{column}` by {path}"
        );
    }
}

fn assert_all_null(catalog: &Catalog, c: &Change, path: &str) {
    for (column, ..) in TYPES {
        assert!(value(catalog, c, column).is_null(), "column `{column}` by {path} is null");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_reads_the_same_from_the_snapshot_and_the_binlog() {
    let server = MariaDb::start();
    let db = "cdc_types";
    server.create_db(db).await;
    let nulls = "INSERT INTO types (id) VALUES";
    server
        .exec(
            db,
            &[TYPES_DDL, "SET time_zone = '+02:00'", &types_insert(1), &format!("{nulls} (2)")],
        )
        .await;
    let mut columns = vec![("id", "int")];
    columns.extend(TYPES.iter().map(|t| (t.0, t.1)));
    let catalog = Arc::new(Catalog::new(vec![table("types", &columns, &["id"])]));
    let mut run = start(&server.url(db), &catalog, None);
    let snap = run.changes(2).await;
    server
        .exec(db, &["SET time_zone = '+02:00'", &types_insert(11), &format!("{nulls} (12)")])
        .await;
    let streamed = run.changes(2).await;
    run.stop().await;

    assert_types(&catalog, &snap[0], "snapshot");
    assert_types(&catalog, &streamed[0], "binlog");
    assert_all_null(&catalog, &snap[1], "snapshot");
    assert_all_null(&catalog, &streamed[1], "binlog");
    for (s, b) in snap.iter().zip(&streamed) {
        let (s, b) = (s.after.as_ref().expect("after"), b.after.as_ref().expect("after"));
        assert_eq!(format!("{:?}", &s[1..]), format!("{:?}", &b[1..]), "identical values");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_format_binlog_is_a_definite_error_naming_the_setting() {
    let server = MariaDb::start_with(&["--binlog-format=STATEMENT"]);
    let db = "cdc_statement";
    server.create_db(db).await;
    server.exec(db, &["CREATE TABLE t (id INT PRIMARY KEY)"]).await;
    let catalog = Arc::new(Catalog::new(vec![table("t", &[("id", "int")], &["id"])]));
    match start(&server.url(db), &catalog, None).failure().await {
        CaptureError::Definite { message, hint } => {
            assert!(
                message.contains("`binlog_format`") && message.contains("STATEMENT"),
                "{message}"
            );
            assert!(hint.unwrap_or_default().contains("ROW"));
        }
        other => panic!("not definite: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_replication_grant_is_a_definite_error_naming_it() {
    let server = MariaDb::start();
    let db = "cdc_grant";
    server.create_db(db).await;
    server
        .exec(
            db,
            &[
                "CREATE TABLE t (id INT PRIMARY KEY)",
                "CREATE USER 'reader'@'%' IDENTIFIED BY 'pw'",
                "GRANT SELECT ON cdc_grant.* TO 'reader'@'%'",
            ],
        )
        .await;
    let catalog = Arc::new(Catalog::new(vec![table("t", &[("id", "int")], &["id"])]));
    match start(&server.url_as("reader", "pw", db), &catalog, None).failure().await {
        CaptureError::Definite { message, hint } => {
            assert!(message.contains("`REPLICATION SLAVE`"), "{message}");
            assert!(hint.unwrap_or_default().contains("GRANT REPLICATION SLAVE"));
        }
        other => panic!("not definite: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_binlog_is_a_definite_error_with_the_resnapshot_hint() {
    let server = MariaDb::start();
    let db = "cdc_purged";
    server.create_db(db).await;
    server.exec(db, &["CREATE TABLE t (id INT PRIMARY KEY)", "INSERT INTO t VALUES (1)"]).await;
    let catalog = Arc::new(Catalog::new(vec![table("t", &[("id", "int")], &["id"])]));
    let mut run = start(&server.url(db), &catalog, None);
    let batches = run.batches(1).await;
    run.stop().await;
    // A file/offset checkpoint (no GTID position: an older checkpoint, or MySQL
    // without GTIDs); a GTID position would resume past the purged file, see
    // `capture_mysql_gtid` for that and for its purged case.
    let cp = MysqlCheckpoint { gtid: None, ..checkpoint(&batches.last().expect("batch").1) };
    let file = cp.file.clone();
    let cp = cp.token();

    // The server keeps files a dump thread still reads: end them all first.
    use mysql_async::prelude::Queryable;
    let mut conn = server.conn(db).await;
    let dumps: Vec<u64> = conn
        .query("SELECT ID FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Binlog Dump%'")
        .await
        .expect("processlist");
    for id in dumps {
        let _ = conn.query_drop(format!("KILL {id}")).await;
    }
    conn.query_drop("FLUSH BINARY LOGS").await.expect("flush");
    let current: Option<mysql_async::Row> =
        conn.query_first("SHOW MASTER STATUS").await.expect("master status");
    let current: String = current.and_then(|mut r| r.take(0)).expect("binlog on");
    // MariaDB keeps a file until its binlog checkpoint moves on (and killed dump
    // threads take a moment to go): retry until it is gone.
    let mut files = Vec::new();
    for _ in 0..50 {
        conn.query_drop(format!("PURGE BINARY LOGS TO '{current}'")).await.expect("purge");
        let rows: Vec<mysql_async::Row> = conn.query("SHOW BINARY LOGS").await.expect("logs");
        files = rows.into_iter().filter_map(|mut r| r.take::<String, _>(0)).collect();
        if !files.contains(&file) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!files.contains(&file), "{file} was not purged: {files:?}");

    match start(&server.url(db), &catalog, Some(cp)).failure().await {
        CaptureError::Definite { message, hint } => {
            assert!(message.contains(&file) && message.contains("no longer"), "{message}");
            assert!(hint.unwrap_or_default().contains("new store"));
        }
        other => panic!("not definite: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_consistent_snapshot_resumes_at_its_next_chunk() {
    let server = MariaDb::start();
    let db = "cdc_snapshot_resume";
    server.create_db(db).await;
    server
        .exec(
            db,
            &[
                "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20))",
                "INSERT INTO t SELECT seq, 'v' FROM seq_1_to_1200",
            ],
        )
        .await;
    let catalog =
        Arc::new(Catalog::new(vec![table("t", &[("id", "int"), ("v", "string")], &["id"])]));
    let consistent = SnapshotMode::Consistent;
    let mut first = start_with(&server.url(db), &catalog, None, consistent);
    let chunk = first.batches(500).await;
    first.stop().await;
    let (rows, cp) = &chunk[0];
    let progress = checkpoint(cp).snapshot.expect("snapshot unfinished");
    assert_eq!(progress.after, Some(vec![serde_json::json!(500)]), "{progress:?}");
    assert_eq!(progress.stage, SnapshotStage::Consistent);
    let first_pos = binlog_pos(&rows[0]);

    // Written between the two snapshot views: read by the second view and replayed
    // by the binlog from the first view's position (at least once, no gap).
    server.exec(db, &["INSERT INTO t VALUES (5000, 'late')"]).await;
    let mut second = start_with(&server.url(db), &catalog, Some(cp.clone()), consistent);
    let got = second.changes(702).await;
    second.stop().await;

    let reads: Vec<&Change> = got.iter().filter(|c| c.op == Op::Read).collect();
    let ids: Vec<Value> = reads.iter().map(|c| value(&catalog, c, "id").clone()).collect();
    let mut want: Vec<Value> = (501..=1200).map(Value::Int).collect();
    want.push(Value::Int(5000));
    assert_eq!(ids, want, "the snapshot continues after key 500");
    assert_eq!(reads.last().expect("reads").source.snapshot, Snapshot::Last);
    assert!(reads.iter().all(|c| binlog_pos(c) == first_pos), "streaming starts at the first view");
    let last = got.last().expect("changes");
    assert_eq!((last.op, value(&catalog, last, "id")), (Op::Insert, &Value::Int(5000)));
    assert_eq!(got[0].origin, 501, "origins continue from the checkpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_incremental_snapshot_resumes_at_its_next_chunk_in_binlog_order() {
    let server = MariaDb::start();
    let db = "cdc_incremental_resume";
    server.create_db(db).await;
    server
        .exec(
            db,
            &[
                "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20))",
                "INSERT INTO t SELECT seq, 'v' FROM seq_1_to_1200",
            ],
        )
        .await;
    let catalog =
        Arc::new(Catalog::new(vec![table("t", &[("id", "int"), ("v", "string")], &["id"])]));
    let mut first = start(&server.url(db), &catalog, None);
    let chunk = first.batches(500).await;
    first.stop().await;
    let (rows, cp) = chunk.last().expect("batches");
    assert_eq!(rows.len(), 500, "one chunk per batch");
    let progress = checkpoint(cp).snapshot.expect("snapshot unfinished");
    assert_eq!(progress.stage, SnapshotStage::Chunks);
    assert_eq!(
        (progress.table.as_str(), progress.after.clone()),
        ("t", Some(vec![serde_json::json!(500)]))
    );
    let (_, _, row) = binlog_pos(&rows[0]);
    assert_eq!(row, u32::MAX, "a chunk sits after every change before its point");

    // While caudal is down: a change to a row already read, one to a row not yet
    // read, and a new row past the last key.
    server
        .exec(
            db,
            &[
                "UPDATE t SET v = 'read' WHERE id = 100",
                "UPDATE t SET v = 'unread' WHERE id = 900",
                "INSERT INTO t VALUES (5000, 'late')",
            ],
        )
        .await;
    let mut second = start(&server.url(db), &catalog, Some(cp.clone()));
    // Streamed from the checkpoint: the three changes; then the next chunks, read
    // after them (so holding them), each exactly once.
    let got = second.changes(3 + 500 + 201).await;
    let ops: Vec<Op> = got.iter().take(3).map(|c| c.op).collect();
    assert_eq!(ops, [Op::Update, Op::Update, Op::Insert]);
    let reads: Vec<&Change> = got[3..].iter().collect();
    assert!(reads.iter().all(|c| c.op == Op::Read));
    let ids: Vec<Value> = reads.iter().map(|c| value(&catalog, c, "id").clone()).collect();
    let mut want: Vec<Value> = (501..=1200).map(Value::Int).collect();
    want.push(Value::Int(5000));
    assert_eq!(ids, want, "the snapshot continues after key 500, once");
    let r900 = reads.iter().find(|c| value(&catalog, c, "id") == &Value::Int(900)).expect("900");
    assert_eq!(value(&catalog, r900, "v").as_str(), Some("unread"), "a chunk is read at its point");
    assert_eq!(reads.last().expect("reads").source.snapshot, Snapshot::Last);
    assert!(reads[..reads.len() - 1].iter().all(|c| c.source.snapshot == Snapshot::True));
    for pair in got.windows(2) {
        let (a, b) = (&pair[0].source.position, &pair[1].source.position);
        assert!(a <= b, "binlog order: {a:?} then {b:?}");
    }
    assert_eq!(got[0].origin, 501, "origins continue from the checkpoint");

    // After the snapshot, streaming goes on.
    server.exec(db, &["DELETE FROM t WHERE id = 1"]).await;
    let after = second.changes(1).await;
    assert_eq!((after[0].op, value(&catalog, &after[0], "id")), (Op::Delete, &Value::Int(1)));
    assert!(after[0].source.position > reads.last().expect("reads").source.position);
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_during_an_incremental_snapshot_reaches_the_later_chunks() {
    let server = MariaDb::start();
    let db = "cdc_incremental_ddl";
    server.create_db(db).await;
    server
        .exec(
            db,
            &[
                "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20))",
                // Many more chunks than the bus holds, so the snapshot is mid-way
                // when the column comes.
                "INSERT INTO t SELECT seq, 'v' FROM seq_1_to_6000",
            ],
        )
        .await;
    let catalog = Arc::new(Catalog::new(vec![table(
        "t",
        &[("id", "int"), ("v", "string"), ("w", "int")],
        &["id"],
    )]));
    server.exec(db, &["CREATE TABLE other (id INT PRIMARY KEY)"]).await;
    let mut run = start(&server.url(db), &catalog, None);
    let mut got = run.changes(500).await;
    // While the source waits for the full bus: transactions of a table it does not
    // capture, then the column. Once let go, the stream is behind the server, so
    // the next chunk is read (at the server's position, after the column) with the
    // schema of the stream's point, before the column: by the time the stream
    // reaches the chunk's point it knows the column, and the chunk is read again.
    let others: Vec<String> =
        (1..=300).map(|i| format!("INSERT INTO other VALUES ({i})")).collect();
    let mut writes: Vec<&str> = others.iter().map(String::as_str).collect();
    writes.extend([
        "ALTER TABLE t ADD COLUMN w INT NOT NULL DEFAULT 7",
        "INSERT INTO t VALUES (9000, 'new', 9)",
    ]);
    server.exec(db, &writes).await;
    got.extend(run.changes(6000 - 500 + 2).await);
    run.assert_quiet(Duration::from_millis(300)).await;
    run.stop().await;

    let mut ids: Vec<i64> = Vec::new();
    let mut seen_new_column = false;
    for c in got.iter().filter(|c| c.op == Op::Read) {
        let Value::Int(id) = value(&catalog, c, "id") else { panic!("id") };
        ids.push(*id);
        match value(&catalog, c, "w") {
            Value::Int(7) => seen_new_column = true,
            Value::Int(9) if *id == 9000 => {}
            Value::Null => {
                assert!(!seen_new_column, "row {id}: a chunk read after the column lacks it")
            }
            other => panic!("row {id}: w = {other:?}"),
        }
    }
    let mut want: Vec<i64> = (1..=6000).collect();
    want.push(9000);
    assert_eq!(ids, want, "every row read once, in key order");
    assert!(seen_new_column, "the later chunks carry the new column");
    let last_read = got.iter().rfind(|c| c.op == Op::Read).expect("reads");
    assert_eq!(value(&catalog, last_read, "w"), &Value::Int(9), "row 9000 as inserted");
    let insert = got.iter().find(|c| c.op == Op::Insert).expect("the streamed insert");
    assert_eq!(value(&catalog, insert, "w"), &Value::Int(9));
    assert!(got.iter().all(|c| c.extra.is_none()), "no undeclared column");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_included_on_restart_joins_the_incremental_snapshot() {
    let server = MariaDb::start();
    let db = "cdc_incremental_join";
    let catalog = three_row_table(&server, db).await;
    server
        .exec(
            db,
            &[
                "CREATE TABLE later (id INT PRIMARY KEY, v VARCHAR(20))",
                "INSERT INTO later SELECT seq, 'l' FROM seq_1_to_700",
            ],
        )
        .await;
    let mut first = start(&server.url(db), &catalog, None);
    let batches = first.batches(3).await;
    first.stop().await;
    let cp = batches.last().expect("batches").1.clone();
    assert!(checkpoint(&cp).snapshot.is_none(), "the first snapshot finished");

    // Declared after the first snapshot: it is read (in chunks, while streaming)
    // when the pipeline restarts; the table already read is not read again.
    let t = catalog.table(0).clone();
    let later = table("later", &[("id", "int"), ("v", "string")], &["id"]);
    let catalog = Arc::new(Catalog::new(vec![t, later]));
    let mut second = start(&server.url(db), &catalog, Some(cp));
    let got = second.changes(700).await;
    second.assert_quiet(Duration::from_millis(300)).await;
    second.stop().await;
    assert!(got.iter().all(|c| c.op == Op::Read && c.table == 1), "only the new table is read");
    let ids: Vec<Value> = got.iter().map(|c| value(&catalog, c, "id").clone()).collect();
    assert_eq!(ids, (1..=700).map(Value::Int).collect::<Vec<_>>());
    assert_eq!(got.last().expect("reads").source.snapshot, Snapshot::Last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_reconnects_and_resumes_without_gaps_or_duplicates() {
    use mysql_async::prelude::Queryable;
    let server = MariaDb::start();
    let db = "cdc_reconnect";
    server.create_db(db).await;
    server.exec(db, &["CREATE TABLE t (id INT PRIMARY KEY)", "INSERT INTO t VALUES (1)"]).await;
    let catalog = Arc::new(Catalog::new(vec![table("t", &[("id", "int")], &["id"])]));
    let mut run = start(&server.url(db), &catalog, None);
    run.changes(1).await;
    server.exec(db, &["INSERT INTO t VALUES (10)"]).await;
    run.changes(1).await;

    let mut conn = server.conn(db).await;
    let dumps: Vec<u64> = conn
        .query("SELECT ID FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Binlog Dump%'")
        .await
        .expect("processlist");
    assert_eq!(dumps.len(), 1, "one replica connection");
    conn.query_drop(format!("KILL {}", dumps[0])).await.expect("kill the replica connection");
    server.exec(db, &["INSERT INTO t VALUES (11)", "INSERT INTO t VALUES (12)"]).await;

    let got = run.changes(2).await;
    let ids: Vec<&Value> = got.iter().map(|c| value(&catalog, c, "id")).collect();
    assert_eq!(ids, [&Value::Int(11), &Value::Int(12)]);
    run.assert_quiet(Duration::from_millis(500)).await;
    run.stop().await;
}

/// Creates `db` with a table `t (id, v)` of three rows; returns its catalog.
pub(crate) async fn three_row_table(server: &MariaDb, db: &str) -> Arc<Catalog> {
    server.create_db(db).await;
    server
        .exec(
            db,
            &[
                "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20))",
                "INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')",
            ],
        )
        .await;
    Arc::new(Catalog::new(vec![table("t", &[("id", "int"), ("v", "string")], &["id"])]))
}
