//! The MySQL/MariaDB sink: the tables of the SQLite and PostgreSQL sinks, in one
//! MySQL or MariaDB database (InnoDB).
//!
//! # Tables
//!
//! - `silver_<table>` for every table of the catalog: the declared columns in order,
//!   then `_flags`, `_extra`, `_position`, `_source_ts_ms`, `_partition`,
//!   `_updated_at`; the primary key is the table's key. A column declared later is
//!   added with `ALTER TABLE ADD COLUMN` at start; nothing is ever dropped.
//!   Undeclared source columns stay in `_extra` (a JSON object as text): unlike the
//!   other stores this one does not learn columns from them, because MySQL's
//!   `ALTER TABLE` commits the open transaction and would split a commit in two.
//! - `gold_<name>` for every gold rule: `window_start`, `window_end`, `group_key`
//!   (the group values as a JSON array, so that NULL groups still upsert), one
//!   column per group and per measure, `<measure>_trend` when the rule has a trend,
//!   and `updated_at`; the primary key is `(window_start, group_key)`. One table, as
//!   in the SQLite sink: consumer groups (gold kept per partition) need PostgreSQL.
//! - `quarantine` with the view `quarantine_summary` (open rows per reason).
//! - `caudal_checkpoint`, keyed by `stream` (default `"main"`).
//!
//! # Values
//!
//! `int` BIGINT, `uint` BIGINT UNSIGNED, `float` DOUBLE (MySQL cannot store NaN or
//! infinities: such a value is a definite error), `bool` BOOLEAN, `string` LONGTEXT
//! and `json` LONGTEXT (utf8mb4, binary collation, byte for byte: MySQL's JSON type
//! would reorder keys and reformat numbers), `bytes` LONGBLOB, timestamps
//! DATETIME(6) (UTC, years 0..9999), `date` DATE, `time` TIME(6)
//! (±838:59:59.999999, MySQL's own range).
//!
//! `decimal` is the exact decimal text in a `VARCHAR(100) CHARACTER SET ascii`
//! column, not a DECIMAL: a DECIMAL column has one fixed scale, the pipeline
//! declares none, and a fixed scale would turn `12.5` into `12.50..0` on the way
//! back; recovery rebuilds sums from these rows and the exports print them, so the
//! scale must survive. `CAST(col AS DECIMAL(65,30))` reads them exactly in SQL. Gold
//! `sum`/`avg` measures (and the trend) are exact text for the same reason, `count`
//! is BIGINT, groups and `min`/`max` the value's display text.
//!
//! Text and bytes in a primary key are VARBINARY: InnoDB limits a key to 3072
//! bytes, so a LONGTEXT cannot be a key column, and a VARCHAR compares by its
//! collation (`a` = `A` under the default one, `a` = `a ` under every PAD SPACE
//! collation, which MariaDB's `utf8mb4_bin` is), which would merge distinct keys.
//! VARBINARY compares bytes. The key's 3072 bytes are shared among its variable
//! columns; a longer value is a definite error.
//!
//! # Transactions and throughput
//!
//! [`Sink::write`] applies a whole [`Commit`] in one InnoDB transaction with the
//! checkpoint and the processing state. Per table, upserts are multi-row `INSERT ..
//! ON DUPLICATE KEY UPDATE` statements and deletes multi-row `DELETE .. WHERE key IN
//! (..)`, rows sorted by key. Values are bound as parameters of prepared statements
//! (binary protocol: no escaping to get wrong); a statement holds at most
//! [`MAX_ROWS`] rows and stays under half the server's `max_allowed_packet`. Chunk
//! sizes are powers of two below [`MAX_ROWS`], so that a handful of prepared
//! statements per table serve every commit.
//!
//! # Errors
//!
//! A lost or refused connection, a deadlock (1213), a lock wait timeout (1205), too
//! many connections (1040), a server shutting down (1053) or a killed connection is
//! [`StoreError::Unavailable`]: the topology retries the commit on a new connection.
//! Anything else is `Definite`, with the server's error code in the message.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, TxOpts, Value as My};
use rust_decimal::Decimal;

use super::sqlite::group_key;
use super::{ident, Ack, Recovered, Sink, StoreError};
use crate::config::spec::{Agg, GoldSpec};
use crate::config::PipelineSpec;
use crate::event::output::{Commit, GoldChange, QuarantineOp, QuarantineRecord, SilverRow};
use crate::event::time::{civil_from_days, days_from_civil, MICROS_PER_DAY};
use crate::event::{Checkpoint, ColumnType, Key, Row, TableId, TableSchema, Value};

/// The stream a sink writes its checkpoint under when none is configured.
pub const DEFAULT_STREAM: &str = "main";
/// Rows in one multi-row statement at most: beyond a few thousand rows a statement
/// gains nothing, and MySQL allows 65535 parameters per statement.
pub const MAX_ROWS: usize = 2048;
/// MySQL's limit on the parameters of one prepared statement.
const MAX_PARAMS: usize = 65_535;
/// InnoDB's limit on the bytes of one index key (DYNAMIC row format), less a margin
/// for the length prefixes of variable columns.
const KEY_BYTES: usize = 3000;
/// Statements prepared per connection: a few chunk sizes per table and operation.
const STMT_CACHE: usize = 512;

/// Session settings of every connection: standard identifier quoting (the shared
/// [`ident`] and [`super::gold_select`] use double quotes), strict mode so that a
/// value that does not fit is an error rather than a warning and a truncated value,
/// UTC for `UTC_TIMESTAMP`, utf8mb4 on the wire.
const SESSION: [&str; 2] = [
    "SET NAMES utf8mb4 COLLATE utf8mb4_bin",
    "SET SESSION sql_mode = 'ANSI_QUOTES,STRICT_ALL_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,\
     ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION', time_zone = '+00:00'",
];
/// Table options: InnoDB for transactions, DYNAMIC rows for 3072-byte keys.
const TABLE_OPTIONS: &str =
    "ENGINE=InnoDB ROW_FORMAT=DYNAMIC DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin";
/// Exact decimal text (rust_decimal prints at most 30 characters).
const DECIMAL_TEXT: &str = "VARCHAR(100) CHARACTER SET ascii COLLATE ascii_bin";
const NOW: &str = "UTC_TIMESTAMP(6)";

/// Bookkeeping columns after the declared ones in every silver table.
const SILVER_META: [(&str, ColumnType); 5] = [
    ("_flags", ColumnType::String),
    ("_extra", ColumnType::String),
    ("_position", ColumnType::String),
    ("_source_ts_ms", ColumnType::Int),
    ("_partition", ColumnType::String),
];
const GOLD_RESERVED: [&str; 4] = ["window_start", "window_end", "group_key", "updated_at"];

// `table_name` and `row_key` are bytes: a record is found by them, and text
// collations (even `utf8mb4_bin`) pad trailing spaces, so the key `1` would find the
// record of the row `1 `; a table name read from an unknown event may be of any length.
const BASE_SCHEMA: [&str; 3] = [
    r#"CREATE TABLE IF NOT EXISTS "quarantine" (
    "id" BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    "table_name" LONGBLOB,
    "row_key" LONGBLOB,
    "stage" VARCHAR(32) NOT NULL,
    "reason" VARCHAR(191) NOT NULL,
    "detail" LONGTEXT,
    "position" TEXT,
    "origin" BIGINT,
    "payload" LONGTEXT,
    "quarantined_at" DATETIME(6) NOT NULL,
    "resolved_at" DATETIME(6),
    INDEX "quarantine_row" ("table_name"(64), "row_key"(255)),
    INDEX "quarantine_reason" ("reason"),
    INDEX "quarantine_origin" ("origin")
) ENGINE=InnoDB ROW_FORMAT=DYNAMIC DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"#,
    r#"CREATE OR REPLACE VIEW "quarantine_summary" AS
    SELECT "reason", COUNT(*) AS "rows" FROM "quarantine"
    WHERE "resolved_at" IS NULL GROUP BY "reason""#,
    r#"CREATE TABLE IF NOT EXISTS "caudal_checkpoint" (
    "stream" VARBINARY(768) NOT NULL PRIMARY KEY,
    "checkpoint" LONGTEXT NOT NULL,
    "state" LONGTEXT NOT NULL,
    "event_count" BIGINT NOT NULL,
    "updated_at" DATETIME(6) NOT NULL
) ENGINE=InnoDB ROW_FORMAT=DYNAMIC DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"#,
];

