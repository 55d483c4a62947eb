//! The incremental snapshot (DBLog's watermark method, as Debezium's incremental
//! snapshots and Flink CDC read tables): the binlog streams from the start, and
//! the tables are read in primary-key chunks, each in its own short transaction,
//! merged into the stream at the point of the binlog the chunk is the state of.
//! No transaction stays open longer than one chunk, so a large snapshot does not
//! make the server keep MVCC history for its whole length.
//!
//! **First view** ([`begin`]). One short consistent-snapshot view (the same as
//! the consistent snapshot's, see [`snapshot::begin`]) gives the binlog position
//! S0 streaming starts from. In it, tables without a primary key are read whole
//! (they cannot be chunked by key), as op `r` at S0; the keyed tables that are
//! empty in it are left out, and the others, in catalog order, are the plan. A
//! restart during this stage starts it over.
//!
//! **Chunks** ([`Chunks`], driven by [`super::binlog::stream`]). Between binlog
//! events, at a transaction boundary, the next chunk
//! (`WHERE key > last ORDER BY key LIMIT n`) is read on a second connection while
//! the stream waits:
//!
//! - *MariaDB*: in a consistent-snapshot transaction whose exact binlog position S
//!   the server reports (`binlog_snapshot_file` / `binlog_snapshot_position`). The
//!   chunk is the state of its rows at S, so it goes out when the stream reaches
//!   S, at `(file of S, S, row u32::MAX)`: after every change before S, before
//!   every change after it, with no gap and no overlap. A chunk whose S the
//!   stream has already passed (stale) is read again.
//! - *MySQL 8* (no snapshot position; written from its documentation, untested
//!   here): DBLog's window. The binlog position and executed GTID set are read
//!   before (low) and after (high) the chunk. Rows of the chunk's table streamed
//!   once the stream passed low are changes at least as new as the chunk: their
//!   keys are noted, and when the stream reaches high, the chunk goes out without
//!   those rows, at the stream's position. Low and high compare by GTID set when
//!   the stream follows one, by file and offset otherwise.
//!
//! Before a chunk goes out, its table's schema at that point of the stream is
//! compared with the one it was read with: a DDL statement in between (the
//! stream applied it on the way) makes the chunk be read again, now with the new
//! schema. A chunk read the server refuses (the table changed under it, a
//! metadata lock held past [`LOCK_WAIT_SECS`]) is retried once the stream has
//! passed the server's position at the failure, so past the DDL that caused it.
//!
//! **Checkpoints** carry, with the stream's position, the next chunk
//! ([`SnapshotProgress`] at stage `chunks`: table, last key read, tables left).
//! A chunk goes out in the batch whose checkpoint first names the next one, so a
//! restart (even after `kill -9`) streams from that checkpoint and reads the next
//! chunk at a new point: each row is read once. Tables included on a restart that
//! the checkpoint does not know join the plan.
//!
//! Progress is logged per table (rows read against the server's estimate) as
//! the consistent snapshot does; every row is op `r` with `snapshot = true`, the
//! very last one `snapshot = last`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, Params, Row, Value as MyValue};

use super::gtid::GtidSet;
use super::schema::{self, driver_error, DbTable, Via};
use super::snapshot::{self, chunk_params, chunk_sql, key_from_json, key_to_json};
use super::{
    connect, send, Capture, MysqlCheckpoint, RowChange, SnapshotMode, SnapshotProgress,
    SnapshotStage, BATCH_ROWS,
};
use crate::bus;
use crate::capture::CaptureError;
use crate::event::{Batch, Event, Op, Position, Snapshot, Value};

const CTX: &str = "incremental snapshot";
/// How long a chunk read waits for a metadata lock (a DDL statement on its table)
/// before it gives up and is retried later: the binlog stream waits while a chunk
/// is read, so the wait must stay short.
pub const LOCK_WAIT_SECS: u32 = 2;
/// Failed reads of one chunk in a row before the snapshot stops with an error:
/// a refusal that outlives many DDL statements is not one.
const MAX_RETRIES: u32 = 20;

/// A snapshot read of one row at `at`.
fn read_event(
    cap: &mut Capture,
    table: &str,
    db: &DbTable,
    values: Vec<Option<MyValue>>,
    at: &Position,
    ts_ms: i64,
) -> Event {
    let natives = values
        .into_iter()
        .zip(&db.columns)
        .map(|(v, col)| schema::native(v.unwrap_or(MyValue::NULL), col, Via::Query))
        .collect();
    cap.event(RowChange {
        table: table.to_owned(),
        op: Op::Read,
        before: None,
        after: Some(natives),
        position: at.clone(),
        snapshot: Snapshot::True,
        gtid: None,
        ts_ms,
        server_id: 0,
    })
}

