//! The shared vocabulary of every stage: typed values and rows, change events,
//! source positions, and the Debezium envelope codec.
//!
//! A [`Change`] is one row-level change of one table as a CDC reader sees it: an
//! operation, before/after row images typed by the table's [`TableSchema`], and
//! the position of the change in its upstream log. Sources produce [`Event`]s
//! (a change, or a line that could not be read) in [`Batch`]es; every batch
//! carries the [`Checkpoint`] to resume from once it is durable downstream.

pub mod debezium;
pub mod output;
pub mod time;
mod value;

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

pub use value::{ColumnType, Key, Row, Value};

/// A column of a table schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: Box<str>,
    pub ty: ColumnType,
}

/// The declared shape of one source table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    pub name: Box<str>,
    pub columns: Vec<Column>,
    /// Indexes into `columns` of the primary key.
    pub key: Vec<usize>,
}

impl TableSchema {
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| &*c.name == name)
    }
}

/// Index of a table in the [`Catalog`].
pub type TableId = usize;

/// Up to this many tables, [`Catalog::id`] scans instead of hashing.
const SCAN_TABLES: usize = 16;

/// The tables a pipeline reads, by name. Events of other tables are quarantined
/// as `unknown_table`.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    tables: Vec<TableSchema>,
    by_name: HashMap<Box<str>, TableId>,
}

impl Catalog {
    pub fn new(tables: Vec<TableSchema>) -> Self {
        let by_name = tables.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Self { tables, by_name }
    }

    pub fn id(&self, name: &str) -> Option<TableId> {
        // Looked up twice per decoded line: for a handful of tables comparing the
        // names beats hashing one (SipHash) by several times.
        if self.tables.len() <= SCAN_TABLES {
            return self.tables.iter().position(|t| *t.name == *name);
        }
        self.by_name.get(name).copied()
    }

    pub fn table(&self, id: TableId) -> &TableSchema {
        &self.tables[id]
    }

    pub fn tables(&self) -> &[TableSchema] {
        &self.tables
    }
}

/// The operation of a change, with Debezium's one-letter codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `r`: a row read by the initial snapshot.
    Read,
    /// `c`
    Insert,
    /// `u`
    Update,
    /// `d`
    Delete,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Read => "r",
            Op::Insert => "c",
            Op::Update => "u",
            Op::Delete => "d",
        }
    }

    pub fn from_code(s: &str) -> Option<Op> {
        Some(match s {
            "r" => Op::Read,
            "c" => Op::Insert,
            "u" => Op::Update,
            "d" => Op::Delete,
            _ => return None,
        })
    }
}

/// Where a change sits in its upstream log. Ordered within one source partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Position {
    /// A MySQL/MariaDB binlog coordinate: file, event offset, row within the event.
    Binlog { file: Arc<str>, pos: u64, row: u32 },
    /// A PostgreSQL WAL position.
    Lsn(u64),
}

impl Position {
    /// Binlog file names end in a sequence number (`mysql-bin.000123`); it grows past
    /// six digits, so files are ordered by that number, not by name.
    fn file_seq(file: &str) -> u64 {
        file.rsplit('.').next().and_then(|n| n.parse().ok()).unwrap_or(0)
    }
}

impl PartialOrd for Position {
    /// Positions of different kinds are not comparable.
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        match (self, other) {
            (
                Position::Binlog { file: f1, pos: p1, row: r1 },
                Position::Binlog { file: f2, pos: p2, row: r2 },
            ) => {
                // Consecutive events share one `Arc` of the file name: compare pointers first.
                let files = if Arc::ptr_eq(f1, f2) || f1 == f2 {
                    Ordering::Equal
                } else {
                    Position::file_seq(f1).cmp(&Position::file_seq(f2)).then_with(|| f1.cmp(f2))
                };
                Some(files.then(p1.cmp(p2)).then(r1.cmp(r2)))
            }
            (Position::Lsn(a), Position::Lsn(b)) => Some(a.cmp(b)),
            _ => None,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Binlog { file, pos, row } => write!(f, "{file}:{pos}:{row}"),
            Position::Lsn(l) => write!(f, "lsn:{:X}/{:X}", l >> 32, l & 0xffff_ffff),
        }
    }
}

/// Debezium's `source.snapshot` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Snapshot {
    #[default]
    False,
    True,
    Last,
}

impl Snapshot {
    pub fn code(self) -> &'static str {
        match self {
            Snapshot::False => "false",
            Snapshot::True => "true",
            Snapshot::Last => "last",
        }
    }
}

/// Connector metadata that is the same for many events; shared, not copied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceMeta {
    /// Debezium's `source.name`: the logical server name (topic prefix).
    pub server: Box<str>,
    pub db: Box<str>,
    pub server_id: u64,
    pub connector: Box<str>,
    pub version: Box<str>,
}

/// The prefix of a [`Source::partition`] whose changes a worker of a consumer
/// group reads for lookups only (`state:topic/partition`): every worker reads the
/// looked-up tables in full, while their silver rows belong to the worker
/// assigned the partition.
pub const STATE_PARTITION_PREFIX: &str = "state:";