/// Refreshes the open record of a row: a newer version failed again.
const QUARANTINE_REFRESH: &str = r#"UPDATE "quarantine" SET "stage" = ?, "reason" = ?,
    "detail" = ?, "position" = ?, "origin" = ?, "payload" = ?
    WHERE "table_name" = ? AND "row_key" = ? AND "resolved_at" IS NULL"#;
/// Whether a row has an open record (an UPDATE that changes nothing reports 0 rows
/// in MySQL, so the refresh's count does not tell).
const QUARANTINE_OPEN_OF_ROW: &str = r#"SELECT "id" FROM "quarantine"
    WHERE "table_name" = ? AND "row_key" = ? AND "resolved_at" IS NULL LIMIT 1"#;
/// The latest record of the same input: origin, table, key, stage, reason and
/// payload all equal (`<=>`: NULL equals NULL).
const QUARANTINE_SAME: &str = r#"SELECT "id", "resolved_at" IS NOT NULL FROM "quarantine"
    WHERE "origin" = ? AND "table_name" <=> ? AND "row_key" <=> ? AND "stage" = ?
    AND "reason" = ? AND "payload" <=> ? ORDER BY "id" DESC LIMIT 1"#;
const QUARANTINE_REOPEN: &str = r#"UPDATE "quarantine" SET "resolved_at" = NULL WHERE "id" = ?"#;
const QUARANTINE_INSERT: &str = r#"INSERT INTO "quarantine" ("table_name", "row_key",
    "stage", "reason", "detail", "position", "origin", "payload", "quarantined_at")
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(6))"#;
const QUARANTINE_RESOLVE: &str = r#"UPDATE "quarantine" SET "resolved_at" = UTC_TIMESTAMP(6)
    WHERE "table_name" = ? AND "row_key" = ? AND "resolved_at" IS NULL"#;
const QUARANTINE_READ_OPEN: &str = r#"SELECT "id", "table_name", "row_key", "stage",
    "reason", "detail", "position", "origin", "payload" FROM "quarantine"
    WHERE "resolved_at" IS NULL ORDER BY "id""#;

/// The event count only grows when the checkpoint moves (as in the other sinks).
/// MySQL applies the assignments left to right, so `event_count` is computed
/// before `checkpoint` changes.
const CHECKPOINT_UPSERT: &str = r#"INSERT INTO "caudal_checkpoint"
    ("stream", "checkpoint", "state", "event_count", "updated_at")
    VALUES (?, ?, ?, ?, UTC_TIMESTAMP(6))
    ON DUPLICATE KEY UPDATE
        "event_count" = IF("checkpoint" = VALUES("checkpoint"), "event_count",
            "event_count" + VALUES("event_count")),
        "checkpoint" = VALUES("checkpoint"),
        "state" = VALUES("state"),
        "updated_at" = VALUES("updated_at")"#;
const CHECKPOINT_READ: &str =
    r#"SELECT "checkpoint", "state" FROM "caudal_checkpoint" WHERE "stream" = ?"#;

/// A [`Sink`] writing to one MySQL or MariaDB database.
pub struct MySqlSink {
    url: String,
    stream: String,
    plan: Arc<Plan>,
    conn: Option<Connection>,
    /// The server thread of the last connection dropped after an error, killed from
    /// the next one. Why: dropping a connection whose network is gone (a half-open
    /// TCP session) does not end it on the server, which would keep its
    /// transaction's row locks until `wait_timeout` (8 h by default), and every
    /// retry would wait for them and time out.
    dropped: Option<u32>,
}

/// One connection and the byte budget of one statement on it.
struct Connection {
    conn: Conn,
    /// Half the server's `max_allowed_packet`: parameters beyond it go in the next
    /// statement.
    budget: usize,
}

impl MySqlSink {
    /// A sink for database `url` keeping its checkpoint under `stream`. Connects
    /// lazily: [`Sink::healthcheck`] opens the connection and creates the tables.
    ///
    /// # Errors
    /// [`StoreError::Definite`] when the URL does not parse or names no database, or
    /// a declared name clashes with a column the sink reserves.
    pub fn new(url: &str, spec: Arc<PipelineSpec>, stream: &str) -> Result<Self, StoreError> {
        options(url)?;
        let plan = Arc::new(Plan::new(&spec)?);
        Ok(Self { url: url.to_owned(), stream: stream.to_owned(), plan, conn: None, dropped: None })
    }

    /// The open connection, opening one when there is none (the first call, or
    /// after an error, whose connection is dropped: its transaction may be half
    /// done and the server may be gone).
    async fn conn(&mut self) -> Result<&mut Connection, StoreError> {
        if self.conn.is_none() {
            let mut conn = connect(&self.url).await?;
            if let Some(id) = self.dropped.take() {
                // Best effort: usually that thread is long gone (error 1094).
                let _ = conn.conn.query_drop(format!("KILL CONNECTION {id}")).await;
            }
            self.conn = Some(conn);
        }
        self.conn.as_mut().ok_or_else(|| definite("no mysql connection".to_owned()))
    }

    /// Drops the connection after an error (which rolls back whatever its open
    /// transaction wrote, when the server still hears it).
    fn drop_conn(&mut self) {
        if let Some(c) = self.conn.take() {
            self.dropped = Some(c.conn.id());
        }
    }
}

#[async_trait]
impl Sink for MySqlSink {
    fn kind(&self) -> &'static str {
        "mysql"
    }

    async fn healthcheck(&mut self) -> Result<(), StoreError> {
        let plan = Arc::clone(&self.plan);
        let conn = self.conn().await?;
        let result = create_schema(&mut conn.conn, &plan).await;
        if result.is_err() {
            self.drop_conn();
        }
        result
    }

    async fn recover(&mut self, tables: &[TableId]) -> Result<Recovered, StoreError> {
        let plan = Arc::clone(&self.plan);
        let stream = self.stream.clone();
        let conn = self.conn().await?;
        let result = recover(&mut conn.conn, &plan, &stream, tables).await;
        if result.is_err() {
            self.drop_conn();
        }
        result
    }

    async fn write(&mut self, commit: Arc<Commit>) -> Result<Ack, StoreError> {
        let plan = Arc::clone(&self.plan);
        let stream = self.stream.clone();
        let conn = self.conn().await?;
        let result = write(conn, &plan, &stream, &commit).await;
        if result.is_err() {
            self.drop_conn();
        }
        result
    }
}

/// Connection options: the URL's, with the session settings and a larger
/// statement cache.
fn options(url: &str) -> Result<Opts, StoreError> {
    let opts = Opts::from_url(url).map_err(|e| StoreError::Definite {
        message: "not a MySQL URL (mysql://USER:PASSWORD@HOST:PORT/DATABASE)".to_owned(),
        source: Some(Box::new(e)),
    })?;
    if opts.db_name().is_none_or(str::is_empty) {
        return Err(definite(
            "the MySQL URL names no database (mysql://USER:PASSWORD@HOST:PORT/DATABASE)".to_owned(),
        ));
    }
    Ok(OptsBuilder::from_opts(opts).setup(SESSION.to_vec()).stmt_cache_size(STMT_CACHE).into())
}