/// The progress that reads `tables` from their first chunk; `None` when empty.
fn plan(mut tables: Vec<String>) -> Option<SnapshotProgress> {
    if tables.is_empty() {
        return None;
    }
    let table = tables.remove(0);
    Some(SnapshotProgress { table, after: None, stage: SnapshotStage::Chunks, then: tables })
}

/// The first view: reads the tables without a primary key and plans the chunks
/// of the others. Returns `Ok(true)` once `checkpoint` holds the position to
/// stream from (and the plan), `Ok(false)` on shutdown.
///
/// # Errors
/// Transient on connection loss, definite on refusals.
pub(crate) async fn begin(
    cap: &mut Capture,
    mut conn: Conn,
    checkpoint: &mut Option<MysqlCheckpoint>,
    out: &bus::Sender,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<bool, CaptureError> {
    let started = Instant::now();
    let view = snapshot::begin(&mut conn, &cap.server).await?;
    let file: Arc<str> = Arc::from(view.file.as_str());
    let at = Position::Binlog { file: file.clone(), pos: view.pos, row: u32::MAX };
    let mut chunked = Vec::new();
    let mut keyless = Vec::new();
    for (_, name) in cap.tables.clone() {
        let Some(mapping) = cap.mappings.get(&name) else {
            return Err(CaptureError::Definite {
                message: format!("table `{name}` has no schema"),
                hint: None,
            });
        };
        if mapping.db.key.is_empty() {
            keyless.push(name);
        } else if !snapshot::is_empty(&mut conn, &cap.db, &name).await? {
            chunked.push(name);
        }
    }
    tracing::info!(
        file = %file,
        pos = view.pos,
        gtid = view.gtid.as_deref().unwrap_or(""),
        chunked = chunked.len(),
        keyless = keyless.len(),
        "mysql incremental snapshot started"
    );
    let chunks = plan(chunked);
    let checkpoint_at = |cap: &Capture, snapshot: Option<SnapshotProgress>| MysqlCheckpoint {
        file: view.file.clone(),
        pos: view.pos,
        gtid: view.gtid.clone(),
        skip: None,
        snapshot,
        origin: cap.origin,
        schemas: Some(cap.schemas.clone()),
    };
    let ts_ms = super::now_ms();
    let mut sent_any = false;
    for (k, name) in keyless.iter().enumerate() {
        let Some(db) = cap.mappings.get(name).map(|m| m.db.clone()) else { continue };
        let mut offset = 0u64;
        loop {
            let sql = chunk_sql(&cap.db, &db, false, offset);
            // Prepared (binary protocol), as every snapshot read: values come typed.
            let mut rows: Vec<Row> =
                conn.exec(sql, Params::Empty).await.map_err(|e| driver_error(CTX, e))?;
            let more = rows.len() > BATCH_ROWS;
            rows.truncate(BATCH_ROWS);
            offset += rows.len() as u64;
            let mut events: Vec<Event> = rows
                .into_iter()
                .map(|r| read_event(cap, name, &db, r.unwrap_raw(), &at, ts_ms))
                .collect();
            let stage_done = !more && k + 1 == keyless.len();
            if stage_done && chunks.is_none() {
                snapshot::mark_last(&mut events);
            }
            let progress = if stage_done {
                chunks.clone()
            } else {
                Some(SnapshotProgress {
                    table: name.clone(),
                    after: None,
                    stage: SnapshotStage::Keyless,
                    then: Vec::new(),
                })
            };
            // Sent as read: the view stays open while a batch waits for the
            // queue, but the stage holds only the keyless tables.
            let cp = checkpoint_at(cap, progress);
            let batch = Batch { events, checkpoint: cp.token(), bytes: None, caught_up_ms: None };
            if !send(out, shutdown, batch).await? {
                return Ok(false);
            }
            *checkpoint = Some(cp);
            sent_any = true;
            if !more {
                break;
            }
        }
        tracing::info!(table = %name, rows = offset, "mysql snapshot of table without a primary key finished");
    }
    // The view only read; ending it releases its undo history.
    conn.query_drop("COMMIT").await.map_err(|e| driver_error(CTX, e))?;
    let _ = conn.disconnect().await;
    if !sent_any {
        let cp = checkpoint_at(cap, chunks.clone());
        let batch =
            Batch { events: Vec::new(), checkpoint: cp.token(), bytes: None, caught_up_ms: None };
        if !send(out, shutdown, batch).await? {
            return Ok(false);
        }
        *checkpoint = Some(cp);
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(seconds = format!("{secs:.2}"), "mysql incremental snapshot first view closed");
    if chunks.is_none() {
        tracing::info!(file = %file, pos = view.pos, "mysql snapshot finished");
    }
    Ok(true)
}

/// A binlog point as file and offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mark {
    pub file: Arc<str>,
    pub pos: u64,
    /// The executed GTID set at the point (MySQL), when the server has GTIDs.
    pub gtid: Option<GtidSet>,
}

/// Whether `a` is at or after `b` in the binlog (files by their sequence number).
pub(crate) fn at_or_after(a: (&Arc<str>, u64), b: (&Arc<str>, u64)) -> bool {
    let pa = Position::Binlog { file: a.0.clone(), pos: a.1, row: 0 };
    let pb = Position::Binlog { file: b.0.clone(), pos: b.1, row: 0 };
    pa.partial_cmp(&pb).is_some_and(|o| o != std::cmp::Ordering::Less)
}

/// Where a chunk read stands in the binlog.
#[derive(Debug)]
enum ChunkAt {
    /// MariaDB: the binlog position of the chunk's view; the chunk is the state
    /// of its rows there.
    View { file: Arc<str>, pos: u64 },
    /// MySQL: the watermarks around the read, and the keys of the chunk's table
    /// streamed since the stream passed `low`.
    Window { low: Mark, high: Mark, open: bool, changed: HashSet<String> },
}

/// A chunk read and waiting for the stream to reach its point.
#[derive(Debug)]
struct Chunk {
    table: String,
    /// The schema the chunk was read with.
    db: DbTable,
    rows: Vec<Vec<Option<MyValue>>>,
    /// The progress once this chunk is delivered.
    next: Option<SnapshotProgress>,
    at: ChunkAt,
    ts_ms: i64,
}

/// Progress of the table being read, for the logs.
struct TableLog {
    name: String,
    estimate: Option<u64>,
    rows: u64,
    started: Instant,
    logged: Instant,
}

/// The chunk stage of an incremental snapshot, driven by the binlog stream.
///
/// The stream calls, between events: [`Chunks::wants_read`] then
/// [`Chunks::read`] at a transaction boundary; [`Chunks::due_before`] before each
/// event and [`Chunks::due`] after each, and on either [`Chunks::emit`] to put
/// the chunk into the stream; [`Chunks::record`] with the changes of each rows
/// event; and [`Chunks::progress`] for every checkpoint. The chunk goes out
/// exactly once, at a point where the stream has sent every change before the
/// chunk's state and none after it (MariaDB) or every change that could be
/// newer than a row it keeps (MySQL).
pub(crate) struct Chunks {
    opts: Opts,
    mariadb: bool,
    conn: Option<Conn>,
    /// The next chunk to read; `None` once the snapshot is complete.
    next: Option<SnapshotProgress>,
    ready: Option<Chunk>,
    /// After a refused read: not again before the stream has passed this point.
    retry_after: Option<(Arc<str>, u64)>,
    failures: u32,
    table: Option<TableLog>,
    started: Instant,
}

impl Chunks {
    /// The chunk stage to run with the stream from `cp`: the checkpoint's
    /// unfinished chunks, and included tables it does not know (new in
    /// `source.include` or under `[tables]`) in incremental mode. `None` when
    /// there is nothing to read.
    pub fn plan(
        cap: &Capture,
        cp: &MysqlCheckpoint,
        mode: SnapshotMode,
        opts: &Opts,
    ) -> Option<Self> {
        let mut next = cp.snapshot.clone().filter(|p| p.stage == SnapshotStage::Chunks);
        if mode == SnapshotMode::Incremental {
            if let Some(known) = &cp.schemas {
                let planned = |t: &str| {
                    next.as_ref().is_some_and(|p| p.table == t || p.then.iter().any(|n| n == t))
                };
                let new: Vec<String> = cap
                    .tables
                    .iter()
                    .map(|(_, t)| t.clone())
                    .filter(|t| known.get(t).is_none() && !planned(t))
                    .collect();
                if !new.is_empty() {
                    tracing::info!(tables = ?new, "newly included tables join the incremental snapshot");
                    next = match next {
                        Some(mut p) => {
                            p.then.extend(new);
                            Some(p)
                        }
                        None => plan(new),
                    };
                }
            }
        }
        let next = next?;
        Some(Self {
            opts: opts.clone(),
            mariadb: cap.server.mariadb,
            conn: None,
            next: Some(next),
            ready: None,
            retry_after: None,
            failures: 0,
            table: None,
            started: Instant::now(),
        })
    }

    /// The progress for a checkpoint of the stream now: the next chunk to read.
    pub fn progress(&self) -> Option<SnapshotProgress> {
        self.next.clone()
    }

    /// Whether the next chunk should be read now: none is waiting, the stream is
    /// at a transaction boundary, and past the point a refused read waits for.
    pub fn wants_read(&self, read_to: (&Arc<str>, u64), in_txn: bool) -> bool {
        self.ready.is_none()
            && self.next.is_some()
            && !in_txn
            && self.retry_after.as_ref().is_none_or(|(f, p)| at_or_after(read_to, (f, *p)))
    }

    /// Whether a waiting chunk must go out before an event that starts at
    /// `start` of `file` (MariaDB: the event is at or after the chunk's point).
    pub fn due_before(&self, file: &Arc<str>, start: u64) -> bool {
        match self.ready.as_ref().map(|c| &c.at) {
            Some(ChunkAt::View { file: f, pos }) => at_or_after((file, start), (f, *pos)),
            _ => false,
        }
    }

    /// Whether a waiting chunk goes out now that the stream has read up to
    /// `read_to` (and, with GTIDs, the transactions of `gtids`).
    pub fn due(&self, read_to: (&Arc<str>, u64), gtids: Option<&GtidSet>, in_txn: bool) -> bool {
        if in_txn {
            return false;
        }
        match self.ready.as_ref().map(|c| &c.at) {
            Some(ChunkAt::View { file, pos }) => at_or_after(read_to, (file, *pos)),
            Some(ChunkAt::Window { high, .. }) => reached(high, read_to, gtids),
            None => false,
        }
    }

    /// Notes the keys a rows event of `table` changed, while a MySQL chunk's
    /// window is open (the stream passed its low watermark).
    pub fn record(
        &mut self,
        cap: &Capture,
        table: &str,
        read_to: (&Arc<str>, u64),
        gtids: Option<&GtidSet>,
        events: &[Event],
    ) {
        let Some(chunk) = self.ready.as_mut().filter(|c| c.table == table) else { return };
        let ChunkAt::Window { low, open, changed, .. } = &mut chunk.at else { return };
        *open = *open || reached(low, read_to, gtids);
        if !*open {
            return;
        }
        for e in events {
            let Event::Change(c) = e else { continue };
            let key = &cap.catalog.table(c.table).key;
            for row in [&c.before, &c.after].into_iter().flatten() {
                changed.insert(key_text(row, key));
            }
        }
    }

    /// Reads the next chunk.
    ///
    /// # Errors
    /// Transient on connection loss; definite on a missing privilege or a read
    /// refused [`MAX_RETRIES`] times in a row.
    pub async fn read(
        &mut self,
        cap: &mut Capture,
        read_to: (&Arc<str>, u64),
    ) -> Result<(), CaptureError> {
        let Some(next) = self.next.clone() else { return Ok(()) };
        let Some(db) = cap.mappings.get(&next.table).map(|m| m.db.clone()) else {
            // Dropped (or renamed away) since the plan was made: nothing to read.
            tracing::warn!(table = %next.table, "table gone; it leaves the incremental snapshot");
            self.advance(after_table(&next));
            return Ok(());
        };
        let after: Option<Vec<MyValue>> = match &next.after {
            None => None,
            Some(keys) => {
                Some(keys.iter().map(key_from_json).collect::<Option<_>>().ok_or_else(|| {
                    CaptureError::Definite {
                        message: format!(
                            "the checkpoint's snapshot key of `{}` is unreadable",
                            next.table
                        ),
                        hint: Some("start with a new store to take a new snapshot".into()),
                    }
                })?)
            }
        };
        if self.conn.is_none() {
            let mut conn = connect(&self.opts).await?;
            for sql in [
                // TIMESTAMP columns are then read as UTC, as the binlog holds them.
                "SET SESSION time_zone = '+00:00'".to_owned(),
                "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ".to_owned(),
                format!("SET SESSION lock_wait_timeout = {LOCK_WAIT_SECS}"),
            ] {
                conn.query_drop(sql).await.map_err(|e| driver_error(CTX, e))?;
            }
            self.conn = Some(conn);
        }
        let Some(conn) = self.conn.as_mut() else { return Ok(()) };
        if self.table.as_ref().is_none_or(|t| t.name != next.table) {
            let estimate = snapshot::estimated_rows(conn, &cap.db, &next.table).await;
            tracing::info!(table = %next.table, rows_estimate = estimate.unwrap_or(0), resumed = next.after.is_some(), "mysql snapshot of table started");
            self.table = Some(TableLog {
                name: next.table.clone(),
                estimate,
                rows: 0,
                started: Instant::now(),
                logged: Instant::now(),
            });
        }
        let read = if self.mariadb {
            read_view(conn, &cap.db, &db, after.as_deref()).await
        } else {
            read_window(conn, &cap.db, &db, after.as_deref(), cap.server.gtid).await
        };
        let (rows, more, last_key, at) = match read {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(e),
            Err(mysql_async::Error::Server(e))
                if !matches!(e.code, 1044 | 1045 | 1142 | 1143 | 1227) =>
            {
                let _ = conn.query_drop("ROLLBACK").await;
                self.failures += 1;
                if self.failures > MAX_RETRIES {
                    return Err(CaptureError::Definite {
                        message: format!(
                            "{CTX}: reading a chunk of `{}` failed {} times: {}",
                            next.table, self.failures, e.message
                        ),
                        hint: None,
                    });
                }
                // A DDL statement on the table (or its metadata lock): retry once
                // the stream, which applies it to the schema, has passed it.
                let now = server_position(conn).await.map_err(|e| driver_error(CTX, e))?;
                tracing::warn!(table = %next.table, code = e.code, error = %e.message, "chunk read refused; retrying after the stream passes the current binlog position");
                self.retry_after = now.map(|m| (m.file, m.pos));
                return Ok(());
            }
            Err(e) => {
                self.conn = None;
                return Err(driver_error(CTX, e));
            }
        };
        self.failures = 0;
        self.retry_after = None;
        if let ChunkAt::View { file, pos } = &at {
            if !at_or_after((file, *pos), read_to) {
                // The stream is already past the view: it sent changes the chunk
                // predates. Read it again (at a later point) next time.
                tracing::debug!(table = %next.table, "stale chunk; reading it again");
                return Ok(());
            }
        }
        let chunk_next = if more {
            let after = last_key.map(|k| k.iter().map(key_to_json).collect());
            Some(SnapshotProgress { after, ..next.clone() })
        } else {
            after_table(&next)
        };
        self.ready = Some(Chunk {
            table: next.table.clone(),
            db,
            rows,
            next: chunk_next,
            at,
            ts_ms: super::now_ms(),
        });
        Ok(())
    }

    /// Puts the waiting chunk into the stream at the stream's boundary
    /// (`file`, `resume`), or drops it to be read again when its table's schema
    /// changed since the read.
    pub fn emit(&mut self, cap: &mut Capture, file: &Arc<str>, resume: u64) -> Vec<Event> {
        let Some(chunk) = self.ready.take() else { return Vec::new() };
        if cap.mappings.get(&chunk.table).map(|m| &m.db) != Some(&chunk.db) {
            tracing::info!(table = %chunk.table, "table schema changed during a chunk read; reading it again");
            return Vec::new();
        }
        let (position, changed) = match chunk.at {
            ChunkAt::View { file, pos } => (Position::Binlog { file, pos, row: u32::MAX }, None),
            ChunkAt::Window { changed, .. } => {
                (Position::Binlog { file: file.clone(), pos: resume, row: u32::MAX }, Some(changed))
            }
        };
        let Chunk { table, db, rows, next, ts_ms, .. } = chunk;
        let filter = changed.filter(|c| !c.is_empty()).and_then(|changed| {
            let mapping = cap.mappings.get(&table)?.clone();
            let schema = cap.catalog.table(mapping.table);
            Some((mapping, schema.key.clone(), changed, schema.clone()))
        });
        let total = rows.len() as u64;
        let mut events = Vec::with_capacity(rows.len());
        for values in rows {
            if let Some((mapping, key, changed, schema)) = &filter {
                let natives: Vec<Result<Value, String>> = values
                    .iter()
                    .zip(&db.columns)
                    .map(|(v, col)| {
                        schema::native(v.clone().unwrap_or(MyValue::NULL), col, Via::Query)
                    })
                    .collect();
                if let Ok((row, _)) = mapping.row(schema, &natives) {
                    if changed.contains(&key_text(&row, key)) {
                        // Streamed in the window: that change is at least as new.
                        continue;
                    }
                }
            }
            events.push(read_event(cap, &table, &db, values, &position, ts_ms));
        }
        if next.is_none() {
            snapshot::mark_last(&mut events);
        }
        if let Some(log) = self.table.as_mut() {
            log.rows += total;
            if log.logged.elapsed() >= snapshot::PROGRESS_EVERY {
                log.logged = Instant::now();
                let all = log.estimate.unwrap_or(0).max(log.rows);
                let percent = if all == 0 { 100.0 } else { log.rows as f64 * 100.0 / all as f64 };
                tracing::info!(table = %log.name, rows = log.rows, rows_estimate = all, percent = format!("{percent:.0}"), "mysql snapshot progress");
            }
        }
        self.advance(next);
        events
    }

    /// Moves on to `next`, logging finished tables and the finished snapshot.
    fn advance(&mut self, next: Option<SnapshotProgress>) {
        let same_table = matches!((&next, &self.table), (Some(n), Some(t)) if n.table == t.name);
        if !same_table {
            if let Some(log) = self.table.take() {
                let secs = log.started.elapsed().as_secs_f64();
                tracing::info!(table = %log.name, rows = log.rows, seconds = format!("{secs:.1}"), "mysql snapshot of table finished");
            }
        }
        self.next = next;
        if self.next.is_none() {
            let secs = self.started.elapsed().as_secs_f64();
            tracing::info!(seconds = format!("{secs:.1}"), "mysql incremental snapshot finished");
            // No more chunks: the connection is not needed.
            self.conn = None;
        }
    }
}

/// The progress after the last chunk of `p.table`.
fn after_table(p: &SnapshotProgress) -> Option<SnapshotProgress> {
    plan(p.then.clone())
}

/// Whether the stream has passed `mark`: by GTID set when both have one,
/// otherwise by file and offset.
fn reached(mark: &Mark, read_to: (&Arc<str>, u64), gtids: Option<&GtidSet>) -> bool {
    match (&mark.gtid, gtids) {
        (Some(want), Some(have)) => have.includes(want),
        _ => at_or_after(read_to, (&mark.file, mark.pos)),
    }
}

/// A row's key as text, to match chunk rows with streamed ones (both decoded
/// into the same catalog values).
fn key_text(row: &[Value], key: &[usize]) -> String {
    let values: Vec<Option<&Value>> = key.iter().map(|&i| row.get(i)).collect();
    format!("{values:?}")
}

type ChunkRead = (Vec<Vec<Option<MyValue>>>, bool, Option<Vec<MyValue>>, ChunkAt);

/// The rows of one chunk: one page by key after `after`, or a table without a
/// primary key whole (it cannot be chunked). Returns the rows, whether more
/// follow, and the key of the last row.
async fn chunk_rows(
    conn: &mut Conn,
    db_name: &str,
    db: &DbTable,
    after: Option<&[MyValue]>,
) -> Result<(Vec<Vec<Option<MyValue>>>, bool, Option<Vec<MyValue>>), mysql_async::Error> {
    if db.key.is_empty() {
        let mut all = Vec::new();
        loop {
            let sql = chunk_sql(db_name, db, false, all.len() as u64);
            let rows: Vec<Row> = conn.exec(sql, Params::Empty).await?;
            let more = rows.len() > BATCH_ROWS;
            all.extend(rows.into_iter().take(BATCH_ROWS).map(Row::unwrap_raw));
            if !more {
                return Ok((all, false, None));
            }
        }
    }
    let sql = chunk_sql(db_name, db, after.is_some(), 0);
    let params = after.map_or_else(Vec::new, chunk_params);
    let params = if params.is_empty() { Params::Empty } else { Params::Positional(params) };
    let mut rows: Vec<Vec<Option<MyValue>>> =
        conn.exec::<Row, _, _>(sql, params).await?.into_iter().map(Row::unwrap_raw).collect();
    let more = rows.len() > BATCH_ROWS;
    rows.truncate(BATCH_ROWS);
    let last_key = rows.last().map(|values| {
        db.key.iter().map(|&k| values.get(k).cloned().flatten().unwrap_or(MyValue::NULL)).collect()
    });
    Ok((rows, more, last_key))
}

/// MariaDB: the chunk in a consistent-snapshot view, at the view's position.
async fn read_view(
    conn: &mut Conn,
    db_name: &str,
    db: &DbTable,
    after: Option<&[MyValue]>,
) -> Result<Result<ChunkRead, CaptureError>, mysql_async::Error> {
    conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT").await?;
    let status: Vec<(String, String)> = conn.query("SHOW STATUS LIKE 'binlog_snapshot_%'").await?;
    let get = |name: &str| {
        status.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    };
    let file = get("binlog_snapshot_file").filter(|f| !f.is_empty());
    let pos = get("binlog_snapshot_position").and_then(|p| p.parse::<u64>().ok());
    let (Some(file), Some(pos)) = (file, pos) else {
        conn.query_drop("ROLLBACK").await?;
        return Ok(Err(CaptureError::Definite {
            message: "the server reports no binlog snapshot position".into(),
            hint: Some("is the binlog on (`log_bin`)?".into()),
        }));
    };
    let (rows, more, last) = chunk_rows(conn, db_name, db, after).await?;
    // Ends the view at once: it only read.
    conn.query_drop("COMMIT").await?;
    Ok(Ok((rows, more, last, ChunkAt::View { file: Arc::from(file.as_str()), pos })))
}

/// MySQL (untested here): the chunk between a low and a high watermark.
async fn read_window(
    conn: &mut Conn,
    db_name: &str,
    db: &DbTable,
    after: Option<&[MyValue]>,
    gtid: bool,
) -> Result<Result<ChunkRead, CaptureError>, mysql_async::Error> {
    let Some(mut low) = server_position(conn).await? else {
        return Ok(Err(no_position()));
    };
    // One view for a table read whole by offset; a keyed chunk is one statement.
    conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT").await?;
    let (rows, more, last) = chunk_rows(conn, db_name, db, after).await?;
    conn.query_drop("COMMIT").await?;
    let Some(mut high) = server_position(conn).await? else {
        return Ok(Err(no_position()));
    };
    if !gtid {
        low.gtid = None;
        high.gtid = None;
    }
    let at = ChunkAt::Window { low, high, open: false, changed: HashSet::new() };
    Ok(Ok((rows, more, last, at)))
}

fn no_position() -> CaptureError {
    CaptureError::Definite {
        message: "the server reports no binlog position".into(),
        hint: Some("is the binlog on (`log_bin`)?".into()),
    }
}

/// The server's current binlog position (and, on MySQL, its executed GTID set).
async fn server_position(conn: &mut Conn) -> Result<Option<Mark>, mysql_async::Error> {
    let status: Option<Row> = match conn.query_first("SHOW BINARY LOG STATUS").await {
        Ok(r) => r,
        // Before MySQL 8.2, and on MariaDB, the statement has its old name.
        Err(mysql_async::Error::Server(_)) => conn.query_first("SHOW MASTER STATUS").await?,
        Err(e) => return Err(e),
    };
    let Some(mut status) = status else { return Ok(None) };
    let file: Option<String> = status.take_opt(0).and_then(Result::ok);
    let pos: Option<u64> = status.take_opt(1).and_then(Result::ok);
    // `Executed_Gtid_Set` (MySQL): column 4; MariaDB has no such column.
    let gtid = status
        .take_opt::<String, usize>(4)
        .and_then(Result::ok)
        .filter(|g| !g.trim().is_empty())
        .and_then(|g| GtidSet::parse(&g, false).ok());
    Ok(match (file, pos) {
        (Some(file), Some(pos)) => Some(Mark { file: Arc::from(file.as_str()), pos, gtid }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binlog_points_order_by_file_number_then_offset() {
        let f1: Arc<str> = Arc::from("bin.000009");
        let f2: Arc<str> = Arc::from("bin.000010");
        assert!(at_or_after((&f1, 400), (&f1, 400)));
        assert!(at_or_after((&f1, 401), (&f1, 400)));
        assert!(!at_or_after((&f1, 399), (&f1, 400)));
        assert!(at_or_after((&f2, 4), (&f1, 9_000)), "a later file is later");
    }

    #[test]
    fn a_plan_reads_its_tables_in_order() {
        assert_eq!(plan(Vec::new()), None);
        let p = plan(vec!["a".into(), "b".into(), "c".into()]).unwrap();
        assert_eq!(
            (p.table.as_str(), p.then.clone(), p.stage),
            ("a", vec!["b".to_owned(), "c".to_owned()], SnapshotStage::Chunks)
        );
        let q = after_table(&p).unwrap();
        assert_eq!((q.table.as_str(), q.after, q.then), ("b", None, vec!["c".to_owned()]));
    }

    #[test]
    fn watermarks_compare_by_gtid_set_when_there_is_one() {
        let file: Arc<str> = Arc::from("bin.000001");
        let uuid = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
        let mark = Mark {
            file: file.clone(),
            pos: 500,
            gtid: Some(GtidSet::parse(&format!("{uuid}:1-10"), false).unwrap()),
        };
        let have = GtidSet::parse(&format!("{uuid}:1-9"), false).unwrap();
        assert!(!reached(&mark, (&file, 900), Some(&have)), "the GTID set decides");
        let have = GtidSet::parse(&format!("{uuid}:1-10"), false).unwrap();
        assert!(reached(&mark, (&file, 100), Some(&have)));
        assert!(reached(&mark, (&file, 500), None), "file and offset without a set");
        assert!(!reached(&mark, (&file, 499), None));
    }

    /// A capture of table `t (id INT PRIMARY KEY, v TEXT)` on MySQL.
    fn capture() -> Capture {
        use crate::capture::mysql::schema::{DbColumn, DbKind, ServerInfo};
        use crate::event::{Catalog, Column, ColumnType, TableSchema};
        let schema = TableSchema {
            name: "t".into(),
            columns: vec![
                Column { name: "id".into(), ty: ColumnType::Int },
                Column { name: "v".into(), ty: ColumnType::String },
            ],
            key: vec![0],
        };
        let db = DbTable {
            name: "t".into(),
            columns: vec![
                DbColumn { name: "id".into(), kind: DbKind::Integer { bits: 32, unsigned: false } },
                DbColumn { name: "v".into(), kind: DbKind::Text { latin1: false } },
            ],
            key: vec![0],
            default_latin1: false,
        };
        let mut cap = Capture {
            catalog: Arc::new(Catalog::new(vec![schema])),
            db: "erp".into(),
            server_name: "erp".into(),
            server_id: 1,
            tables: vec![(0, "t".into())],
            mappings: Default::default(),
            schemas: Default::default(),
            origin: 0,
            server: ServerInfo { mariadb: false, gtid: false },
            metas: Default::default(),
        };
        cap.set_schema(0, db);
        cap
    }

    fn streamed(cap: &mut Capture, id: i64, file: &Arc<str>, pos: u64) -> Event {
        cap.event(RowChange {
            table: "t".into(),
            op: Op::Update,
            before: Some(vec![Ok(Value::Int(id)), Ok(Value::Str("old".into()))]),
            after: Some(vec![Ok(Value::Int(id)), Ok(Value::Str("new".into()))]),
            position: Position::Binlog { file: file.clone(), pos, row: 0 },
            snapshot: Snapshot::False,
            gtid: None,
            ts_ms: 0,
            server_id: 1,
        })
    }

    #[test]
    fn a_watermark_chunk_drops_the_rows_streamed_in_its_window() {
        let mut cap = capture();
        let file: Arc<str> = Arc::from("bin.000001");
        let mark = |pos| Mark { file: file.clone(), pos, gtid: None };
        let db = cap.mappings["t"].db.clone();
        let row = |id: i64| vec![Some(MyValue::Int(id)), Some(MyValue::Bytes(b"chunk".to_vec()))];
        let opts = Opts::from_url("mysql://root@localhost/erp").unwrap();
        let progress = plan(vec!["t".into()]);
        let mut chunks = Chunks {
            opts,
            mariadb: false,
            conn: None,
            next: progress.clone(),
            ready: Some(Chunk {
                table: "t".into(),
                db,
                rows: vec![row(1), row(2), row(3)],
                next: None,
                at: ChunkAt::Window {
                    low: mark(1000),
                    high: mark(2000),
                    open: false,
                    changed: HashSet::new(),
                },
                ts_ms: 0,
            }),
            retry_after: None,
            failures: 0,
            table: None,
            started: Instant::now(),
        };
        assert_eq!(chunks.progress(), progress, "the chunk is not out yet");
        // Before the low watermark: older than the chunk, which then wins.
        let before_low = [streamed(&mut cap, 1, &file, 900)];
        chunks.record(&cap, "t", (&file, 900), None, &before_low);
        // In the window: at least as new as the chunk, so the chunk's row goes.
        let in_window = [streamed(&mut cap, 2, &file, 1500)];
        chunks.record(&cap, "t", (&file, 1500), None, &in_window);
        assert!(!chunks.due((&file, 1500), None, false), "before the high watermark");
        assert!(!chunks.due((&file, 2000), None, true), "inside a transaction");
        assert!(chunks.due((&file, 2000), None, false));
        let out = chunks.emit(&mut cap, &file, 2000);
        let ids: Vec<String> = out
            .iter()
            .map(|e| match e {
                Event::Change(c) => {
                    assert_eq!(c.op, Op::Read);
                    let at = Position::Binlog { file: file.clone(), pos: 2000, row: u32::MAX };
                    assert_eq!(c.source.position.as_ref(), Some(&at));
                    format!("{:?}", c.after.as_ref().map(|r| r[0].clone()))
                }
                Event::Bad(b) => panic!("bad event: {}", b.detail),
            })
            .collect();
        assert_eq!(ids, ["Some(Int(1))", "Some(Int(3))"]);
        assert!(matches!(&out[1], Event::Change(c) if c.source.snapshot == Snapshot::Last));
        assert_eq!(chunks.progress(), None, "the snapshot is complete");
    }

    #[test]
    fn a_chunk_read_before_a_ddl_is_not_emitted_with_the_old_schema() {
        let mut cap = capture();
        let file: Arc<str> = Arc::from("bin.000001");
        let mut db = cap.mappings["t"].db.clone();
        db.columns.truncate(1);
        let mut chunks = Chunks {
            opts: Opts::from_url("mysql://root@localhost/erp").unwrap(),
            mariadb: true,
            conn: None,
            next: plan(vec!["t".into()]),
            ready: Some(Chunk {
                table: "t".into(),
                db,
                rows: vec![vec![Some(MyValue::Int(1))]],
                next: None,
                at: ChunkAt::View { file: file.clone(), pos: 500 },
                ts_ms: 0,
            }),
            retry_after: None,
            failures: 0,
            table: None,
            started: Instant::now(),
        };
        assert!(chunks.due_before(&file, 500) && !chunks.due_before(&file, 499));
        assert!(chunks.emit(&mut cap, &file, 500).is_empty(), "dropped, to be read again");
        assert!(chunks.wants_read((&file, 500), false), "read again at once");
        assert_eq!(chunks.progress().map(|p| p.table), Some("t".to_owned()));
    }

    #[test]
    fn keys_of_chunk_and_stream_rows_match_as_text() {
        let row = [Value::Int(7), Value::Str("x".into())];
        assert_eq!(key_text(&row, &[0]), key_text(&[Value::Int(7), Value::Null], &[0]));
        assert_ne!(key_text(&row, &[0]), key_text(&[Value::Int(8)], &[0]));
    }
}
