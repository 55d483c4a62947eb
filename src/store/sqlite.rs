//! The SQLite sink: one embedded database file holds everything a pipeline makes.
//!
//! # Tables
//!
//! - `silver_<table>` for every table of the catalog (also those with `silver = false`:
//!   processing rebuilds its lookup state from them). The declared columns in order,
//!   then `_flags`, `_extra`, `_position`, `_source_ts_ms`, `_updated_at`; the
//!   primary key is the table's key. A column declared later is added with
//!   `ALTER TABLE ADD COLUMN`; nothing is ever dropped.
//!
//!   Then the columns learned from `_extra`: a key of a row's undeclared columns
//!   becomes a column (no declared type) in the commit that first carries it, and its
//!   values leave `_extra`; a key that cannot be a column name stays there (rules in
//!   [`super::extra`]). Values keep their kind: integers INTEGER, floats REAL when
//!   they read back as the same text, anything else its exact text. A row without
//!   the key has NULL there. The learned columns are read back from the tables on
//!   start and after a failed commit, whose `ALTER TABLE` rolled back with it.
//! - `gold_<name>` for every gold rule: `window_start`, `window_end` (ISO-8601 UTC),
//!   `group_key` (the group values as a JSON array, so that NULL groups still upsert),
//!   one column per group and per measure, `<measure>_trend` when the rule has a
//!   trend, and `updated_at`; the primary key is `(window_start, group_key)`.
//! - `quarantine`: one row per quarantined input, open until `resolved_at` is set,
//!   and the view `quarantine_summary` counting open rows per reason.
//! - `caudal_checkpoint`: per pipeline, the source checkpoint, the processing state
//!   and the cumulative number of events.
//!
//! # Values
//!
//! Every [`Value`] is stored so that reading it back by the column's declared type
//! gives an equal value of the same variant: decimals are exact text (`12.50`, never
//! a REAL), timestamps ISO-8601 text with as many fractional digits as they need,
//! dates `YYYY-MM-DD`, times `[-]HH:MM:SS[.ffffff]`, bytes BLOBs. Unsigned integers
//! above `i64::MAX` are text; their columns therefore have no type affinity, which
//! would otherwise turn that text into a lossy REAL. A float NaN is the text `NaN`
//! (SQLite stores a bound NaN as NULL); `-0.0` comes back as `0.0`, because SQLite
//! keeps integral REALs as integers on disk. Gold group and measure columns
//! have no affinity either: they hold whatever the aggregate produced, as produced.
//!
//! # Transactions
//!
//! [`Sink::write`] applies a whole [`Commit`] in one transaction, in this order:
//! silver upserts and deletes, the gold reset, gold upserts and deletes, quarantine
//! operations, then the checkpoint and state. Either all of it is durable or none
//! of it, so the checkpoint never runs ahead of the data, nor behind it.
//!
//! Writes are idempotent (applying a commit twice leaves the same tables, up to
//! the times of writing): silver and gold are upserts and deletes by key; a row
//! has at most one open quarantine record, refreshed in place, and a record of an
//! input already quarantined (same origin, reason and payload) is reopened rather
//! than duplicated; the event count does not grow when the stored checkpoint
//! already equals the commit's.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::types::{ToSql, ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{CachedStatement, Connection, ErrorCode, OpenFlags, TransactionBehavior};
use rust_decimal::Decimal;

use super::extra::{self, ExtraColumns, Json};
use super::{ident, Ack, Recovered, Sink, StoreError};
use crate::config::spec::GoldSpec;
use crate::config::PipelineSpec;
use crate::event::output::{
    Commit, GoldChange, QuarantineOp, QuarantineRecord, SilverChange, SilverRow,
};
use crate::event::{time, Checkpoint, ColumnType, Key, Row, TableId, TableSchema, Value};

/// How long a statement waits for another connection's lock (an exporter reading,
/// an operator's shell) before the store reports itself unavailable.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Page cache of the writing connection, in KiB (a negative `cache_size`): upserts
/// into large silver tables touch many B-tree pages per commit.
const CACHE_KIB: i64 = 64 * 1024;
/// The WAL file grows to the size of the largest commit; this truncates it back
/// after a checkpoint instead of keeping that size on disk forever.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Bookkeeping columns after the declared ones in every silver table.
const SILVER_META: [(&str, &str); 5] = [
    ("_flags", "TEXT"),
    ("_extra", "TEXT"),
    ("_position", "TEXT"),
    ("_source_ts_ms", "INTEGER"),
    ("_updated_at", "TEXT"),
];
/// SQLite's default limit on the columns of a table (`SQLITE_MAX_COLUMN`): learned
/// columns stop there, later keys stay in `_extra`.
const MAX_COLUMNS: usize = 2000;
/// Gold columns the sink owns; a group or measure of the same name would clash.
const GOLD_RESERVED: [&str; 4] = ["window_start", "window_end", "group_key", "updated_at"];

const QUARANTINE_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS "quarantine" (
    "id" INTEGER PRIMARY KEY AUTOINCREMENT,
    "table_name" TEXT,
    "row_key" TEXT,
    "stage" TEXT NOT NULL,
    "reason" TEXT NOT NULL,
    "detail" TEXT,
    "position" TEXT,
    "origin" INTEGER,
    "payload" TEXT,
    "quarantined_at" TEXT NOT NULL,
    "resolved_at" TEXT
);
CREATE INDEX IF NOT EXISTS "quarantine_open"
    ON "quarantine" ("table_name", "row_key") WHERE "resolved_at" IS NULL;
CREATE INDEX IF NOT EXISTS "quarantine_reason" ON "quarantine" ("reason");
CREATE INDEX IF NOT EXISTS "quarantine_origin" ON "quarantine" ("origin");
CREATE VIEW IF NOT EXISTS "quarantine_summary" AS
    SELECT "reason", COUNT(*) AS "rows" FROM "quarantine"
    WHERE "resolved_at" IS NULL GROUP BY "reason";
CREATE TABLE IF NOT EXISTS "caudal_checkpoint" (
    "pipeline" TEXT PRIMARY KEY,
    "checkpoint" TEXT NOT NULL,
    "state" TEXT NOT NULL,
    "event_count" INTEGER NOT NULL,
    "updated_at" TEXT NOT NULL
);
"#;

/// Refreshes the open record of a row: a newer version failed again. `quarantined_at`
/// is kept, it says since when the row has been out of the clean data.
const QUARANTINE_REFRESH: &str = r#"UPDATE "quarantine" SET "stage" = ?3, "reason" = ?4,
    "detail" = ?5, "position" = ?6, "origin" = ?7, "payload" = ?8
    WHERE "table_name" = ?1 AND "row_key" = ?2 AND "resolved_at" IS NULL"#;
const QUARANTINE_INSERT: &str = r#"INSERT INTO "quarantine" ("table_name", "row_key",
    "stage", "reason", "detail", "position", "origin", "payload", "quarantined_at")
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"#;
/// The latest record of the same input: origin (its sequence number in the source),
/// table, key, stage, reason and payload all equal.
const QUARANTINE_SAME: &str = r#"SELECT "id", "resolved_at" IS NOT NULL FROM "quarantine"
    WHERE "origin" = ?7 AND "table_name" IS ?1 AND "row_key" IS ?2 AND "stage" = ?3
    AND "reason" = ?4 AND "payload" IS ?8 ORDER BY "id" DESC LIMIT 1"#;
const QUARANTINE_REOPEN: &str = r#"UPDATE "quarantine" SET "resolved_at" = NULL WHERE "id" = ?1"#;
const QUARANTINE_RESOLVE: &str = r#"UPDATE "quarantine" SET "resolved_at" = ?3
    WHERE "table_name" = ?1 AND "row_key" = ?2 AND "resolved_at" IS NULL"#;
const QUARANTINE_OPEN: &str = r#"SELECT "id", "table_name", "row_key", "stage", "reason",
    "detail", "position", "origin", "payload" FROM "quarantine"
    WHERE "resolved_at" IS NULL ORDER BY "id""#;

/// The event count only grows when the checkpoint moves: every source checkpoint
/// advances past the events it covers, so an equal one is the same commit again.
const CHECKPOINT_UPSERT: &str = r#"INSERT INTO "caudal_checkpoint"
    ("pipeline", "checkpoint", "state", "event_count", "updated_at")
    VALUES (?1, ?2, ?3, ?4, ?5)
    ON CONFLICT ("pipeline") DO UPDATE SET
        "event_count" = CASE WHEN "caudal_checkpoint"."checkpoint" = excluded."checkpoint"
            THEN "caudal_checkpoint"."event_count"
            ELSE "caudal_checkpoint"."event_count" + excluded."event_count" END,
        "checkpoint" = excluded."checkpoint",
        "state" = excluded."state",
        "updated_at" = excluded."updated_at""#;
const CHECKPOINT_READ: &str =
    r#"SELECT "checkpoint", "state" FROM "caudal_checkpoint" WHERE "pipeline" = ?1"#;

/// A [`Sink`] writing to one SQLite file.
///
/// The connection is synchronous; every operation runs on tokio's blocking pool
/// with the connection moved in and back out. If an operation is cancelled or its
/// thread panics, the connection is lost with it and the next call opens a new one.
pub struct SqliteSink {
    path: PathBuf,
    plan: Arc<Plan>,
    conn: Option<Connection>,
    /// Per silver table, the columns learned from `_extra`; `None` until read from
    /// the tables, and again after a failed commit (whose `ALTER TABLE` was rolled
    /// back with it, so memory must not keep the column).
    learned: Option<Vec<Learned>>,
}

