//! Streaming the binlog as a replica and turning rows events into changes.
//!
//! The source registers with `source.server_id` and asks for the binlog from the
//! checkpoint's GTID position when it has one (MariaDB: `@slave_connect_state`
//! then `COM_BINLOG_DUMP`; MySQL 8: `COM_BINLOG_DUMP_GTID` with the executed set),
//! otherwise from its file and offset. It follows transaction boundaries (GTID /
//! `BEGIN` open one, `XID` / any other query close it) so that a checkpoint always
//! names a boundary to restart from, as file/offset and as the GTID set of the
//! transactions before it, plus the last row delivered inside an open transaction;
//! a restart re-reads the transaction's table maps and skips what was delivered.
//! Each change carries its transaction's GTID (`source.gtid`).
//!
//! The server is asked for a heartbeat after [`HEARTBEAT`] of silence. A heartbeat
//! means the source has read everything: it sends a (possibly empty) batch whose
//! [`Batch::caught_up_ms`] is the time it arrived, so while the database is idle
//! the lag stays under one heartbeat period instead of growing with the age of
//! the last change.
//!
//! Rows events of included tables in the captured database are decoded through
//! their table map and the table's server schema (read from `information_schema`,
//! again after a DDL statement mentions the table). A row that cannot be decoded
//! or does not fit the declared types is a bad event, not an error.
//!
//! Failures: a lost connection, a server closing the stream or 30 s without any
//! event or heartbeat is transient (the caller reconnects from the last checkpoint
//! sent); a purged binlog file, a duplicate server id or compressed binlog events
//! are definite.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mysql_async::binlog::events::{EventData, RowsEventData, TableMapEvent};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStreamRequest, Conn, Opts, Row};

use super::ddl::{self, Ddl};
use super::gtid::{Gtid, GtidSet};
use super::incremental::Chunks;
use super::schema::{self, driver_error, DbTable};
use super::{
    connect, send, Capture, MysqlCheckpoint, RowChange, Schemas, BATCH_INTERVAL, BATCH_ROWS,
};
use crate::bus;
use crate::capture::CaptureError;
use crate::event::{BadEvent, Batch, Event, Op, Position, Snapshot, Value};

const CTX: &str = "reading the binlog";
/// The server sends a heartbeat after this much silence, so a dead connection is
/// told apart from an idle database, and an idle database reads as caught up: it
/// bounds the lag shown while idle. One tiny packet a second costs nothing.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence after which the connection is presumed dead.
const SILENCE_LIMIT: Duration = Duration::from_secs(30);
/// How often an idle stream still sends its (moved) checkpoint downstream, so a
/// restart does not re-read a long run of events of other tables.
const IDLE_CHECKPOINT: Duration = Duration::from_secs(1);

// Event type codes (MySQL `log_event.h`, MariaDB `log_event.h`).
const QUERY: u8 = 2;
const ROTATE: u8 = 4;
const FORMAT_DESCRIPTION: u8 = 15;
const XID: u8 = 16;
const TABLE_MAP: u8 = 19;
const HEARTBEAT_EVENT: u8 = 27;
const GTID: u8 = 33;
const ANONYMOUS_GTID: u8 = 34;
/// MySQL 8.0.26+: a heartbeat with a 64-bit position.
const HEARTBEAT_V2: u8 = 41;
/// MySQL 8.4: a GTID with a tag.
const GTID_TAGGED: u8 = 42;
const MARIADB_GTID: u8 = 162;
/// MariaDB's compressed query and rows events (`log_bin_compress = ON`).
const MARIADB_COMPRESSED: std::ops::RangeInclusive<u8> = 165..=171;
/// `LOG_EVENT_ARTIFICIAL_F`: made up by the server for this stream, not in the file.
const ARTIFICIAL: u16 = 0x20;

/// Where the stream is, in the terms of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub file: Arc<str>,
    /// The boundary to restart from: the end of the last event outside a
    /// transaction, or the start of the open transaction.
    pub resume: u64,
    pub in_txn: bool,
    /// The last row delivered of the open transaction.
    pub last_row: Option<(u64, u32)>,
    /// Rows of the first transaction that were delivered before the restart.
    pub skip: Option<(u64, u32)>,
    /// The transactions before `resume`, when the server has GTIDs and the start
    /// position named them.
    pub gtids: Option<GtidSet>,
    /// The GTID of the open transaction, and its text for the changes.
    txn_gtid: Option<(Gtid, Box<str>)>,
}

impl Cursor {
    pub fn new(cp: &MysqlCheckpoint, gtids: Option<GtidSet>) -> Self {
        Self {
            file: Arc::from(cp.file.as_str()),
            resume: cp.pos,
            in_txn: false,
            last_row: cp.skip,
            skip: cp.skip,
            gtids,
            txn_gtid: None,
        }
    }

