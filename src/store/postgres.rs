//! The PostgreSQL sink: the tables of the SQLite sink, in a PostgreSQL database.
//!
//! # Tables
//!
//! The same names, columns and keys as [`super::sqlite`]:
//!
//! - `silver_<table>` for every table of the catalog: the declared columns in order,
//!   then `_flags`, `_extra`, `_position`, `_source_ts_ms`, `_updated_at`; the
//!   primary key is the table's key. A column declared later is added with
//!   `ALTER TABLE ADD COLUMN`; nothing is ever dropped.
//!
//!   Then the columns learned from `_extra` (rules in [`super::extra`]): the first
//!   non-null value of a key types its column, BIGINT (an integer that fits), NUMERIC
//!   (other numbers), TEXT, BOOLEAN or JSONB (arrays and objects), added with
//!   `ALTER TABLE .. ADD COLUMN IF NOT EXISTS` in the commit's transaction, under the
//!   schema lock so that workers of a group agree on it. A later value the type
//!   cannot hold exactly stays in that row's `_extra` (the column is NULL there).
//!   Values travel as text and the server casts them. The learned columns and their
//!   types are read back from the tables on start and after a failed commit.
//! - `gold_<name>` for every gold rule: `window_start`, `window_end`, `group_key`
//!   (the group values as a JSON array, so that NULL groups still upsert), one column
//!   per group and per measure, `<measure>_trend`, `updated_at`; the primary key is
//!   `(window_start, group_key)`.
//! - `quarantine` with the view `quarantine_summary` (open rows per reason).
//! - `caudal_checkpoint`, keyed by `stream` (default `"main"`), so that several
//!   workers can each keep their own offsets in one database.
//!
//! # Values
//!
//! Column types follow the declared types: `int` BIGINT, `uint` NUMERIC(20,0) (a
//! BIGINT cannot hold 2^64-1), `float` DOUBLE PRECISION, `decimal` NUMERIC (exact,
//! with its scale: `12.50` stays `12.50`), `string` TEXT, `json` TEXT (JSONB would
//! reorder keys and reformat numbers, and processing compares the text it wrote),
//! `bytes` BYTEA, timestamps TIMESTAMP (no zone, UTC), `date` DATE, `time` INTERVAL
//! (MySQL TIME spans -838:59:59..838:59:59, which PostgreSQL's TIME cannot hold).
//! Gold columns: `count` BIGINT, `sum`/`avg` and the trend NUMERIC, `min`/`max` and
//! the groups TEXT (they can be any value; the text is the value's display form, the
//! one exports print). TEXT cannot hold a NUL character: such a string is a definite
//! error. Values go over the binary protocol, encoded here.
//!
//! # Transactions and throughput
//!
//! [`Sink::write`] applies a whole [`Commit`] in one transaction with the checkpoint
//! and the processing state, like the SQLite sink. Per table, the commit's upserts
//! go in one `INSERT .. SELECT FROM unnest($1, $2, ..) ON CONFLICT DO UPDATE` with one
//! array per column, and its deletes in one `DELETE .. USING unnest(..)`, rows sorted
//! by key so that concurrent writers lock in the same order. A table with more than
//! [`COPY_MIN_ROWS`] upserts in one commit (the first commit of a replay) is loaded
//! with a binary `COPY` into a temporary table, then one `INSERT .. SELECT .. ON
//! CONFLICT`; into a table that is still empty (an initial load), straight into the
//! table with a plain `COPY` under a savepoint, falling back to the staging table
//! if a concurrent writer got a key in first. All statements of a commit are pipelined: sent back to back, in order,
//! without waiting for each answer, so a commit costs about one round trip plus the
//! server's work. Statements are prepared once per connection.
//!
//! # Errors
//!
//! A refused, reset or closed connection, an administrator shutdown, a server
//! starting up, a serialization failure or a deadlock is [`StoreError::Unavailable`]:
//! the topology retries the commit, and the next call reconnects when the
//! connection is closed. Anything else is `Definite`, with the SQLSTATE in the
//! message.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use async_trait::async_trait;
use bytes::{BufMut, BytesMut};
use rust_decimal::Decimal;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};
use tokio_postgres::{Client, IsolationLevel, NoTls, Statement, Transaction};

use super::extra::{self, ExtraColumns, Json, Split};
use super::sqlite::group_key;
use super::{ident, Ack, Recovered, Sink, StoreError};
use crate::config::spec::{Agg, GoldSpec};
use crate::config::PipelineSpec;
use crate::event::output::{Commit, GoldChange, QuarantineOp, QuarantineRecord, SilverRow};
use crate::event::{Checkpoint, ColumnType, Key, Row, TableId, TableSchema, Value};

/// The stream a sink writes its checkpoint under when none is configured.
pub const DEFAULT_STREAM: &str = "main";
/// Upserts of one table in one commit above which COPY beats `unnest` arrays (the
/// temporary table and the extra statement cost about as much as a few thousand
/// rows of array decoding).
pub const COPY_MIN_ROWS: usize = 5_000;

/// Microseconds from 1970-01-01 (caudal's epoch) to 2000-01-01 (PostgreSQL's).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Days from 1970-01-01 to 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;
const DAY_MICROS: i64 = 86_400_000_000;

/// Bookkeeping columns after the declared ones in every silver table (`_updated_at`
/// is set by the server, the others come with the row).
const SILVER_META: [(&str, ColumnType); 5] = [
    ("_flags", ColumnType::String),
    ("_extra", ColumnType::String),
    ("_position", ColumnType::String),
    ("_source_ts_ms", ColumnType::Int),
    ("_partition", ColumnType::String),
];
/// PostgreSQL's limit on the columns of a table (dropped ones count too): learned
/// columns stop there, later keys stay in `_extra`.
const MAX_COLUMNS: usize = 1600;
const GOLD_RESERVED: [&str; 5] =
    ["window_start", "window_end", "group_key", "updated_at", "_partition"];
/// The transaction's start time in UTC, for the `*_at` columns.
const NOW: &str = "(now() AT TIME ZONE 'UTC')";
/// Serializes schema changes of workers starting together (CREATE TABLE IF NOT
/// EXISTS is not safe against a concurrent identical CREATE).
const SCHEMA_LOCK: i64 = 0x6361_7564_616c; // "caudal"

const BASE_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS "quarantine" (
    "id" BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    "table_name" TEXT,
    "row_key" TEXT,
    "stage" TEXT NOT NULL,
    "reason" TEXT NOT NULL,
    "detail" TEXT,
    "position" TEXT,
    "origin" BIGINT,
    "payload" TEXT,
    "quarantined_at" TIMESTAMP NOT NULL,
    "resolved_at" TIMESTAMP
);
CREATE INDEX IF NOT EXISTS "quarantine_open"
    ON "quarantine" ("table_name", "row_key") WHERE "resolved_at" IS NULL;
CREATE INDEX IF NOT EXISTS "quarantine_reason" ON "quarantine" ("reason");
CREATE INDEX IF NOT EXISTS "quarantine_origin" ON "quarantine" ("origin");
CREATE OR REPLACE VIEW "quarantine_summary" AS
    SELECT "reason", COUNT(*) AS "rows" FROM "quarantine"
    WHERE "resolved_at" IS NULL GROUP BY "reason";
CREATE TABLE IF NOT EXISTS "caudal_checkpoint" (
    "stream" TEXT PRIMARY KEY,
    "checkpoint" TEXT NOT NULL,
    "state" TEXT NOT NULL,
    "event_count" BIGINT NOT NULL,
    "updated_at" TIMESTAMP NOT NULL
);
ALTER TABLE "caudal_checkpoint" ADD COLUMN IF NOT EXISTS "version" BIGINT NOT NULL DEFAULT 0;
"#;

/// Opens a quarantine record without ever duplicating one (the rules of the SQLite
/// sink's `open_quarantine`, in one statement): refresh the open record of the same
/// row; else reopen the latest record of the same input; else insert.
const QUARANTINE_OPEN: &str = r#"
WITH "refreshed" AS (
    UPDATE "quarantine" SET "stage" = $3, "reason" = $4, "detail" = $5, "position" = $6,
        "origin" = $7, "payload" = $8
    WHERE $1::text IS NOT NULL AND $2::text IS NOT NULL
        AND "table_name" = $1 AND "row_key" = $2 AND "resolved_at" IS NULL
    RETURNING "id"
), "same" AS (
    SELECT "id", "resolved_at" IS NOT NULL AS "resolved" FROM "quarantine"
    WHERE NOT EXISTS (SELECT 1 FROM "refreshed")
        AND "origin" = $7 AND "table_name" IS NOT DISTINCT FROM $1
        AND "row_key" IS NOT DISTINCT FROM $2 AND "stage" = $3 AND "reason" = $4
        AND "payload" IS NOT DISTINCT FROM $8
    ORDER BY "id" DESC LIMIT 1
), "reopened" AS (
    UPDATE "quarantine" SET "resolved_at" = NULL
    WHERE "id" IN (SELECT "id" FROM "same" WHERE "resolved")
    RETURNING "id"
)
INSERT INTO "quarantine" ("table_name", "row_key", "stage", "reason", "detail", "position",
    "origin", "payload", "quarantined_at")
SELECT $1, $2, $3, $4, $5, $6, $7::bigint, $8, (now() AT TIME ZONE 'UTC')
WHERE NOT EXISTS (SELECT 1 FROM "refreshed") AND NOT EXISTS (SELECT 1 FROM "same")"#;
const QUARANTINE_RESOLVE: &str = r#"UPDATE "quarantine"
    SET "resolved_at" = (now() AT TIME ZONE 'UTC')
    WHERE "table_name" = $1 AND "row_key" = $2 AND "resolved_at" IS NULL"#;
const QUARANTINE_READ_OPEN: &str = r#"SELECT "id", "table_name", "row_key", "stage",
    "reason", "detail", "position", "origin", "payload" FROM "quarantine"
    WHERE "resolved_at" IS NULL ORDER BY "id""#;

/// The event count only grows when the checkpoint moves (as in the SQLite sink).
const CHECKPOINT_UPSERT: &str = r#"INSERT INTO "caudal_checkpoint"
    ("stream", "checkpoint", "state", "event_count", "updated_at")
    VALUES ($1, $2, $3, $4, (now() AT TIME ZONE 'UTC'))
    ON CONFLICT ("stream") DO UPDATE SET
        "event_count" = CASE WHEN "caudal_checkpoint"."checkpoint" = excluded."checkpoint"
            THEN "caudal_checkpoint"."event_count"
            ELSE "caudal_checkpoint"."event_count" + excluded."event_count" END,
        "checkpoint" = excluded."checkpoint",
        "state" = excluded."state",
        "updated_at" = excluded."updated_at""#;
const CHECKPOINT_READ: &str =
    r#"SELECT "checkpoint", "state" FROM "caudal_checkpoint" WHERE "stream" = $1"#;
/// A group worker's checkpoint of one partition, written only if nobody else wrote
/// it since this worker read it (`version` as read, or 0 for a new row): a worker
/// whose partition was reassigned cannot overwrite the new owner's progress.
const PARTITION_CHECKPOINT: &str = r#"INSERT INTO "caudal_checkpoint"
    ("stream", "checkpoint", "state", "event_count", "updated_at", "version")
    VALUES ($1, $2, $3, $4, (now() AT TIME ZONE 'UTC'), $5::bigint + 1)
    ON CONFLICT ("stream") DO UPDATE SET
        "checkpoint" = excluded."checkpoint",
        "state" = excluded."state",
        "event_count" = excluded."event_count",
        "updated_at" = excluded."updated_at",
        "version" = excluded."version"
    WHERE "caudal_checkpoint"."version" = $5::bigint"#;