/// Where one change came from.
#[derive(Debug, Clone)]
pub struct Source {
    pub meta: Arc<SourceMeta>,
    pub position: Option<Position>,
    pub gtid: Option<Box<str>>,
    pub snapshot: Snapshot,
    /// When the change was committed upstream (`source.ts_ms`).
    pub ts_ms: i64,
    /// The transport partition the change travelled through (`topic/partition` for
    /// Kafka), when there are several: positions are ordered only within one, so
    /// deduplication keeps one high-water mark per partition. `None` for a source
    /// read in log order (file, simulator, binlog).
    pub partition: Option<Arc<str>>,
}

/// A buffer of bytes a source read, shared by the changes decoded from it and
/// handed back to its [`BytePool`] when the last of them is dropped.
///
/// Why a pool: a file source reads hundreds of megabytes; fresh buffers for each
/// chunk cost a page fault (and a page zeroing) per 4 KiB, about a tenth of the
/// pipeline's time. Recycled buffers keep their pages.
#[derive(Debug, Default)]
pub struct PooledBytes {
    data: Vec<u8>,
    pool: Option<Arc<BytePool>>,
}

impl PooledBytes {
    pub fn new(data: Vec<u8>, pool: Option<Arc<BytePool>>) -> Self {
        Self { data, pool }
    }
}

impl std::ops::Deref for PooledBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for PooledBytes {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.put(std::mem::take(&mut self.data));
        }
    }
}

/// Free buffers for [`PooledBytes`], at most `max` kept.
#[derive(Debug)]
pub struct BytePool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
    max: usize,
}

impl BytePool {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { free: std::sync::Mutex::new(Vec::new()), max })
    }

    /// An empty buffer with at least `capacity` bytes of room.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let reused = self.free.lock().ok().and_then(|mut f| f.pop());
        let mut buf = reused.unwrap_or_default();
        buf.clear();
        buf.reserve(capacity);
        buf
    }

    fn put(&self, buf: Vec<u8>) {
        if let Ok(mut free) = self.free.lock() {
            if free.len() < self.max {
                free.push(buf);
            }
        }
    }
}

/// Where a change's original bytes sit in its batch's [`Batch::bytes`], kept so
/// quarantine can store the payload exactly as it arrived. A span, not a pointer:
/// one shared buffer per batch instead of a reference count touched per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawSpan {
    pub start: u32,
    pub len: u32,
}

impl RawSpan {
    /// The payload text within `bytes`.
    pub fn text(self, bytes: &[u8]) -> String {
        let start = self.start as usize;
        let slice = bytes.get(start..start + self.len as usize).unwrap_or_default();
        String::from_utf8_lossy(slice).into_owned()
    }
}

/// One row-level change of one table.
#[derive(Debug, Clone)]
pub struct Change {
    pub table: TableId,
    pub op: Op,
    pub before: Option<Row>,
    pub after: Option<Row>,
    /// Columns of `after` that the pipeline file does not declare, as a JSON object,
    /// kept so that nothing is lost (stored in the silver table's `_extra` column).
    pub extra: Option<Box<str>>,
    pub source: Source,
    /// When the connector produced the event (envelope `ts_ms`).
    pub ts_ms: i64,
    /// The event's sequence number within its source (line number for files).
    pub origin: u64,
    /// The original bytes, when the source read bytes (a span of [`Batch::bytes`]).
    pub raw: Option<RawSpan>,
}

impl Change {
    /// The image that identifies the row: `after`, or `before` for deletes.
    pub fn image(&self) -> Option<&Row> {
        self.after.as_ref().or(self.before.as_ref())
    }
}

/// An input that could not be turned into a [`Change`]: bad data, kept as data.
#[derive(Debug, Clone)]
pub struct BadEvent {
    /// Stable snake_case reason code (`malformed_json`, `unknown_table`, …).
    pub reason: &'static str,
    pub detail: String,
    pub origin: u64,
    pub table: Option<String>,
    pub payload: String,
}

/// What a source hands downstream.
#[derive(Debug, Clone)]
pub enum Event {
    Change(Change),
    Bad(BadEvent),
}

/// A source's resume token, opaque to every other stage (JSON text).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint(pub String);

/// A run of events in source order, and where to resume once they are durable.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub checkpoint: Checkpoint,
    /// The bytes the changes' [`RawSpan`]s point into, for sources that read bytes.
    pub bytes: Option<Arc<PooledBytes>>,
    /// Upstream time (ms since the epoch) up to which the source has read all of
    /// its log when it cut this batch: the commit time of the last event read, or
    /// the arrival time of a heartbeat, which says the upstream had nothing more.
    /// Lag is now minus the newest of these, so it reads zero while the upstream
    /// is idle. `None` when the source cannot tell (files, the simulator). A batch
    /// may carry only this and no events.
    pub caught_up_ms: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binlog_positions_order_by_file_number_then_offset() {
        let p = |f: &str, pos, row| Position::Binlog { file: f.into(), pos, row };
        assert!(p("mysql-bin.999999", 900, 0) < p("mysql-bin.1000000", 4, 0));
        assert!(p("mysql-bin.000001", 900, 0) < p("mysql-bin.000001", 900, 1));
        assert!(Position::Lsn(1).partial_cmp(&p("a.1", 1, 0)).is_none());
    }
}
