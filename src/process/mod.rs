//! Processing: dedup, clean, enrich, aggregate, quarantine.
//!
//! Input: batches of [`Event`](crate::event::Event)s in source order. Output: one
//! [`Commit`](crate::event::output::Commit) per micro-batch, holding the silver rows
//! that changed, the gold rows that changed (absolute values), the quarantine
//! records opened or resolved, and the checkpoint it covers.
//!
//! - [`dedup`]: drops re-delivered events by source position (a high-water mark).
//! - [`clean`]: fixes, defaults and checks from the pipeline file; the first failed
//!   `quarantine` check quarantines the row with its reason.
//! - [`processor`]: keeps the current rows of fact and dimension tables, joins facts
//!   to dimensions as either side changes, and maintains the window aggregates of
//!   [`window`] with retractions.
//!
//! Bad data never returns an error here: it is a quarantine record. This module
//! does no I/O and reads no clock; it imports only `event` and `config`.

pub mod clean;
pub mod dedup;
pub mod expr;
pub mod keymap;
pub mod processor;
pub mod window;

pub use crate::event::STATE_PARTITION_PREFIX;
pub use processor::{Processor, Stats};