async fn connect(url: &str) -> Result<Connection, StoreError> {
    let mut conn =
        Conn::new(options(url)?).await.map_err(|e| my_error(e, "connect to mysql".to_owned()))?;
    let packet: Option<u64> = conn
        .query_first("SELECT @@max_allowed_packet")
        .await
        .map_err(|e| my_error(e, "read `max_allowed_packet`".to_owned()))?;
    let budget = usize::try_from(packet.unwrap_or(4 << 20) / 2).unwrap_or(usize::MAX);
    Ok(Connection { conn, budget: budget.max(64 << 10) })
}

// ---- exports ----------------------------------------------------------------

/// A gold row as exports read it: (window start in epoch microseconds, group values,
/// measure values without the trend column).
pub type GoldRow = (i64, Vec<Value>, Vec<Value>);

/// Reads the rows of gold rule `gold` from database `url`, ordered by window start
/// then the group columns. Groups come back as text, `count` as `Int`, `sum`/`avg`
/// as `Decimal` with their scale.
///
/// # Errors
/// When the database cannot be reached (`Unavailable`) or the table read.
pub async fn read_gold(
    url: &str,
    spec: &PipelineSpec,
    gold: usize,
) -> Result<Vec<GoldRow>, StoreError> {
    let g = spec.gold.get(gold).ok_or_else(|| {
        definite(format!("no gold rule {gold}: the pipeline has {}", spec.gold.len()))
    })?;
    let table = GoldTable::new(g)?;
    let mut conn = connect(url).await?.conn;
    let context = || format!("select from `{}`", table.table);
    let rows: Vec<mysql_async::Row> =
        conn.exec(&table.select, ()).await.map_err(|e| my_error(e, context()))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut cells = cells(row).into_iter();
        let start = match cells.next().map(|c| stored(ColumnType::TimestampMicros, c)) {
            Some(Ok(Value::Timestamp(t))) => t,
            _ => {
                return Err(definite(format!(
                    "`{}` has a `window_start` that is not a timestamp",
                    table.table
                )))
            }
        };
        let mut values = Vec::with_capacity(table.groups + table.reported);
        for (cell, kind) in cells.zip(&table.kinds).take(table.groups + table.reported) {
            values.push(kind.read(cell).map_err(|e| definite(format!("{}: {e}", context())))?);
        }
        let measures = values.split_off(table.groups.min(values.len()));
        out.push((start, values, measures));
    }
    let _ = conn.disconnect().await;
    Ok(out)
}

/// Open quarantine rows per reason in database `url`, ordered by reason.
///
/// # Errors
/// When the database cannot be reached (`Unavailable`) or the view read.
pub async fn read_quarantine_summary(url: &str) -> Result<Vec<(String, u64)>, StoreError> {
    let mut conn = connect(url).await?.conn;
    let rows: Vec<(String, i64)> = conn
        .exec(r#"SELECT "reason", "rows" FROM "quarantine_summary" ORDER BY "reason""#, ())
        .await
        .map_err(|e| my_error(e, "select from `quarantine_summary`".to_owned()))?;
    let _ = conn.disconnect().await;
    Ok(rows.into_iter().map(|(r, n)| (r, u64::try_from(n).unwrap_or(0))).collect())
}

// ---- plan: the SQL of every table, built once from the spec -----------------

struct Plan {
    silver: Vec<SilverTable>,
    gold: Vec<GoldTable>,
}

impl Plan {
    fn new(spec: &PipelineSpec) -> Result<Self, StoreError> {
        let silver =
            spec.catalog.tables().iter().map(SilverTable::new).collect::<Result<_, _>>()?;
        let gold = spec.gold.iter().map(GoldTable::new).collect::<Result<_, _>>()?;
        Ok(Self { silver, gold })
    }
}

/// A multi-row statement: `head`, then `tuple` once per row joined by `sep`, then
/// `tail`.
struct Multi {
    head: String,
    tuple: String,
    sep: &'static str,
    tail: String,
    /// Parameters per row.
    width: usize,
}

impl Multi {
    fn sql(&self, rows: usize) -> String {
        let mut out = String::with_capacity(
            self.head.len() + rows * (self.tuple.len() + self.sep.len()) + self.tail.len(),
        );
        out.push_str(&self.head);
        for i in 0..rows {
            if i > 0 {
                out.push_str(self.sep);
            }
            out.push_str(&self.tuple);
        }
        out.push_str(&self.tail);
        out
    }

    /// Rows per statement at most: MySQL's parameter limit and [`MAX_ROWS`].
    fn max_rows(&self) -> usize {
        (MAX_PARAMS / self.width.max(1)).clamp(1, MAX_ROWS)
    }
}

struct SilverTable {
    /// `silver_<name>`, unquoted, for messages.
    table: String,
    types: Vec<ColumnType>,
    key: Vec<usize>,
    key_names: Vec<String>,
    /// Every column with its SQL type, for creating and evolving the table.
    columns: Vec<(String, String)>,
    create: String,
    upsert: Multi,
    delete: Multi,
    /// The declared columns.
    select: String,
}

/// The SQL type of a silver column; `key_bytes` is the VARBINARY length of a
/// variable-length key column, `None` outside the key.
fn sql_type(ty: ColumnType, key_bytes: Option<usize>) -> String {
    match (ty, key_bytes) {
        (ColumnType::String | ColumnType::Json | ColumnType::Bytes, Some(n)) => {
            format!("VARBINARY({n})")
        }
        (ColumnType::Bool, _) => "BOOLEAN".to_owned(),
        (ColumnType::Int, _) => "BIGINT".to_owned(),
        (ColumnType::UInt, _) => "BIGINT UNSIGNED".to_owned(),
        (ColumnType::Float, _) => "DOUBLE".to_owned(),
        (ColumnType::Decimal, _) => DECIMAL_TEXT.to_owned(),
        (ColumnType::String | ColumnType::Json, None) => {
            "LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin".to_owned()
        }
        (ColumnType::Bytes, None) => "LONGBLOB".to_owned(),
        (
            ColumnType::TimestampMillis | ColumnType::TimestampMicros | ColumnType::TimestampZoned,
            _,
        ) => "DATETIME(6)".to_owned(),
        (ColumnType::Date, _) => "DATE".to_owned(),
        (ColumnType::Time, _) => "TIME(6)".to_owned(),
    }
}

/// Key bytes a fixed-size key column takes; `None` for variable ones.
fn fixed_key_bytes(ty: ColumnType) -> Option<usize> {
    match ty {
        ColumnType::String | ColumnType::Json | ColumnType::Bytes => None,
        ColumnType::Bool => Some(1),
        ColumnType::Date => Some(3),
        ColumnType::Time => Some(6),
        ColumnType::Decimal => Some(101),
        _ => Some(8),
    }
}

impl SilverTable {
    fn new(schema: &TableSchema) -> Result<Self, StoreError> {
        let table = format!("silver_{}", schema.name);
        for c in &schema.columns {
            if SILVER_META.iter().any(|(m, _)| m.eq_ignore_ascii_case(&c.name))
                || c.name.eq_ignore_ascii_case("_updated_at")
            {
                return Err(definite(format!(
                    "table `{}` declares column `{}`, a name the mysql store reserves",
                    schema.name, c.name
                )));
            }
        }
        // The key's bytes, shared among its variable-length columns.
        let key_types: Vec<ColumnType> = schema.key.iter().map(|&k| schema.columns[k].ty).collect();
        let fixed: usize = key_types.iter().filter_map(|t| fixed_key_bytes(*t)).sum();
        let variable = key_types.iter().filter(|t| fixed_key_bytes(**t).is_none()).count();
        let var_bytes = match variable {
            0 => 0,
            n => KEY_BYTES.checked_sub(fixed).map_or(0, |rest| rest / n),
        };
        if variable > 0 && var_bytes < 16 {
            return Err(definite(format!(
                "table `{}` has a primary key too wide for InnoDB's 3072 bytes",
                schema.name
            )));
        }
        let mut columns: Vec<(String, String)> = schema
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let key = schema.key.contains(&i).then_some(var_bytes);
                (c.name.to_string(), sql_type(c.ty, key))
            })
            .collect();
        columns.extend(SILVER_META.iter().map(|(n, t)| ((*n).to_owned(), sql_type(*t, None))));
        columns.push(("_updated_at".to_owned(), "DATETIME(6)".to_owned()));
        let key_names: Vec<String> =
            schema.key.iter().map(|&k| schema.columns[k].name.to_string()).collect();
        let quoted = ident(&table);
        let key_list = key_names.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ");
        let create = create_sql(&quoted, &columns, &key_list);
        let data = columns.len() - 1;
        let names = columns.iter().map(|(n, _)| ident(n)).collect::<Vec<_>>().join(", ");
        let updates = columns
            .iter()
            .filter(|(n, _)| !key_names.contains(n))
            .map(|(n, _)| format!("{0} = VALUES({0})", ident(n)))
            .collect::<Vec<_>>()
            .join(", ");
        let upsert = Multi {
            head: format!("INSERT INTO {quoted} ({names}) VALUES "),
            tuple: format!("({}{NOW})", "?, ".repeat(data)),
            sep: ", ",
            tail: format!(" ON DUPLICATE KEY UPDATE {updates}"),
            width: data,
        };
        let delete = if let [only] = key_names.as_slice() {
            Multi {
                head: format!("DELETE FROM {quoted} WHERE {} IN (", ident(only)),
                tuple: "?".to_owned(),
                sep: ", ",
                tail: ")".to_owned(),
                width: 1,
            }
        } else {
            let matches = key_names.iter().map(|k| format!("{} = ?", ident(k))).collect::<Vec<_>>();
            Multi {
                head: format!("DELETE FROM {quoted} WHERE "),
                tuple: format!("({})", matches.join(" AND ")),
                sep: " OR ",
                tail: String::new(),
                width: key_names.len(),
            }
        };
        let declared = schema.columns.iter().map(|c| ident(&c.name)).collect::<Vec<_>>();
        let select = format!("SELECT {} FROM {quoted}", declared.join(", "));
        Ok(Self {
            table,
            types: schema.columns.iter().map(|c| c.ty).collect(),
            key: schema.key.clone(),
            key_names,
            columns,
            create,
            upsert,
            delete,
            select,
        })
    }
}

