//! SQLite sink (being written).
