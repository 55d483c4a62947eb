//! What processing hands to the store: one [`Commit`] per micro-batch.
//!
//! A commit is self-contained and idempotent: silver rows are upserts or deletes by
//! key, gold rows carry absolute values (not deltas) per window and group, and the
//! source checkpoint rides along so that a store writes all of it in one transaction.

use std::sync::Arc;

use super::{Checkpoint, Key, Row, TableId, Value};

/// The state of one silver row after a batch; `None` deletes it.
#[derive(Debug, Clone)]
pub struct SilverChange {
    pub table: TableId,
    /// The row's key. For a delete it is the key as the row was stored: a whole
    /// decimal key comes as `Key::Values([Decimal(5.00)])`, not as the `Key::Int(5)`
    /// that processing matches it by, so that stores keeping decimals as text find
    /// the row. An upsert's stores take the key from `row`.
    pub key: Key,
    pub row: Option<SilverRow>,
}

#[derive(Debug, Clone)]
pub struct SilverRow {
    pub values: Row,
    /// Reasons of failed `flag` checks, comma-separated.
    pub flags: Option<String>,
    /// Undeclared columns as a JSON object.
    pub extra: Option<Box<str>>,
    /// The source position of the change that produced this version.
    pub position: Option<String>,
    /// When the change was committed upstream (epoch ms).
    pub source_ts_ms: i64,
    /// The transport partition the change came through (`topic/partition` for
    /// Kafka): a worker of a consumer group rebuilds the facts of the partitions it
    /// is assigned from the silver rows tagged with them.
    pub partition: Option<Arc<str>>,
}

/// The values of one gold row after a batch; `measures: None` deletes the row
/// (its group no longer has any contributing fact).
#[derive(Debug, Clone)]
pub struct GoldChange {
    /// Index of the gold spec in the pipeline.
    pub gold: usize,
    /// Window start, epoch microseconds (UTC).
    pub window_start: i64,
    pub group: Box<[Value]>,
    pub measures: Option<Box<[Value]>>,
    /// The fact partition whose rows these values aggregate, when gold is kept per
    /// partition (workers of a consumer group; see `Processor::set_group_mode`);
    /// `None`: every fact row.
    pub partition: Option<Arc<str>>,
    /// For each `avg` measure, in measure order, the exact sum and count of its
    /// inputs: a store that keeps gold per partition adds these up to merge the
    /// partitions' averages exactly (an average of averages is not the average).
    /// Empty when the rule has no `avg` or the row is deleted.
    pub avg_parts: Box<[(rust_decimal::Decimal, i64)]>,
}

/// A stage where a row can be quarantined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The input could not be decoded into a change.
    Decode,
    /// A `quarantine` check of the table's rules failed.
    Validate,
    /// A lookup with `missing = "quarantine"` found no dimension row.
    Enrich,
}

impl Stage {
    pub fn code(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Validate => "validate",
            Stage::Enrich => "enrich",
        }
    }

    pub fn from_code(s: &str) -> Option<Stage> {
        Some(match s {
            "decode" => Stage::Decode,
            "validate" => Stage::Validate,
            "enrich" => Stage::Enrich,
            _ => return None,
        })
    }
}

/// A quarantined row or input, with everything needed to inspect or replay it.
#[derive(Debug, Clone)]
pub struct QuarantineRecord {
    /// Table name, when known.
    pub table: Option<String>,
    /// The row key, rendered (`5`, `[5,"a"]`), when known.
    pub key: Option<String>,
    pub stage: Stage,
    /// Stable snake_case reason code.
    pub reason: Arc<str>,
    pub detail: String,
    /// Upstream log position, rendered.
    pub position: Option<String>,
    /// Sequence number within the source (line number for files).
    pub origin: u64,
    /// The original payload (the input line, or the change as a Debezium envelope line).
    pub payload: String,
}

/// Quarantine is current state: a row leaves quarantine when a later version of it
/// passes, when it is deleted, or when the dimension row it waited for arrives.
#[derive(Debug, Clone)]
pub enum QuarantineOp {
    Open(QuarantineRecord),
    /// Resolves the open record of (table, key).
    Resolve {
        table: String,
        key: String,
    },
}

/// One micro-batch of output.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    /// At most one entry per (table, key): the last state in the batch.
    pub silver: Vec<SilverChange>,
    /// When true, the store replaces every gold row with `gold` (after recovery).
    pub gold_reset: bool,
    /// At most one entry per (gold, window, group).
    pub gold: Vec<GoldChange>,
    /// In order.
    pub quarantine: Vec<QuarantineOp>,
    /// Where the source resumes once this commit is durable.
    pub checkpoint: Checkpoint,
    /// Processing state that must survive a restart with the checkpoint (JSON).
    pub state: String,
    /// Number of source events this commit covers.
    pub event_count: u64,
}