impl SqliteSink {
    /// Opens (creating if needed) the database at `path`. Tables are created by
    /// [`Sink::healthcheck`].
    ///
    /// # Errors
    /// [`StoreError::Definite`] when a declared name clashes with a column the sink
    /// reserves, or the file cannot be opened; `Unavailable` when it is locked.
    pub fn open(path: &Path, spec: Arc<PipelineSpec>) -> Result<Self, StoreError> {
        let plan = Arc::new(Plan::new(&spec)?);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Definite {
                message: format!("cannot create directory `{}`", dir.display()),
                source: Some(Box::new(e)),
            })?;
        }
        let conn = connect(path, &plan)?;
        Ok(Self { path: path.to_owned(), plan, conn: Some(conn), learned: None })
    }

    /// Runs `work` with the connection (and the learned columns) on the blocking
    /// pool. After an error the learned columns are read again from the tables.
    async fn run<T, F>(&mut self, what: &'static str, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &Plan, &mut Option<Vec<Learned>>) -> Result<T, StoreError>
            + Send
            + 'static,
    {
        let conn = self.conn.take();
        let mut learned = self.learned.take();
        let path = self.path.clone();
        let plan = Arc::clone(&self.plan);
        let joined = tokio::task::spawn_blocking(move || {
            let mut conn = match conn {
                Some(c) => c,
                None => match connect(&path, &plan) {
                    Ok(c) => c,
                    Err(e) => return (None, None, Err(e)),
                },
            };
            let result = work(&mut conn, &plan, &mut learned);
            if result.is_err() {
                learned = None;
            }
            (Some(conn), learned, result)
        })
        .await;
        match joined {
            Ok((conn, learned, result)) => {
                self.conn = conn;
                self.learned = learned;
                result
            }
            Err(e) => Err(StoreError::Definite {
                message: format!("sqlite {what} task failed"),
                source: Some(Box::new(e)),
            }),
        }
    }
}

#[async_trait]
impl Sink for SqliteSink {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn healthcheck(&mut self) -> Result<(), StoreError> {
        self.run("healthcheck", |conn, plan, learned| {
            // The tables may have changed under this sink: read them again.
            *learned = None;
            create_schema(conn, plan)
        })
        .await
    }

    async fn recover(&mut self, tables: &[TableId]) -> Result<Recovered, StoreError> {
        let tables = tables.to_vec();
        self.run("recover", move |conn, plan, _| recover(conn, plan, &tables)).await
    }

    async fn write(&mut self, commit: Arc<Commit>) -> Result<Ack, StoreError> {
        self.run("write", move |conn, plan, learned| write(conn, plan, learned, &commit)).await
    }
}

/// A gold row as exports read it: (window start in epoch microseconds, group values,
/// measure values without the trend column).
pub type GoldRow = (i64, Vec<Value>, Vec<Value>);

/// Reads the rows of gold rule `gold`, ordered by window start then the group
/// columns. Values come back as stored: INTEGER as `Int`, REAL
/// as `Float`, TEXT as `Str` (so decimals keep their scale), BLOB as `Bytes`.
///
/// # Errors
/// When the file cannot be opened or the table read; `Unavailable` when locked.
pub fn read_gold(
    path: &Path,
    spec: &PipelineSpec,
    gold: usize,
) -> Result<Vec<GoldRow>, StoreError> {
    let g = spec.gold.get(gold).ok_or_else(|| {
        definite(format!("no gold rule {gold}: the pipeline has {}", spec.gold.len()))
    })?;
    let table = GoldTable::new(g)?;
    let conn = open_read_only(path)?;
    let context = || format!("select from `{}`", table.table);
    let mut stmt = conn.prepare(&table.select).map_err(|e| sql_error(e, context()))?;
    let mut rows = stmt.query([]).map_err(|e| sql_error(e, context()))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(|e| sql_error(e, context()))? {
        let start = row.get_ref(0).map_err(|e| sql_error(e, context()))?;
        let start = match start {
            ValueRef::Text(t) => std::str::from_utf8(t).ok().and_then(time::parse_timestamp),
            _ => None,
        }
        .ok_or_else(|| {
            definite(format!("`{}` has a `window_start` that is not a timestamp", table.table))
        })?;
        let mut values = Vec::with_capacity(table.groups + table.reported);
        for i in 1..=table.groups + table.reported {
            values.push(stored_value(row.get_ref(i).map_err(|e| sql_error(e, context()))?));
        }
        let measures = values.split_off(table.groups);
        out.push((start, values, measures));
    }
    Ok(out)
}

/// Open quarantine rows per reason, ordered by reason.
///
/// # Errors
/// When the file cannot be opened or the view read; `Unavailable` when locked.
pub fn read_quarantine_summary(path: &Path) -> Result<Vec<(String, u64)>, StoreError> {
    let conn = open_read_only(path)?;
    let context = || "select from `quarantine_summary`".to_owned();
    let mut stmt = conn
        .prepare(r#"SELECT "reason", "rows" FROM "quarantine_summary" ORDER BY "reason""#)
        .map_err(|e| sql_error(e, context()))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .map_err(|e| sql_error(e, context()))?;
    let mut out = Vec::new();
    for row in rows {
        let (reason, n) = row.map_err(|e| sql_error(e, context()))?;
        out.push((reason, u64::try_from(n).unwrap_or(0)));
    }
    Ok(out)
}

// ---- plan: the SQL of every table, built once from the spec -----------------

/// The statements of every table, built once so that the hot path only binds.
struct Plan {
    pipeline: String,
    silver: Vec<SilverTable>,
    gold: Vec<GoldTable>,
}

impl Plan {
    fn new(spec: &PipelineSpec) -> Result<Self, StoreError> {
        let silver =
            spec.catalog.tables().iter().map(SilverTable::new).collect::<Result<_, _>>()?;
        let gold = spec.gold.iter().map(GoldTable::new).collect::<Result<_, _>>()?;
        Ok(Self { pipeline: spec.name.clone(), silver, gold })
    }

    /// Room for every statement of every table, so that none is re-prepared.
    fn statement_cache(&self) -> usize {
        (16 + 3 * self.silver.len() + 4 * self.gold.len()).max(64)
    }
}

struct SilverTable {
    /// `silver_<name>`, unquoted, for messages.
    table: String,
    types: Vec<ColumnType>,
    key_len: usize,
    /// Every column with its declared type, for creating and evolving the table.
    columns: Vec<(String, &'static str)>,
    key: Vec<String>,
    create: String,
    upsert: String,
    delete: String,
    select: String,
}

impl SilverTable {
    fn new(schema: &TableSchema) -> Result<Self, StoreError> {
        let table = format!("silver_{}", schema.name);
        for c in &schema.columns {
            if SILVER_META.iter().any(|(m, _)| m.eq_ignore_ascii_case(&c.name)) {
                return Err(definite(format!(
                    "table `{}` declares column `{}`, a name the sqlite store reserves",
                    schema.name, c.name
                )));
            }
        }
        let mut columns: Vec<(String, &'static str)> =
            schema.columns.iter().map(|c| (c.name.to_string(), affinity(c.ty))).collect();
        columns.extend(SILVER_META.iter().map(|(n, t)| ((*n).to_owned(), *t)));
        let key: Vec<String> =
            schema.key.iter().map(|&k| schema.columns[k].name.to_string()).collect();
        let quoted = ident(&table);
        let key_list = key.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ");
        let create = create_sql(&quoted, &columns, &key_list);
        let upsert = upsert_sql(&quoted, columns.iter().map(|(n, _)| n.as_str()), &key);
        let delete = format!("DELETE FROM {quoted} WHERE {}", key_predicate(&key, 1));
        let declared = schema.columns.iter().map(|c| ident(&c.name)).collect::<Vec<_>>();
        let select = format!("SELECT {} FROM {quoted}", declared.join(", "));
        Ok(Self {
            table,
            types: schema.columns.iter().map(|c| c.ty).collect(),
            key_len: key.len(),
            columns,
            key,
            create,
            upsert,
            delete,
            select,
        })
    }
}

struct GoldTable {
    /// `gold_<name>`, unquoted, for messages.
    table: String,
    groups: usize,
    /// Measure columns including the trend column.
    measures: usize,
    /// Measure columns without the trend column (what exports report).
    reported: usize,
    window_micros: i64,
    columns: Vec<(String, &'static str)>,
    create: String,
    upsert: String,
    delete: String,
    clear: String,
    select: String,
}

impl GoldTable {
    fn new(g: &GoldSpec) -> Result<Self, StoreError> {
        let table = format!("gold_{}", g.name);
        let mut outputs: Vec<String> = g.group_by.iter().map(|(n, _)| n.clone()).collect();
        outputs.extend(g.measures.iter().map(|m| m.name.clone()));
        if let Some(t) = g.trend.and_then(|t| g.measures.get(t)) {
            outputs.push(format!("{}_trend", t.name));
        }
        for (i, name) in outputs.iter().enumerate() {
            let clash = GOLD_RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name))
                || outputs[..i].iter().any(|o| o.eq_ignore_ascii_case(name));
            if clash {
                return Err(definite(format!(
                    "gold `{}` has an output column `{name}` that clashes with another column",
                    g.name
                )));
            }
        }
        let mut columns: Vec<(String, &'static str)> = vec![
            ("window_start".to_owned(), "TEXT NOT NULL"),
            ("window_end".to_owned(), "TEXT NOT NULL"),
            ("group_key".to_owned(), "TEXT NOT NULL"),
        ];
        // No affinity: a measure is an integer count, an exact decimal as text or a
        // float, and must stay what the aggregate produced.
        columns.extend(outputs.iter().map(|n| (n.clone(), "")));
        columns.push(("updated_at".to_owned(), "TEXT"));
        let quoted = ident(&table);
        let create = create_sql(&quoted, &columns, r#""window_start", "group_key""#);
        let names = columns.iter().map(|(n, _)| ident(n)).collect::<Vec<_>>().join(", ");
        let placeholders = (1..=columns.len()).map(|i| format!("?{i}")).collect::<Vec<_>>();
        let updates = columns
            .iter()
            .skip(1)
            .filter(|(n, _)| n != "group_key")
            .map(|(n, _)| format!("{0} = excluded.{0}", ident(n)))
            .collect::<Vec<_>>()
            .join(", ");
        let upsert = format!(
            "INSERT INTO {quoted} ({names}) VALUES ({}) \
             ON CONFLICT (\"window_start\", \"group_key\") DO UPDATE SET {updates}",
            placeholders.join(", ")
        );
        let delete =
            format!("DELETE FROM {quoted} WHERE \"window_start\" = ?1 AND \"group_key\" = ?2");
        let clear = format!("DELETE FROM {quoted}");
        let select = super::gold_select(&quoted, g, &[]);
        Ok(Self {
            table,
            groups: g.group_by.len(),
            measures: outputs.len() - g.group_by.len(),
            reported: g.measures.len(),
            window_micros: g.window_micros,
            columns,
            create,
            upsert,
            delete,
            clear,
            select,
        })
    }
}

/// The declared SQL type, which sets the column's affinity.
fn affinity(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Bool | ColumnType::Int => "INTEGER",
        // INTEGER affinity would turn the text of a value above i64::MAX into a
        // REAL and lose digits; without affinity SQLite stores what is bound.
        ColumnType::UInt => "",
        ColumnType::Float => "REAL",
        ColumnType::Bytes => "BLOB",
        ColumnType::Decimal
        | ColumnType::String
        | ColumnType::Json
        | ColumnType::TimestampMillis
        | ColumnType::TimestampMicros
        | ColumnType::TimestampZoned
        | ColumnType::Date
        | ColumnType::Time => "TEXT",
    }
}

/// A double-quoted SQL identifier.
fn column_def(name: &str, decl: &str) -> String {
    if decl.is_empty() {
        ident(name)
    } else {
        format!("{} {decl}", ident(name))
    }
}

/// The upsert of one silver row: every column (declared, bookkeeping, then learned)
/// set from the row, so a column the row does not carry becomes NULL.
fn upsert_sql<'n>(quoted: &str, columns: impl Iterator<Item = &'n str>, key: &[String]) -> String {
    let columns: Vec<&str> = columns.collect();
    let key_list = key.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ");
    let names = columns.iter().map(|n| ident(n)).collect::<Vec<_>>().join(", ");
    let placeholders = (1..=columns.len()).map(|i| format!("?{i}")).collect::<Vec<_>>();
    let updates = columns
        .iter()
        .filter(|n| !key.iter().any(|k| k == *n))
        .map(|n| format!("{0} = excluded.{0}", ident(n)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO {quoted} ({names}) VALUES ({}) ON CONFLICT ({key_list}) DO UPDATE SET {updates}",
        placeholders.join(", ")
    )
}

fn create_sql(quoted: &str, columns: &[(String, &'static str)], key_list: &str) -> String {
    let defs = columns.iter().map(|(n, t)| column_def(n, t)).collect::<Vec<_>>().join(", ");
    format!("CREATE TABLE IF NOT EXISTS {quoted} ({defs}, PRIMARY KEY ({key_list}))")
}

/// `"a" = ?first AND "b" = ?first+1 ...`
fn key_predicate(key: &[String], first: usize) -> String {
    key.iter()
        .enumerate()
        .map(|(i, k)| format!("{} = ?{}", ident(k), first + i))
        .collect::<Vec<_>>()
        .join(" AND ")
}

// ---- connections and errors -------------------------------------------------

fn connect(path: &Path, plan: &Plan) -> Result<Connection, StoreError> {
    let context = || format!("cannot open `{}`", path.display());
    let conn = Connection::open(path).map_err(|e| sql_error(e, context()))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| sql_error(e, context()))?;
    // WAL lets exporters and shells read while the pipeline writes.
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| sql_error(e, "set `journal_mode`".to_owned()))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode, "sqlite store is not in WAL mode");
    }
    // synchronous=NORMAL in WAL mode: a commit survives a crash of the process, but
    // an OS crash or power loss may lose the latest commits. That is safe because
    // the source checkpoint is written in the same transaction as the data: what is
    // lost is replayed from the checkpoint that survived. FULL would fsync on every
    // commit for no gain in correctness.
    conn.execute_batch(&format!(
        "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = OFF; PRAGMA cache_size = -{CACHE_KIB};"
    ))
    .map_err(|e| sql_error(e, "set pragmas".to_owned()))?;
    conn.query_row(&format!("PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}"), [], |_| Ok(()))
        .map_err(|e| sql_error(e, "set `journal_size_limit`".to_owned()))?;
    conn.set_prepared_statement_cache_capacity(plan.statement_cache());
    Ok(conn)
}

