//! Streaming the binlog as a replica and turning rows events into changes.
//!
//! The source registers with `source.server_id` and asks for the binlog from the
//! checkpoint's file and offset. It follows transaction boundaries (GTID / `BEGIN`
//! open one, `XID` / any other query close it) so that a checkpoint always names a
//! boundary to restart from plus the last row delivered inside an open transaction;
//! a restart re-reads the transaction's table maps and skips what was delivered.
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
use mysql_async::binlog::events::{EventData, RowsEventData};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStreamRequest, Conn, Opts, Row};

use super::schema::{self, driver_error, DbTable};
use super::{connect, send, Capture, MysqlCheckpoint, RowChange, BATCH_INTERVAL, BATCH_ROWS};
use crate::bus;
use crate::capture::CaptureError;
use crate::event::{BadEvent, Batch, Event, Op, Position, Snapshot, Value};

const CTX: &str = "reading the binlog";
/// The server sends a heartbeat after this much silence, so a dead connection is
/// told apart from an idle database.
const HEARTBEAT: Duration = Duration::from_secs(5);
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
}

impl Cursor {
    pub fn new(cp: &MysqlCheckpoint) -> Self {
        Self {
            file: Arc::from(cp.file.as_str()),
            resume: cp.pos,
            in_txn: false,
            last_row: cp.skip,
            skip: cp.skip,
        }
    }

    /// Tracks transaction boundaries through one event.
    pub fn advance(&mut self, event_type: u8, log_pos: u64, artificial: bool, query: Option<&str>) {
        match event_type {
            GTID | ANONYMOUS_GTID | MARIADB_GTID | TABLE_MAP => self.in_txn = true,
            QUERY if query.is_some_and(|q| q.trim().eq_ignore_ascii_case("BEGIN")) => {
                self.in_txn = true;
            }
            QUERY | XID => self.end_txn(),
            _ => {}
        }
        let bookkept = !artificial
            && log_pos != 0
            && !matches!(event_type, ROTATE | FORMAT_DESCRIPTION | HEARTBEAT_EVENT);
        if bookkept && !self.in_txn {
            self.resume = log_pos;
        }
    }

    fn end_txn(&mut self) {
        self.in_txn = false;
        self.last_row = None;
        self.skip = None;
    }

    pub fn rotate(&mut self, file: &str, pos: u64) {
        if *self.file != *file {
            self.file = Arc::from(file);
            self.skip = None;
            self.last_row = None;
        }
        self.resume = pos;
        self.in_txn = false;
    }

    /// Whether the row at (`pos`, `row`) was delivered before the restart.
    pub fn skipped(&self, pos: u64, row: u32) -> bool {
        self.skip.is_some_and(|s| (pos, row) <= s)
    }

    pub fn checkpoint(&self, origin: u64) -> MysqlCheckpoint {
        MysqlCheckpoint {
            file: self.file.to_string(),
            pos: self.resume,
            skip: if self.in_txn { self.last_row } else { None },
            snapshot: None,
            origin,
        }
    }
}

