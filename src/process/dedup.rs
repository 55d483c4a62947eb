//! Deduplication of re-delivered events by source position.
//!
//! A CDC source emits each change once, in log order; a re-delivery (after a
//! reconnect, a crash, or at-least-once transport) repeats an earlier position.
//! So an event is new exactly when its position is past the highest one seen:
//! one position of state per source partition, instead of a set of every position
//! ever read (which would grow with the events, not with the data).
//!
//! Snapshot reads are the exception: Debezium gives every row of a snapshot the
//! same binlog position, so during a snapshot an *equal* position is still new.
//! A snapshot read behind the mark (after streaming moved on) is stale and dropped.

use serde::{Deserialize, Serialize};

use crate::event::{Change, Position, Snapshot};

/// The high-water mark of one source partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dedup {
    high: Option<Position>,
}

/// The mark as saved with the checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pos: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<u64>,
}

impl Dedup {
    /// Whether `change` is new; advances the mark when it is.
    pub fn admit(&mut self, change: &Change) -> bool {
        let Some(pos) = &change.source.position else { return true };
        let snapshot = change.source.snapshot != Snapshot::False;
        let new = match &self.high {
            None => true,
            Some(high) => match pos.partial_cmp(high) {
                Some(std::cmp::Ordering::Greater) => true,
                Some(std::cmp::Ordering::Equal) => snapshot,
                Some(std::cmp::Ordering::Less) => false,
                // A position of another kind: the source changed; start over from it.
                None => true,
            },
        };
        if new {
            self.high = Some(pos.clone());
        }
        new
    }

    pub fn save(&self) -> DedupState {
        match &self.high {
            Some(Position::Binlog { file, pos, row }) => DedupState {
                file: Some(file.to_string()),
                pos: Some(*pos),
                row: Some(*row),
                lsn: None,
            },
            Some(Position::Lsn(l)) => DedupState { lsn: Some(*l), ..DedupState::default() },
            None => DedupState::default(),
        }
    }

    pub fn restore(state: &DedupState) -> Self {
        let high = match state {
            DedupState { file: Some(f), pos: Some(p), row, .. } => {
                Some(Position::Binlog { file: f.as_str().into(), pos: *p, row: row.unwrap_or(0) })
            }
            DedupState { lsn: Some(l), .. } => Some(Position::Lsn(*l)),
            _ => None,
        };
        Self { high }
    }
}
