//! Reference-format export (being written).