/// How a gold output column is typed and bound.
#[derive(Debug, Clone, Copy)]
enum GoldType {
    /// `count`: BIGINT.
    Int,
    /// `sum`, `avg`: exact decimal text.
    Numeric,
    /// Groups, `min`, `max`: the value's display text.
    Text,
}

impl GoldType {
    fn sql(self) -> &'static str {
        match self {
            GoldType::Int => "BIGINT",
            GoldType::Numeric => DECIMAL_TEXT,
            GoldType::Text => "LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
        }
    }

    fn param(self, v: &Value) -> Result<My, String> {
        match (self, v) {
            (_, Value::Null) => Ok(My::NULL),
            (GoldType::Int, v) => param(v),
            (GoldType::Numeric | GoldType::Text, v) => Ok(My::Bytes(v.to_string().into_bytes())),
        }
    }

    fn read(self, cell: My) -> Result<Value, String> {
        Ok(match (self, cell) {
            (_, My::NULL) => Value::Null,
            (GoldType::Int, My::Int(i)) => Value::Int(i),
            (GoldType::Numeric, My::Bytes(b)) => {
                let s = String::from_utf8(b).map_err(|e| e.to_string())?;
                match Decimal::from_str_exact(&s) {
                    Ok(d) => Value::Decimal(d),
                    Err(_) => Value::Str(s.into()),
                }
            }
            (_, My::Bytes(b)) => {
                Value::Str(String::from_utf8(b).map_err(|e| e.to_string())?.into())
            }
            (_, other) => return Err(format!("unexpected gold value {other:?}")),
        })
    }
}

struct GoldTable {
    /// `gold_<name>`, unquoted, for messages.
    table: String,
    groups: usize,
    /// Measure values a gold change carries, including the trend value.
    measures: usize,
    /// Measure columns without the trend column (what exports report).
    reported: usize,
    window_micros: i64,
    /// Types of the group, measure and trend columns, in order.
    kinds: Vec<GoldType>,
    columns: Vec<(String, String)>,
    create: String,
    upsert: Multi,
    delete: Multi,
    clear: String,
    select: String,
}

impl GoldTable {
    fn new(g: &GoldSpec) -> Result<Self, StoreError> {
        let table = format!("gold_{}", g.name);
        let mut outputs: Vec<(String, GoldType)> =
            g.group_by.iter().map(|(n, _)| (n.clone(), GoldType::Text)).collect();
        outputs.extend(g.measures.iter().map(|m| (m.name.clone(), measure_type(m.agg))));
        if let Some(t) = g.trend.and_then(|t| g.measures.get(t)) {
            outputs.push((format!("{}_trend", t.name), measure_type(t.agg)));
        }
        for (i, (name, _)) in outputs.iter().enumerate() {
            let clash = GOLD_RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name))
                || outputs[..i].iter().any(|(o, _)| o.eq_ignore_ascii_case(name));
            if clash {
                return Err(definite(format!(
                    "gold `{}` has an output column `{name}` that clashes with another column",
                    g.name
                )));
            }
        }
        let mut columns: Vec<(String, String)> = vec![
            ("window_start".to_owned(), "DATETIME(6) NOT NULL".to_owned()),
            ("window_end".to_owned(), "DATETIME(6) NOT NULL".to_owned()),
            ("group_key".to_owned(), format!("VARBINARY({}) NOT NULL", KEY_BYTES - 8)),
        ];
        columns.extend(outputs.iter().map(|(n, t)| (n.clone(), t.sql().to_owned())));
        columns.push(("updated_at".to_owned(), "DATETIME(6)".to_owned()));
        let quoted = ident(&table);
        let create = create_sql(&quoted, &columns, r#""window_start", "group_key""#);
        let data = columns.len() - 1;
        let names = columns.iter().map(|(n, _)| ident(n)).collect::<Vec<_>>().join(", ");
        let updates = columns
            .iter()
            .skip(1)
            .filter(|(n, _)| n != "group_key")
            .map(|(n, _)| format!("{0} = VALUES({0})", ident(n)))
            .collect::<Vec<_>>()
            .join(", ");
        let upsert = Multi {
            head: format!("INSERT INTO {quoted} ({names}) VALUES "),
            tuple: format!("({}{NOW})", "?, ".repeat(data)),
            sep: ", ",
            tail: format!(" ON DUPLICATE KEY UPDATE {updates}"),
            width: data,
        };
        let delete = Multi {
            head: format!("DELETE FROM {quoted} WHERE "),
            tuple: r#"("window_start" = ? AND "group_key" = ?)"#.to_owned(),
            sep: " OR ",
            tail: String::new(),
            width: 2,
        };
        // Not TRUNCATE: it commits the open transaction.
        let clear = format!("DELETE FROM {quoted}");
        let select = super::gold_select(&quoted, g, &[]);
        Ok(Self {
            table,
            groups: g.group_by.len(),
            measures: outputs.len() - g.group_by.len(),
            reported: g.measures.len(),
            window_micros: g.window_micros,
            kinds: outputs.iter().map(|(_, t)| *t).collect(),
            columns,
            create,
            upsert,
            delete,
            clear,
            select,
        })
    }
}