    /// A GTID event opens a transaction with this id.
    pub fn begin_gtid(&mut self, gtid: Gtid) {
        let text = gtid.to_string().into_boxed_str();
        self.txn_gtid = Some((gtid, text));
    }

    /// The GTID of the open transaction.
    pub fn gtid(&self) -> Option<&str> {
        self.txn_gtid.as_ref().map(|(_, t)| &**t)
    }

    /// Tracks transaction boundaries through one event.
    pub fn advance(&mut self, event_type: u8, log_pos: u64, artificial: bool, query: Option<&str>) {
        match event_type {
            GTID | ANONYMOUS_GTID | GTID_TAGGED | MARIADB_GTID | TABLE_MAP => self.in_txn = true,
            QUERY if query.is_some_and(|q| q.trim().eq_ignore_ascii_case("BEGIN")) => {
                self.in_txn = true;
            }
            QUERY | XID => self.end_txn(),
            _ => {}
        }
        let bookkept = !artificial
            && log_pos != 0
            && !matches!(event_type, ROTATE | FORMAT_DESCRIPTION | HEARTBEAT_EVENT | HEARTBEAT_V2);
        // Never backwards: a stream resumed by GTID starts with the header events of
        // the file (format description, GTID list), whose offsets are before the
        // checkpoint's; an incremental snapshot's chunk may take a checkpoint then.
        if bookkept && !self.in_txn {
            self.resume = self.resume.max(log_pos);
        }
    }

    fn end_txn(&mut self) {
        self.in_txn = false;
        self.last_row = None;
        self.skip = None;
        if let (Some((gtid, _)), Some(set)) = (self.txn_gtid.take(), self.gtids.as_mut()) {
            set.add(&gtid);
        }
    }

    /// A rotate event: the stream continues in `file` at `pos`.
    pub fn rotate(&mut self, file: &str, pos: u64) {
        if *self.file != *file {
            self.file = Arc::from(file);
            self.skip = None;
            self.last_row = None;
            self.resume = pos;
        } else {
            // A stream resumed by GTID opens with a made-up rotate to the start of
            // the file holding the next transaction (the server skips the ones
            // before it): in the checkpoint's own file, its offset stays the
            // boundary.
            self.resume = self.resume.max(pos);
        }
        self.in_txn = false;
        self.txn_gtid = None;
    }

    /// Whether the row at (`pos`, `row`) was delivered before the restart.
    pub fn skipped(&self, pos: u64, row: u32) -> bool {
        self.skip.is_some_and(|s| (pos, row) <= s)
    }

    /// The checkpoint of this point, with the schemas in force at it (DDL statements
    /// close transactions, so the schemas at the open transaction's start are the
    /// current ones).
    pub fn checkpoint(&self, origin: u64, schemas: &Schemas) -> MysqlCheckpoint {
        MysqlCheckpoint {
            file: self.file.to_string(),
            pos: self.resume,
            gtid: self.gtids.as_ref().filter(|g| !g.is_empty()).map(ToString::to_string),
            skip: if self.in_txn { self.last_row } else { None },
            snapshot: None,
            origin,
            schemas: Some(schemas.clone()),
        }
    }
}

/// The checkpoint of the stream now, with the incremental snapshot's progress.
fn checkpoint_now(cursor: &Cursor, cap: &Capture, chunks: Option<&Chunks>) -> MysqlCheckpoint {
    let mut cp = cursor.checkpoint(cap.origin, &cap.schemas);
    cp.snapshot = chunks.and_then(Chunks::progress);
    cp
}

