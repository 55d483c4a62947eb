//! The bus between capture and processing.
//!
//! In-process by default: a bounded channel of [`Batch`]es, so a slow consumer
//! slows the producer instead of growing memory. For work that outgrows one
//! process, [`kafka`] publishes the changes to one Kafka topic per table
//! (`caudal capture`), and the `kafka` source (`capture::kafka`) reads them back.

pub mod kafka;

use tokio::sync::mpsc;

use crate::event::Batch;

/// The sending half; `send` waits while the queue is full (backpressure).
pub type Sender = mpsc::Sender<Batch>;
/// The receiving half.
pub type Receiver = mpsc::Receiver<Batch>;

/// A bounded in-memory bus holding at most `capacity` batches.
pub fn memory(capacity: usize) -> (Sender, Receiver) {
    mpsc::channel(capacity.max(1))
}