/// Every partition checkpoint of a group: `<stream>@<topic>/<partition>`.
const PARTITION_CHECKPOINT_READ: &str = r#"SELECT "stream", "checkpoint", "state", "version"
    FROM "caudal_checkpoint" WHERE starts_with("stream", $1)"#;

/// A [`Sink`] writing to one PostgreSQL database.
pub struct PostgresSink {
    url: String,
    stream: String,
    plan: Arc<Plan>,
    conn: Option<Conn>,
    /// Set for a worker of a consumer group.
    group: Option<GroupAssignment>,
    /// Group mode: the `version` of each assigned partition's checkpoint row as this
    /// worker last read or wrote it.
    versions: HashMap<String, i64>,
    /// Per silver table, the columns learned from `_extra`; `None` until read from
    /// the tables, and again after a failed commit (its `ALTER TABLE` was rolled
    /// back with it, so memory must not keep the column).
    learned: Option<Vec<Learned>>,
}

/// What a worker of a consumer group is assigned (see [`PostgresSink::set_group`]).
#[derive(Debug, Clone, Default)]
pub struct GroupAssignment {
    /// Partition names (`topic/partition`) this worker is assigned.
    pub partitions: Vec<String>,
    /// Tables whose silver rows are recovered for the assigned partitions only
    /// (facts); the rows of the other tables asked for are recovered in full.
    pub fact_tables: Vec<TableId>,
}

/// One partition's committed progress in a group: next offset, and how far the
/// worker that committed it had read the looked-up tables' partitions.
#[derive(Debug, Clone, Default)]
pub struct PartitionProgress {
    pub offset: i64,
    pub lookups: std::collections::BTreeMap<String, i64>,
}

/// The group checkpoint row's name of a partition.
fn partition_stream(stream: &str, partition: &str) -> String {
    format!("{stream}@{partition}")
}

/// One connection and what was prepared on it.
struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
}

impl PostgresSink {
    /// A sink for database `url` keeping its checkpoint under `stream`. Connects
    /// lazily: [`Sink::healthcheck`] opens the connection and creates the tables.
    ///
    /// # Errors
    /// [`StoreError::Definite`] when a declared name clashes with a column the sink
    /// reserves.
    pub fn new(url: &str, spec: Arc<PipelineSpec>, stream: &str) -> Result<Self, StoreError> {
        let plan = Arc::new(Plan::new(&spec)?);
        Ok(Self {
            url: url.to_owned(),
            stream: stream.to_owned(),
            plan,
            conn: None,
            group: None,
            versions: HashMap::new(),
            learned: None,
        })
    }

    /// Makes this sink the store of one worker of a consumer group, assigned
    /// `assignment`. Then:
    /// - the checkpoint is one row per partition, `<stream>@<topic>/<partition>`,
    ///   each written only if its `version` is still the one this worker read
    ///   (else [`StoreError::Fenced`]);
    /// - `recover` merges every partition row of the stream and returns the fact
    ///   rows of the assigned partitions only;
    /// - a commit's `gold_reset` clears the gold rows of the assigned partitions only.
    pub fn set_group(&mut self, assignment: GroupAssignment) {
        self.group = Some(assignment);
        self.versions.clear();
    }

    /// The open connection, reconnecting when there is none or it was closed (a
    /// server restart, a network error): the topology retries after `Unavailable`.
    async fn conn(&mut self) -> Result<&mut Conn, StoreError> {
        if self.conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            if self.conn.take().is_some() {
                tracing::info!("reconnecting to postgres");
            }
            let client = connect(&self.url).await?;
            self.conn = Some(Conn { client, statements: HashMap::new() });
        }
        self.conn.as_mut().ok_or_else(|| definite("no postgres connection".to_owned()))
    }
}

#[async_trait]
impl Sink for PostgresSink {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn healthcheck(&mut self) -> Result<(), StoreError> {
        let plan = Arc::clone(&self.plan);
        // The tables may have changed under this sink: read them again.
        self.learned = None;
        let conn = self.conn().await?;
        create_schema(&mut conn.client, &plan).await
    }

    async fn recover(&mut self, tables: &[TableId]) -> Result<Recovered, StoreError> {
        let plan = Arc::clone(&self.plan);
        let stream = self.stream.clone();
        let group = self.group.clone();
        let conn = self.conn().await?;
        let (recovered, versions) =
            recover(&mut conn.client, &plan, &stream, tables, group.as_ref()).await?;
        self.versions = versions;
        Ok(recovered)
    }

    async fn write(&mut self, commit: Arc<Commit>) -> Result<Ack, StoreError> {
        let plan = Arc::clone(&self.plan);
        let stream = self.stream.clone();
        let group = self.group.clone();
        let mut versions = std::mem::take(&mut self.versions);
        let mut learned = self.learned.take();
        let result = match self.conn().await {
            Ok(conn) => {
                let state =
                    State { group: group.as_ref(), versions: &mut versions, learned: &mut learned };
                write(conn, &plan, &stream, &commit, state).await
            }
            Err(e) => Err(e),
        };
        self.versions = versions;
        // After a failure the tables are read again: a rolled-back commit may have
        // added columns that do not exist.
        self.learned = if result.is_ok() { learned } else { None };
        result
    }
}

/// Opens a connection and drives it on a task of its own.
pub(crate) async fn connect(url: &str) -> Result<Client, StoreError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| pg_error(e, "connect to postgres".to_owned()))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

// ---- exports ----------------------------------------------------------------

/// A gold row as exports read it: (window start in epoch microseconds, group values,
/// measure values without the trend column).
pub type GoldRow = (i64, Vec<Value>, Vec<Value>);

/// Reads the rows of gold rule `gold` from database `url`, ordered by window start
/// then the group columns. Groups come back as text, measures as stored (`count`
/// as `Int`, `sum`/`avg` as `Decimal` with their scale).
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
    let client = connect(url).await?;
    let context = || format!("select from `{}`", table.view);
    let rows = client.query(&table.select, &[]).await.map_err(|e| pg_error(e, context()))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut values = Vec::with_capacity(1 + table.groups + table.reported);
        for i in 0..=table.groups + table.reported {
            values.push(row.try_get::<_, Cell>(i).map_err(|e| pg_error(e, context()))?.0);
        }
        let Value::Timestamp(start) = values.remove(0) else {
            return Err(definite(format!(
                "`{}` has a `window_start` that is not a timestamp",
                table.view
            )));
        };
        let mut measures = values.split_off(table.groups);
        // An average as processing computes it: the exact sum over the count, with
        // rust_decimal's division (the server's division keeps fewer digits).
        let avgs = table.avg_index.iter().flatten().count();
        let first = 1 + table.groups + table.reported;
        for k in 0..avgs {
            let sum = row.try_get::<_, Cell>(first + 2 * k).map_err(|e| pg_error(e, context()))?.0;
            let count =
                row.try_get::<_, Cell>(first + 2 * k + 1).map_err(|e| pg_error(e, context()))?.0;
            let avg = match (sum.to_decimal(), count) {
                (Some(sum), Value::Int(n)) if n != 0 => {
                    sum.checked_div(Decimal::from(n)).map_or(Value::Null, Value::Decimal)
                }
                _ => Value::Null,
            };
            if let Some(i) = table.avg_index.iter().position(|a| *a == Some(k)) {
                measures[i] = avg;
            }
        }
        out.push((start, values, measures));
    }
    Ok(out)
}

