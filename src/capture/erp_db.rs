//! Drives a real MySQL/MariaDB ERP database with the simulator's activity
//! (`caudal simulate --mysql URL`): creates the six ERP tables, then applies the
//! generator's changes as SQL (inserts, updates, deletes, cancellations) at a rate.
//!
//! The binlog source then sees what a CDC reader of a live ERP sees. Re-deliveries
//! are a property of transports, not of databases, so the generator's duplicates
//! (an already-applied position) are skipped here. Each change is one autocommit
//! statement; a statement that fails (a constraint, a lost connection) is an error,
//! not silently skipped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, Params};

use super::simulator::ErpGenerator;
use super::CaptureError;
use crate::config::spec::SimulateSpec;
use crate::event::{time, Catalog, Change, ColumnType, Op, Position, Value};

/// The ERP schema, as an ERP would declare it. Column types match what the shipped
/// pipeline declares (DATETIME(3) is Debezium's epoch-millisecond `timestamp`).
pub const ERP_DDL: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS customers (id INT PRIMARY KEY, name VARCHAR(100), \
     email VARCHAR(200), phone VARCHAR(40), city VARCHAR(80), country CHAR(2), \
     created_at DATETIME(3), updated_at DATETIME(3)) CHARACTER SET utf8mb4",
    "CREATE TABLE IF NOT EXISTS products (id INT PRIMARY KEY, sku VARCHAR(20), \
     name VARCHAR(100), category VARCHAR(40), unit_price DECIMAL(12,2), active TINYINT, \
     updated_at DATETIME(3)) CHARACTER SET utf8mb4",
    "CREATE TABLE IF NOT EXISTS employees (id INT PRIMARY KEY, name VARCHAR(100), \
     email VARCHAR(200), channel VARCHAR(20), region VARCHAR(20), hired_at DATE) \
     CHARACTER SET utf8mb4",
    "CREATE TABLE IF NOT EXISTS orders (id BIGINT PRIMARY KEY, customer_id INT, \
     employee_id INT, channel VARCHAR(20), status VARCHAR(20), order_ts DATETIME(3), \
     currency CHAR(3), total DECIMAL(14,2), city VARCHAR(80)) CHARACTER SET utf8mb4",
    "CREATE TABLE IF NOT EXISTS order_items (id BIGINT PRIMARY KEY, order_id BIGINT, \
     product_id INT, quantity INT, unit_price DECIMAL(12,2), discount DECIMAL(5,4)) \
     CHARACTER SET utf8mb4",
    "CREATE TABLE IF NOT EXISTS payments (id BIGINT PRIMARY KEY, order_id BIGINT, \
     amount DECIMAL(14,2), method VARCHAR(20), status VARCHAR(20), paid_at DATETIME(3)) \
     CHARACTER SET utf8mb4",
];

fn transient(context: &str, e: mysql_async::Error) -> CaptureError {
    CaptureError::Transient { message: format!("{context}: {e}"), source: Some(Box::new(e)) }
}

/// A value as a SQL parameter; temporal values as text in UTC, which is how the
/// binlog and the snapshot read DATETIME back (DATETIME has no zone).
fn param(ty: ColumnType, v: &Value) -> mysql_async::Value {
    use mysql_async::Value as P;
    match v {
        Value::Null => P::NULL,
        Value::Bool(b) => P::Int(i64::from(*b)),
        Value::Int(i) => P::Int(*i),
        Value::UInt(u) => P::UInt(*u),
        Value::Float(f) => P::Double(*f),
        Value::Decimal(d) => P::Bytes(d.to_string().into_bytes()),
        Value::Str(s) | Value::Json(s) => P::Bytes(s.as_bytes().to_vec()),
        Value::Bytes(b) => P::Bytes(b.to_vec()),
        Value::Timestamp(us) => {
            let digits = if ty == ColumnType::TimestampMillis { 3 } else { 6 };
            let iso = time::format_timestamp(*us, digits);
            P::Bytes(iso.trim_end_matches('Z').replace('T', " ").into_bytes())
        }
        Value::Date(d) => P::Bytes(time::format_date(i64::from(*d)).into_bytes()),
        Value::Time(t) => P::Bytes(time::format_time(*t).into_bytes()),
    }
}

