//! Capture: sources of change events.
//!
//! A [`Source`] turns an upstream log (a file of Debezium JSON lines, the built-in
//! ERP simulator, a MySQL binlog, Kafka topics) into [`Batch`]es of
//! events in log order. Each batch carries the [`Checkpoint`] to resume from once
//! the batch is durable downstream; a source restarted with that checkpoint
//! continues strictly after it. Re-delivered events are possible after a crash
//! (at-least-once); processing deduplicates them by source position.

pub mod erp_db;
pub mod file;
pub mod kafka;
pub mod mysql;
pub mod simulator;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::bus;
use crate::event::Checkpoint;

/// Errors of sources, classified by what happens next.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Connection lost or upstream busy: reconnect with backoff.
    #[error("source unavailable: {message}")]
    Transient {
        message: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// Cannot continue without an operator (missing file, purged log, bad checkpoint).
    #[error("{message}")]
    Definite { message: String, hint: Option<String> },
    /// Downstream hung up: the pipeline is stopping.
    #[error("pipeline stopped")]
    Closed,
}

impl CaptureError {
    pub fn is_transient(&self) -> bool {
        matches!(self, CaptureError::Transient { .. })
    }
}

/// Reads a source's resume token: `None` for no token (an empty one is what a new
/// store holds), a definite error naming `what` when the token is another source's.
pub(crate) fn parse_checkpoint<T: serde::de::DeserializeOwned>(
    cp: &Checkpoint,
    what: &str,
) -> Result<Option<T>, CaptureError> {
    if cp.0.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&cp.0).map(Some).map_err(|e| CaptureError::Definite {
        message: format!("checkpoint `{}` is not a {what}: {e}", cp.0),
        hint: Some("was the store written by another source type? use a new store".into()),
    })
}

/// Sends a batch unless shutdown comes first; `Ok(false)` means stop.
pub(crate) async fn send(
    out: &bus::Sender,
    shutdown: &CancellationToken,
    batch: crate::event::Batch,
) -> Result<bool, CaptureError> {
    tokio::select! {
        biased;
        () = shutdown.cancelled() => Ok(false),
        sent = out.send(batch) => sent.map(|()| true).map_err(|_| CaptureError::Closed),
    }
}

/// A producer of change events.
#[async_trait]
pub trait Source: Send {
    /// Stable lowercase name used in logs and metric labels, e.g. `"file"`.
    fn kind(&self) -> &'static str;
    /// Streams batches into `out`, starting strictly after `resume`, until `shutdown`
    /// is cancelled or the upstream ends (then returns `Ok`).
    ///
    /// # Errors
    /// [`CaptureError::is_transient`] tells the runner whether to retry.
    async fn run(
        self: Box<Self>,
        resume: Option<Checkpoint>,
        out: bus::Sender,
        shutdown: CancellationToken,
    ) -> Result<(), CaptureError>;
}