pub(crate) fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    let context = || format!("cannot open `{}`", path.display());
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| sql_error(e, context()))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| sql_error(e, context()))?;
    Ok(conn)
}

fn definite(message: String) -> StoreError {
    StoreError::Definite { message, source: None }
}

/// Busy and locked databases clear up by themselves; anything else will not.
pub(crate) fn sql_error(err: rusqlite::Error, message: String) -> StoreError {
    let transient = matches!(
        err.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    );
    let source = Some(Box::new(err) as Box<dyn std::error::Error + Send + Sync>);
    if transient {
        StoreError::Unavailable { message, source }
    } else {
        StoreError::Definite { message, source }
    }
}

fn now_iso() -> String {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    time::format_timestamp(micros, 3)
}

// ---- values ----------------------------------------------------------------

/// A value bound as a statement parameter, stored as the module doc describes.
struct Param<'a>(&'a Value);

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Bool(b) => ToSqlOutput::Owned(SqlValue::Integer(i64::from(*b))),
            Value::Int(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
            Value::UInt(u) => match i64::try_from(*u) {
                Ok(i) => ToSqlOutput::Owned(SqlValue::Integer(i)),
                Err(_) => ToSqlOutput::Owned(SqlValue::Text(u.to_string())),
            },
            // SQLite stores a bound NaN as NULL; as text it survives (REAL affinity
            // keeps text that is not a number).
            Value::Float(f) if f.is_nan() => ToSqlOutput::Borrowed(ValueRef::Text(b"NaN")),
            Value::Float(f) => ToSqlOutput::Owned(SqlValue::Real(*f)),
            Value::Decimal(d) => ToSqlOutput::Owned(SqlValue::Text(d.to_string())),
            Value::Str(s) | Value::Json(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Value::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Value::Timestamp(t) => ToSqlOutput::Owned(SqlValue::Text(format_timestamp(*t))),
            Value::Date(d) => ToSqlOutput::Owned(SqlValue::Text(time::format_date(i64::from(*d)))),
            Value::Time(t) => ToSqlOutput::Owned(SqlValue::Text(time::format_time(*t))),
        })
    }
}

/// ISO-8601 UTC with as few fractional digits as keep the value exact.
fn format_timestamp(micros: i64) -> String {
    let digits = if micros % 1000 != 0 {
        6
    } else if micros % 1_000_000 != 0 {
        3
    } else {
        0
    };
    time::format_timestamp(micros, digits)
}

fn text(t: &[u8]) -> Box<str> {
    match std::str::from_utf8(t) {
        Ok(s) => s.into(),
        Err(_) => String::from_utf8_lossy(t).into(),
    }
}

/// A value as SQLite holds it, without a declared type to read it by.
fn stored_value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Float(f),
        ValueRef::Text(t) => Value::Str(text(t)),
        ValueRef::Blob(b) => Value::Bytes(b.into()),
    }
}

/// Reads a stored value by its column's declared type. A value the type cannot read
/// (a column whose declared type changed since it was written) comes back as stored
/// rather than failing the recovery.
fn column_value(ty: ColumnType, v: ValueRef<'_>) -> Value {
    typed_value(ty, v).unwrap_or_else(|| stored_value(v))
}

fn typed_value(ty: ColumnType, v: ValueRef<'_>) -> Option<Value> {
    let s = || match v {
        ValueRef::Text(t) => std::str::from_utf8(t).ok(),
        _ => None,
    };
    Some(match (ty, v) {
        (_, ValueRef::Null) => Value::Null,
        (ColumnType::Bool, ValueRef::Integer(i)) => Value::Bool(i != 0),
        (ColumnType::Int, ValueRef::Integer(i)) => Value::Int(i),
        (ColumnType::UInt, ValueRef::Integer(i)) => Value::UInt(u64::try_from(i).ok()?),
        (ColumnType::UInt, ValueRef::Text(_)) => Value::UInt(s()?.parse().ok()?),
        (ColumnType::Float, ValueRef::Real(f)) => Value::Float(f),
        (ColumnType::Float, ValueRef::Integer(i)) => Value::Float(i as f64),
        (ColumnType::Float, ValueRef::Text(b"NaN")) => Value::Float(f64::NAN),
        (ColumnType::Decimal, ValueRef::Text(_)) => {
            Value::Decimal(Decimal::from_str_exact(s()?).ok()?)
        }
        (ColumnType::String, ValueRef::Text(t)) => Value::Str(text(t)),
        (ColumnType::Json, ValueRef::Text(t)) => Value::Json(text(t)),
        (ColumnType::Bytes, ValueRef::Blob(b)) => Value::Bytes(b.into()),
        (
            ColumnType::TimestampMillis | ColumnType::TimestampMicros | ColumnType::TimestampZoned,
            ValueRef::Text(_),
        ) => Value::Timestamp(time::parse_timestamp(s()?)?),
        (ColumnType::Date, ValueRef::Text(_)) => {
            Value::Date(i32::try_from(time::parse_date(s()?)?).ok()?)
        }
        (ColumnType::Time, ValueRef::Text(_)) => Value::Time(time::parse_time(s()?)?),
        _ => return None,
    })
}