/// Streams the binlog from `start` until shutdown; `checkpoint` follows the last
/// batch sent.
///
/// # Errors
/// Transient on connection loss (the caller reconnects), definite on refusals.
pub(crate) async fn stream(
    cap: &mut Capture,
    opts: &Opts,
    mut schema_conn: Conn,
    start: MysqlCheckpoint,
    checkpoint: &mut Option<MysqlCheckpoint>,
    out: &bus::Sender,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<(), CaptureError> {
    ensure_file_exists(&mut schema_conn, &start.file).await?;

    let mut conn = connect(opts).await?;
    // Ask for heartbeats (the period is in nanoseconds) and, on MariaDB, for real
    // GTID events instead of made-up BEGIN queries.
    conn.query_drop(format!("SET @master_heartbeat_period = {}", HEARTBEAT.as_nanos()))
        .await
        .map_err(|e| driver_error(CTX, e))?;
    if cap.server.mariadb {
        conn.query_drop("SET @mariadb_slave_capability = 4")
            .await
            .map_err(|e| driver_error(CTX, e))?;
    }
    let request = BinlogStreamRequest::new(cap.server_id)
        .with_filename(start.file.as_bytes())
        .with_pos(start.pos);
    let mut stream = conn.get_binlog_stream(request).await.map_err(|e| driver_error(CTX, e))?;
    tracing::info!(file = %start.file, pos = start.pos, server_id = cap.server_id, "mysql binlog streaming");

    let mut cursor = Cursor::new(&start);
    let mut pending: Vec<Event> = Vec::new();
    let mut pending_since = Instant::now();
    let mut sent = start.clone();
    let mut sent_at = Instant::now();
    let mut tick = tokio::time::interval(BATCH_INTERVAL / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gtid: Option<Box<str>> = None;

    loop {
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                // Quit cleanly so the server ends its dump thread now, not at
                // its next failed write.
                let _ = stream.close().await;
                return Ok(());
            }
            next = tokio::time::timeout(SILENCE_LIMIT, stream.next()) => Some(next),
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
                gtid = mariadb_gtid(event.data(), header.server_id());
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
                        reload_mentioned(cap, &mut schema_conn, &text).await?;
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
                    if *tme.database_name() == *cap.db && cap.is_included(&table) {
                        let columns = usize::try_from(tme.columns_count()).unwrap_or(usize::MAX);
                        if cap.mappings.get(&table).is_none_or(|m| m.db.columns.len() != columns) {
                            // A schema change not seen yet (or the table is new): read it again.
                            reload(cap, &mut schema_conn, &table).await?;
                        }
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
                            gtid: gtid.as_deref(),
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
                    }
                }
                Some(EventData::XidEvent(_)) => gtid = None,
                _ => {}
            }
            cursor.advance(event_type, log_pos, artificial, query_text.as_deref());
        }

        let due = pending.len() >= BATCH_ROWS
            || (!pending.is_empty() && pending_since.elapsed() >= BATCH_INTERVAL)
            || (pending.is_empty()
                && sent_at.elapsed() >= IDLE_CHECKPOINT
                && cursor.checkpoint(cap.origin) != sent);
        if due {
            let cp = cursor.checkpoint(cap.origin);
            let batch =
                Batch { events: std::mem::take(&mut pending), checkpoint: cp.token(), bytes: None };
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
    gtid: Option<&'a str>,
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
        gtid: at.gtid.map(Into::into),
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

/// `domain-server-sequence` from a MariaDB GTID event's body.
fn mariadb_gtid(data: &[u8], server_id: u32) -> Option<Box<str>> {
    let seq = u64::from_le_bytes(data.get(0..8)?.try_into().ok()?);
    let domain = u32::from_le_bytes(data.get(8..12)?.try_into().ok()?);
    Some(format!("{domain}-{server_id}-{seq}").into())
}

fn is_ddl(query: &str) -> bool {
    let first = query.split_whitespace().next().unwrap_or("");
    ["ALTER", "CREATE", "DROP", "RENAME", "TRUNCATE"].iter().any(|k| first.eq_ignore_ascii_case(k))
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
            cap.mappings.remove(table);
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
        Cursor::new(&MysqlCheckpoint {
            file: "mysql-bin.000001".into(),
            pos: 100,
            skip: None,
            snapshot: None,
            origin: 0,
        })
    }

    #[test]
    fn checkpoints_inside_a_transaction_name_its_start_and_the_last_row() {
        let mut c = cursor();
        c.advance(MARIADB_GTID, 150, false, None);
        c.advance(TABLE_MAP, 200, false, None);
        c.last_row = Some((300, 1));
        c.advance(23, 300, false, None);
        let cp = c.checkpoint(9);
        assert_eq!((cp.pos, cp.skip), (100, Some((300, 1))));
        c.advance(XID, 330, false, None);
        let cp = c.checkpoint(9);
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
        c.rotate("mysql-bin.000002", 4);
        assert_eq!((&*c.file, c.resume), ("mysql-bin.000002", 4));
    }

    #[test]
    fn resumed_transactions_skip_delivered_rows_only() {
        let c = Cursor::new(&MysqlCheckpoint {
            file: "f.1".into(),
            pos: 100,
            skip: Some((300, 1)),
            snapshot: None,
            origin: 0,
        });
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
    fn mariadb_gtids_read_domain_server_and_sequence() {
        let mut data = 42u64.to_le_bytes().to_vec();
        data.extend_from_slice(&3u32.to_le_bytes());
        data.push(0);
        assert_eq!(mariadb_gtid(&data, 1).as_deref(), Some("3-1-42"));
        assert_eq!(mariadb_gtid(&[1, 2], 1), None);
        assert!(is_ddl("  alter table x add y int") && !is_ddl("BEGIN"));
    }
}