/// The statement and parameters that apply `change` to its table.
fn statement(catalog: &Catalog, change: &Change) -> Option<(String, Params)> {
    let schema = catalog.table(change.table);
    let quote = |s: &str| format!("`{}`", s.replace('`', "``"));
    let table = quote(&schema.name);
    let key_where: Vec<String> =
        schema.key.iter().map(|&k| format!("{} = ?", quote(&schema.columns[k].name))).collect();
    match change.op {
        Op::Read | Op::Insert => {
            let row = change.after.as_ref()?;
            let cols: Vec<String> = schema.columns.iter().map(|c| quote(&c.name)).collect();
            let marks = vec!["?"; cols.len()].join(", ");
            let params =
                schema.columns.iter().zip(row.iter()).map(|(c, v)| param(c.ty, v)).collect();
            // REPLACE keeps a re-run over an existing database idempotent.
            let sql = format!("REPLACE INTO {table} ({}) VALUES ({marks})", cols.join(", "));
            Some((sql, Params::Positional(params)))
        }
        Op::Update => {
            let row = change.after.as_ref()?;
            let sets: Vec<String> =
                schema.columns.iter().map(|c| format!("{} = ?", quote(&c.name))).collect();
            let mut params: Vec<mysql_async::Value> =
                schema.columns.iter().zip(row.iter()).map(|(c, v)| param(c.ty, v)).collect();
            params.extend(schema.key.iter().map(|&k| param(schema.columns[k].ty, &row[k])));
            let sql =
                format!("UPDATE {table} SET {} WHERE {}", sets.join(", "), key_where.join(" AND "));
            Some((sql, Params::Positional(params)))
        }
        Op::Delete => {
            let row = change.before.as_ref()?;
            let params = schema.key.iter().map(|&k| param(schema.columns[k].ty, &row[k])).collect();
            let sql = format!("DELETE FROM {table} WHERE {}", key_where.join(" AND "));
            Some((sql, Params::Positional(params)))
        }
    }
}

/// Creates the ERP tables in the database of `url` and applies the simulator's
/// changes at `spec.rate` (`None`: as fast as the server takes them) until
/// `spec.events` changes were generated. Returns the number of statements applied.
///
/// # Errors
/// [`CaptureError`] when the database refuses a connection or a statement.
pub async fn drive(
    url: &str,
    spec: &SimulateSpec,
    catalog: Arc<Catalog>,
    start_ms: i64,
) -> Result<u64, CaptureError> {
    let opts = Opts::from_url(url).map_err(|e| CaptureError::Definite {
        message: format!("not a MySQL URL: {e}"),
        hint: Some("mysql://USER:PASSWORD@HOST:PORT/DATABASE".into()),
    })?;
    let mut conn = Conn::new(opts).await.map_err(|e| transient("cannot connect", e))?;
    for ddl in ERP_DDL {
        conn.query_drop(*ddl).await.map_err(|e| transient("cannot create the ERP tables", e))?;
    }
    let mut gen = ErpGenerator::new(spec, catalog.clone(), start_ms)?;
    let started = Instant::now();
    let mut applied = 0u64;
    let mut high: Option<Position> = None;
    while let Some(change) = gen.next_change() {
        // A repeated position is a simulated re-delivery: the database saw it once.
        if let (Some(p), Some(h)) = (&change.source.position, &high) {
            if p <= h {
                continue;
            }
        }
        high = change.source.position.clone();
        if let Some((sql, params)) = statement(&catalog, &change) {
            conn.exec_drop(sql, params).await.map_err(|e| transient("statement failed", e))?;
            applied += 1;
        }
        if let Some(rate) = spec.rate {
            let due = Duration::from_secs_f64(applied as f64 / rate);
            let elapsed = started.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
    }
    conn.disconnect().await.map_err(|e| transient("disconnect", e))?;
    Ok(applied)
}