fn measure_type(agg: Agg) -> GoldType {
    match agg {
        Agg::Count => GoldType::Int,
        Agg::Sum | Agg::Avg => GoldType::Numeric,
        Agg::Min | Agg::Max => GoldType::Text,
    }
}

fn create_sql(quoted: &str, columns: &[(String, String)], key_list: &str) -> String {
    let defs =
        columns.iter().map(|(n, t)| format!("{} {t}", ident(n))).collect::<Vec<_>>().join(", ");
    format!(
        "CREATE TABLE IF NOT EXISTS {quoted} ({defs}, PRIMARY KEY ({key_list})) {TABLE_OPTIONS}"
    )
}

// ---- errors -----------------------------------------------------------------

fn definite(message: String) -> StoreError {
    StoreError::Definite { message, source: None }
}

/// Server errors a retry on a new connection can get past: deadlock, lock wait
/// timeout, too many connections, server shutdown, connection killed or aborted,
/// network read/write errors, query interrupted (a killed connection), MySQL 8's
/// idle disconnect. Not 1153 (a packet over `max_allowed_packet`): the same commit
/// would be too large again.
const TRANSIENT_CODES: [u16; 12] =
    [1213, 1205, 1040, 1053, 1927, 1152, 1158, 1159, 1160, 1161, 1317, 4031];

/// Whether retrying on a new connection can succeed.
fn is_transient(err: &mysql_async::Error) -> bool {
    use mysql_async::{DriverError, Error};
    match err {
        Error::Io(_) => true,
        Error::Server(e) => TRANSIENT_CODES.contains(&e.code),
        Error::Driver(
            DriverError::ConnectionClosed
            | DriverError::PoolDisconnected
            | DriverError::PacketOutOfOrder
            | DriverError::UnexpectedPacket { .. },
        ) => true,
        Error::Driver(_) | Error::Other(_) | Error::Url(_) => false,
    }
}

fn my_error(err: mysql_async::Error, context: String) -> StoreError {
    let transient = is_transient(&err);
    let message = match &err {
        mysql_async::Error::Server(e) => {
            format!("{context}: {} (error {}, SQLSTATE {})", e.message, e.code, e.state)
        }
        other => format!("{context}: {other}"),
    };
    let source = Some(Box::new(err) as Box<dyn std::error::Error + Send + Sync>);
    if transient {
        StoreError::Unavailable { message, source }
    } else {
        StoreError::Definite { message, source }
    }
}

// ---- values ----------------------------------------------------------------

/// The last year DATE and DATETIME hold. MySQL documents 1000..9999 as the
/// "supported" range and says earlier values may work; MariaDB 10.11 stores and
/// returns years 0..999 in strict mode (tested; MySQL 8 is not tested here), and
/// ERP placeholder dates such as 0001-01-01 are common. Only 0000-00-00 style zero
/// dates are refused, and those cannot come from a `Value`.
const MAX_YEAR: u16 = 9999;

/// The largest TIME MySQL holds: 838:59:59.999999.
const MAX_TIME_MICROS: i64 = (838 * 3600 + 59 * 60 + 59) * 1_000_000 + 999_999;

/// A value as a parameter. The server converts it to the column's type (strict
/// mode refuses what does not fit).
fn param(v: &Value) -> Result<My, String> {
    Ok(match v {
        Value::Null => My::NULL,
        Value::Bool(b) => My::Int(i64::from(*b)),
        Value::Int(i) => My::Int(*i),
        Value::UInt(u) => My::UInt(*u),
        Value::Float(f) if f.is_finite() => My::Double(*f),
        Value::Float(f) => return Err(format!("mysql cannot store the float {f}")),
        Value::Decimal(d) => My::Bytes(d.to_string().into_bytes()),
        Value::Str(s) | Value::Json(s) => My::Bytes(s.as_bytes().to_vec()),
        Value::Bytes(b) => My::Bytes(b.to_vec()),
        Value::Timestamp(t) => datetime(*t)?,
        Value::Date(d) => {
            let (y, m, day) = civil_from_days(i64::from(*d));
            let y = u16::try_from(y).ok().filter(|y| *y <= MAX_YEAR);
            let y = y.ok_or_else(|| format!("the date {v} is outside MySQL's years 0..9999"))?;
            My::Date(y, m as u8, day as u8, 0, 0, 0, 0)
        }
        Value::Time(t) => {
            if t.abs() > MAX_TIME_MICROS {
                return Err(format!("the time {v} is outside MySQL's ±838:59:59.999999"));
            }
            let a = t.unsigned_abs();
            let secs = a / 1_000_000;
            // Within range: every part fits its field.
            My::Time(
                *t < 0,
                (secs / 86_400) as u32,
                (secs / 3600 % 24) as u8,
                (secs / 60 % 60) as u8,
                (secs % 60) as u8,
                (a % 1_000_000) as u32,
            )
        }
    })
}