/// Streams the binlog from `start` until shutdown; `checkpoint` follows the last
/// batch sent. With `chunks`, the chunks of an incremental snapshot are read
/// between events and merged into the stream (see [`super::incremental`]).
///
/// # Errors
/// Transient on connection loss (the caller reconnects), definite on refusals.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn stream(
    cap: &mut Capture,
    opts: &Opts,
    mut schema_conn: Conn,
    start: MysqlCheckpoint,
    checkpoint: &mut Option<MysqlCheckpoint>,
    out: &bus::Sender,
    shutdown: &tokio_util::sync::CancellationToken,
    mut chunks: Option<Chunks>,
) -> Result<(), CaptureError> {
    let mariadb = cap.server.mariadb;
    // Resume by GTID when the checkpoint has a GTID position and the server GTIDs;
    // by file and offset otherwise (and then the GTID position of that offset is
    // looked up, on MariaDB, so the checkpoints from now on carry one).
    let by_gtid = match start.gtid.as_deref().filter(|g| cap.server.gtid && !g.trim().is_empty()) {
        Some(text) => Some(GtidSet::parse(text, mariadb).map_err(|e| CaptureError::Definite {
            message: format!("the checkpoint's GTID position is unreadable: {e}"),
            hint: Some("start with a new store to take a new snapshot".into()),
        })?),
        None => None,
    };
    let gtids = match &by_gtid {
        Some(set) => Some(set.clone()),
        None => {
            ensure_file_exists(&mut schema_conn, &start.file).await?;
            if mariadb {
                let text = mariadb_gtid_pos(&mut schema_conn, &start.file, start.pos).await?;
                text.and_then(|t| GtidSet::parse(&t, true).ok())
            } else {
                None
            }
        }
    };

    let mut conn = connect(opts).await?;
    // Ask for heartbeats (the period is in nanoseconds) and, on MariaDB, for real
    // GTID events instead of made-up BEGIN queries.
    conn.query_drop(format!("SET @master_heartbeat_period = {}", HEARTBEAT.as_nanos()))
        .await
        .map_err(|e| driver_error(CTX, e))?;
    if mariadb {
        conn.query_drop("SET @mariadb_slave_capability = 4")
            .await
            .map_err(|e| driver_error(CTX, e))?;
    }
    let request = BinlogStreamRequest::new(cap.server_id);
    let request = match &by_gtid {
        None => request.with_filename(start.file.as_bytes()).with_pos(start.pos),
        Some(set) if mariadb => {
            // The server finds the file by the state and skips the transactions
            // in it; the file and offset of the request are then ignored. Strict
            // mode off: the state may name a domain's GTID from an older server id.
            let state = set.to_string();
            for sql in [
                format!("SET @slave_connect_state = '{}'", state.replace('\'', "")),
                "SET @slave_gtid_strict_mode = 0".to_owned(),
                "SET @slave_gtid_ignore_duplicates = 0".to_owned(),
            ] {
                conn.query_drop(sql).await.map_err(|e| driver_error(CTX, e))?;
            }
            request.with_filename(&b""[..]).with_pos(4u64)
        }
        Some(set) => {
            // MySQL 8 (from its protocol documentation, untested here):
            // COM_BINLOG_DUMP_GTID sends every transaction not in the set.
            let sids = set.sids().map_err(|e| CaptureError::Definite {
                message: format!("the checkpoint's GTID set is unreadable: {e}"),
                hint: Some("start with a new store to take a new snapshot".into()),
            })?;
            request.with_gtid().with_gtid_set(sids).with_filename(&b""[..]).with_pos(4u64)
        }
    };
    let mut stream = conn.get_binlog_stream(request).await.map_err(|e| driver_error(CTX, e))?;
    tracing::info!(
        file = %start.file,
        pos = start.pos,
        gtid = start.gtid.as_deref().unwrap_or(""),
        by_gtid = by_gtid.is_some(),
        server_id = cap.server_id,
        "mysql binlog streaming"
    );

    let mut cursor = Cursor::new(&start, gtids);
    // The end of the last event read: where the stream stands against a chunk's
    // binlog point.
    let mut read_to: (Arc<str>, u64) = (cursor.file.clone(), start.pos);
    // The newest upstream time the stream is known to be complete up to.
    let mut caught_up_ms: Option<i64> = None;
    let mut heartbeat = false;
    let mut pending: Vec<Event> = Vec::new();
    let mut pending_since = Instant::now();
    let mut sent = start.clone();
    sent.snapshot = chunks.as_ref().and_then(Chunks::progress);
    let mut sent_at = Instant::now();
    let mut tick = tokio::time::interval(BATCH_INTERVAL / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        // A chunk to read does not wait for the next tick when no event is ready.
        let chunk_now =
            chunks.as_ref().is_some_and(|c| c.wants_read((&read_to.0, read_to.1), cursor.in_txn));
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                // Quit cleanly so the server ends its dump thread now, not at
                // its next failed write.
                let _ = stream.close().await;
                return Ok(());
            }
            next = tokio::time::timeout(SILENCE_LIMIT, stream.next()) => Some(next),
            () = std::future::ready(()), if chunk_now => None,
            _ = tick.tick() => None,
        };
        if let Some(next) = next {
            let event = match next {
                Err(_) => {
                    return Err(CaptureError::Transient {
                        message: format!(
                            "no binlog event or heartbeat for {} s",
                            SILENCE_LIMIT.as_secs()
                        ),
                        source: None,
                    })
                }
                Ok(None) => {
                    return Err(CaptureError::Transient {
                        message: "the server closed the binlog stream".into(),
                        source: None,
                    })
                }
                Ok(Some(Err(e))) => return Err(driver_error(CTX, e)),
                Ok(Some(Ok(event))) => event,
            };
            let header = event.header();
            let event_type = header.event_type_raw();
            let log_pos = u64::from(header.log_pos());
            let artificial = header.flags_raw() & ARTIFICIAL != 0;
            if MARIADB_COMPRESSED.contains(&event_type) {
                return Err(CaptureError::Definite {
                    message: format!(
                        "compressed binlog event (type {event_type}) at `{}`:{log_pos}",
                        cursor.file
                    ),
                    hint: Some("set `log_bin_compress = OFF` on the server".into()),
                });
            }
            if event_type == MARIADB_GTID {
                if let Some(g) = Gtid::mariadb(event.data(), header.server_id()) {
                    cursor.begin_gtid(g);
                }
            }
            let counted = !artificial
                && log_pos != 0
                && !matches!(
                    event_type,
                    ROTATE | FORMAT_DESCRIPTION | HEARTBEAT_EVENT | HEARTBEAT_V2
                );
            if let Some(c) = chunks.as_mut() {
                let start = log_pos.saturating_sub(u64::from(header.event_size()));
                if counted && c.due_before(&cursor.file, start) {
                    // This event is after the chunk's point: the chunk goes first.
                    let events = c.emit(cap, &cursor.file, cursor.resume);
                    if pending.is_empty() && !events.is_empty() {
                        pending_since = Instant::now();
                    }
                    pending.extend(events);
                }
            }
            if matches!(event_type, HEARTBEAT_EVENT | HEARTBEAT_V2) {
                // The server had nothing more to send: caught up as of now.
                caught_up_ms = Some(super::now_ms());
                heartbeat = true;
                // Its offset is where the server's reading stands in the current
                // file: everything before it was sent.
                if log_pos > read_to.1 && *read_to.0 == *cursor.file {
                    read_to.1 = log_pos;
                }
            } else if !artificial && header.timestamp() != 0 {
                let ts = i64::from(header.timestamp()) * 1000;
                caught_up_ms = Some(caught_up_ms.map_or(ts, |c| c.max(ts)));
            }
            let data = event.read_data().map_err(|e| CaptureError::Definite {
                message: format!(
                    "cannot read binlog event (type {event_type}) at `{}`:{log_pos}: {e}",
                    cursor.file
                ),
                hint: None,
            })?;
            let mut query_text = None;
            match data {
                Some(EventData::RotateEvent(r)) => {
                    let name = rotate_name(&r.name(), &cursor.file, artificial || log_pos == 0);
                    cursor.rotate(&name, r.position());
                    continue;
                }
                Some(EventData::QueryEvent(q)) => {
                    let text = q.query().into_owned();
                    if is_ddl(&text) {
                        apply_ddl(cap, &mut schema_conn, &q.schema(), &text).await?;
                    }
                    query_text = Some(text);
                }
                Some(EventData::RowsEvent(rows)) => {
                    let Some(tme) = stream.get_tme(rows.table_id()) else {
                        return Err(CaptureError::Definite {
                            message: format!(
                                "rows event without its table map at `{}`:{log_pos}",
                                cursor.file
                            ),
                            hint: None,
                        });
                    };
                    let table = tme.table_name().into_owned();
                    let ours = *tme.database_name() == *cap.db && cap.is_included(&table);
                    let mut decodable = false;
                    if ours {
                        let mut fits = fits(cap, &table, tme);
                        if let Err(why) = &fits {
                            // The history does not fit these rows (a DDL it could not
                            // follow, or none seen): the server's schema is right
                            // unless a later DDL already changed it.
                            tracing::warn!(table = %table, reason = %why, "binlog rows do not fit the known schema; reading information_schema");
                            reload(cap, &mut schema_conn, &table).await?;
                            fits = self::fits(cap, &table, tme);
                        }
                        if let Err(why) = &fits {
                            // Decoding with a schema that does not fit would give wrong
                            // values under the wrong names: each row is quarantined.
                            let before_len = pending.len();
                            for (row, item) in rows.rows(tme).enumerate() {
                                let row = u32::try_from(row).unwrap_or(u32::MAX);
                                if cursor.skipped(log_pos, row) {
                                    continue;
                                }
                                cap.origin += 1;
                                let (payload, end) = match item {
                                    Ok((b, a)) => (raw_payload(b, a), false),
                                    Err(_) => (String::new(), true),
                                };
                                pending.push(Event::Bad(BadEvent {
                                    reason: "schema_mismatch",
                                    detail: format!(
                                        "row {row} of `{table}` at `{}`:{log_pos}: {why}",
                                        cursor.file
                                    ),
                                    origin: cap.origin,
                                    table: Some(table.clone()),
                                    payload,
                                }));
                                cursor.last_row = Some((log_pos, row));
                                if end {
                                    break;
                                }
                            }
                            if before_len == 0 && !pending.is_empty() {
                                pending_since = Instant::now();
                            }
                        } else if let Some(m) = cap.mappings.get_mut(&table) {
                            m.verified = Some(tme.table_id());
                            decodable = true;
                        }
                    }
                    if decodable {
                        let op = match &rows {
                            RowsEventData::WriteRowsEventV1(_)
                            | RowsEventData::WriteRowsEvent(_) => Op::Insert,
                            RowsEventData::DeleteRowsEventV1(_)
                            | RowsEventData::DeleteRowsEvent(_) => Op::Delete,
                            _ => Op::Update,
                        };
                        let at = RowsAt {
                            table: &table,
                            op,
                            file: &cursor.file,
                            pos: log_pos,
                            ts_ms: i64::from(header.timestamp()) * 1000,
                            server_id: u64::from(header.server_id()),
                            gtid: cursor.gtid().map(Into::into),
                        };
                        let before_len = pending.len();
                        for (row, item) in rows.rows(tme).enumerate() {
                            let row = u32::try_from(row).unwrap_or(u32::MAX);
                            if cursor.skipped(log_pos, row) {
                                continue;
                            }
                            match item {
                                Ok((before, after)) => {
                                    pending.push(decode(cap, &at, row, before, after))
                                }
                                Err(e) => {
                                    // The rest of the event cannot be located: one bad
                                    // event stands for it.
                                    cap.origin += 1;
                                    pending.push(Event::Bad(BadEvent {
                                        reason: "undecodable_row",
                                        detail: format!("cannot decode row {row} of `{table}` at `{}`:{log_pos}: {e}", cursor.file),
                                        origin: cap.origin,
                                        table: Some(table.clone()),
                                        payload: String::new(),
                                    }));
                                    cursor.last_row = Some((log_pos, row));
                                    break;
                                }
                            }
                            cursor.last_row = Some((log_pos, row));
                        }
                        if before_len == 0 && pending.len() > before_len {
                            pending_since = Instant::now();
                        }
                        if let Some(c) = chunks.as_mut() {
                            let point = (&cursor.file, log_pos);
                            let gtids = cursor.gtids.as_ref();
                            c.record(cap, &table, point, gtids, &pending[before_len..]);
                        }
                    }
                }
                Some(EventData::GtidEvent(g)) => {
                    // MySQL 8; its commit time is in microseconds, finer than the header's.
                    let tag = g.tag().map(|t| t.as_str().to_owned());
                    cursor.begin_gtid(Gtid::mysql(g.sid(), tag.as_deref(), g.gno()));
                    let commit_ms =
                        i64::try_from(g.immediate_commit_timestamp() / 1000).unwrap_or(0);
                    if commit_ms > 0 {
                        caught_up_ms = Some(caught_up_ms.map_or(commit_ms, |c| c.max(commit_ms)));
                    }
                }
                _ => {}
            }
            cursor.advance(event_type, log_pos, artificial, query_text.as_deref());
            if counted {
                if *read_to.0 == *cursor.file {
                    read_to.1 = read_to.1.max(log_pos);
                } else {
                    read_to = (cursor.file.clone(), log_pos);
                }
            }
        }

        if let Some(c) = chunks.as_mut() {
            if c.wants_read((&read_to.0, read_to.1), cursor.in_txn) {
                // The stream waits while the chunk is read (one short transaction).
                c.read(cap, (&read_to.0, read_to.1)).await?;
            }
            if c.due((&read_to.0, read_to.1), cursor.gtids.as_ref(), cursor.in_txn) {
                let events = c.emit(cap, &cursor.file, cursor.resume);
                if pending.is_empty() && !events.is_empty() {
                    pending_since = Instant::now();
                }
                pending.extend(events);
            }
        }

        let due = pending.len() >= BATCH_ROWS
            || (!pending.is_empty() && pending_since.elapsed() >= BATCH_INTERVAL)
            || (pending.is_empty()
                && sent_at.elapsed() >= IDLE_CHECKPOINT
                && checkpoint_now(&cursor, cap, chunks.as_ref()) != sent)
            || (pending.is_empty() && heartbeat);
        if due {
            heartbeat = false;
            let cp = checkpoint_now(&cursor, cap, chunks.as_ref());
            let batch = Batch {
                events: std::mem::take(&mut pending),
                checkpoint: cp.token(),
                bytes: None,
                caught_up_ms,
            };
            if !send(out, shutdown, batch).await? {
                let _ = stream.close().await;
                return Ok(());
            }
            sent = cp.clone();
            sent_at = Instant::now();
            *checkpoint = Some(cp);
        }
    }
}