/// The group values as a JSON array: the gold row's identity within its window.
/// Numbers are rendered as normalized decimals, so that groups equal as [`Value`]s
/// (`2`, `2u`, `2.00`) map to the same row, as they do in processing.
pub(crate) fn group_key(values: &[Value]) -> String {
    let mut out = String::with_capacity(2 + 16 * values.len());
    out.push('[');
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Int(_) | Value::UInt(_) | Value::Decimal(_) => {
                let _ = write!(out, "{}", v.to_decimal().unwrap_or_default().normalize());
            }
            Value::Float(f) => match Decimal::try_from(*f) {
                Ok(d) => {
                    let _ = write!(out, "{}", d.normalize());
                }
                Err(_) => push_json_str(&mut out, &f.to_string()),
            },
            other => push_json_str(&mut out, &other.to_string()),
        }
    }
    out.push(']');
    out
}

fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < ' ' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---- schema -----------------------------------------------------------------

fn create_schema(conn: &mut Connection, plan: &Plan) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| sql_error(e, "begin schema transaction".to_owned()))?;
    tx.execute_batch(QUARANTINE_SCHEMA)
        .map_err(|e| sql_error(e, "create `quarantine` and `caudal_checkpoint`".to_owned()))?;
    for t in &plan.silver {
        ensure_table(&tx, &t.table, &t.create, &t.columns, &t.key)?;
    }
    let gold_key = ["window_start".to_owned(), "group_key".to_owned()];
    for g in &plan.gold {
        ensure_table(&tx, &g.table, &g.create, &g.columns, &gold_key)?;
    }
    tx.commit().map_err(|e| sql_error(e, "commit schema".to_owned()))
}