/// Open quarantine rows per reason in database `url`, ordered by reason.
///
/// # Errors
/// When the database cannot be reached (`Unavailable`) or the view read.
pub async fn read_quarantine_summary(url: &str) -> Result<Vec<(String, u64)>, StoreError> {
    let client = connect(url).await?;
    let context = || "select from `quarantine_summary`".to_owned();
    let rows = client
        .query(r#"SELECT "reason", "rows" FROM "quarantine_summary" ORDER BY "reason""#, &[])
        .await
        .map_err(|e| pg_error(e, context()))?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let reason: String = row.try_get(0).map_err(|e| pg_error(e, context()))?;
        let n: i64 = row.try_get(1).map_err(|e| pg_error(e, context()))?;
        out.push((reason, u64::try_from(n).unwrap_or(0)));
    }
    Ok(out)
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

struct SilverTable {
    /// `silver_<name>`, unquoted, for messages.
    table: String,
    types: Vec<ColumnType>,
    /// Indexes of the key columns.
    key: Vec<usize>,
    /// Every column with its SQL type, for creating and evolving the table.
    columns: Vec<(String, &'static str)>,
    key_names: Vec<String>,
    create: String,
    /// Delete of keys given as one array per key column.
    delete: String,
    /// The temporary table COPY loads.
    stage: String,
    stage_create: String,
    /// Whether the table is empty, and the transaction's time as epoch microseconds.
    empty_now: String,
    /// A binary COPY straight into the table: data columns and `_updated_at`.
    direct_copy: String,
    /// Data columns: declared then bookkeeping, in binding order.
    data: Vec<(String, ColumnType)>,
    /// The upserts without learned columns.
    sql: SilverSql,
    /// The declared columns and `_partition`: every row, or those of some partitions.
    select: String,
    select_partitions: String,
}

impl SilverTable {
    fn new(schema: &TableSchema) -> Result<Self, StoreError> {
        let table = format!("silver_{}", schema.name);
        for c in &schema.columns {
            if SILVER_META.iter().any(|(m, _)| m.eq_ignore_ascii_case(&c.name))
                || c.name.eq_ignore_ascii_case("_updated_at")
            {
                return Err(definite(format!(
                    "table `{}` declares column `{}`, a name the postgres store reserves",
                    schema.name, c.name
                )));
            }
        }
        // Data columns: what each row carries, in binding order.
        let mut data: Vec<(String, ColumnType)> =
            schema.columns.iter().map(|c| (c.name.to_string(), c.ty)).collect();
        data.extend(SILVER_META.iter().map(|(n, t)| ((*n).to_owned(), *t)));
        let mut columns: Vec<(String, &'static str)> =
            data.iter().map(|(n, t)| (n.clone(), sql_type(*t))).collect();
        columns.push(("_updated_at".to_owned(), "TIMESTAMP"));
        let key_names: Vec<String> =
            schema.key.iter().map(|&k| schema.columns[k].name.to_string()).collect();
        let quoted = ident(&table);
        let key_list = key_names.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ");
        let create = create_sql(&quoted, &columns, &key_list);
        let key_types: Vec<ColumnType> = schema.key.iter().map(|&k| schema.columns[k].ty).collect();
        let key_arrays = key_types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("${}::{}[]", i + 1, array_type(*t)))
            .collect::<Vec<_>>()
            .join(", ");
        let matches = key_names
            .iter()
            .map(|k| format!("t.{0} = d.{0}", ident(k)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let delete = format!(
            "DELETE FROM {quoted} AS t USING unnest({key_arrays}) AS d({key_list}) WHERE {matches}"
        );
        let stage = ident(&format!("caudal_stage_{table}"));
        let stage_defs = data
            .iter()
            .map(|(n, t)| format!("{} {}", ident(n), sql_type(*t)))
            .collect::<Vec<_>>()
            .join(", ");
        let stage_create =
            format!("CREATE TEMP TABLE IF NOT EXISTS {stage} ({stage_defs}) ON COMMIT DELETE ROWS");
        let sql = SilverSql::new(&quoted, &stage, &data, &key_names, &[]);
        let empty_now = format!(
            "SELECT NOT EXISTS (SELECT 1 FROM {quoted}), \
             (EXTRACT(EPOCH FROM now()) * 1000000)::BIGINT"
        );
        let data_names = data.iter().map(|(n, _)| ident(n)).collect::<Vec<_>>().join(", ");
        let direct_copy =
            format!("COPY {quoted} ({data_names}, \"_updated_at\") FROM STDIN (FORMAT binary)");
        let declared = schema.columns.iter().map(|c| ident(&c.name)).collect::<Vec<_>>();
        let select = format!("SELECT {}, \"_partition\" FROM {quoted}", declared.join(", "));
        let select_partitions = format!("{select} WHERE \"_partition\" = ANY($1::text[])");
        Ok(Self {
            select_partitions,
            table,
            types: schema.columns.iter().map(|c| c.ty).collect(),
            key: schema.key.clone(),
            columns,
            key_names,
            create,
            delete,
            stage,
            stage_create,
            empty_now,
            direct_copy,
            data,
            sql,
            select,
        })
    }
}

/// The statements that name every data column of a silver table, learned ones
/// included, so they change when a column is learned.
struct SilverSql {
    /// Upsert of rows given as one array per data column.
    upsert: String,
    /// Adds the learned columns to the COPY staging table (as text, cast by the
    /// upsert); `None` without learned columns.
    stage_extend: Option<String>,
    /// The COPY into the staging table and the upsert from it.
    stage_copy: String,
    stage_upsert: String,
    /// Wire types of the data columns, for COPY.
    wire: Vec<Type>,
}

impl SilverSql {
    fn new(
        quoted: &str,
        stage: &str,
        data: &[(String, ColumnType)],
        key_names: &[String],
        learned: &[(String, ExtraType)],
    ) -> Self {
        let all: Vec<&str> = data
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(learned.iter().map(|(n, _)| n.as_str()))
            .collect();
        let names = all.iter().map(|n| ident(n)).collect::<Vec<_>>().join(", ");
        // Learned values travel as text and are cast by the server, which parses
        // numbers exactly; the casts are explicit since text has no assignment
        // cast to the other types.
        let arrays = data
            .iter()
            .map(|(_, t)| array_type(*t).to_owned())
            .chain(learned.iter().map(|(_, t)| format!("text[]::{}", t.sql())))
            .enumerate()
            .map(|(i, t)| format!("${}::{t}[]", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        let key_list = key_names.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ");
        // Every column is set from the row, learned ones too: a key the row does not
        // carry makes its column NULL, as a missing declared column does.
        let updates = all
            .iter()
            .copied()
            .chain(["_updated_at"])
            .filter(|n| !key_names.iter().any(|k| k == n))
            .map(|n| format!("{0} = excluded.{0}", ident(n)))
            .collect::<Vec<_>>()
            .join(", ");
        let conflict = format!("ON CONFLICT ({key_list}) DO UPDATE SET {updates}");
        let upsert = format!(
            "INSERT INTO {quoted} ({names}, \"_updated_at\") \
             SELECT *, {NOW} FROM unnest({arrays}) {conflict}"
        );
        let stage_extend = (!learned.is_empty()).then(|| {
            let adds = learned
                .iter()
                .map(|(n, _)| format!("ADD COLUMN IF NOT EXISTS {} TEXT", ident(n)))
                .collect::<Vec<_>>()
                .join(", ");
            format!("ALTER TABLE {stage} {adds}")
        });
        let stage_copy = format!("COPY {stage} ({names}) FROM STDIN (FORMAT binary)");
        let selected = data
            .iter()
            .map(|(n, _)| ident(n))
            .chain(learned.iter().map(|(n, t)| format!("{}::{}", ident(n), t.sql())))
            .collect::<Vec<_>>()
            .join(", ");
        let stage_upsert = format!(
            "INSERT INTO {quoted} ({names}, \"_updated_at\") \
             SELECT {selected}, {NOW} FROM {stage} {conflict}"
        );
        let wire = data
            .iter()
            .map(|(_, t)| wire_type(*t))
            .chain(learned.iter().map(|_| Type::TEXT))
            .collect();
        Self { upsert, stage_extend, stage_copy, stage_upsert, wire }
    }
}

/// How a gold output column is typed.
#[derive(Debug, Clone, Copy)]
enum GoldType {
    Int,
    Numeric,
    Text,
}

impl GoldType {
    fn sql(self) -> &'static str {
        match self {
            GoldType::Int => "BIGINT",
            GoldType::Numeric => "NUMERIC",
            GoldType::Text => "TEXT",
        }
    }
}

/// A column of a gold partition table that the view needs to merge partitions
/// exactly, beside the measure columns.
#[derive(Debug, Clone, Copy)]
enum Hidden {
    /// The sum of the inputs of the `k`th `avg` measure.
    AvgSum(usize),
    /// The count of the inputs of the `k`th `avg` measure.
    AvgCount(usize),
    /// Measure `i` (a min or max) as a number, to order numbers as numbers: the
    /// stored value is text, where "10.00" sorts before "9.50".
    Number(usize),
}

struct GoldTable {
    /// `gold_<name>_part`, unquoted, for messages: one row per fact partition,
    /// window and group (partition `''` outside a consumer group).
    table: String,
    /// `gold_<name>`, the view adding up the partitions' rows.
    view: String,
    groups: usize,
    /// Measure values a gold change carries, including the trend value.
    measures: usize,
    /// Measure columns without the trend column (what the partition table keeps and
    /// exports report; the view computes the trend).
    reported: usize,
    /// Columns after the measures, in order.
    hidden: Vec<Hidden>,
    /// Per measure: `Some(k)` for the `k`th `avg` (exports divide its sum by its
    /// count as processing does, rather than take the server's division).
    avg_index: Vec<Option<usize>>,
    window_micros: i64,
    columns: Vec<(String, &'static str)>,
    create: String,
    /// Drops and recreates the view (its columns follow the rule's).
    create_view: String,
    upsert: String,
    delete: String,
    clear: String,
    /// Clears the rows of the partitions given as a text array.
    clear_partitions: String,
    select: String,
}

impl GoldTable {
    fn new(g: &GoldSpec) -> Result<Self, StoreError> {
        let view = format!("gold_{}", g.name);
        let table = format!("{view}_part");
        let mut outputs: Vec<(String, GoldType)> =
            g.group_by.iter().map(|(n, _)| (n.clone(), GoldType::Text)).collect();
        outputs.extend(g.measures.iter().map(|m| {
            let ty = match m.agg {
                Agg::Count => GoldType::Int,
                // Sums of integer columns are integers, the others exact decimals.
                Agg::Sum | Agg::Avg => GoldType::Numeric,
                Agg::Min | Agg::Max => GoldType::Text,
            };
            (m.name.clone(), ty)
        }));
        let trend = g.trend.and_then(|t| g.measures.get(t)).map(|t| t.name.clone());
        let mut hidden = Vec::new();
        let mut avg_index = Vec::with_capacity(g.measures.len());
        for (i, m) in g.measures.iter().enumerate() {
            avg_index.push(None);
            match m.agg {
                Agg::Avg => {
                    let k = avg_index.iter().flatten().count();
                    avg_index[i] = Some(k);
                    hidden.push((format!("_{}_sum", m.name), "NUMERIC", Hidden::AvgSum(k)));
                    hidden.push((format!("_{}_count", m.name), "BIGINT", Hidden::AvgCount(k)));
                }
                Agg::Min | Agg::Max => {
                    hidden.push((format!("_{}_number", m.name), "NUMERIC", Hidden::Number(i)))
                }
                Agg::Count | Agg::Sum => {}
            }
        }
        let mut named: Vec<String> = outputs.iter().map(|(n, _)| n.clone()).collect();
        if let Some(t) = &trend {
            named.push(format!("{t}_trend"));
        }
        named.extend(hidden.iter().map(|(n, _, _)| n.clone()));
        for (i, name) in named.iter().enumerate() {
            let clash = GOLD_RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name))
                || named[..i].iter().any(|o| o.eq_ignore_ascii_case(name));
            if clash {
                return Err(definite(format!(
                    "gold `{}` has an output column `{name}` that clashes with another column",
                    g.name
                )));
            }
        }
        let mut columns: Vec<(String, &'static str)> = vec![
            ("_partition".to_owned(), "TEXT NOT NULL"),
            ("window_start".to_owned(), "TIMESTAMP NOT NULL"),
            ("window_end".to_owned(), "TIMESTAMP NOT NULL"),
            ("group_key".to_owned(), "TEXT NOT NULL"),
        ];
        columns.extend(outputs.iter().map(|(n, t)| (n.clone(), t.sql())));
        columns.extend(hidden.iter().map(|(n, t, _)| (n.clone(), *t)));
        columns.push(("updated_at".to_owned(), "TIMESTAMP"));
        let quoted = ident(&table);
        let create = create_sql(&quoted, &columns, r#""_partition", "window_start", "group_key""#);
        let mut arrays = vec!["$1::text[]", "$2::timestamp[]", "$3::timestamp[]", "$4::text[]"]
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        let typed: Vec<&str> =
            outputs.iter().map(|(_, t)| t.sql()).chain(hidden.iter().map(|(_, t, _)| *t)).collect();
        arrays.extend(
            typed
                .iter()
                .enumerate()
                .map(|(i, t)| format!("${}::{}[]", i + 5, t.to_ascii_lowercase())),
        );
        let names = columns[..columns.len() - 1]
            .iter()
            .map(|(n, _)| ident(n))
            .collect::<Vec<_>>()
            .join(", ");
        let updates = columns
            .iter()
            .skip(2)
            .filter(|(n, _)| n != "group_key")
            .map(|(n, _)| format!("{0} = excluded.{0}", ident(n)))
            .collect::<Vec<_>>()
            .join(", ");
        let upsert = format!(
            "INSERT INTO {quoted} ({names}, \"updated_at\") SELECT *, {NOW} FROM unnest({}) \
             ON CONFLICT (\"_partition\", \"window_start\", \"group_key\") DO UPDATE SET {updates}",
            arrays.join(", ")
        );
        let delete = format!(
            "DELETE FROM {quoted} AS t USING unnest($1::text[], $2::timestamp[], $3::text[]) \
             AS d(p, s, k) WHERE t.\"_partition\" = d.p AND t.\"window_start\" = d.s \
             AND t.\"group_key\" = d.k"
        );
        let clear = format!("DELETE FROM {quoted}");
        let clear_partitions =
            format!("DELETE FROM {quoted} WHERE \"_partition\" = ANY($1::text[])");
        // The view: partitions' shares merged per window and group. Counts and
        // sums add; an average is the sum of the partitions' input sums over the
        // sum of their input counts; min and max take the extreme, numbers ordered
        // as numbers (temporal values as their microseconds or days, see `number`)
        // and anything else by its text (strings by bytes as processing orders them).
        let group_cols: Vec<String> = g.group_by.iter().map(|(n, _)| ident(n)).collect();
        let mut agg_cols: Vec<String> = Vec::new();
        let mut avg_cols: Vec<String> = Vec::new();
        for m in &g.measures {
            let c = ident(&m.name);
            let extreme = |order: &str| {
                let number = ident(&format!("_{}_number", m.name));
                format!(
                    "(array_agg({c} ORDER BY {number} {order} NULLS LAST, {c} COLLATE \"C\" {order}) \
                     FILTER (WHERE {c} IS NOT NULL))[1] AS {c}"
                )
            };
            agg_cols.push(match m.agg {
                Agg::Count => format!("sum({c})::bigint AS {c}"),
                Agg::Sum => format!("sum({c}) AS {c}"),
                Agg::Avg => {
                    let sum = ident(&format!("_{}_sum", m.name));
                    let count = ident(&format!("_{}_count", m.name));
                    avg_cols.push(format!("a.{sum}, a.{count}"));
                    format!(
                        "sum({sum}) / NULLIF(sum({count}), 0) AS {c}, sum({sum}) AS {sum}, \
                         sum({count})::bigint AS {count}"
                    )
                }
                Agg::Min => extreme("ASC"),
                Agg::Max => extreme("DESC"),
            });
        }
        let mut grouped = vec![r#""window_start""#.to_owned(), r#""group_key""#.to_owned()];
        grouped.extend(group_cols.iter().cloned());
        let inner = format!(
            "SELECT \"window_start\", max(\"window_end\") AS \"window_end\", \"group_key\"{}, {}, \
             max(\"updated_at\") AS \"updated_at\" FROM {quoted} GROUP BY {}",
            group_cols.iter().map(|c| format!(", {c}")).collect::<String>(),
            agg_cols.join(", "),
            grouped.join(", ")
        );
        let mut outer: Vec<String> = vec![
            r#"a."window_start""#.to_owned(),
            r#"a."window_end""#.to_owned(),
            r#"a."group_key""#.to_owned(),
        ];
        outer.extend(group_cols.iter().map(|c| format!("a.{c}")));
        outer.extend(g.measures.iter().map(|m| format!("a.{}", ident(&m.name))));
        let from = match &trend {
            Some(t) => {
                outer.push(format!("a.{0} - p.{0} AS {1}", ident(t), ident(&format!("{t}_trend"))));
                format!(
                    "\"a\" LEFT JOIN \"a\" AS \"p\" ON p.\"group_key\" = a.\"group_key\" \
                     AND p.\"window_start\" = a.\"window_start\" - interval '{} microseconds'",
                    g.window_micros
                )
            }
            None => "\"a\"".to_owned(),
        };
        outer.push(r#"a."updated_at""#.to_owned());
        outer.extend(avg_cols);
        let quoted_view = ident(&view);
        let create_view = format!(
            "DROP VIEW IF EXISTS {quoted_view}; CREATE VIEW {quoted_view} AS \
             WITH \"a\" AS ({inner}) SELECT {} FROM {from}",
            outer.join(", ")
        );
        // Exports read the view's avg sums and counts after the reported columns.
        let avg_select: Vec<String> = g
            .measures
            .iter()
            .filter(|m| matches!(m.agg, Agg::Avg))
            .flat_map(|m| {
                [ident(&format!("_{}_sum", m.name)), ident(&format!("_{}_count", m.name))]
            })
            .collect();
        let select = super::gold_select(&quoted_view, g, &avg_select);
        Ok(Self {
            table,
            view,
            groups: g.group_by.len(),
            measures: named.len() - g.group_by.len() - hidden.len(),
            reported: g.measures.len(),
            hidden: hidden.into_iter().map(|(_, _, h)| h).collect(),
            avg_index,
            window_micros: g.window_micros,
            columns,
            create,
            create_view,
            upsert,
            delete,
            clear,
            clear_partitions,
            select,
        })
    }
}

fn sql_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Bool => "BOOLEAN",
        ColumnType::Int => "BIGINT",
        ColumnType::UInt => "NUMERIC(20,0)",
        ColumnType::Float => "DOUBLE PRECISION",
        ColumnType::Decimal => "NUMERIC",
        ColumnType::String | ColumnType::Json => "TEXT",
        ColumnType::Bytes => "BYTEA",
        ColumnType::TimestampMillis | ColumnType::TimestampMicros | ColumnType::TimestampZoned => {
            "TIMESTAMP"
        }
        ColumnType::Date => "DATE",
        ColumnType::Time => "INTERVAL",
    }
}

/// The element type of an array parameter of a column of type `ty`.
fn array_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::UInt => "numeric",
        ColumnType::Float => "float8",
        other => match sql_type(other) {
            "BOOLEAN" => "boolean",
            "BIGINT" => "bigint",
            "NUMERIC" => "numeric",
            "BYTEA" => "bytea",
            "TIMESTAMP" => "timestamp",
            "DATE" => "date",
            "INTERVAL" => "interval",
            _ => "text",
        },
    }
}

fn wire_type(ty: ColumnType) -> Type {
    match ty {
        ColumnType::Bool => Type::BOOL,
        ColumnType::Int => Type::INT8,
        ColumnType::UInt | ColumnType::Decimal => Type::NUMERIC,
        ColumnType::Float => Type::FLOAT8,
        ColumnType::String | ColumnType::Json => Type::TEXT,
        ColumnType::Bytes => Type::BYTEA,
        ColumnType::TimestampMillis | ColumnType::TimestampMicros | ColumnType::TimestampZoned => {
            Type::TIMESTAMP
        }
        ColumnType::Date => Type::DATE,
        ColumnType::Time => Type::INTERVAL,
    }
}

/// A double-quoted SQL identifier.
fn create_sql(quoted: &str, columns: &[(String, &'static str)], key_list: &str) -> String {
    let defs =
        columns.iter().map(|(n, t)| format!("{} {t}", ident(n))).collect::<Vec<_>>().join(", ");
    format!("CREATE TABLE IF NOT EXISTS {quoted} ({defs}, PRIMARY KEY ({key_list}))")
}

// ---- errors -----------------------------------------------------------------

fn definite(message: String) -> StoreError {
    StoreError::Definite { message, source: None }
}

/// Whether retrying on a new connection can succeed.
fn is_transient(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    if let Some(code) = err.code() {
        return [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::TOO_MANY_CONNECTIONS,
        ]
        .contains(code)
            // Class 08: connection exceptions.
            || code.code().starts_with("08");
    }
    // No SQLSTATE: refused, reset or timed out at the socket.
    std::error::Error::source(err).is_some_and(|s| s.is::<std::io::Error>())
}

pub(crate) fn pg_error(err: tokio_postgres::Error, context: String) -> StoreError {
    let transient = is_transient(&err);
    let message = match (err.code(), err.as_db_error()) {
        (Some(code), Some(db)) => format!("{context}: {} (SQLSTATE {})", db.message(), code.code()),
        (Some(code), None) => format!("{context} (SQLSTATE {})", code.code()),
        _ => context,
    };
    let source = Some(Box::new(err) as Box<dyn std::error::Error + Send + Sync>);
    if transient {
        StoreError::Unavailable { message, source }
    } else {
        StoreError::Definite { message, source }
    }
}

// ---- values ----------------------------------------------------------------

/// A parameter, encoded in the binary format of the column type the server expects.
#[derive(Debug, Clone, Copy)]
enum Param<'a> {
    Value(&'a Value),
    Int(i64),
    Decimal(Option<Decimal>),
    Text(Option<&'a str>),
    /// Epoch microseconds.
    Timestamp(i64),
}

type BoxError = Box<dyn std::error::Error + Sync + Send>;

impl ToSql for Param<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        match *self {
            Param::Value(v) => encode(v, ty, out),
            Param::Int(i) => encode(&Value::Int(i), ty, out),
            Param::Decimal(None) => Ok(IsNull::Yes),
            Param::Decimal(Some(d)) => encode(&Value::Decimal(d), ty, out),
            Param::Text(None) => Ok(IsNull::Yes),
            Param::Text(Some(s)) => {
                out.put_slice(s.as_bytes());
                Ok(IsNull::No)
            }
            Param::Timestamp(t) => encode(&Value::Timestamp(t), ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

fn mismatch(v: &Value, ty: &Type) -> BoxError {
    let kind = match v {
        Value::Null => "a null",
        Value::Bool(_) => "a bool",
        Value::Int(_) => "an int",
        Value::UInt(_) => "a uint",
        Value::Float(_) => "a float",
        Value::Decimal(_) => "a decimal",
        Value::Str(_) => "a string",
        Value::Json(_) => "a json",
        Value::Bytes(_) => "a bytes",
        Value::Timestamp(_) => "a timestamp",
        Value::Date(_) => "a date",
        Value::Time(_) => "a time",
    };
    format!("cannot store {kind} value in a {ty} column").into()
}

fn encode(v: &Value, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
    if matches!(v, Value::Null) {
        return Ok(IsNull::Yes);
    }
    match *ty {
        Type::TEXT | Type::VARCHAR => match v {
            Value::Str(s) | Value::Json(s) => out.put_slice(s.as_bytes()),
            // Gold groups and min/max: the display form, as exports print it.
            other => out.put_slice(other.to_string().as_bytes()),
        },
        Type::INT8 => match v {
            Value::Int(i) => out.put_i64(*i),
            Value::UInt(u) => out.put_i64(i64::try_from(*u).map_err(|_| mismatch(v, ty))?),
            Value::Bool(b) => out.put_i64(i64::from(*b)),
            _ => return Err(mismatch(v, ty)),
        },
        Type::NUMERIC => {
            let d = match v {
                Value::Decimal(d) => *d,
                Value::Int(i) => Decimal::from(*i),
                Value::UInt(u) => Decimal::from(*u),
                // The shortest text that reads back as the same float, exactly.
                Value::Float(f) if f.is_finite() => {
                    Decimal::from_str_exact(&f.to_string()).map_err(|_| mismatch(v, ty))?
                }
                _ => return Err(mismatch(v, ty)),
            };
            return d.to_sql(ty, out);
        }
        Type::FLOAT8 => match v {
            Value::Float(f) => out.put_f64(*f),
            Value::Int(i) => out.put_f64(*i as f64),
            _ => return Err(mismatch(v, ty)),
        },
        Type::BOOL => match v {
            Value::Bool(b) => out.put_u8(u8::from(*b)),
            Value::Int(i) => out.put_u8(u8::from(*i != 0)),
            _ => return Err(mismatch(v, ty)),
        },
        Type::BYTEA => match v {
            Value::Bytes(b) => out.put_slice(b),
            _ => return Err(mismatch(v, ty)),
        },
        Type::TIMESTAMP => match v {
            Value::Timestamp(t) => {
                out.put_i64(t.checked_sub(PG_EPOCH_MICROS).ok_or_else(|| mismatch(v, ty))?)
            }
            _ => return Err(mismatch(v, ty)),
        },
        Type::DATE => match v {
            Value::Date(d) => {
                out.put_i32(d.checked_sub(PG_EPOCH_DAYS).ok_or_else(|| mismatch(v, ty))?)
            }
            _ => return Err(mismatch(v, ty)),
        },
        Type::INTERVAL => match v {
            // All in the microseconds field: days and months are calendar units.
            Value::Time(t) => {
                out.put_i64(*t);
                out.put_i32(0);
                out.put_i32(0);
            }
            _ => return Err(mismatch(v, ty)),
        },
        _ => return Err(mismatch(v, ty)),
    }
    Ok(IsNull::No)
}

/// A value read back by its PostgreSQL type.
struct Cell(Value);

impl<'a> FromSql<'a> for Cell {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        fn be<const N: usize>(raw: &[u8]) -> Result<[u8; N], BoxError> {
            raw.try_into().map_err(|_| format!("expected {N} bytes, got {}", raw.len()).into())
        }
        Ok(Cell(match *ty {
            Type::BOOL => Value::Bool(be::<1>(raw)?[0] != 0),
            Type::INT2 => Value::Int(i64::from(i16::from_be_bytes(be(raw)?))),
            Type::INT4 => Value::Int(i64::from(i32::from_be_bytes(be(raw)?))),
            Type::INT8 => Value::Int(i64::from_be_bytes(be(raw)?)),
            Type::FLOAT8 => Value::Float(f64::from_be_bytes(be(raw)?)),
            Type::NUMERIC => Value::Decimal(Decimal::from_sql(ty, raw)?),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
                Value::Str(std::str::from_utf8(raw)?.into())
            }
            Type::BYTEA => Value::Bytes(raw.into()),
            Type::TIMESTAMP => Value::Timestamp(
                i64::from_be_bytes(be(raw)?)
                    .checked_add(PG_EPOCH_MICROS)
                    .ok_or("timestamp out of range")?,
            ),
            Type::DATE => Value::Date(
                i32::from_be_bytes(be(raw)?)
                    .checked_add(PG_EPOCH_DAYS)
                    .ok_or("date out of range")?,
            ),
            Type::INTERVAL => {
                let raw = be::<16>(raw)?;
                let micros = i64::from_be_bytes(be(&raw[..8])?);
                let days = i64::from(i32::from_be_bytes(be(&raw[8..12])?));
                let months = i64::from(i32::from_be_bytes(be(&raw[12..])?));
                let total = (days + 30 * months)
                    .checked_mul(DAY_MICROS)
                    .and_then(|d| d.checked_add(micros))
                    .ok_or("interval out of range")?;
                Value::Time(total)
            }
            _ => return Err(format!("cannot read a {ty} column").into()),
        }))
    }

    fn from_sql_null(_: &Type) -> Result<Self, BoxError> {
        Ok(Cell(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A stored value as the column's declared type reads it (the variants the SQLite
/// sink gives back); one that does not fit comes back as stored.
fn typed(ty: ColumnType, v: Value) -> Value {
    match (ty, v) {
        (ColumnType::UInt, Value::Decimal(d)) => u64::try_from(d)
            .ok()
            .filter(|u| Decimal::from(*u) == d)
            .map_or(Value::Decimal(d), Value::UInt),
        (ColumnType::Json, Value::Str(s)) => Value::Json(s),
        (_, v) => v,
    }
}

// ---- schema -----------------------------------------------------------------

async fn create_schema(client: &mut Client, plan: &Plan) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(|e| pg_error(e, "begin schema".to_owned()))?;
    // `IF NOT EXISTS` notices on every start (of every worker generation) say nothing.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .map_err(|e| pg_error(e, "set up the schema transaction".to_owned()))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await
        .map_err(|e| pg_error(e, "lock the schema".to_owned()))?;
    tx.batch_execute(BASE_SCHEMA)
        .await
        .map_err(|e| pg_error(e, "create `quarantine` and `caudal_checkpoint`".to_owned()))?;
    for t in &plan.silver {
        ensure_table(&tx, &t.table, &t.create, &t.columns, &t.key_names).await?;
    }
    let gold_key = ["_partition".to_owned(), "window_start".to_owned(), "group_key".to_owned()];
    for g in &plan.gold {
        // Before gold was kept per partition, `gold_<name>` was a table. Gold is
        // derived: recovery rewrites it from silver, so the old table just goes.
        let old_table: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_class WHERE oid = to_regclass($1) AND relkind = 'r')",
                &[&ident(&g.view)],
            )
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| pg_error(e, format!("look up `{}`", g.view)))?;
        if old_table {
            tx.batch_execute(&format!("DROP TABLE {}", ident(&g.view)))
                .await
                .map_err(|e| pg_error(e, format!("drop the old table `{}`", g.view)))?;
            tracing::info!(table = %g.view, "replaced the gold table by a view over its partitions");
        }
        ensure_table(&tx, &g.table, &g.create, &g.columns, &gold_key).await?;
        tx.batch_execute(&g.create_view)
            .await
            .map_err(|e| pg_error(e, format!("create the view `{}`", g.view)))?;
    }
    tx.commit().await.map_err(|e| pg_error(e, "commit schema".to_owned()))
}

/// Creates `table`, or adds the columns it lacks. A different primary key cannot be
/// evolved in place (the upserts would not match it), so it is an error.
async fn ensure_table(
    tx: &Transaction<'_>,
    table: &str,
    create: &str,
    columns: &[(String, &'static str)],
    key: &[String],
) -> Result<(), StoreError> {
    tx.batch_execute(create).await.map_err(|e| pg_error(e, format!("create `{table}`")))?;
    let context = || format!("read the columns of `{table}`");
    let existing: Vec<String> = tx
        .query(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1",
            &[&table],
        )
        .await
        .map_err(|e| pg_error(e, context()))?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(|e| pg_error(e, context()))?;
    let pk: Vec<String> = tx
        .query(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = to_regclass($1) AND i.indisprimary \
             ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&ident(table)],
        )
        .await
        .map_err(|e| pg_error(e, context()))?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(|e| pg_error(e, context()))?;
    if pk != key {
        let stored = pk.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        let declared = key.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        return Err(definite(format!(
            "`{table}` has primary key ({stored}) but the pipeline declares ({declared}); \
             rename or drop the table to change its key"
        )));
    }
    for (name, decl) in columns {
        if existing.iter().any(|n| n == name) {
            continue;
        }
        let sql = format!("ALTER TABLE {} ADD COLUMN {} {decl}", ident(table), ident(name));
        tx.batch_execute(&sql)
            .await
            .map_err(|e| pg_error(e, format!("add column `{name}` to `{table}`")))?;
        tracing::info!(table, column = %name, "added a newly declared column");
    }
    Ok(())
}

// ---- learned columns ----------------------------------------------------------

/// The type of a column learned from `_extra`, chosen by the first non-null value
/// of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExtraType {
    BigInt,
    Numeric,
    Text,
    Boolean,
    Jsonb,
}

impl ExtraType {
    fn sql(self) -> &'static str {
        match self {
            ExtraType::BigInt => "bigint",
            ExtraType::Numeric => "numeric",
            ExtraType::Text => "text",
            ExtraType::Boolean => "boolean",
            ExtraType::Jsonb => "jsonb",
        }
    }

    /// The type of an existing column, as `format_type` names it; `None` for types
    /// this sink does not give learned columns (`numeric(20,0)` included: it would
    /// round).
    fn from_format(name: &str) -> Option<Self> {
        [Self::BigInt, Self::Numeric, Self::Text, Self::Boolean, Self::Jsonb]
            .into_iter()
            .find(|t| t.sql() == name)
    }

    /// The type a first value asks for: integers that fit BIGINT, other numbers
    /// NUMERIC (exact), strings TEXT, booleans BOOLEAN, arrays and objects JSONB.
    fn of(v: &Json<'_>) -> Option<Self> {
        Some(match v {
            Json::Null => return None,
            Json::Bool(_) => ExtraType::Boolean,
            Json::Integer(t) if extra::exact_i64(t).is_some() => ExtraType::BigInt,
            Json::Integer(_) | Json::Number(_) => ExtraType::Numeric,
            Json::Text(_) => ExtraType::Text,
            Json::Nested(_) => ExtraType::Jsonb,
        })
    }

    /// The text the server casts to this type for `v`, or `None` when the column
    /// cannot hold `v` exactly (the value then stays in `_extra`): a string in a
    /// BIGINT column, `1.5` in a BIGINT column, a string with NUL (TEXT cannot hold
    /// it), `\u0000` in JSONB (which refuses it), a number beyond NUMERIC's range.
    fn fit(&self, v: &Json<'_>) -> Option<String> {
        match (self, v) {
            (ExtraType::BigInt, Json::Integer(t)) => extra::exact_i64(t).map(|i| i.to_string()),
            (ExtraType::Numeric, Json::Integer(t) | Json::Number(t)) => {
                extra::fits_numeric(t).then(|| (*t).to_owned())
            }
            (ExtraType::Text, Json::Text(s)) if !s.contains('\0') => Some(s.clone()),
            (ExtraType::Boolean, Json::Bool(b)) => Some(b.to_string()),
            (ExtraType::Jsonb, Json::Nested(raw)) if !raw.contains("\\u0000") => {
                Some((*raw).to_owned())
            }
            _ => None,
        }
    }
}

/// The columns one silver table learned from `_extra`, and its statements.
struct Learned {
    columns: ExtraColumns<ExtraType>,
    /// The statements naming the learned columns; `None` while there are none (the
    /// plan's are the same).
    sql: Option<SilverSql>,
}

impl Learned {
    fn sql<'a>(&'a self, t: &'a SilverTable) -> &'a SilverSql {
        self.sql.as_ref().unwrap_or(&t.sql)
    }

    fn rebuild(&mut self, t: &SilverTable) {
        let learned = self.columns.columns();
        self.sql = (!learned.is_empty())
            .then(|| SilverSql::new(&ident(&t.table), &t.stage, &t.data, &t.key_names, learned));
    }
}

/// Reads the learned columns of every silver table: the columns neither declared
/// nor bookkeeping whose type is one this sink gives learned columns. Any other
/// column only reserves its name (dropped ones too: they count against the limit).
async fn read_learned(tx: &Transaction<'_>, plan: &Plan) -> Result<Vec<Learned>, StoreError> {
    let names: Vec<&str> = plan.silver.iter().map(|t| t.table.as_str()).collect();
    let context = || "read the columns of the silver tables".to_owned();
    let rows = tx
        .query(
            "SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod), \
             a.attisdropped FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema()) \
             AND c.relname = ANY($1::text[]) AND a.attnum > 0 ORDER BY c.relname, a.attnum",
            &[&names],
        )
        .await
        .map_err(|e| pg_error(e, context()))?;
    let mut out: Vec<Learned> = plan
        .silver
        .iter()
        .map(|t| Learned {
            columns: ExtraColumns::new(t.columns.iter().map(|(n, _)| n.as_str()), MAX_COLUMNS),
            sql: None,
        })
        .collect();
    let by_name: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    for row in rows {
        let read = || -> Result<(String, String, String, bool), tokio_postgres::Error> {
            Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?))
        };
        let (table, column, ty, dropped) = read().map_err(|e| pg_error(e, context()))?;
        let Some(&i) = by_name.get(table.as_str()) else { continue };
        let (t, l) = (&plan.silver[i], &mut out[i]);
        if t.columns.iter().any(|(n, _)| n.eq_ignore_ascii_case(&column)) {
            continue;
        }
        match ExtraType::from_format(&ty) {
            Some(ty) if !dropped && l.columns.admits(&column) => l.columns.add(column, ty),
            _ => l.columns.take(&column),
        }
    }
    for (t, l) in plan.silver.iter().zip(&mut out) {
        l.rebuild(t);
    }
    Ok(out)
}

/// Adds a column for every key of the commit's `_extra` objects that may become
/// one (see [`ExtraColumns::admits`]) and has a non-null value to type it by, in
/// the commit's transaction.
async fn learn_columns(
    tx: &Transaction<'_>,
    plan: &Plan,
    learned: &mut Option<Vec<Learned>>,
    commit: &Commit,
) -> Result<(), StoreError> {
    if learned.is_none() {
        *learned = Some(read_learned(tx, plan).await?);
    }
    let mut wanted: Vec<(TableId, String, ExtraType)> = Vec::new();
    if let Some(current) = learned.as_ref() {
        for change in &commit.silver {
            let Some(text) = change.row.as_ref().and_then(|r| r.extra.as_deref()) else {
                continue;
            };
            let Some(l) = current.get(change.table) else { continue };
            let Some(entries) = extra::parse(text) else { continue };
            for e in entries {
                let new = l.columns.position(&e.key).is_none()
                    && l.columns.admits(&e.key)
                    && !wanted.iter().any(|(t, k, _)| *t == change.table && *k == e.key);
                if let Some(ty) = ExtraType::of(&e.value).filter(|_| new) {
                    wanted.push((change.table, e.key, ty));
                }
            }
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    // Workers of a group share the tables: one at a time adds columns, and each
    // first reads what the others added, so that a key gets one column whose type
    // every worker agrees on.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await
        .map_err(|e| pg_error(e, "lock the schema".to_owned()))?;
    let mut fresh = read_learned(tx, plan).await?;
    let mut changed = vec![false; fresh.len()];
    for (id, key, ty) in wanted {
        let (Some(t), Some(l)) = (plan.silver.get(id), fresh.get_mut(id)) else { continue };
        if l.columns.position(&key).is_some() || !l.columns.admits(&key) {
            continue;
        }
        let sql = format!(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}",
            ident(&t.table),
            ident(&key),
            ty.sql().to_ascii_uppercase()
        );
        tx.batch_execute(&sql)
            .await
            .map_err(|e| pg_error(e, format!("add column `{key}` to `{}`", t.table)))?;
        tracing::info!(table = %t.table, column = %key, ty = ty.sql(), "added a column the source added");
        l.columns.add(key, ty);
        changed[id] = true;
    }
    for ((t, l), changed) in plan.silver.iter().zip(&mut fresh).zip(changed) {
        if changed {
            l.rebuild(t);
        }
    }
    *learned = Some(fresh);
    Ok(())
}

// ---- write ------------------------------------------------------------------

/// What a commit reads and updates of the sink besides the connection.
struct State<'s> {
    group: Option<&'s GroupAssignment>,
    versions: &'s mut HashMap<String, i64>,
    learned: &'s mut Option<Vec<Learned>>,
}

/// One statement of a commit with its parameters.
struct Job<'a> {
    what: String,
    sql: &'a str,
    params: Vec<Box<dyn ToSql + Sync + Send + 'a>>,
}

async fn write(
    conn: &mut Conn,
    plan: &Plan,
    stream: &str,
    commit: &Commit,
    state: State<'_>,
) -> Result<Ack, StoreError> {
    let State { group, versions, learned } = state;
    let Conn { client, statements } = conn;
    let tx = client.transaction().await.map_err(|e| pg_error(e, "begin commit".to_owned()))?;
    // Columns first: the statements below name them.
    learn_columns(&tx, plan, learned, commit).await?;
    let learned: &[Learned] = learned.as_deref().unwrap_or_default();
    // Each row's undeclared values, split between learned columns and `_extra`;
    // built here and borrowed by the parameters.
    let splits: Vec<Split<'_, String>> = commit
        .silver
        .iter()
        .map(|c| {
            let extra = c.row.as_ref().and_then(|r| r.extra.as_deref());
            match learned.get(c.table) {
                Some(l) => extra::split(extra, &l.columns, ExtraType::fit),
                None => Split { values: Vec::new(), rest: extra.map(std::borrow::Cow::Borrowed) },
            }
        })
        .collect();
    // Gold group keys are built here and borrowed by the parameters.
    let gold_keys: Vec<String> = commit.gold.iter().map(|c| group_key(&c.group)).collect();
    // Group mode: the partitions' rows, each checked against the version read.
    let partition_rows = match group {
        Some(a) => partition_checkpoints(stream, commit, &a.partitions)?,
        None => Vec::new(),
    };
    let mut jobs: Vec<Job<'_>> = Vec::new();
    let mut copies: Vec<CopyLoad<'_>> = Vec::new();
    silver_jobs(plan, learned, commit, &splits, &mut jobs, &mut copies)?;
    if commit.gold_reset {
        for g in &plan.gold {
            let what = format!("clear `{}`", g.table);
            match group {
                None => jobs.push(Job { what, sql: &g.clear, params: vec![] }),
                Some(a) => jobs.push(Job {
                    what,
                    sql: &g.clear_partitions,
                    params: vec![Box::new(&a.partitions)],
                }),
            }
        }
    }
    gold_jobs(plan, &commit.gold, &gold_keys, &mut jobs)?;
    for op in &commit.quarantine {
        jobs.push(quarantine_job(op));
    }
    let first_partition_job = jobs.len();
    for (name, row_stream, checkpoint, state, offset) in &partition_rows {
        jobs.push(Job {
            what: format!("checkpoint partition `{name}`"),
            sql: PARTITION_CHECKPOINT,
            params: vec![
                Box::new(row_stream.as_str()),
                Box::new(checkpoint.as_str()),
                Box::new(state.as_str()),
                Box::new(*offset),
                Box::new(versions.get(name).copied().unwrap_or(0)),
            ],
        });
    }
    if group.is_none() {
        jobs.push(Job {
            what: "upsert into `caudal_checkpoint`".to_owned(),
            sql: CHECKPOINT_UPSERT,
            params: vec![
                Box::new(stream),
                Box::new(commit.checkpoint.0.as_str()),
                Box::new(commit.state.as_str()),
                Box::new(i64::try_from(commit.event_count).unwrap_or(i64::MAX)),
            ],
        });
    }

    for (t, sql, rows) in &copies {
        copy_silver(&tx, statements, t, sql, rows).await?;
    }
    let mut prepared = Vec::with_capacity(jobs.len());
    for job in &jobs {
        prepared.push(prepare(&tx, statements, job.sql, || job.what.clone()).await?);
    }
    let tx_ref = &tx;
    let futures: Vec<PinnedJob<'_>> = jobs
        .iter()
        .zip(&prepared)
        .map(|(job, stmt)| {
            let refs: Vec<&(dyn ToSql + Sync)> =
                job.params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
            Box::pin(async move {
                tx_ref.execute(stmt, &refs).await.map_err(|e| pg_error(e, job.what.clone()))
            }) as PinnedJob<'_>
        })
        .collect();
    let counts = pipelined(futures).await?;
    let fenced: Vec<&str> = partition_rows
        .iter()
        .zip(&counts[first_partition_job..])
        .filter(|(_, n)| **n != 1)
        .map(|((name, ..), _)| name.as_str())
        .collect();
    if !fenced.is_empty() {
        // Dropping the transaction rolls the whole commit back.
        return Err(StoreError::Fenced {
            message: format!(
                "another worker committed partitions {fenced:?} since this worker read them"
            ),
        });
    }
    tx.commit().await.map_err(|e| pg_error(e, "commit".to_owned()))?;
    for (name, ..) in &partition_rows {
        *versions.entry(name.clone()).or_insert(0) += 1;
    }
    Ok(Ack { checkpoint: commit.checkpoint.clone(), event_count: commit.event_count })
}

/// A group commit's checkpoint rows: per assigned partition, its name, row name, `{"<partition>": offset}`, the
/// state `{"partitions": {"<partition>": mark}, "lookups": {..}}` and the offset.
type PartitionRow = (String, String, String, String, i64);

fn partition_checkpoints(
    stream: &str,
    commit: &Commit,
    assigned: &[String],
) -> Result<Vec<PartitionRow>, StoreError> {
    use std::collections::BTreeMap;
    let prefix = crate::event::STATE_PARTITION_PREFIX;
    // Empty: nothing was ever read (a first commit right after recovery).
    let offsets: BTreeMap<String, i64> = match commit.checkpoint.0.as_str() {
        "" => BTreeMap::new(),
        text => serde_json::from_str(text)
            .map_err(|e| definite(format!("a group checkpoint is not a map of offsets: {e}")))?,
    };
    let state: serde_json::Value = serde_json::from_str(&commit.state).unwrap_or_default();
    let marks = state.get("partitions").and_then(|p| p.as_object());
    let lookups: BTreeMap<&str, i64> =
        offsets.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k, *v))).collect();
    let mut rows = Vec::new();
    // Only the assigned partitions: after recovery the checkpoint holds every
    // partition's offset, and the others belong to other workers.
    for (name, offset) in offsets.iter().filter(|(k, _)| assigned.contains(k)) {
        let mark = marks.and_then(|m| m.get(name)).cloned().unwrap_or_default();
        let row_state = serde_json::json!({
            "partitions": { name.as_str(): mark },
            "lookups": lookups,
        });
        rows.push((
            name.clone(),
            partition_stream(stream, name),
            serde_json::json!({ name.as_str(): offset }).to_string(),
            row_state.to_string(),
            *offset,
        ));
    }
    Ok(rows)
}