/// Where the rows of one rows event sit.
struct RowsAt<'a> {
    table: &'a str,
    op: Op,
    file: &'a Arc<str>,
    pos: u64,
    ts_ms: i64,
    server_id: u64,
    gtid: Option<Box<str>>,
}

fn natives(row: Option<BinlogRow>, db: Option<&DbTable>) -> Option<Vec<Result<Value, String>>> {
    let mut row = row?;
    let out = (0..row.len())
        .map(|i| {
            let col = db.and_then(|d| d.columns.get(i));
            match (row.take(i), col) {
                (Some(v), Some(col)) => schema::native_binlog(v, col),
                (None, _) => Ok(Value::Null),
                (Some(_), None) => {
                    Err(format!("the binlog row has more columns than the table ({})", row.len()))
                }
            }
        })
        .collect();
    Some(out)
}

fn decode(
    cap: &mut Capture,
    at: &RowsAt<'_>,
    row: u32,
    before: Option<BinlogRow>,
    after: Option<BinlogRow>,
) -> Event {
    let db = cap.mappings.get(at.table).map(|m| &m.db);
    let before = natives(before, db);
    let after = natives(after, db);
    cap.event(RowChange {
        table: at.table.to_owned(),
        op: at.op,
        before,
        after,
        position: Position::Binlog { file: at.file.clone(), pos: at.pos, row },
        snapshot: Snapshot::False,
        gtid: at.gtid.clone(),
        ts_ms: at.ts_ms,
        server_id: at.server_id,
    })
}