/// Creates `table`, or adds the columns it lacks. A different primary key cannot be
/// evolved in place (the upserts would not match it), so it is an error.
fn ensure_table(
    conn: &Connection,
    table: &str,
    create: &str,
    columns: &[(String, &'static str)],
    key: &[String],
) -> Result<(), StoreError> {
    conn.execute(create, []).map_err(|e| sql_error(e, format!("create `{table}`")))?;
    let context = || format!("read the columns of `{table}`");
    let mut stmt = conn
        .prepare(r#"SELECT "name", "pk" FROM pragma_table_info(?1)"#)
        .map_err(|e| sql_error(e, context()))?;
    let existing = stmt
        .query_map([table], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .map_err(|e| sql_error(e, context()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| sql_error(e, context()))?;
    let mut pk: Vec<&(String, i64)> = existing.iter().filter(|(_, pk)| *pk > 0).collect();
    pk.sort_by_key(|(_, pk)| *pk);
    let same_key = pk.len() == key.len()
        && pk.iter().zip(key).all(|((name, _), k)| name.eq_ignore_ascii_case(k));
    if !same_key {
        let stored = pk.iter().map(|(n, _)| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        let declared = key.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        return Err(definite(format!(
            "`{table}` has primary key ({stored}) but the pipeline declares ({declared}); \
             rename or drop the table to change its key"
        )));
    }
    for (name, decl) in columns {
        if existing.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            continue;
        }
        let sql = format!("ALTER TABLE {} ADD COLUMN {}", ident(table), column_def(name, decl));
        conn.execute(&sql, [])
            .map_err(|e| sql_error(e, format!("add column `{name}` to `{table}`")))?;
        tracing::info!(table, column = %name, "added a newly declared column");
    }
    Ok(())
}

// ---- learned columns ----------------------------------------------------------

/// The columns one silver table learned from `_extra`. They have no declared type
/// (no affinity): each value is stored as what it is, see [`extra_value`].
struct Learned {
    columns: ExtraColumns<()>,
    /// The upsert including the learned columns; `None` while there are none (the
    /// plan's upsert is the same).
    upsert: Option<String>,
}

impl Learned {
    fn upsert<'a>(&'a self, t: &'a SilverTable) -> &'a str {
        self.upsert.as_deref().unwrap_or(&t.upsert)
    }

    fn rebuild(&mut self, t: &SilverTable) {
        let learned = self.columns.columns();
        self.upsert = (!learned.is_empty()).then(|| {
            let names = t.columns.iter().map(|(n, _)| n.as_str());
            upsert_sql(
                &ident(&t.table),
                names.chain(learned.iter().map(|(n, _)| n.as_str())),
                &t.key,
            )
        });
    }
}

/// Reads the learned columns of every silver table: the columns neither declared
/// nor bookkeeping, without a declared type (as this sink adds them). Any other
/// column only reserves its name.
fn read_learned(conn: &Connection, plan: &Plan) -> Result<Vec<Learned>, StoreError> {
    let mut out = Vec::with_capacity(plan.silver.len());
    for t in &plan.silver {
        let context = || format!("read the columns of `{}`", t.table);
        let mut stmt = conn
            .prepare_cached(r#"SELECT "name", "type" FROM pragma_table_info(?1) ORDER BY "cid""#)
            .map_err(|e| sql_error(e, context()))?;
        let existing = stmt
            .query_map([&t.table], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| sql_error(e, context()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| sql_error(e, context()))?;
        let mut columns = ExtraColumns::new(t.columns.iter().map(|(n, _)| n.as_str()), MAX_COLUMNS);
        for (name, decl) in existing {
            let planned = t.columns.iter().any(|(n, _)| n.eq_ignore_ascii_case(&name));
            if planned {
                continue;
            }
            if decl.is_empty() && columns.admits(&name) {
                columns.add(name, ());
            } else {
                columns.take(&name);
            }
        }
        let mut learned = Learned { columns, upsert: None };
        learned.rebuild(t);
        out.push(learned);
    }
    Ok(out)
}

/// Adds a column for every key of the commit's `_extra` objects that may become
/// one (see [`ExtraColumns::admits`]), in the commit's transaction.
fn learn_columns(
    conn: &Connection,
    plan: &Plan,
    learned: &mut [Learned],
    changes: &[SilverChange],
) -> Result<(), StoreError> {
    for change in changes {
        let Some(text) = change.row.as_ref().and_then(|r| r.extra.as_deref()) else { continue };
        let (Some(t), Some(l)) = (plan.silver.get(change.table), learned.get_mut(change.table))
        else {
            continue;
        };
        let Some(entries) = extra::parse(text) else { continue };
        let mut added = false;
        for e in entries {
            if l.columns.position(&e.key).is_some() || !l.columns.admits(&e.key) {
                continue;
            }
            let sql = format!("ALTER TABLE {} ADD COLUMN {}", ident(&t.table), ident(&e.key));
            conn.execute(&sql, [])
                .map_err(|e2| sql_error(e2, format!("add column `{}` to `{}`", e.key, t.table)))?;
            tracing::info!(table = %t.table, column = %e.key, "added a column the source added");
            l.columns.add(e.key, ());
            added = true;
        }
        if added {
            l.rebuild(t);
        }
    }
    Ok(())
}

/// What an undeclared value is stored as: an integer as INTEGER and a float as
/// REAL only when they read back as the same text, anything else as its exact text
/// (a number beyond `i64`, `1.50`, a string, an array or object as JSON). Booleans
/// are 1 and 0, as SQLite has no boolean.
fn extra_value(_: &(), v: &Json<'_>) -> Option<SqlValue> {
    Some(match v {
        Json::Null => SqlValue::Null,
        Json::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Json::Integer(t) => {
            extra::exact_i64(t).map_or_else(|| SqlValue::Text((*t).to_owned()), SqlValue::Integer)
        }
        Json::Number(t) => {
            extra::exact_f64(t).map_or_else(|| SqlValue::Text((*t).to_owned()), SqlValue::Real)
        }
        Json::Text(s) => SqlValue::Text(s.clone()),
        Json::Nested(raw) => SqlValue::Text((*raw).to_owned()),
    })
}

// ---- write ------------------------------------------------------------------

fn write(
    conn: &mut Connection,
    plan: &Plan,
    learned: &mut Option<Vec<Learned>>,
    commit: &Commit,
) -> Result<Ack, StoreError> {
    let now = now_iso();
    // IMMEDIATE takes the write lock up front, so a concurrent writer makes this
    // wait (busy_timeout) rather than fail halfway through the commit.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| sql_error(e, "begin commit transaction".to_owned()))?;
    if learned.is_none() {
        *learned = Some(read_learned(&tx, plan)?);
    }
    let learned = learned.as_mut().ok_or_else(|| definite("no learned columns".to_owned()))?;
    learn_columns(&tx, plan, learned, &commit.silver)?;
    write_silver(&tx, plan, learned, &commit.silver, &now)?;
    if commit.gold_reset {
        for g in &plan.gold {
            tx.execute(&g.clear, []).map_err(|e| sql_error(e, format!("clear `{}`", g.table)))?;
        }
    }
    write_gold(&tx, plan, &commit.gold, &now)?;
    write_quarantine(&tx, &commit.quarantine, &now)?;
    let event_count = i64::try_from(commit.event_count).unwrap_or(i64::MAX);
    tx.prepare_cached(CHECKPOINT_UPSERT)
        .and_then(|mut s| {
            s.execute(rusqlite::params![
                plan.pipeline,
                &commit.checkpoint.0,
                &commit.state,
                event_count,
                now
            ])
        })
        .map_err(|e| sql_error(e, "upsert into `caudal_checkpoint`".to_owned()))?;
    tx.commit().map_err(|e| sql_error(e, "commit".to_owned()))?;
    Ok(Ack { checkpoint: commit.checkpoint.clone(), event_count: commit.event_count })
}

/// The statement in `slot`, prepared (from the connection's cache) on first use.
fn statement<'s, 'c>(
    conn: &'c Connection,
    slot: &'s mut Option<CachedStatement<'c>>,
    sql: &str,
    what: impl FnOnce() -> String,
) -> Result<&'s mut CachedStatement<'c>, StoreError> {
    if slot.is_none() {
        *slot = Some(conn.prepare_cached(sql).map_err(|e| sql_error(e, what()))?);
    }
    slot.as_mut().ok_or_else(|| definite("statement cache slot is empty".to_owned()))
}

fn write_silver(
    conn: &Connection,
    plan: &Plan,
    learned: &[Learned],
    changes: &[SilverChange],
    now: &str,
) -> Result<(), StoreError> {
    // One statement of each kind per table for the whole commit: the hot path only
    // binds and steps.
    let mut upserts: Vec<Option<CachedStatement<'_>>> = plan.silver.iter().map(|_| None).collect();
    let mut deletes: Vec<Option<CachedStatement<'_>>> = plan.silver.iter().map(|_| None).collect();
    for change in changes {
        let (Some(t), Some(l)) = (plan.silver.get(change.table), learned.get(change.table)) else {
            return Err(definite(format!("silver change of unknown table id {}", change.table)));
        };
        match &change.row {
            Some(row) => {
                if row.values.len() != t.types.len() {
                    return Err(definite(format!(
                        "a row for `{}` has {} values but the table declares {} columns",
                        t.table,
                        row.values.len(),
                        t.types.len()
                    )));
                }
                let stmt = statement(conn, &mut upserts[change.table], l.upsert(t), || {
                    format!("prepare upsert into `{}`", t.table)
                })?;
                let split = extra::split(row.extra.as_deref(), &l.columns, extra_value);
                bind_silver_row(stmt, row, &split, now)
                    .and_then(|()| stmt.raw_execute())
                    .map_err(|e| sql_error(e, format!("upsert into `{}`", t.table)))?;
            }
            None => {
                let stmt = statement(conn, &mut deletes[change.table], &t.delete, || {
                    format!("prepare delete from `{}`", t.table)
                })?;
                let bound = match &change.key {
                    Key::Int(i) if t.key_len == 1 => stmt.raw_bind_parameter(1, *i).map(|()| 1),
                    Key::Int(_) => Ok(1),
                    Key::Values(vals) => vals
                        .iter()
                        .enumerate()
                        .try_for_each(|(i, v)| stmt.raw_bind_parameter(i + 1, Param(v)))
                        .map(|()| vals.len()),
                };
                let bound =
                    bound.map_err(|e| sql_error(e, format!("delete from `{}`", t.table)))?;
                if bound != t.key_len {
                    return Err(definite(format!(
                        "a delete from `{}` has a key of {bound} values, the table's has {}",
                        t.table, t.key_len
                    )));
                }
                stmt.raw_execute()
                    .map_err(|e| sql_error(e, format!("delete from `{}`", t.table)))?;
            }
        }
    }
    Ok(())
}

fn bind_silver_row(
    stmt: &mut CachedStatement<'_>,
    row: &SilverRow,
    split: &extra::Split<'_, SqlValue>,
    now: &str,
) -> rusqlite::Result<()> {
    for (i, v) in row.values.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, Param(v))?;
    }
    let n = row.values.len();
    stmt.raw_bind_parameter(n + 1, row.flags.as_deref())?;
    stmt.raw_bind_parameter(n + 2, split.rest.as_deref())?;
    stmt.raw_bind_parameter(n + 3, row.position.as_deref())?;
    stmt.raw_bind_parameter(n + 4, row.source_ts_ms)?;
    stmt.raw_bind_parameter(n + 5, now)?;
    for (i, v) in split.values.iter().enumerate() {
        stmt.raw_bind_parameter(n + 6 + i, v)?;
    }
    Ok(())
}

fn write_gold(
    conn: &Connection,
    plan: &Plan,
    changes: &[GoldChange],
    now: &str,
) -> Result<(), StoreError> {
    let mut upserts: Vec<Option<CachedStatement<'_>>> = plan.gold.iter().map(|_| None).collect();
    let mut deletes: Vec<Option<CachedStatement<'_>>> = plan.gold.iter().map(|_| None).collect();
    for change in changes {
        let g = plan
            .gold
            .get(change.gold)
            .ok_or_else(|| definite(format!("gold change of unknown gold rule {}", change.gold)))?;
        if change.group.len() != g.groups {
            return Err(definite(format!(
                "a row for `{}` has {} group values, the rule has {}",
                g.table,
                change.group.len(),
                g.groups
            )));
        }
        let start = time::format_timestamp(change.window_start, 0);
        let key = group_key(&change.group);
        match &change.measures {
            Some(measures) => {
                if measures.len() != g.measures {
                    return Err(definite(format!(
                        "a row for `{}` has {} measure values, the table has {} measure columns",
                        g.table,
                        measures.len(),
                        g.measures
                    )));
                }
                let end =
                    time::format_timestamp(change.window_start.saturating_add(g.window_micros), 0);
                let stmt = statement(conn, &mut upserts[change.gold], &g.upsert, || {
                    format!("prepare upsert into `{}`", g.table)
                })?;
                let bind = |stmt: &mut CachedStatement<'_>| -> rusqlite::Result<()> {
                    stmt.raw_bind_parameter(1, &start)?;
                    stmt.raw_bind_parameter(2, &end)?;
                    stmt.raw_bind_parameter(3, &key)?;
                    let mut i = 4;
                    for v in change.group.iter().chain(measures.iter()) {
                        stmt.raw_bind_parameter(i, Param(v))?;
                        i += 1;
                    }
                    stmt.raw_bind_parameter(i, now)
                };
                bind(stmt)
                    .and_then(|()| stmt.raw_execute())
                    .map_err(|e| sql_error(e, format!("upsert into `{}`", g.table)))?;
            }
            None => {
                let stmt = statement(conn, &mut deletes[change.gold], &g.delete, || {
                    format!("prepare delete from `{}`", g.table)
                })?;
                stmt.raw_bind_parameter(1, &start)
                    .and_then(|()| stmt.raw_bind_parameter(2, &key))
                    .and_then(|()| stmt.raw_execute())
                    .map_err(|e| sql_error(e, format!("delete from `{}`", g.table)))?;
            }
        }
    }
    Ok(())
}

fn write_quarantine(conn: &Connection, ops: &[QuarantineOp], now: &str) -> Result<(), StoreError> {
    for op in ops {
        match op {
            QuarantineOp::Open(r) => open_quarantine(conn, r, now)?,
            QuarantineOp::Resolve { table, key } => {
                conn.prepare_cached(QUARANTINE_RESOLVE)
                    .and_then(|mut s| s.execute(rusqlite::params![table, key, now]))
                    .map_err(|e| sql_error(e, "resolve in `quarantine`".to_owned()))?;
            }
        }
    }
    Ok(())
}

/// Opens a record without ever duplicating one, so that replayed commits leave the
/// table as it was:
/// 1. a row (table and key known) has at most one open record: a newer failure
///    refreshes it in place;
/// 2. otherwise, a record of the same input that exists already is the same
///    quarantine applied again: it is reopened if it was resolved (a replay resolves
///    it again if it should be), left alone if open;
/// 3. otherwise the record is inserted.
fn open_quarantine(conn: &Connection, r: &QuarantineRecord, now: &str) -> Result<(), StoreError> {
    // Origins are line or sequence numbers; one beyond i64 is not a real input.
    let origin = i64::try_from(r.origin).unwrap_or(i64::MAX);
    let params = rusqlite::params![
        r.table,
        r.key,
        r.stage.code(),
        &*r.reason,
        r.detail,
        r.position,
        origin,
        r.payload,
        now
    ];
    let context = || "insert into `quarantine`".to_owned();
    if r.table.is_some() && r.key.is_some() {
        let refreshed = conn
            .prepare_cached(QUARANTINE_REFRESH)
            .and_then(|mut s| s.execute(&params[..8]))
            .map_err(|e| sql_error(e, "update `quarantine`".to_owned()))?;
        if refreshed > 0 {
            return Ok(());
        }
    }
    let same = conn
        .prepare_cached(QUARANTINE_SAME)
        .and_then(|mut s| {
            s.query_row(&params[..8], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, bool>(1)?)))
        })
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(|e| sql_error(e, "select from `quarantine`".to_owned()))?;
    match same {
        Some((_, false)) => Ok(()),
        Some((id, true)) => conn
            .prepare_cached(QUARANTINE_REOPEN)
            .and_then(|mut s| s.execute([id]))
            .map(drop)
            .map_err(|e| sql_error(e, "reopen in `quarantine`".to_owned())),
        None => conn
            .prepare_cached(QUARANTINE_INSERT)
            .and_then(|mut s| s.execute(params))
            .map(drop)
            .map_err(|e| sql_error(e, context())),
    }
}

// ---- recover ----------------------------------------------------------------

fn recover(
    conn: &mut Connection,
    plan: &Plan,
    tables: &[TableId],
) -> Result<Recovered, StoreError> {
    // One read transaction: the checkpoint, rows and quarantine are one snapshot.
    let tx = conn.transaction().map_err(|e| sql_error(e, "begin recovery".to_owned()))?;
    let saved = tx
        .query_row(CHECKPOINT_READ, [&plan.pipeline], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })
        .map_err(|e| sql_error(e, "select from `caudal_checkpoint`".to_owned()))?;
    let (checkpoint, state) = match saved {
        Some((c, s)) => (Some(Checkpoint(c)), Some(s)),
        None => (None, None),
    };
    let mut rows = Vec::new();
    for &id in tables {
        let t = plan
            .silver
            .get(id)
            .ok_or_else(|| definite(format!("recovery of unknown table id {id}")))?;
        read_silver(&tx, t, id, &mut rows)
            .map_err(|e| sql_error(e, format!("select from `{}`", t.table)))?;
    }
    let open_quarantine = read_open_quarantine(&tx)?;
    Ok(Recovered { checkpoint, state, rows, open_quarantine, partitions: Vec::new() })
}

fn read_silver(
    conn: &Connection,
    t: &SilverTable,
    id: TableId,
    out: &mut Vec<(TableId, Row)>,
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(&t.select)?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let mut values = Vec::with_capacity(t.types.len());
        for (i, ty) in t.types.iter().enumerate() {
            values.push(column_value(*ty, r.get_ref(i)?));
        }
        out.push((id, values.into_boxed_slice()));
    }
    Ok(())
}

