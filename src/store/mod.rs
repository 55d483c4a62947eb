//! Stores: where processed data becomes durable.
//!
//! A [`Sink`] receives one [`Commit`] per micro-batch and writes all of it (silver
//! rows, gold rows, quarantine, and the source checkpoint with the processing state)
//! in one transaction, so a crash at any moment leaves either the whole commit or
//! none of it. On start, [`Sink::recover`] hands back the last checkpoint and the
//! current rows the processing state is rebuilt from.

pub mod export;
pub(crate) mod extra;
pub mod mysql;
pub mod postgres;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::event::output::{Commit, QuarantineRecord, Stage};
use crate::event::{Checkpoint, Row, TableId};

/// What a store had durable at the last commit.
#[derive(Debug, Default)]
pub struct Recovered {
    pub checkpoint: Option<Checkpoint>,
    /// The processing state saved with the checkpoint.
    pub state: Option<String>,
    /// Current silver rows of the tables asked for.
    pub rows: Vec<(TableId, Row)>,
    /// The transport partition of each row of `rows`, same order (empty when the
    /// store does not keep them).
    pub partitions: Vec<Option<Arc<str>>>,
    /// Quarantine records not yet resolved.
    pub open_quarantine: Vec<QuarantineRecord>,
}

/// A store's acknowledgement: everything up to `checkpoint` is durable.
#[derive(Debug, Clone)]
pub struct Ack {
    pub checkpoint: Checkpoint,
    pub event_count: u64,
}

/// Errors of stores, classified by what happens next.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store is unreachable or busy: retry with backoff.
    #[error("store unavailable: {message}")]
    Unavailable {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// Another worker of the consumer group committed one of this worker's
    /// partitions since this worker read it: the partition was reassigned. Nothing
    /// of the commit was written; the worker rebuilds its state from the store.
    #[error("fenced: {message}")]
    Fenced { message: String },
    /// A write failed in a way a retry will not fix (schema conflict, disk full, corruption).
    #[error("store write failed: {message}")]
    Definite {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

/// A destination for processed data.
///
/// # Contract
/// - `write` returns only once the whole commit is durable, or not at all: a commit
///   is applied atomically with its checkpoint.
/// - Writes are idempotent: silver is upsert/delete by key, gold rows carry absolute
///   values, so applying a commit twice leaves the same tables.
/// - Commits arrive in order; a store never reorders them.
#[async_trait]
pub trait Sink: Send {
    /// Stable lowercase name for logs and metric labels, e.g. `"sqlite"`.
    fn kind(&self) -> &'static str;
    /// Checks connectivity and creates or evolves the tables. Called before `recover`.
    async fn healthcheck(&mut self) -> Result<(), StoreError>;
    /// Loads the last checkpoint, the saved processing state, the silver rows of
    /// `tables` and the open quarantine records.
    async fn recover(&mut self, tables: &[TableId]) -> Result<Recovered, StoreError>;
    /// Writes one commit durably.
    /// Takes an `Arc` so a caller can retry the same commit after a transient error
    /// without copying its rows.
    async fn write(&mut self, commit: std::sync::Arc<Commit>) -> Result<Ack, StoreError>;
}

/// One `quarantine` row as every store reads it back: id, table, key, stage, reason,
/// detail, position, origin, payload.
pub(crate) type QuarantineRow = (
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

/// Turns a stored quarantine row into a record; `reasons` interns the reason codes,
/// which thousands of records share.
pub(crate) fn quarantine_record(
    row: QuarantineRow,
    reasons: &mut HashMap<String, Arc<str>>,
) -> Result<QuarantineRecord, StoreError> {
    let (id, table, key, stage, reason, detail, position, origin, payload) = row;
    let stage = Stage::from_code(&stage).ok_or_else(|| StoreError::Definite {
        message: format!("quarantine record {id} has an unknown stage `{stage}`"),
        source: None,
    })?;
    let reason = reasons.entry(reason).or_insert_with_key(|r| Arc::from(r.as_str())).clone();
    Ok(QuarantineRecord {
        table,
        key,
        stage,
        reason,
        detail: detail.unwrap_or_default(),
        position,
        origin: origin.and_then(|o| u64::try_from(o).ok()).unwrap_or(0),
        payload: payload.unwrap_or_default(),
    })
}

/// A quoted SQL identifier; the same rule in SQLite and PostgreSQL.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The export query of a gold table: window, group columns, measures and then
/// `extra` columns, in the reference files' row order. The stores lay gold tables
/// out the same way.
pub(crate) fn gold_select(
    quoted: &str,
    g: &crate::config::spec::GoldSpec,
    extra: &[String],
) -> String {
    let mut order = vec![r#""window_start""#.to_owned()];
    order.extend(g.group_by.iter().map(|(n, _)| ident(n)));
    let mut selected = order.clone();
    selected.extend(g.measures.iter().map(|m| ident(&m.name)));
    selected.extend(extra.iter().cloned());
    format!("SELECT {} FROM {quoted} ORDER BY {}", selected.join(", "), order.join(", "))
}