type PinnedJob<'f> = Pin<Box<dyn Future<Output = Result<u64, StoreError>> + Send + 'f>>;

/// Runs statements pipelined: every future is first polled in order, which is when
/// tokio-postgres sends its request, so the server receives and runs them in order
/// while the client waits once. Returns the first error (later statements then fail
/// too: the transaction is aborted).
async fn pipelined(mut futures: Vec<PinnedJob<'_>>) -> Result<Vec<u64>, StoreError> {
    let mut done: Vec<Option<u64>> = vec![None; futures.len()];
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, d) in futures.iter_mut().zip(done.iter_mut()) {
            if d.is_some() {
                continue;
            }
            match f.as_mut().poll(cx) {
                Poll::Ready(Ok(n)) => *d = Some(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => pending = true,
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    })
    .await?;
    Ok(done.into_iter().map(Option::unwrap_or_default).collect())
}

/// The statement for `sql`, prepared on this connection once.
async fn prepare(
    tx: &Transaction<'_>,
    cache: &mut HashMap<String, Statement>,
    sql: &str,
    what: impl FnOnce() -> String,
) -> Result<Statement, StoreError> {
    if let Some(s) = cache.get(sql) {
        return Ok(s.clone());
    }
    let stmt = tx.prepare(sql).await.map_err(|e| pg_error(e, format!("prepare {}", what())))?;
    cache.insert(sql.to_owned(), stmt.clone());
    Ok(stmt)
}