/// The file a rotate event names. The made-up rotate that opens a stream comes
/// before the format description that says checksums are on, so the decoder
/// leaves the 4 checksum bytes on its name; it always names the requested file.
fn rotate_name(name: &str, current: &str, artificial: bool) -> String {
    if artificial && name.starts_with(current) {
        return current.to_owned();
    }
    name.chars().take_while(|c| c.is_ascii_graphic()).collect()
}

/// MariaDB's GTID position at a binlog file and offset (`BINLOG_GTID_POS`); `None`
/// on MySQL, or when the offset is not a transaction boundary of a file still on
/// the server.
///
/// # Errors
/// Transient on connection loss.
pub(crate) async fn mariadb_gtid_pos(
    conn: &mut Conn,
    file: &str,
    pos: u64,
) -> Result<Option<String>, CaptureError> {
    match conn.exec_first::<Option<String>, _, _>("SELECT BINLOG_GTID_POS(?, ?)", (file, pos)).await
    {
        Ok(v) => Ok(v.flatten()),
        // MySQL has no such function (error 1305): no GTID position from an offset.
        Err(mysql_async::Error::Server(e)) if e.code == 1305 => Ok(None),
        Err(e) => Err(driver_error(CTX, e)),
    }
}

fn is_ddl(query: &str) -> bool {
    let first = query.split_whitespace().next().unwrap_or("");
    ["ALTER", "CREATE", "DROP", "RENAME", "TRUNCATE"].iter().any(|k| first.eq_ignore_ascii_case(k))
        || first.starts_with("/*")
}