/// Epoch microseconds as a DATETIME(6) parameter.
fn datetime(t: i64) -> Result<My, String> {
    let days = t.div_euclid(MICROS_PER_DAY);
    let rem = t.rem_euclid(MICROS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    let y = u16::try_from(y).ok().filter(|y| *y <= MAX_YEAR).ok_or_else(|| {
        format!("the timestamp {} is outside MySQL's years 0..9999", Value::Timestamp(t))
    })?;
    let secs = rem / 1_000_000;
    // rem_euclid keeps every part in its field's range.
    Ok(My::Date(
        y,
        m as u8,
        d as u8,
        (secs / 3600) as u8,
        (secs / 60 % 60) as u8,
        (secs % 60) as u8,
        (rem % 1_000_000) as u32,
    ))
}

fn text(b: Vec<u8>) -> Result<Box<str>, String> {
    String::from_utf8(b).map(String::into_boxed_str).map_err(|e| e.to_string())
}

/// A stored value read back (binary protocol) as its column's declared type.
fn stored(ty: ColumnType, cell: My) -> Result<Value, String> {
    Ok(match (ty, cell) {
        (_, My::NULL) => Value::Null,
        (ColumnType::Bool, My::Int(i)) => Value::Bool(i != 0),
        (ColumnType::Int, My::Int(i)) => Value::Int(i),
        (ColumnType::UInt, My::UInt(u)) => Value::UInt(u),
        (ColumnType::UInt, My::Int(i)) => {
            Value::UInt(u64::try_from(i).map_err(|_| format!("{i} is not a uint"))?)
        }
        (ColumnType::Float, My::Double(f)) => Value::Float(f),
        (ColumnType::Float, My::Float(f)) => Value::Float(f64::from(f)),
        (ColumnType::Decimal, My::Bytes(b)) => {
            let s = text(b)?;
            Value::Decimal(Decimal::from_str_exact(&s).map_err(|e| format!("`{s}`: {e}"))?)
        }
        (ColumnType::String, My::Bytes(b)) => Value::Str(text(b)?),
        (ColumnType::Json, My::Bytes(b)) => Value::Json(text(b)?),
        (ColumnType::Bytes, My::Bytes(b)) => Value::Bytes(b.into_boxed_slice()),
        (
            ColumnType::TimestampMillis | ColumnType::TimestampMicros | ColumnType::TimestampZoned,
            My::Date(y, m, d, hh, mm, ss, us),
        ) => {
            let days = days_from_civil(i64::from(y), u32::from(m), u32::from(d));
            let secs = i64::from(hh) * 3600 + i64::from(mm) * 60 + i64::from(ss);
            Value::Timestamp(days * MICROS_PER_DAY + secs * 1_000_000 + i64::from(us))
        }
        (ColumnType::Date, My::Date(y, m, d, ..)) => {
            let days = days_from_civil(i64::from(y), u32::from(m), u32::from(d));
            Value::Date(i32::try_from(days).map_err(|_| format!("date {y}-{m}-{d} out of range"))?)
        }
        (ColumnType::Time, My::Time(neg, days, hh, mm, ss, us)) => {
            let secs = i64::from(days) * 86_400
                + i64::from(hh) * 3600
                + i64::from(mm) * 60
                + i64::from(ss);
            let t = secs * 1_000_000 + i64::from(us);
            Value::Time(if neg { -t } else { t })
        }
        (ty, other) => return Err(format!("cannot read {other:?} as {}", ty.name())),
    })
}

/// A row's cells. `Row::unwrap` panics only when a cell was moved out with
/// `Row::take` first, which this module never does.
fn cells(row: mysql_async::Row) -> Vec<My> {
    row.unwrap()
}

/// Bytes a parameter adds to a statement, roughly (for the packet budget).
fn param_bytes(v: &My) -> usize {
    match v {
        My::Bytes(b) => b.len() + 9,
        _ => 12,
    }
}

/// Splits `sizes` (the bytes of each row) into consecutive statements of at most
/// `max_rows` rows and `budget` bytes, each split again into powers of two so that
/// few distinct statements are ever prepared. A row alone over the budget still
/// goes alone (the server then refuses it).
fn chunks(sizes: &[usize], max_rows: usize, budget: usize) -> Vec<usize> {
    let mut groups = Vec::new();
    let (mut rows, mut bytes) = (0usize, 0usize);
    for &s in sizes {
        if rows > 0 && (rows == max_rows || bytes + s > budget) {
            groups.push(rows);
            (rows, bytes) = (0, 0);
        }
        rows += 1;
        bytes += s;
    }
    if rows > 0 {
        groups.push(rows);
    }
    let mut out = Vec::new();
    for mut n in groups {
        while n > 0 {
            let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
            out.push(p);
            n -= p;
        }
    }
    out
}

// ---- schema -----------------------------------------------------------------

async fn create_schema(conn: &mut Conn, plan: &Plan) -> Result<(), StoreError> {
    // DDL commits implicitly in MySQL: each statement stands alone, and every one
    // of them can run again.
    for sql in BASE_SCHEMA {
        conn.query_drop(sql).await.map_err(|e| {
            my_error(e, "create `quarantine`, `quarantine_summary` and `caudal_checkpoint`".into())
        })?;
    }
    for t in &plan.silver {
        ensure_table(conn, &t.table, &t.create, &t.columns, &t.key_names).await?;
    }
    let gold_key = ["window_start".to_owned(), "group_key".to_owned()];
    for g in &plan.gold {
        ensure_table(conn, &g.table, &g.create, &g.columns, &gold_key).await?;
    }
    Ok(())
}

/// Creates `table`, or adds the columns it lacks. A different primary key cannot be
/// evolved in place (the upserts would not match it), so it is an error.
async fn ensure_table(
    conn: &mut Conn,
    table: &str,
    create: &str,
    columns: &[(String, String)],
    key: &[String],
) -> Result<(), StoreError> {
    conn.query_drop(create).await.map_err(|e| my_error(e, format!("create `{table}`")))?;
    let context = || format!("read the columns of `{table}`");
    let existing: Vec<String> = conn
        .exec(
            "SELECT CAST(column_name AS CHAR) FROM information_schema.columns \
             WHERE table_schema = DATABASE() AND table_name = ?",
            (table,),
        )
        .await
        .map_err(|e| my_error(e, context()))?;
    let pk: Vec<String> = conn
        .exec(
            "SELECT CAST(column_name AS CHAR) FROM information_schema.key_column_usage \
             WHERE table_schema = DATABASE() AND table_name = ? AND constraint_name = 'PRIMARY' \
             ORDER BY ordinal_position",
            (table,),
        )
        .await
        .map_err(|e| my_error(e, context()))?;
    if pk != key {
        let stored = pk.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        let declared = key.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        return Err(definite(format!(
            "`{table}` has primary key ({stored}) but the pipeline declares ({declared}); \
             rename or drop the table to change its key"
        )));
    }
    for (name, decl) in columns {
        // MySQL column names are case-insensitive.
        if existing.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            continue;
        }
        let sql = format!("ALTER TABLE {} ADD COLUMN {} {decl}", ident(table), ident(name));
        conn.query_drop(sql)
            .await
            .map_err(|e| my_error(e, format!("add column `{name}` to `{table}`")))?;
        tracing::info!(table, column = %name, "added a newly declared column");
    }
    Ok(())
}

// ---- write ------------------------------------------------------------------

/// Runs a multi-row statement over `rows` (each a row's parameters), chunked.
async fn exec_rows(
    tx: &mut mysql_async::Transaction<'_>,
    multi: &Multi,
    rows: Vec<Vec<My>>,
    budget: usize,
    what: impl Fn() -> String,
) -> Result<(), StoreError> {
    let sizes: Vec<usize> = rows.iter().map(|r| r.iter().map(param_bytes).sum()).collect();
    let mut rows = rows.into_iter();
    for n in chunks(&sizes, multi.max_rows(), budget) {
        let params: Vec<My> = rows.by_ref().take(n).flatten().collect();
        tx.exec_drop(multi.sql(n), mysql_async::Params::Positional(params))
            .await
            .map_err(|e| my_error(e, what()))?;
    }
    Ok(())
}

async fn write(
    conn: &mut Connection,
    plan: &Plan,
    stream: &str,
    commit: &Commit,
) -> Result<Ack, StoreError> {
    // Parameters first, so that a value MySQL cannot hold fails before any I/O.
    let silver = silver_params(plan, commit)?;
    let gold = gold_params(plan, &commit.gold)?;
    let budget = conn.budget;
    let mut tx = conn
        .conn
        .start_transaction(TxOpts::default())
        .await
        .map_err(|e| my_error(e, "begin commit".to_owned()))?;
    for (t, deletes, upserts) in silver {
        if !deletes.is_empty() {
            exec_rows(&mut tx, &t.delete, deletes, budget, || format!("delete from `{}`", t.table))
                .await?;
        }
        if !upserts.is_empty() {
            exec_rows(&mut tx, &t.upsert, upserts, budget, || format!("upsert into `{}`", t.table))
                .await?;
        }
    }
    if commit.gold_reset {
        for g in &plan.gold {
            tx.query_drop(&g.clear)
                .await
                .map_err(|e| my_error(e, format!("clear `{}`", g.table)))?;
        }
    }
    for (g, deletes, upserts) in gold {
        if !deletes.is_empty() {
            exec_rows(&mut tx, &g.delete, deletes, budget, || format!("delete from `{}`", g.table))
                .await?;
        }
        if !upserts.is_empty() {
            exec_rows(&mut tx, &g.upsert, upserts, budget, || format!("upsert into `{}`", g.table))
                .await?;
        }
    }
    for op in &commit.quarantine {
        match op {
            QuarantineOp::Open(r) => open_quarantine(&mut tx, r).await?,
            QuarantineOp::Resolve { table, key } => tx
                .exec_drop(QUARANTINE_RESOLVE, (table.as_str(), key.as_str()))
                .await
                .map_err(|e| my_error(e, "resolve in `quarantine`".to_owned()))?,
        }
    }
    let events = i64::try_from(commit.event_count).unwrap_or(i64::MAX);
    tx.exec_drop(
        CHECKPOINT_UPSERT,
        (stream.as_bytes(), commit.checkpoint.0.as_str(), commit.state.as_str(), events),
    )
    .await
    .map_err(|e| my_error(e, "upsert into `caudal_checkpoint`".to_owned()))?;
    tx.commit().await.map_err(|e| my_error(e, "commit".to_owned()))?;
    Ok(Ack { checkpoint: commit.checkpoint.clone(), event_count: commit.event_count })
}

