//! The built-in ERP simulator (being written).