/// Whether the known schema of `table` fits this table map (checked once per table
/// id: the server gives a table a new id when its definition changes).
fn fits(cap: &Capture, table: &str, tme: &TableMapEvent<'_>) -> Result<(), String> {
    match cap.mappings.get(table) {
        Some(m) if m.verified == Some(tme.table_id()) => Ok(()),
        Some(m) => m.db.fits_table_map(tme),
        None => Err(format!("no schema known for `{table}`")),
    }
}

/// The values of a row that fits no schema, by position, for its quarantine record.
fn raw_payload(before: Option<BinlogRow>, after: Option<BinlogRow>) -> String {
    let image = |row: Option<BinlogRow>| {
        row.map(|mut r| {
            (0..r.len())
                .map(|i| r.take(i).map_or(serde_json::Value::Null, |v| format!("{v:?}").into()))
                .collect::<Vec<_>>()
        })
    };
    serde_json::json!({ "before": image(before), "after": image(after) }).to_string()
}

/// Applies a DDL statement to the schema history: the known schemas follow the
/// statement; what the history cannot follow is read from the server.
async fn apply_ddl(
    cap: &mut Capture,
    conn: &mut Conn,
    default_db: &str,
    query: &str,
) -> Result<(), CaptureError> {
    let db = cap.db.clone();
    let ours = |t: &ddl::TableName| t.db.as_deref().unwrap_or(default_db) == db;
    match ddl::parse(query) {
        Ddl::None => {}
        Ddl::Alter { table, changes } if ours(&table) => {
            let Some(known) = cap.mappings.get(&table.name).map(|m| m.db.clone()) else {
                if cap.is_included(&table.name) {
                    reload(cap, conn, &table.name).await?;
                }
                return Ok(());
            };
            match ddl::apply(&known, &changes) {
                Ok(after) if after.name == table.name => {
                    if let Some(id) = cap.included_id(&table.name) {
                        cap.set_schema(id, after);
                    }
                }
                Ok(renamed) => {
                    cap.forget_schema(&table.name);
                    if let Some(id) = cap.included_id(&renamed.name) {
                        cap.set_schema(id, renamed);
                    }
                }
                Err(why) => {
                    tracing::warn!(table = %table.name, reason = %why, "the schema history cannot follow a DDL statement; reading information_schema");
                    reload(cap, conn, &table.name).await?;
                }
            }
        }
        Ddl::Alter { .. } => {}
        Ddl::Rename(pairs) => {
            // Schemas in flight through tables caudal does not capture (a swap
            // through a temporary name).
            let mut moving: std::collections::HashMap<String, DbTable> = Default::default();
            for (from, to) in pairs {
                let mut schema = None;
                if ours(&from) {
                    schema = moving
                        .remove(&from.name)
                        .or_else(|| cap.mappings.get(&from.name).map(|m| m.db.clone()));
                    cap.forget_schema(&from.name);
                }
                if !ours(&to) {
                    continue;
                }
                match (cap.included_id(&to.name), schema) {
                    (Some(id), Some(mut s)) => {
                        s.name.clone_from(&to.name);
                        cap.set_schema(id, s);
                    }
                    (Some(_), None) => reload(cap, conn, &to.name).await?,
                    (None, Some(s)) => {
                        moving.insert(to.name.clone(), s);
                    }
                    (None, None) => {}
                }
            }
        }
        Ddl::Drop(tables) => {
            for t in tables.iter().filter(|t| ours(t)) {
                cap.forget_schema(&t.name);
            }
        }
        Ddl::Reload(tables) if tables.is_empty() => reload_mentioned(cap, conn, query).await?,
        Ddl::Reload(tables) => {
            let wanted: Vec<&str> = tables
                .iter()
                .filter(|t| ours(t) && cap.is_included(&t.name))
                .map(|t| t.name.as_str())
                .collect();
            for name in wanted {
                reload(cap, conn, name).await?;
            }
        }
    }
    Ok(())
}