/// Rows of parameters per table: deletes (key values), upserts (data columns).
type TableParams<'p, T> = (&'p T, Vec<Vec<My>>, Vec<Vec<My>>);

/// Per silver table, the commit's deletes and upserts as parameters, each sorted by
/// key so that writers lock rows in one order.
fn silver_params<'p>(
    plan: &'p Plan,
    commit: &Commit,
) -> Result<Vec<TableParams<'p, SilverTable>>, StoreError> {
    let mut upserts: Vec<Vec<(&Key, &SilverRow)>> =
        plan.silver.iter().map(|_| Vec::new()).collect();
    let mut deletes: Vec<Vec<&Key>> = plan.silver.iter().map(|_| Vec::new()).collect();
    for change in &commit.silver {
        let t = plan.silver.get(change.table).ok_or_else(|| {
            definite(format!("silver change of unknown table id {}", change.table))
        })?;
        match &change.row {
            Some(row) if row.values.len() != t.types.len() => {
                return Err(definite(format!(
                    "a row for `{}` has {} values but the table declares {} columns",
                    t.table,
                    row.values.len(),
                    t.types.len()
                )))
            }
            Some(row) => upserts[change.table].push((&change.key, row)),
            None => deletes[change.table].push(&change.key),
        }
    }
    let mut out = Vec::new();
    for ((t, mut keys), mut rows) in plan.silver.iter().zip(deletes).zip(upserts) {
        if keys.is_empty() && rows.is_empty() {
            continue;
        }
        let bad = |e: String| definite(format!("a value for `{}`: {e}", t.table));
        keys.sort_unstable();
        let mut delete_params = Vec::with_capacity(keys.len());
        for key in keys {
            let values: Vec<My> = match key {
                Key::Int(i) if t.key.len() == 1 => vec![My::Int(*i)],
                Key::Values(vals) if vals.len() == t.key.len() => {
                    vals.iter().map(param).collect::<Result<_, _>>().map_err(bad)?
                }
                _ => {
                    return Err(definite(format!(
                    "a delete from `{}` has a key that does not match the table's {} key columns",
                    t.table,
                    t.key.len()
                )))
                }
            };
            delete_params.push(values);
        }
        rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut upsert_params = Vec::with_capacity(rows.len());
        for (_, row) in rows {
            let mut p = Vec::with_capacity(t.upsert.width);
            for v in row.values.iter() {
                p.push(param(v).map_err(bad)?);
            }
            let opt = |s: Option<&str>| s.map_or(My::NULL, |s| My::Bytes(s.as_bytes().to_vec()));
            p.push(opt(row.flags.as_deref()));
            p.push(opt(row.extra.as_deref()));
            p.push(opt(row.position.as_deref()));
            p.push(My::Int(row.source_ts_ms));
            p.push(opt(row.partition.as_deref()));
            upsert_params.push(p);
        }
        out.push((t, delete_params, upsert_params));
    }
    Ok(out)
}

/// Per gold table, the commit's deletes and upserts as parameters.
fn gold_params<'p>(
    plan: &'p Plan,
    changes: &[GoldChange],
) -> Result<Vec<TableParams<'p, GoldTable>>, StoreError> {
    if let Some(c) = changes.iter().find(|c| c.gold >= plan.gold.len()) {
        return Err(definite(format!("gold change of unknown gold rule {}", c.gold)));
    }
    if let Some(c) = changes.iter().find(|c| c.partition.is_some()) {
        return Err(definite(format!(
            "gold kept per partition (`{}`) needs the postgres store: the mysql store has \
             no consumer groups",
            c.partition.as_deref().unwrap_or_default()
        )));
    }
    let mut out = Vec::new();
    for (gi, g) in plan.gold.iter().enumerate() {
        let mut deletes = Vec::new();
        let mut upserts = Vec::new();
        let bad = |e: String| definite(format!("a value for `{}`: {e}", g.table));
        let mut mine: Vec<(&GoldChange, String)> =
            changes.iter().filter(|c| c.gold == gi).map(|c| (c, group_key(&c.group))).collect();
        mine.sort_unstable_by(|a, b| (a.0.window_start, &a.1).cmp(&(b.0.window_start, &b.1)));
        for (change, key) in mine {
            if change.group.len() != g.groups {
                return Err(definite(format!(
                    "a row for `{}` has {} group values, the rule has {}",
                    g.table,
                    change.group.len(),
                    g.groups
                )));
            }
            let start = datetime(change.window_start).map_err(bad)?;
            match &change.measures {
                Some(m) if m.len() != g.measures => {
                    return Err(definite(format!(
                        "a row for `{}` has {} measure values, the table has {} measure columns",
                        g.table,
                        m.len(),
                        g.measures
                    )))
                }
                Some(m) => {
                    let end = datetime(change.window_start.saturating_add(g.window_micros))
                        .map_err(bad)?;
                    let mut p = vec![start, end, My::Bytes(key.into_bytes())];
                    for (v, kind) in change.group.iter().chain(m.iter()).zip(&g.kinds) {
                        p.push(kind.param(v).map_err(bad)?);
                    }
                    upserts.push(p);
                }
                None => deletes.push(vec![start, My::Bytes(key.into_bytes())]),
            }
        }
        if !deletes.is_empty() || !upserts.is_empty() {
            out.push((g, deletes, upserts));
        }
    }
    Ok(out)
}

/// Opens a quarantine record without ever duplicating one (the SQLite sink's rules):
/// refresh the open record of the same row; else reopen the latest record of the
/// same input; else insert.
async fn open_quarantine(
    tx: &mut mysql_async::Transaction<'_>,
    r: &QuarantineRecord,
) -> Result<(), StoreError> {
    // Origins are line or sequence numbers; one beyond i64 is not a real input.
    let origin = i64::try_from(r.origin).unwrap_or(i64::MAX);
    if let (Some(table), Some(key)) = (&r.table, &r.key) {
        let open: Option<i64> = tx
            .exec_first(QUARANTINE_OPEN_OF_ROW, (table.as_str(), key.as_str()))
            .await
            .map_err(|e| my_error(e, "select from `quarantine`".to_owned()))?;
        if open.is_some() {
            let params: Vec<My> = vec![
                r.stage.code().into(),
                (&*r.reason).into(),
                r.detail.as_str().into(),
                r.position.as_deref().into(),
                origin.into(),
                r.payload.as_str().into(),
                table.as_str().into(),
                key.as_str().into(),
            ];
            return tx
                .exec_drop(QUARANTINE_REFRESH, params)
                .await
                .map_err(|e| my_error(e, "update `quarantine`".to_owned()));
        }
    }
    let same: Option<(i64, bool)> = tx
        .exec_first(
            QUARANTINE_SAME,
            vec![
                My::from(origin),
                r.table.as_deref().into(),
                r.key.as_deref().into(),
                r.stage.code().into(),
                (&*r.reason).into(),
                r.payload.as_str().into(),
            ],
        )
        .await
        .map_err(|e| my_error(e, "select from `quarantine`".to_owned()))?;
    match same {
        Some((_, false)) => Ok(()),
        Some((id, true)) => tx
            .exec_drop(QUARANTINE_REOPEN, (id,))
            .await
            .map_err(|e| my_error(e, "reopen in `quarantine`".to_owned())),
        None => {
            let params: Vec<My> = vec![
                r.table.as_deref().into(),
                r.key.as_deref().into(),
                r.stage.code().into(),
                (&*r.reason).into(),
                r.detail.as_str().into(),
                r.position.as_deref().into(),
                origin.into(),
                r.payload.as_str().into(),
            ];
            tx.exec_drop(QUARANTINE_INSERT, params)
                .await
                .map_err(|e| my_error(e, "insert into `quarantine`".to_owned()))
        }
    }
}