/// Upserts of one table loaded by COPY: the table, its statements, and the rows
/// with their undeclared values.
type CopyLoad<'a> = (&'a SilverTable, &'a SilverSql, Vec<(&'a SilverRow, &'a Split<'a, String>)>);

/// Per table: the commit's deletes as one statement, its upserts as one statement
/// (or a COPY when there are many), each sorted by key.
fn silver_jobs<'a>(
    plan: &'a Plan,
    learned: &'a [Learned],
    commit: &'a Commit,
    splits: &'a [Split<'a, String>],
    jobs: &mut Vec<Job<'a>>,
    copies: &mut Vec<CopyLoad<'a>>,
) -> Result<(), StoreError> {
    type Upsert<'r> = (&'r Key, &'r SilverRow, &'r Split<'r, String>);
    let mut upserts: Vec<Vec<Upsert<'a>>> = plan.silver.iter().map(|_| Vec::new()).collect();
    let mut deletes: Vec<Vec<&Key>> = plan.silver.iter().map(|_| Vec::new()).collect();
    for (change, split) in commit.silver.iter().zip(splits) {
        let t = plan.silver.get(change.table).ok_or_else(|| {
            definite(format!("silver change of unknown table id {}", change.table))
        })?;
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
                upserts[change.table].push((&change.key, row, split));
            }
            None => deletes[change.table].push(&change.key),
        }
    }
    for (id, t) in plan.silver.iter().enumerate() {
        let mut keys = std::mem::take(&mut deletes[id]);
        if !keys.is_empty() {
            keys.sort_unstable();
            let mut columns: Vec<Vec<Param<'a>>> =
                t.key.iter().map(|_| Vec::with_capacity(keys.len())).collect();
            for key in keys {
                match key {
                    Key::Int(i) if t.key.len() == 1 => columns[0].push(Param::Int(*i)),
                    Key::Values(vals) if vals.len() == t.key.len() => {
                        for (c, v) in columns.iter_mut().zip(vals.iter()) {
                            c.push(Param::Value(v));
                        }
                    }
                    _ => {
                        return Err(definite(format!(
                            "a delete from `{}` has a key that does not match the table's {} key columns",
                            t.table,
                            t.key.len()
                        )))
                    }
                }
            }
            jobs.push(Job {
                what: format!("delete from `{}`", t.table),
                sql: &t.delete,
                params: columns.into_iter().map(|c| Box::new(c) as _).collect(),
            });
        }
        let mut rows = std::mem::take(&mut upserts[id]);
        if rows.is_empty() {
            continue;
        }
        rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let rows: Vec<(&SilverRow, &Split<'a, String>)> =
            rows.into_iter().map(|(_, r, s)| (r, s)).collect();
        let sql = learned.get(id).map_or(&t.sql, |l| l.sql(t));
        if rows.len() >= COPY_MIN_ROWS {
            copies.push((t, sql, rows));
            continue;
        }
        let mut columns: Vec<Vec<Param<'a>>> =
            sql.wire.iter().map(|_| Vec::with_capacity(rows.len())).collect();
        for (row, split) in &rows {
            for (c, p) in columns.iter_mut().zip(silver_params(row, split)) {
                c.push(p);
            }
        }
        jobs.push(Job {
            what: format!("upsert into `{}`", t.table),
            sql: &sql.upsert,
            params: columns.into_iter().map(|c| Box::new(c) as _).collect(),
        });
    }
    Ok(())
}