/// Reads again the schema of each included table a DDL statement mentions.
async fn reload_mentioned(
    cap: &mut Capture,
    conn: &mut Conn,
    query: &str,
) -> Result<(), CaptureError> {
    let lower = query.to_lowercase();
    let mentioned: Vec<String> = cap
        .tables
        .iter()
        .map(|(_, t)| t.clone())
        .filter(|t| lower.contains(&t.to_lowercase()))
        .collect();
    for table in mentioned {
        reload(cap, conn, &table).await?;
    }
    Ok(())
}

/// Reads a table's schema again; a dropped table loses its mapping (its rows
/// events, if any remain, become bad events) instead of stopping the stream.
async fn reload(cap: &mut Capture, conn: &mut Conn, table: &str) -> Result<(), CaptureError> {
    match cap.load_mapping(conn, table).await {
        Ok(()) => Ok(()),
        Err(CaptureError::Definite { message, .. }) => {
            tracing::warn!(table = %table, reason = %message, "mysql table schema unavailable");
            cap.forget_schema(table);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Fails with the re-snapshot hint when `file` is no longer on the server.
async fn ensure_file_exists(conn: &mut Conn, file: &str) -> Result<(), CaptureError> {
    let rows: Vec<Row> = conn.query("SHOW BINARY LOGS").await.map_err(|e| driver_error(CTX, e))?;
    let files: Vec<String> = rows
        .into_iter()
        .filter_map(|mut r| r.take_opt::<String, usize>(0).and_then(Result::ok))
        .collect();
    if files.iter().any(|f| f == file) {
        return Ok(());
    }
    Err(CaptureError::Definite {
        message: format!(
            "binlog file `{file}` needed to resume is no longer on the server (oldest: `{}`)",
            files.first().map_or("none", String::as_str)
        ),
        hint: Some(
            "it was purged: start with a new store to take a new snapshot, and raise \
             `binlog_expire_logs_seconds` / `expire_logs_days` so it does not recur"
                .into(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor() -> Cursor {
        Cursor::new(
            &MysqlCheckpoint {
                schemas: None,
                file: "mysql-bin.000001".into(),
                pos: 100,
                gtid: None,
                skip: None,
                snapshot: None,
                origin: 0,
            },
            None,
        )
    }

    #[test]
    fn checkpoints_inside_a_transaction_name_its_start_and_the_last_row() {
        let mut c = cursor();
        c.advance(MARIADB_GTID, 150, false, None);
        c.advance(TABLE_MAP, 200, false, None);
        c.last_row = Some((300, 1));
        c.advance(23, 300, false, None);
        let cp = c.checkpoint(9, &Schemas::default());
        assert_eq!((cp.pos, cp.skip), (100, Some((300, 1))));
        c.advance(XID, 330, false, None);
        let cp = c.checkpoint(9, &Schemas::default());
        assert_eq!((cp.pos, cp.skip), (330, None));
    }

    #[test]
    fn begin_opens_and_ddl_closes_a_transaction() {
        let mut c = cursor();
        c.advance(QUERY, 150, false, Some("BEGIN"));
        assert!(c.in_txn);
        c.advance(QUERY, 180, false, Some("COMMIT"));
        assert!(!c.in_txn);
        assert_eq!(c.resume, 180);
        c.advance(MARIADB_GTID, 200, false, None);
        c.advance(QUERY, 260, false, Some("ALTER TABLE t ADD COLUMN x INT"));
        assert_eq!((c.in_txn, c.resume), (false, 260));
    }

    #[test]
    fn artificial_and_header_events_do_not_move_the_resume_point() {
        let mut c = cursor();
        c.advance(FORMAT_DESCRIPTION, 256, false, None);
        c.advance(HEARTBEAT_EVENT, 0, true, None);
        assert_eq!(c.resume, 100);
        // The GTID list at the head of the file of a GTID resume.
        c.advance(163, 60, false, None);
        assert_eq!(c.resume, 100, "never backwards");
        c.rotate("mysql-bin.000002", 4);
        assert_eq!((&*c.file, c.resume), ("mysql-bin.000002", 4));
    }

    #[test]
    fn resumed_transactions_skip_delivered_rows_only() {
        let c = Cursor::new(
            &MysqlCheckpoint {
                schemas: None,
                file: "f.1".into(),
                pos: 100,
                gtid: None,
                skip: Some((300, 1)),
                snapshot: None,
                origin: 0,
            },
            None,
        );
        assert!(c.skipped(300, 1) && c.skipped(250, 7));
        assert!(!c.skipped(300, 2) && !c.skipped(400, 0));
    }

    #[test]
    fn the_opening_rotate_loses_its_checksum_bytes() {
        let garbled = "mysql-bin.000001\u{fffd}\u{fffd}1";
        assert_eq!(rotate_name(garbled, "mysql-bin.000001", true), "mysql-bin.000001");
        assert_eq!(rotate_name("mysql-bin.000002", "mysql-bin.000001", false), "mysql-bin.000002");
    }

    #[test]
    fn ddl_statements_are_recognised() {
        assert!(is_ddl("  alter table x add y int") && !is_ddl("BEGIN"));
    }

    #[test]
    fn checkpoints_carry_the_gtids_of_finished_transactions_only() {
        let mut c = cursor();
        c.gtids = Some(GtidSet::parse("0-1-41", true).unwrap());
        c.advance(MARIADB_GTID, 150, false, None);
        c.begin_gtid(Gtid::Mariadb { domain: 0, server: 1, seq: 42 });
        assert_eq!(c.gtid(), Some("0-1-42"));
        c.advance(TABLE_MAP, 200, false, None);
        c.last_row = Some((300, 0));
        let open = c.checkpoint(1, &Schemas::default());
        assert_eq!((open.pos, open.gtid.as_deref()), (100, Some("0-1-41")), "open txn excluded");
        c.advance(XID, 330, false, None);
        let done = c.checkpoint(1, &Schemas::default());
        assert_eq!((done.pos, done.gtid.as_deref()), (330, Some("0-1-42")));
        assert_eq!(c.gtid(), None);
        // A DDL is its own transaction, closed by its query event.
        c.advance(MARIADB_GTID, 380, false, None);
        c.begin_gtid(Gtid::Mariadb { domain: 0, server: 1, seq: 43 });
        c.advance(QUERY, 450, false, Some("CREATE TABLE x (id INT)"));
        assert_eq!(c.checkpoint(1, &Schemas::default()).gtid.as_deref(), Some("0-1-43"));
    }

    #[test]
    fn a_gtid_resume_keeps_the_checkpoint_offset_in_its_own_file() {
        let mut c = cursor();
        c.rotate("mysql-bin.000001", 4);
        assert_eq!(c.resume, 100, "the made-up rotate to the file start");
        c.rotate("mysql-bin.000002", 4);
        assert_eq!((&*c.file, c.resume), ("mysql-bin.000002", 4));
    }
}