// ---- recover ----------------------------------------------------------------

async fn recover(
    conn: &mut Conn,
    plan: &Plan,
    stream: &str,
    tables: &[TableId],
) -> Result<Recovered, StoreError> {
    // One snapshot: the checkpoint, rows and quarantine agree.
    let mut opts = TxOpts::new();
    opts.with_consistent_snapshot(true).with_readonly(Some(true));
    let mut tx =
        conn.start_transaction(opts).await.map_err(|e| my_error(e, "begin recovery".to_owned()))?;
    let saved: Option<(String, String)> = tx
        .exec_first(CHECKPOINT_READ, (stream.as_bytes(),))
        .await
        .map_err(|e| my_error(e, "select from `caudal_checkpoint`".to_owned()))?;
    let (checkpoint, state) = match saved {
        Some((c, s)) => (Some(Checkpoint(c)), Some(s)),
        None => (None, None),
    };
    let mut rows: Vec<(TableId, Row)> = Vec::new();
    for &id in tables {
        let t = plan
            .silver
            .get(id)
            .ok_or_else(|| definite(format!("recovery of unknown table id {id}")))?;
        let context = || format!("select from `{}`", t.table);
        let got: Vec<mysql_async::Row> =
            tx.exec(&t.select, ()).await.map_err(|e| my_error(e, context()))?;
        rows.reserve(got.len());
        for r in got {
            let values = cells(r)
                .into_iter()
                .zip(&t.types)
                .map(|(cell, ty)| stored(*ty, cell))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| definite(format!("{}: {e}", context())))?;
            rows.push((id, values.into_boxed_slice()));
        }
    }
    let open_quarantine = read_open_quarantine(&mut tx).await?;
    tx.commit().await.map_err(|e| my_error(e, "end recovery".to_owned()))?;
    Ok(Recovered { checkpoint, state, rows, partitions: Vec::new(), open_quarantine })
}

type QuarantineCells = (
    i64,
    Option<String>,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
);

async fn read_open_quarantine(
    tx: &mut mysql_async::Transaction<'_>,
) -> Result<Vec<QuarantineRecord>, StoreError> {
    let context = || "select from `quarantine`".to_owned();
    let rows: Vec<mysql_async::Row> =
        tx.exec(QUARANTINE_READ_OPEN, ()).await.map_err(|e| my_error(e, context()))?;
    // Thousands of records share a handful of reasons.
    let mut reasons: HashMap<String, Arc<str>> = HashMap::new();
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let row: QuarantineCells =
            mysql_async::from_row_opt(r).map_err(|e| definite(format!("{}: {e}", context())))?;
        out.push(super::quarantine_record(row, &mut reasons)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_the_binary_protocol() {
        let dec = |s: &str| Value::Decimal(Decimal::from_str_exact(s).expect("decimal"));
        let cases = [
            (ColumnType::Int, Value::Int(i64::MIN)),
            (ColumnType::UInt, Value::UInt(u64::MAX)),
            (ColumnType::Bool, Value::Bool(true)),
            (ColumnType::Float, Value::Float(-0.0)),
            (ColumnType::Decimal, dec("-0.0050")),
            (ColumnType::Decimal, dec("12.50")),
            (ColumnType::String, Value::Str("héllo 😀".into())),
            (ColumnType::Json, Value::Json(r#"{"b":1, "a":2.50}"#.into())),
            (ColumnType::Bytes, Value::Bytes(vec![0, 255].into())),
            (ColumnType::TimestampMicros, Value::Timestamp(-1)),
            (ColumnType::TimestampMicros, Value::Timestamp(1_767_600_000_123_456)),
            (ColumnType::Date, Value::Date(-1)),
            (ColumnType::Time, Value::Time(-1_500_000)),
            (ColumnType::Time, Value::Time(MAX_TIME_MICROS)),
            (ColumnType::Int, Value::Null),
        ];
        for (ty, v) in cases {
            let back = stored(ty, param(&v).expect("encodes")).expect("decodes");
            assert_eq!(format!("{back:?}"), format!("{v:?}"), "{}", ty.name());
        }
    }

    #[test]
    fn values_mysql_cannot_hold_are_refused() {
        assert!(param(&Value::Float(f64::NAN)).is_err());
        assert!(param(&Value::Float(f64::INFINITY)).is_err());
        assert!(param(&Value::Time(MAX_TIME_MICROS + 1)).is_err());
        // Year 5 is stored; year -26 is not.
        assert!(param(&Value::Timestamp(-62_000_000_000_000_000)).is_ok());
        assert!(param(&Value::Timestamp(-63_000_000_000_000_000)).is_err());
        assert!(param(&Value::Date(3_000_000)).is_err());
    }

    #[test]
    fn statements_are_chunked_by_rows_and_bytes_into_powers_of_two() {
        assert_eq!(chunks(&[10; 7], 100, 1000), vec![4, 2, 1]);
        assert_eq!(chunks(&[10; 10], 4, 1000), vec![4, 4, 2]);
        assert_eq!(chunks(&[10; 5], 100, 25), vec![2, 2, 1]);
        assert_eq!(chunks(&[100, 1, 1], 100, 50), vec![1, 2]);
        assert!(chunks(&[], 4, 10).is_empty());
    }

    #[test]
    fn deadlocks_and_lost_connections_are_transient() {
        let server = |code| {
            mysql_async::Error::Server(mysql_async::ServerError {
                code,
                message: "x".into(),
                state: "HY000".into(),
            })
        };
        assert!(my_error(server(1213), "w".into()).is_transient());
        assert!(my_error(server(1205), "w".into()).is_transient());
        assert!(!my_error(server(1406), "w".into()).is_transient());
        assert!(!my_error(server(1153), "w".into()).is_transient());
        let io = mysql_async::Error::Io(mysql_async::IoError::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(my_error(io, "w".into()).is_transient());
        let closed = mysql_async::Error::Driver(mysql_async::DriverError::ConnectionClosed);
        assert!(my_error(closed, "w".into()).is_transient());
    }

    #[test]
    fn text_keys_share_the_key_bytes() {
        let spec = crate::config::parse(
            std::path::Path::new("t.toml"),
            "[source]\ntype = \"file\"\npath = \"x.jsonl\"\n\
             [tables.p]\nkey = [\"k\", \"n\", \"i\"]\n\
             columns = { k = \"string\", n = \"string\", i = \"int\", v = \"string\" }\n",
        )
        .expect("spec");
        let plan = Plan::new(&spec).expect("plan");
        let t = &plan.silver[0];
        let types: Vec<&str> = t.columns.iter().map(|(_, ty)| ty.as_str()).collect();
        assert_eq!(types[..3], ["VARBINARY(1496)", "VARBINARY(1496)", "BIGINT"]);
        assert!(types[3].starts_with("LONGTEXT"));
        assert!(MySqlSink::new("mysql://u@h:1/", Arc::new(spec), "main").is_err());
    }
}