/// A silver row's data columns: declared values, then the bookkeeping columns, then
/// the learned columns (as text; the statement casts them).
fn silver_params<'a>(
    row: &'a SilverRow,
    split: &'a Split<'a, String>,
) -> impl Iterator<Item = Param<'a>> {
    row.values
        .iter()
        .map(Param::Value)
        .chain([
            Param::Text(row.flags.as_deref()),
            Param::Text(split.rest.as_deref()),
            Param::Text(row.position.as_deref()),
            Param::Int(row.source_ts_ms),
            Param::Text(row.partition.as_deref()),
        ])
        .chain(split.values.iter().map(|v| Param::Text(v.as_deref())))
}

/// Loads many upserts of one table: binary COPY into a temporary table, then one
/// upsert from it. The temporary table empties itself at commit.
async fn copy_silver(
    tx: &Transaction<'_>,
    cache: &mut HashMap<String, Statement>,
    t: &SilverTable,
    sql: &SilverSql,
    rows: &[(&SilverRow, &Split<'_, String>)],
) -> Result<(), StoreError> {
    let what = || format!("copy into `{}`", t.table);
    // Without learned columns (whose values travel as text for the server to
    // cast), an empty table can skip the staging table.
    if sql.stage_extend.is_none() && copy_direct(tx, t, sql, rows).await? {
        return Ok(());
    }
    tx.batch_execute(&t.stage_create).await.map_err(|e| pg_error(e, what()))?;
    if let Some(extend) = &sql.stage_extend {
        tx.batch_execute(extend).await.map_err(|e| pg_error(e, what()))?;
    }
    let copy = tx.copy_in(&sql.stage_copy).await.map_err(|e| pg_error(e, what()))?;
    let writer = BinaryCopyInWriter::new(copy, &sql.wire);
    let mut writer = std::pin::pin!(writer);
    let mut params: Vec<Param<'_>> = Vec::with_capacity(sql.wire.len());
    for (row, split) in rows {
        params.clear();
        params.extend(silver_params(row, split));
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        writer.as_mut().write(&refs).await.map_err(|e| pg_error(e, what()))?;
    }
    writer.finish().await.map_err(|e| pg_error(e, what()))?;
    let upsert =
        prepare(tx, cache, &sql.stage_upsert, || format!("upsert into `{}`", t.table)).await?;
    tx.execute(&upsert, &[])
        .await
        .map_err(|e| pg_error(e, format!("upsert into `{}`", t.table)))?;
    Ok(())
}

/// Loads upserts into an empty table with a plain COPY, as fast as PostgreSQL
/// takes rows: no staging table, no `ON CONFLICT` probe per row. This is the
/// initial load of a table (a snapshot, a replay into a new store). Returns false,
/// having written nothing, when the table has rows, or when a concurrent writer
/// inserted one of the keys first (the COPY is rolled back to a savepoint and the
/// caller upserts through the staging table).
async fn copy_direct(
    tx: &Transaction<'_>,
    t: &SilverTable,
    sql: &SilverSql,
    rows: &[(&SilverRow, &Split<'_, String>)],
) -> Result<bool, StoreError> {
    let what = || format!("copy into `{}`", t.table);
    let probe = tx.query_one(&t.empty_now, &[]).await.map_err(|e| pg_error(e, what()))?;
    let empty: bool = probe.try_get(0).map_err(|e| pg_error(e, what()))?;
    if !empty {
        return Ok(false);
    }
    // `_updated_at` is what the upsert's `now()` would give: the transaction's start.
    let now: i64 = probe.try_get(1).map_err(|e| pg_error(e, what()))?;
    tx.batch_execute("SAVEPOINT caudal_copy").await.map_err(|e| pg_error(e, what()))?;
    let loaded = async {
        let copy = tx.copy_in(&t.direct_copy).await?;
        let wire: Vec<Type> = sql.wire.iter().cloned().chain([Type::TIMESTAMP]).collect();
        let writer = BinaryCopyInWriter::new(copy, &wire);
        let mut writer = std::pin::pin!(writer);
        let mut params: Vec<Param<'_>> = Vec::with_capacity(wire.len());
        for (row, split) in rows {
            params.clear();
            params.extend(silver_params(row, split));
            params.push(Param::Timestamp(now));
            let refs: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            writer.as_mut().write(&refs).await?;
        }
        writer.finish().await
    }
    .await;
    match loaded {
        Ok(_) => {
            tx.batch_execute("RELEASE SAVEPOINT caudal_copy")
                .await
                .map_err(|e| pg_error(e, what()))?;
            Ok(true)
        }
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT caudal_copy")
                .await
                .map_err(|e| pg_error(e, what()))?;
            Ok(false)
        }
        Err(e) => Err(pg_error(e, what())),
    }
}

fn gold_jobs<'a>(
    plan: &'a Plan,
    changes: &'a [GoldChange],
    keys: &'a [String],
    jobs: &mut Vec<Job<'a>>,
) -> Result<(), StoreError> {
    for (gi, g) in plan.gold.iter().enumerate() {
        let mut upserts: Vec<(&'a str, i64, &'a str, &'a GoldChange, &'a [Value])> = Vec::new();
        let mut deletes: Vec<(&'a str, i64, &'a str)> = Vec::new();
        for (change, key) in changes.iter().zip(keys).filter(|(c, _)| c.gold == gi) {
            if change.group.len() != g.groups {
                return Err(definite(format!(
                    "a row for `{}` has {} group values, the rule has {}",
                    g.table,
                    change.group.len(),
                    g.groups
                )));
            }
            match &change.measures {
                Some(m) if m.len() != g.measures => {
                    return Err(definite(format!(
                        "a row for `{}` has {} measure values, the table has {} measure columns",
                        g.table,
                        m.len(),
                        g.measures
                    )))
                }
                Some(m) => upserts.push((
                    change.partition.as_deref().unwrap_or(""),
                    change.window_start,
                    key.as_str(),
                    change,
                    m,
                )),
                None => deletes.push((
                    change.partition.as_deref().unwrap_or(""),
                    change.window_start,
                    key.as_str(),
                )),
            }
        }
        if let Some(c) = changes.iter().find(|c| c.gold >= plan.gold.len()) {
            return Err(definite(format!("gold change of unknown gold rule {}", c.gold)));
        }
        if !deletes.is_empty() {
            deletes.sort_unstable();
            let parts: Vec<Param<'a>> = deletes.iter().map(|d| Param::Text(Some(d.0))).collect();
            let starts: Vec<Param<'a>> = deletes.iter().map(|d| Param::Timestamp(d.1)).collect();
            let keys: Vec<Param<'a>> = deletes.iter().map(|d| Param::Text(Some(d.2))).collect();
            jobs.push(Job {
                what: format!("delete from `{}`", g.table),
                sql: &g.delete,
                params: vec![Box::new(parts), Box::new(starts), Box::new(keys)],
            });
        }
        if !upserts.is_empty() {
            upserts.sort_unstable_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
            let n = upserts.len();
            let mut parts = Vec::with_capacity(n);
            let mut starts = Vec::with_capacity(n);
            let mut ends = Vec::with_capacity(n);
            let mut group_keys = Vec::with_capacity(n);
            // The trend is not stored per partition: the view computes it.
            let mut outputs: Vec<Vec<Param<'a>>> = (0..g.groups + g.reported + g.hidden.len())
                .map(|_| Vec::with_capacity(n))
                .collect();
            for (part, start, key, change, measures) in upserts {
                parts.push(Param::Text(Some(part)));
                starts.push(Param::Timestamp(start));
                ends.push(Param::Timestamp(start.saturating_add(g.window_micros)));
                group_keys.push(Param::Text(Some(key)));
                let (shown, hidden) = outputs.split_at_mut(g.groups + g.reported);
                for (o, v) in shown.iter_mut().zip(change.group.iter().chain(measures.iter())) {
                    o.push(Param::Value(v));
                }
                for (o, h) in hidden.iter_mut().zip(&g.hidden) {
                    o.push(match *h {
                        Hidden::AvgSum(k) => {
                            Param::Decimal(change.avg_parts.get(k).map(|(sum, _)| *sum))
                        }
                        Hidden::AvgCount(k) => change
                            .avg_parts
                            .get(k)
                            .map_or(Param::Decimal(None), |(_, n)| Param::Int(*n)),
                        Hidden::Number(i) => Param::Decimal(measures.get(i).and_then(number)),
                    });
                }
            }
            let mut params: Vec<Box<dyn ToSql + Sync + Send + 'a>> =
                vec![Box::new(parts), Box::new(starts), Box::new(ends), Box::new(group_keys)];
            params.extend(outputs.into_iter().map(|o| Box::new(o) as _));
            jobs.push(Job { what: format!("upsert into `{}`", g.table), sql: &g.upsert, params });
        }
    }
    Ok(())
}

/// A min or max value as a number, to order it among the partitions' values; `None`
/// for what is not a number (ordered by its text instead). Temporal values order by
/// their count of microseconds or days: their text is not fixed-width (a timestamp
/// prints 0, 3 or 6 fractional digits, a TIME may be negative or exceed 99 hours).
fn number(v: &Value) -> Option<Decimal> {
    match v {
        Value::Float(f) => Decimal::try_from(*f).ok(),
        Value::Bool(_) => None,
        Value::Timestamp(us) | Value::Time(us) => Some(Decimal::from(*us)),
        Value::Date(days) => Some(Decimal::from(*days)),
        v => v.to_decimal(),
    }
}

fn quarantine_job(op: &QuarantineOp) -> Job<'_> {
    match op {
        QuarantineOp::Open(r) => Job {
            what: "insert into `quarantine`".to_owned(),
            sql: QUARANTINE_OPEN,
            params: vec![
                Box::new(r.table.as_deref()),
                Box::new(r.key.as_deref()),
                Box::new(r.stage.code()),
                Box::new(&*r.reason),
                Box::new(r.detail.as_str()),
                Box::new(r.position.as_deref()),
                // Origins are line or sequence numbers; one beyond i64 is not a real input.
                Box::new(i64::try_from(r.origin).unwrap_or(i64::MAX)),
                Box::new(r.payload.as_str()),
            ],
        },
        QuarantineOp::Resolve { table, key } => Job {
            what: "resolve in `quarantine`".to_owned(),
            sql: QUARANTINE_RESOLVE,
            params: vec![Box::new(table.as_str()), Box::new(key.as_str())],
        },
    }
}

// ---- recover ----------------------------------------------------------------

async fn recover(
    client: &mut Client,
    plan: &Plan,
    stream: &str,
    tables: &[TableId],
    group: Option<&GroupAssignment>,
) -> Result<(Recovered, HashMap<String, i64>), StoreError> {
    // One snapshot: the checkpoint, rows and quarantine agree.
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(|e| pg_error(e, "begin recovery".to_owned()))?;
    let mut versions = HashMap::new();
    let (checkpoint, state) = match group {
        None => {
            let saved = tx
                .query_opt(CHECKPOINT_READ, &[&stream])
                .await
                .map_err(|e| pg_error(e, "select from `caudal_checkpoint`".to_owned()))?;
            match saved {
                Some(row) => {
                    let read = || -> Result<(String, String), tokio_postgres::Error> {
                        Ok((row.try_get(0)?, row.try_get(1)?))
                    };
                    let (c, s) = read()
                        .map_err(|e| pg_error(e, "select from `caudal_checkpoint`".to_owned()))?;
                    (Some(Checkpoint(c)), Some(s))
                }
                None => (None, None),
            }
        }
        Some(a) => {
            let rows = read_partition_rows(&tx, stream).await?;
            let mut offsets = serde_json::Map::new();
            let mut marks = serde_json::Map::new();
            for (name, checkpoint, state, version) in rows {
                if let Ok(serde_json::Value::Object(o)) = serde_json::from_str(&checkpoint) {
                    offsets.extend(o);
                }
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&state) {
                    if let Some(serde_json::Value::Object(m)) = v.get("partitions") {
                        marks.extend(m.clone());
                    }
                }
                if a.partitions.contains(&name) {
                    versions.insert(name, version);
                }
            }
            let state = serde_json::json!({ "partitions": marks }).to_string();
            (Some(Checkpoint(serde_json::Value::Object(offsets).to_string())), Some(state))
        }
    };
    let mut rows: Vec<(TableId, Row)> = Vec::new();
    let mut partitions: Vec<Option<Arc<str>>> = Vec::new();
    let mut names: HashMap<String, Arc<str>> = HashMap::new();
    for &id in tables {
        let t = plan
            .silver
            .get(id)
            .ok_or_else(|| definite(format!("recovery of unknown table id {id}")))?;
        let context = || format!("select from `{}`", t.table);
        let got = match group {
            Some(a) if a.fact_tables.contains(&id) => {
                tx.query(&t.select_partitions, &[&a.partitions]).await
            }
            _ => tx.query(&t.select, &[]).await,
        }
        .map_err(|e| pg_error(e, context()))?;
        rows.reserve(got.len());
        for r in got {
            let mut values = Vec::with_capacity(t.types.len());
            for (i, ty) in t.types.iter().enumerate() {
                let cell: Cell = r.try_get(i).map_err(|e| pg_error(e, context()))?;
                values.push(typed(*ty, cell.0));
            }
            let partition: Option<String> =
                r.try_get(t.types.len()).map_err(|e| pg_error(e, context()))?;
            partitions.push(
                partition
                    .map(|p| names.entry(p).or_insert_with_key(|p| Arc::from(p.as_str())).clone()),
            );
            rows.push((id, values.into_boxed_slice()));
        }
    }
    let open_quarantine = read_open_quarantine(&tx).await?;
    tx.commit().await.map_err(|e| pg_error(e, "end recovery".to_owned()))?;
    Ok((Recovered { checkpoint, state, rows, open_quarantine, partitions }, versions))
}