fn read_open_quarantine(conn: &Connection) -> Result<Vec<QuarantineRecord>, StoreError> {
    let context = || "select from `quarantine`".to_owned();
    let mut stmt = conn.prepare(QUARANTINE_OPEN).map_err(|e| sql_error(e, context()))?;
    let mut rows = stmt.query([]).map_err(|e| sql_error(e, context()))?;
    // Thousands of records share a handful of reasons.
    let mut reasons: HashMap<String, Arc<str>> = HashMap::new();
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(|e| sql_error(e, context()))? {
        let read = || -> rusqlite::Result<_> {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Option<i64>>(7)?,
                r.get::<_, Option<String>>(8)?,
            ))
        };
        let row = read().map_err(|e| sql_error(e, context()))?;
        out.push(super::quarantine_record(row, &mut reasons)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::event::output::Stage;
    use std::str::FromStr;

    use super::*;

    fn erp() -> Arc<PipelineSpec> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/erp.toml");
        Arc::new(crate::config::load(&path).expect("erp.toml loads"))
    }

    fn spec(text: &str) -> Arc<PipelineSpec> {
        Arc::new(crate::config::parse(Path::new("t.toml"), text).expect("test spec parses"))
    }

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

    async fn sink(dir: &tempfile::TempDir, spec: &Arc<PipelineSpec>) -> SqliteSink {
        let mut s = SqliteSink::open(&dir.path().join("c.db"), Arc::clone(spec)).expect("opens");
        s.healthcheck().await.expect("healthcheck");
        s
    }

    fn dec(s: &str) -> Value {
        Value::Decimal(Decimal::from_str_exact(s).expect("decimal literal"))
    }

    fn text(s: &str) -> Value {
        Value::Str(s.into())
    }

    fn upsert(table: TableId, key_cols: &[usize], values: Vec<Value>) -> SilverChange {
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

    fn delete(table: TableId, key: Key) -> SilverChange {
        SilverChange { table, key, row: None }
    }

    fn commit(n: u64) -> Commit {
        Commit {
            checkpoint: Checkpoint(format!(r#"{{"offset":{n}}}"#)),
            state: format!(r#"{{"n":{n}}}"#),
            event_count: n,
            ..Commit::default()
        }
    }

    /// Recovered rows of one table, sorted by their debug rendering (which shows
    /// the variant and the decimal scale, so equality below is exact).
    fn sorted(rows: &[(TableId, Row)], table: TableId) -> Vec<String> {
        let mut out: Vec<String> =
            rows.iter().filter(|(t, _)| *t == table).map(|(_, r)| format!("{r:?}")).collect();
        out.sort();
        out
    }

    fn micros(iso: &str) -> i64 {
        time::parse_timestamp(iso).expect("timestamp literal")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn every_value_type_round_trips() {
        let spec = spec(TYPES);
        let dir = tempfile::tempdir().unwrap();
        let mut s = sink(&dir, &spec).await;
        let full = vec![
            Value::Int(1),
            Value::Bool(true),
            Value::Int(i64::MIN),
            Value::UInt(u64::MAX),
            Value::Float(-2.25e-300),
            dec("-0.0050"),
            text("héllo 😀 \"q\""),
            Value::Bytes(vec![0, 255, 10, 0].into()),
            Value::Json(r#"{"a":[1,2.50,null]}"#.into()),
            Value::Timestamp(micros("2026-01-05T08:10:00.123Z")),
            Value::Timestamp(micros("2026-01-05T08:10:00.123456Z")),
            Value::Timestamp(micros("2026-01-05T08:10:00Z")),
            Value::Date(20_458),
            Value::Time(-1_500_000),
        ];
        let empty = vec![
            Value::Int(2),
            Value::Bool(false),
            Value::Null,
            Value::UInt(0),
            Value::Float(f64::NAN),
            dec("12.50"),
            text(""),
            Value::Bytes(Vec::new().into()),
            Value::Null,
            Value::Null,
            Value::Timestamp(micros("1969-12-31T23:59:59.999999Z")),
            Value::Null,
            Value::Date(-1),
            Value::Time(838 * 3_600_000_000 + 59 * 60_000_000 + 59_000_000),
        ];
        let edges = vec![
            Value::Int(3),
            Value::Null,
            Value::Int(i64::MAX),
            Value::UInt(i64::MAX as u64 + 1),
            Value::Float(f64::INFINITY),
            dec("79228162514264337593543950335"),
            Value::Null,
            Value::Null,
            Value::Json("[]".into()),
            Value::Timestamp(0),
            Value::Timestamp(-1),
            Value::Timestamp(micros("9999-12-31T23:59:59.999Z")),
            Value::Date(0),
            Value::Time(0),
        ];
        let pair = vec![text("a\"b"), dec("-1.10"), text("x")];
        let mut c = commit(1);
        for row in [&full, &empty, &edges] {
            c.silver.push(upsert(0, &[0], row.clone()));
        }
        c.silver.push(upsert(1, &[0, 1], pair.clone()));
        s.write(Arc::new(c)).await.unwrap();

        let got = s.recover(&[0, 1]).await.unwrap();
        let want: Vec<String> = {
            let mut w: Vec<String> =
                [&full, &empty, &edges].iter().map(|r| format!("{:?}", r.as_slice())).collect();
            w.sort();
            w
        };
        assert_eq!(sorted(&got.rows, 0), want);
        assert_eq!(sorted(&got.rows, 1), vec![format!("{:?}", pair.into_boxed_slice())]);

        // The storage classes are the documented ones: exact text, not REALs.
        let conn = Connection::open(dir.path().join("c.db")).unwrap();
        let types: (String, String, String, String, String) = conn
            .query_row(
                r#"SELECT typeof("u"), typeof("d"), "d", typeof("by"), "tus" FROM "silver_all" WHERE "id" = 1"#,
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .unwrap();
        assert_eq!(
            types,
            (
                "text".into(),
                "text".into(),
                "-0.0050".into(),
                "blob".into(),
                "2026-01-05T08:10:00.123456Z".into()
            )
        );
        let small: (String, i64) = conn
            .query_row(r#"SELECT typeof("u"), "u" FROM "silver_all" WHERE "id" = 2"#, [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(small, ("integer".into(), 0));
        let ts: String = conn
            .query_row(r#"SELECT "ts" FROM "silver_all" WHERE "id" = 1"#, [], |r| r.get(0))
            .unwrap();
        assert_eq!(ts, "2026-01-05T08:10:00.123Z");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn deletes_remove_rows_by_single_and_composite_keys() {
        let spec = spec(TYPES);
        let dir = tempfile::tempdir().unwrap();
        let mut s = sink(&dir, &spec).await;
        let nulls = |id: i64| {
            let mut v = vec![Value::Null; 14];
            v[0] = Value::Int(id);
            v
        };
        let mut c = commit(1);
        for id in 1..=3 {
            c.silver.push(upsert(0, &[0], nulls(id)));
        }
        c.silver.push(upsert(1, &[0, 1], vec![text("a"), dec("1.50"), text("x")]));
        c.silver.push(upsert(1, &[0, 1], vec![text("a"), dec("2"), text("y")]));
        s.write(Arc::new(c)).await.unwrap();

        let mut c = commit(2);
        c.silver.push(delete(0, Key::Int(2)));
        c.silver.push(delete(1, Key::Values(vec![text("a"), dec("1.50")].into())));
        // Deleting a row that does not exist is not an error.
        c.silver.push(delete(0, Key::Int(99)));
        s.write(Arc::new(c)).await.unwrap();

        let got = s.recover(&[0, 1]).await.unwrap();
        let ids: Vec<String> = sorted(&got.rows, 0);
        assert_eq!(ids.len(), 2);
        assert!(ids.iter().all(|r| !r.starts_with("[Int(2),")));
        assert_eq!(sorted(&got.rows, 1), vec![r#"[Str("a"), Decimal(2), Str("y")]"#.to_owned()]);
    }

    fn gold_row(start: &str, group: [Value; 2], measures: Option<[Value; 4]>) -> GoldChange {
        GoldChange {
            gold: 0,
            window_start: micros(start),
            group: group.into(),
            measures: measures.map(|m| m.into()),
            partition: None,
            avg_parts: [].into(),
        }
    }

    fn measures(lines: i64, revenue: &str) -> Option<[Value; 4]> {
        Some([Value::Int(lines), Value::Int(lines * 2), dec(revenue), Value::Float(0.5)])
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn gold_upserts_deletes_resets_and_reads_in_order() {
        let spec = erp();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let mut s = sink(&dir, &spec).await;
        let mut c = commit(1);
        c.gold.push(gold_row(
            "2026-01-05T08:10:00Z",
            [text("web"), text("toys")],
            measures(1, "1.00"),
        ));
        c.gold.push(gold_row(
            "2026-01-05T08:00:00Z",
            [text("web"), text("toys")],
            measures(2, "2.50"),
        ));
        c.gold.push(gold_row(
            "2026-01-05T08:00:00Z",
            [text("store"), Value::Null],
            measures(3, "3"),
        ));
        c.gold.push(gold_row(
            "2026-01-05T08:00:00Z",
            [text("app"), text("books")],
            measures(4, "4"),
        ));
        s.write(Arc::new(c)).await.unwrap();

        // Upserts replace: the NULL group and a changed value stay one row each.
        let mut c = commit(2);
        c.gold.push(gold_row(
            "2026-01-05T08:00:00Z",
            [text("store"), Value::Null],
            measures(5, "5.10"),
        ));
        c.gold.push(gold_row("2026-01-05T08:00:00Z", [text("app"), text("books")], None));
        s.write(Arc::new(c)).await.unwrap();

        let rows = read_gold(&path, &spec, 0).unwrap();
        let rendered: Vec<String> = rows
            .iter()
            .map(|(w, g, m)| format!("{} {g:?} {m:?}", time::format_timestamp(*w, 0)))
            .collect();
        assert_eq!(
            rendered,
            vec![
                r#"2026-01-05T08:00:00Z [Str("store"), Null] [Int(5), Int(10), Str("5.10")]"#,
                r#"2026-01-05T08:00:00Z [Str("web"), Str("toys")] [Int(2), Int(4), Str("2.50")]"#,
                r#"2026-01-05T08:10:00Z [Str("web"), Str("toys")] [Int(1), Int(2), Str("1.00")]"#,
            ]
        );
        let conn = Connection::open(&path).unwrap();
        let (end, key, trend): (String, String, f64) = conn
            .query_row(
                r#"SELECT "window_end", "group_key", "revenue_trend" FROM "gold_sales_10m"
                   WHERE "window_start" = '2026-01-05T08:10:00Z'"#,
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(
            (end.as_str(), key.as_str(), trend),
            ("2026-01-05T08:20:00Z", r#"["web","toys"]"#, 0.5)
        );

        // A reset replaces every gold row with the commit's.
        let mut c = commit(3);
        c.gold_reset = true;
        c.gold.push(gold_row(
            "2026-01-05T09:00:00Z",
            [text("web"), text("toys")],
            measures(7, "7"),
        ));
        s.write(Arc::new(c)).await.unwrap();
        let rows = read_gold(&path, &spec, 0).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0, micros("2026-01-05T09:00:00Z"));

        // A malformed change fails the whole commit and leaves the previous one.
        let mut c = commit(4);
        c.gold_reset = true;
        c.gold.push(GoldChange {
            gold: 0,
            window_start: 0,
            group: [].into(),
            measures: None,
            partition: None,
            avg_parts: [].into(),
        });
        assert!(matches!(s.write(Arc::new(c)).await, Err(StoreError::Definite { .. })));
        assert_eq!(read_gold(&path, &spec, 0).unwrap().len(), 1);
        assert!(read_gold(&path, &spec, 5).is_err());
    }

    #[test]
    fn group_keys_follow_value_equality() {
        assert_eq!(group_key(&[Value::Int(2), Value::Null]), "[2,null]");
        assert_eq!(group_key(&[dec("2.00")]), group_key(&[Value::UInt(2)]));
        assert_eq!(group_key(&[text("a\"\n"), Value::Bool(true)]), r#"["a\"\n",true]"#);
        assert_ne!(group_key(&[Value::Null]), group_key(&[text("null")]));
    }

    fn record(table: Option<&str>, key: Option<&str>, reason: &str, origin: u64) -> QuarantineOp {
        QuarantineOp::Open(QuarantineRecord {
            table: table.map(str::to_owned),
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
    async fn quarantine_opens_resolves_and_summarizes() {
        let spec = erp();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let mut s = sink(&dir, &spec).await;
        let mut c = commit(1);
        c.quarantine.push(record(Some("order_items"), Some("1"), "unknown_product", 10));
        c.quarantine.push(record(Some("order_items"), Some("2"), "unknown_product", 11));
        c.quarantine.push(record(None, None, "malformed_json", 12));
        c.quarantine.push(record(Some("order_items"), Some("3"), "invalid_quantity", 13));
        c.quarantine.push(QuarantineOp::Resolve { table: "order_items".into(), key: "3".into() });
        s.write(Arc::new(c)).await.unwrap();
        let mut c = commit(2);
        c.quarantine.push(QuarantineOp::Resolve { table: "order_items".into(), key: "1".into() });
        // Resolving what is not open is a no-op.
        c.quarantine.push(QuarantineOp::Resolve { table: "order_items".into(), key: "77".into() });
        s.write(Arc::new(c)).await.unwrap();

        assert_eq!(
            read_quarantine_summary(&path).unwrap(),
            vec![("malformed_json".to_owned(), 1), ("unknown_product".to_owned(), 1)]
        );
        let got = s.recover(&[]).await.unwrap();
        assert!(got.rows.is_empty());
        let open: Vec<_> = got
            .open_quarantine
            .iter()
            .map(|r| (r.table.clone(), r.key.clone(), r.stage, r.reason.to_string(), r.origin))
            .collect();
        assert_eq!(
            open,
            vec![
                (
                    Some("order_items".into()),
                    Some("2".into()),
                    Stage::Enrich,
                    "unknown_product".into(),
                    11
                ),
                (None, None, Stage::Decode, "malformed_json".into(), 12),
            ]
        );
        assert_eq!(got.open_quarantine[0].payload, r#"{"line":11}"#);
        assert_eq!(got.open_quarantine[0].position.as_deref(), Some("bin.1:11:0"));

        // A resolved row quarantined again opens a new record.
        let mut c = commit(3);
        c.quarantine.push(record(Some("order_items"), Some("1"), "unknown_product", 20));
        s.write(Arc::new(c)).await.unwrap();
        assert_eq!(
            read_quarantine_summary(&path).unwrap(),
            vec![("malformed_json".to_owned(), 1), ("unknown_product".to_owned(), 2)]
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn checkpoint_and_state_survive_reopening() {
        let spec = erp();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let mut s = sink(&dir, &spec).await;
            let empty = s.recover(&[0]).await.unwrap();
            assert!(empty.checkpoint.is_none() && empty.state.is_none());
            s.write(Arc::new(commit(10))).await.unwrap();
            let ack = s.write(Arc::new(commit(5))).await.unwrap();
            assert_eq!((ack.checkpoint, ack.event_count), (commit(5).checkpoint, 5));
        }
        // Read-only readers open the file once the writer has closed it (and SQLite
        // has removed the WAL files).
        assert!(read_quarantine_summary(&path).unwrap().is_empty());
        let mut s = sink(&dir, &spec).await;
        let got = s.recover(&[0]).await.unwrap();
        assert_eq!(got.checkpoint, Some(commit(5).checkpoint));
        assert_eq!(got.state.as_deref(), Some(r#"{"n":5}"#));
        let conn = Connection::open(&path).unwrap();
        let (name, count): (String, i64) = conn
            .query_row(r#"SELECT "pipeline", "event_count" FROM "caudal_checkpoint""#, [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((name.as_str(), count), ("erp", 15));
    }

    /// Every table's content, without the columns that record when a row was written.
    fn dump(path: &Path, spec: &PipelineSpec) -> Vec<String> {
        let conn = Connection::open(path).unwrap();
        let mut out = Vec::new();
        let mut tables: Vec<(String, Vec<String>)> = Vec::new();
        for t in spec.catalog.tables() {
            let mut cols: Vec<String> = t.columns.iter().map(|c| ident(&c.name)).collect();
            cols.extend(
                ["\"_flags\"", "\"_extra\"", "\"_position\"", "\"_source_ts_ms\""]
                    .map(String::from),
            );
            tables.push((format!("silver_{}", t.name), cols));
        }
        for g in &spec.gold {
            let t = GoldTable::new(g).unwrap();
            let cols = t
                .columns
                .iter()
                .filter(|(n, _)| n != "updated_at")
                .map(|(n, _)| ident(n))
                .collect();
            tables.push((t.table, cols));
        }
        // Ids and states, not the times of writing.
        tables.push((
            "quarantine".into(),
            ["id", "table_name", "row_key", "stage", "reason", "detail", "position", "origin"]
                .map(ident)
                .into_iter()
                .chain(["\"payload\"".to_owned(), "\"resolved_at\" IS NULL".to_owned()])
                .collect(),
        ));
        tables.push((
            "caudal_checkpoint".into(),
            ["pipeline", "checkpoint", "state", "event_count"].map(ident).to_vec(),
        ));
        for (table, cols) in tables {
            let sql = format!("SELECT {} FROM {} ORDER BY 1, 2, 3", cols.join(", "), ident(&table));
            let mut stmt = conn.prepare(&sql).unwrap();
            let n = stmt.column_count();
            let mut rows = stmt.query([]).unwrap();
            while let Some(r) = rows.next().unwrap() {
                let vals: Vec<String> =
                    (0..n).map(|i| format!("{:?}", r.get_ref(i).unwrap())).collect();
                out.push(format!("{table}: {}", vals.join(" | ")));
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn applying_a_commit_twice_leaves_the_same_tables() {
        let spec = erp();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let mut s = sink(&dir, &spec).await;
        let orders = spec.catalog.id("orders").unwrap();
        let order = |id: i64, total: &str| {
            vec![
                Value::Int(id),
                Value::Int(7),
                Value::Int(3),
                text("web"),
                text("paid"),
                Value::Timestamp(micros("2026-01-05T08:01:02.5Z")),
                text("EUR"),
                dec(total),
                text("Lyon"),
            ]
        };
        let mut first = commit(1);
        first.silver.push(upsert(orders, &[0], order(1, "10.00")));
        first.silver.push(upsert(orders, &[0], order(2, "20.00")));
        s.write(Arc::new(first)).await.unwrap();

        let mut c = commit(2);
        c.silver.push(upsert(orders, &[0], order(1, "11.50")));
        c.silver.push(delete(orders, Key::Int(2)));
        c.gold_reset = true;
        c.gold.push(gold_row(
            "2026-01-05T08:00:00Z",
            [text("web"), Value::Null],
            measures(1, "11.50"),
        ));
        c.quarantine.push(record(Some("order_items"), Some("9"), "unknown_product", 4));
        c.quarantine.push(record(None, None, "malformed_json", 5));
        c.quarantine.push(record(Some("order_items"), Some("8"), "unknown_product", 6));
        c.quarantine.push(QuarantineOp::Resolve { table: "order_items".into(), key: "8".into() });
        s.write(Arc::new(c.clone())).await.unwrap();
        let once = dump(&path, &spec);
        s.write(Arc::new(c)).await.unwrap();
        let twice = dump(&path, &spec);
        assert_eq!(once, twice);
        assert!(once.iter().any(|l| l.starts_with("silver_orders: Integer(1)")));
        assert!(once
            .iter()
            .any(|l| l.starts_with("caudal_checkpoint:") && l.ends_with("Integer(3)")));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reopening_adds_newly_declared_columns() {
        let v1 = spec(
            r#"
[source]
type = "file"
path = "x.jsonl"
[tables.t]
key = ["id"]
columns = { id = "int", a = "string" }
"#,
        );
        let v2 = spec(
            r#"
[source]
type = "file"
path = "x.jsonl"
[tables.t]
key = ["id"]
columns = { id = "int", a = "string", b = "decimal" }
"#,
        );
        let rekeyed = spec(
            r#"
[source]
type = "file"
path = "x.jsonl"
[tables.t]
key = ["id", "a"]
columns = { id = "int", a = "string", b = "decimal" }
"#,
        );
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = sink(&dir, &v1).await;
            let mut c = commit(1);
            c.silver.push(upsert(0, &[0], vec![Value::Int(1), text("old")]));
            s.write(Arc::new(c)).await.unwrap();
        }
        let mut s = sink(&dir, &v2).await;
        let mut c = commit(2);
        c.silver.push(upsert(0, &[0], vec![Value::Int(2), text("new"), dec("0.10")]));
        s.write(Arc::new(c)).await.unwrap();
        let got = s.recover(&[0]).await.unwrap();
        assert_eq!(
            sorted(&got.rows, 0),
            vec![
                r#"[Int(1), Str("old"), Null]"#.to_owned(),
                r#"[Int(2), Str("new"), Decimal(0.10)]"#.to_owned()
            ]
        );
        // Healthcheck is idempotent.
        s.healthcheck().await.unwrap();
        drop(s);

        let mut s = SqliteSink::open(&dir.path().join("c.db"), rekeyed).unwrap();
        let err = s.healthcheck().await.unwrap_err();
        assert!(!err.is_transient());
        assert!(err.to_string().contains("primary key"), "{err}");
    }

    /// The values of `cols` per row of `silver_t`, each as `typeof:value`.
    fn silver_t(path: &Path, cols: &[&str]) -> Vec<String> {
        let conn = Connection::open(path).unwrap();
        let sel: Vec<String> = cols
            .iter()
            .map(|c| format!("typeof({0}) || ':' || coalesce({0}, ''), ", ident(c)))
            .collect();
        let sql = format!("SELECT {} '' FROM silver_t ORDER BY id", sel.concat());
        let mut stmt = conn.prepare(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let rows = stmt.query_map([], |r| {
            (0..cols.len()).map(|i| r.get::<_, String>(i)).collect::<Result<Vec<_>, _>>()
        });
        rows.unwrap().map(|r| r.unwrap().join(" ")).collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn undeclared_columns_become_columns_with_exact_values() {
        let spec = spec(
            r#"
[source]
type = "file"
path = "x.jsonl"
[tables.t]
key = ["id"]
columns = { id = "int", a = "string" }
"#,
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let row = |id: i64, extra: Option<&str>| {
            let mut c = upsert(0, &[0], vec![Value::Int(id), text("x")]);
            if let Some(r) = c.row.as_mut() {
                r.extra = extra.map(Into::into);
            }
            c
        };
        let mut s = sink(&dir, &spec).await;
        let mut c = commit(1);
        c.silver.push(row(
            1,
            Some(
                r#"{"n":7,"big":18446744073709551615,"f":0.1,"d":1.50,"s":"hé","b":true,"o":{"k":[1]},"z":null,"A":"clash","_x":1,"nul\u0000":2}"#,
            ),
        ));
        c.silver.push(row(2, None));
        s.write(Arc::new(c)).await.unwrap();
        let cols = ["id", "n", "big", "f", "d", "s", "b", "o", "z", "_extra"];
        assert_eq!(
            silver_t(&path, &cols),
            vec![
                r#"integer:1 integer:7 text:18446744073709551615 real:0.1 text:1.50 text:hé integer:1 text:{"k":[1]} null: text:{"A":"clash","_x":1,"nul\u0000":2}"#,
                "integer:2 null: null: null: null: null: null: null: null: null:",
            ],
            "kinds are kept, names that cannot be columns stay in `_extra`"
        );

        // A new version of a row without a key: its column is NULL (the row's image).
        let mut c = commit(2);
        c.silver.push(row(1, Some(r#"{"n":8}"#)));
        s.write(Arc::new(c)).await.unwrap();
        assert_eq!(
            silver_t(&path, &["id", "n", "big", "_extra"])[0],
            "integer:1 integer:8 null: null:"
        );

        // A failed commit rolls its ALTER back: the next one adds the column again.
        let mut c = commit(3);
        c.silver.push(row(3, Some(r#"{"q":1}"#)));
        c.silver.push(upsert(0, &[0], vec![Value::Int(4)]));
        assert!(s.write(Arc::new(c)).await.is_err());
        let mut c = commit(3);
        c.silver.push(row(3, Some(r#"{"q":1}"#)));
        s.write(Arc::new(c)).await.unwrap();
        drop(s);

        // Reopened, the sink reads its learned columns back from the table.
        let mut s = sink(&dir, &spec).await;
        let mut c = commit(4);
        c.silver.push(row(4, Some(r#"{"n":9,"q":2,"N":3,"new":"x"}"#)));
        s.write(Arc::new(c)).await.unwrap();
        assert_eq!(
            silver_t(&path, &["id", "n", "q", "new", "_extra"]),
            vec![
                "integer:1 integer:8 null: null: null:",
                "integer:2 null: null: null: null:",
                "integer:3 null: integer:1 null: null:",
                r#"integer:4 integer:9 integer:2 text:x text:{"N":3}"#,
            ]
        );
        // Recovery reads the declared columns only, as before.
        let got = s.recover(&[0]).await.unwrap();
        assert_eq!(sorted(&got.rows, 0)[0], r#"[Int(1), Str("x")]"#);
    }

    #[test]
    fn reserved_column_names_are_refused() {
        let s = spec(
            r#"
[source]
type = "file"
path = "x.jsonl"
[tables.t]
key = ["id"]
columns = { id = "int", _flags = "string" }
"#,
        );
        let dir = tempfile::tempdir().unwrap();
        let err = SqliteSink::open(&dir.path().join("c.db"), s).err().expect("refused");
        assert!(err.to_string().contains("`_flags`"), "{err}");
    }

    #[test]
    fn busy_errors_are_transient() {
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        assert!(sql_error(busy, "x".into()).is_transient());
        let other = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT),
            None,
        );
        assert!(!sql_error(other, "x".into()).is_transient());
    }

    /// Not a benchmark with assertions: prints the silver write rate of one large
    /// commit (run with `--release -- --nocapture` for meaningful numbers).
    #[tokio::test(flavor = "multi_thread")]
    async fn silver_throughput() {
        const ROWS: i64 = 200_000;
        let spec = erp();
        let dir = tempfile::tempdir().unwrap();
        let mut s = sink(&dir, &spec).await;
        let items = spec.catalog.id("order_items").unwrap();
        let make = |round: i64| {
            let mut c = commit(round as u64);
            c.silver = (1..=ROWS)
                .map(|id| {
                    upsert(
                        items,
                        &[0],
                        vec![
                            Value::Int(id),
                            Value::Int(id / 3),
                            Value::Int(id % 1000),
                            Value::Int(1 + id % 7 + round),
                            Value::Decimal(Decimal::new(1999 + id % 500, 2)),
                            Value::Decimal(Decimal::from_str("0.05").unwrap()),
                        ],
                    )
                })
                .collect();
            c
        };
        for (round, label) in [(1, "insert"), (2, "update")] {
            let c = make(round);
            let started = std::time::Instant::now();
            s.write(Arc::new(c)).await.unwrap();
            let secs = started.elapsed().as_secs_f64();
            println!(
                "sqlite silver {label}: {ROWS} rows in {secs:.3}s = {:.0} rows/s",
                ROWS as f64 / secs
            );
        }
        let started = std::time::Instant::now();
        let got = s.recover(&[items]).await.unwrap();
        let secs = started.elapsed().as_secs_f64();
        println!(
            "sqlite silver recover: {ROWS} rows in {secs:.3}s = {:.0} rows/s",
            ROWS as f64 / secs
        );
        assert_eq!(got.rows.len(), ROWS as usize);

        // A wider row with text and timestamps to format: `orders`.
        let orders = spec.catalog.id("orders").unwrap();
        let mut c = commit(3);
        c.silver = (1..=ROWS)
            .map(|id| {
                let ts = micros("2026-01-05T08:00:00Z") + id * 1_234_000;
                upsert(
                    orders,
                    &[0],
                    vec![
                        Value::Int(id),
                        Value::Int(id % 5000),
                        Value::Int(id % 60),
                        text("web"),
                        text("paid"),
                        Value::Timestamp(ts),
                        text("EUR"),
                        Value::Decimal(Decimal::new(12_345 + id, 2)),
                        text("Lyon"),
                    ],
                )
            })
            .collect();
        let started = std::time::Instant::now();
        s.write(Arc::new(c)).await.unwrap();
        let secs = started.elapsed().as_secs_f64();
        println!(
            "sqlite silver orders: {ROWS} rows in {secs:.3}s = {:.0} rows/s",
            ROWS as f64 / secs
        );
    }
}
