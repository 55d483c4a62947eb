//! caudal: a real-time change-data pipeline in one binary.
//!
//! The modules follow the data path:
//!
//! ```text
//! capture (file, simulator) -> bus (bounded channels) -> process (dedup, clean,
//! enrich, windows, quarantine) -> store (SQLite) -> serve
//! ```
//!
//! `event` is the vocabulary every stage shares; `config` turns a pipeline file
//! into a validated spec; `topology` wires the stages together.

pub mod bus;
pub mod capture;
pub mod config;
pub mod event;
pub mod process;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod topology;