/// The partition rows of a group's checkpoint: (partition, checkpoint, state, version).
async fn read_partition_rows(
    client: &impl tokio_postgres::GenericClient,
    stream: &str,
) -> Result<Vec<(String, String, String, i64)>, StoreError> {
    let prefix = partition_stream(stream, "");
    let context = || "select from `caudal_checkpoint`".to_owned();
    let rows = client
        .query(PARTITION_CHECKPOINT_READ, &[&prefix])
        .await
        .map_err(|e| pg_error(e, context()))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let read = || -> Result<(String, String, String, i64), tokio_postgres::Error> {
            Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?))
        };
        let (name, checkpoint, state, version) = read().map_err(|e| pg_error(e, context()))?;
        let name = name.strip_prefix(&prefix).unwrap_or(&name).to_owned();
        out.push((name, checkpoint, state, version));
    }
    Ok(out)
}

/// The committed progress of every partition of a consumer group's stream in
/// database `url`, by partition name.
///
/// # Errors
/// When the database cannot be reached (`Unavailable`) or the table read.
pub async fn group_progress(
    url: &str,
    stream: &str,
) -> Result<HashMap<String, PartitionProgress>, StoreError> {
    let client = connect(url).await?;
    let mut out = HashMap::new();
    for (name, checkpoint, state, _) in read_partition_rows(&client, stream).await? {
        let offset = serde_json::from_str::<HashMap<String, i64>>(&checkpoint)
            .ok()
            .and_then(|m| m.get(&name).copied())
            .unwrap_or(0);
        let lookups = serde_json::from_str::<serde_json::Value>(&state)
            .ok()
            .and_then(|v| v.get("lookups").cloned())
            .and_then(|l| serde_json::from_value(l).ok())
            .unwrap_or_default();
        out.insert(name, PartitionProgress { offset, lookups });
    }
    Ok(out)
}

async fn read_open_quarantine(tx: &Transaction<'_>) -> Result<Vec<QuarantineRecord>, StoreError> {
    let context = || "select from `quarantine`".to_owned();
    let rows = tx.query(QUARANTINE_READ_OPEN, &[]).await.map_err(|e| pg_error(e, context()))?;
    // Thousands of records share a handful of reasons.
    let mut reasons: HashMap<String, Arc<str>> = HashMap::new();
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let read = || -> Result<_, tokio_postgres::Error> {
            Ok((
                r.try_get::<_, i64>(0)?,
                r.try_get::<_, Option<String>>(1)?,
                r.try_get::<_, Option<String>>(2)?,
                r.try_get::<_, String>(3)?,
                r.try_get::<_, String>(4)?,
                r.try_get::<_, Option<String>>(5)?,
                r.try_get::<_, Option<String>>(6)?,
                r.try_get::<_, Option<i64>>(7)?,
                r.try_get::<_, Option<String>>(8)?,
            ))
        };
        let row = read().map_err(|e| pg_error(e, context()))?;
        out.push(super::quarantine_record(row, &mut reasons)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(v: &Value, ty: Type) -> Value {
        let mut buf = BytesMut::new();
        match encode(v, &ty, &mut buf).expect("encodes") {
            IsNull::Yes => Value::Null,
            IsNull::No => Cell::from_sql(&ty, &buf).expect("decodes").0,
        }
    }

    #[test]
    fn values_round_trip_through_the_binary_format() {
        let cases = [
            (Value::Int(i64::MIN), Type::INT8),
            (Value::Float(-0.0), Type::FLOAT8),
            (Value::Bool(true), Type::BOOL),
            (Value::Decimal(Decimal::from_str_exact("-0.0050").unwrap()), Type::NUMERIC),
            (Value::Str("héllo".into()), Type::TEXT),
            (Value::Bytes(vec![0, 255].into()), Type::BYTEA),
            (Value::Timestamp(-1), Type::TIMESTAMP),
            (Value::Timestamp(1_767_600_000_123_456), Type::TIMESTAMP),
            (Value::Date(-1), Type::DATE),
            (Value::Time(-1_500_000), Type::INTERVAL),
            (Value::Time(838 * 3_600_000_000), Type::INTERVAL),
        ];
        for (v, ty) in cases {
            assert_eq!(format!("{:?}", round_trip(&v, ty.clone())), format!("{v:?}"), "{ty}");
        }
        assert!(
            matches!(round_trip(&Value::Float(f64::NAN), Type::FLOAT8), Value::Float(f) if f.is_nan())
        );
        assert_eq!(round_trip(&Value::Null, Type::INT8), Value::Null);
        // uint columns are NUMERIC(20,0) and read back as UInt.
        let big = round_trip(&Value::UInt(u64::MAX), Type::NUMERIC);
        assert_eq!(typed(ColumnType::UInt, big), Value::UInt(u64::MAX));
        // Gold text columns hold the display form.
        assert_eq!(round_trip(&Value::Int(5), Type::TEXT), Value::Str("5".into()));
        assert!(encode(&Value::Str("x".into()), &Type::INT8, &mut BytesMut::new()).is_err());
    }

    #[test]
    fn a_group_commit_writes_one_checkpoint_row_per_assigned_partition() {
        let commit = Commit {
            checkpoint: Checkpoint(
                r#"{"db.items/0":7,"db.items/1":9,"state:db.orders/0":4}"#.to_owned(),
            ),
            state: r#"{"partitions":{"db.items/0":{"file":"b.1","pos":3,"row":0}}}"#.to_owned(),
            ..Commit::default()
        };
        let rows = partition_checkpoints("main", &commit, &["db.items/0".to_owned()])
            .expect("a map of offsets");
        assert_eq!(rows.len(), 1, "only the assigned partition: {rows:?}");
        let (name, stream, checkpoint, state, offset) = &rows[0];
        assert_eq!((name.as_str(), stream.as_str(), *offset), ("db.items/0", "main@db.items/0", 7));
        assert_eq!(checkpoint, r#"{"db.items/0":7}"#);
        let state: serde_json::Value = serde_json::from_str(state).expect("json");
        assert_eq!(state["partitions"]["db.items/0"]["pos"], 3);
        assert_eq!(state["lookups"]["db.orders/0"], 4);
        let empty = Commit::default();
        assert!(partition_checkpoints("main", &empty, &["db.items/0".to_owned()])
            .expect("empty")
            .is_empty());
    }

    #[test]
    fn decimals_keep_their_scale_and_floats_their_digits() {
        let d =
            round_trip(&Value::Decimal(Decimal::from_str_exact("12.50").unwrap()), Type::NUMERIC);
        assert_eq!(d.to_string(), "12.50");
        assert_eq!(round_trip(&Value::Float(2.5), Type::NUMERIC).to_string(), "2.5");
        assert_eq!(round_trip(&Value::Int(7), Type::NUMERIC).to_string(), "7");
    }
}
