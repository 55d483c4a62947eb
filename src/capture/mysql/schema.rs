//! What the server is and what its tables look like, and how MySQL values become
//! [`Value`]s.
//!
//! [`check_server`] validates the settings and grants binlog capture needs and
//! fails with a [`CaptureError::Definite`] that names the setting or grant and the
//! fix. [`load_table`] reads a table's columns from `information_schema` (the binlog
//! identifies columns only by position, and without `binlog_row_metadata = FULL`
//! it carries neither names nor signedness).
//!
//! Conversion goes in two steps: [`native`] reads a driver value by the column's
//! MySQL type into the value it denotes (a DATETIME is wall-clock microseconds with
//! no zone shift, a TIMESTAMP is UTC, an ENUM index becomes its label), the same
//! whether it came from the snapshot's binary protocol or from a binlog row; then
//! [`coerce`] fits it to the column type the pipeline declares. A value that does
//! not fit is an `Err(String)` the caller turns into a bad event (data, not a
//! failure of the source).

use std::str::FromStr;

use base64::Engine as _;
use mysql_async::binlog::events::TableMapEvent;
use mysql_async::consts::ColumnType as BinlogType;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Row, Value as MyValue};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::capture::CaptureError;
use crate::event::{time, ColumnType, Value};

/// Which protocol a value arrived by: a few types are encoded differently in rows
/// events than in result sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// A prepared-statement result (the snapshot): typed, TIMESTAMP in the session
    /// zone (set to UTC), ENUM and SET as labels.
    Query,
    /// A binlog rows event: TIMESTAMP as epoch seconds, ENUM as a 1-based index, SET
    /// as a bit mask, unsigned integers possibly read as signed.
    Binlog,
}

/// The MySQL type of a column, as far as conversion cares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum DbKind {
    /// TINYINT..BIGINT with the width in bits (for reading unsigned values the
    /// binlog decoded as signed).
    Integer {
        bits: u32,
        unsigned: bool,
    },
    Decimal,
    Float,
    Bit {
        bits: u32,
    },
    Date,
    Datetime,
    Timestamp,
    Time,
    Year,
    /// CHAR / VARCHAR / TEXT (MariaDB's JSON is a LONGTEXT too).
    Text {
        latin1: bool,
    },
    /// BINARY / VARBINARY / BLOB and anything unrecognised (kept as bytes).
    Binary,
    Json,
    Enum(Vec<String>),
    Set(Vec<String>),
}

/// A column as the server declares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DbColumn {
    pub name: String,
    pub kind: DbKind,
}

/// A table as the server declares it: columns in ordinal order (the binlog order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DbTable {
    pub name: String,
    pub columns: Vec<DbColumn>,
    /// Indexes into `columns` of the primary key, in key order; empty without one.
    pub key: Vec<usize>,
    /// Whether text columns defined without a charset are latin1 (the table's
    /// default charset), for columns a DDL statement adds.
    #[serde(default)]
    pub default_latin1: bool,
}

impl DbTable {
    /// Checks this schema against a binlog table map: the same number of columns,
    /// each of a type the column's kind is logged as. A schema that fails it is
    /// not the one the rows were written with.
    ///
    /// # Errors
    /// The first column that does not fit, for the log and the bad event.
    pub fn fits_table_map(&self, tme: &TableMapEvent<'_>) -> Result<(), String> {
        let count = usize::try_from(tme.columns_count()).unwrap_or(usize::MAX);
        if count != self.columns.len() {
            return Err(format!(
                "the binlog has {count} columns for `{}`, its schema {}",
                self.name,
                self.columns.len()
            ));
        }
        for (i, col) in self.columns.iter().enumerate() {
            match tme.get_column_type(i) {
                Ok(Some(t)) if logged_as(&col.kind, t) => {}
                Ok(Some(t)) => {
                    return Err(format!(
                        "column {i} of `{}` is logged as {t:?}, its schema says `{}` {:?}",
                        self.name, col.name, col.kind
                    ))
                }
                // Types this decoder does not know are left to the row decoder.
                Ok(None) | Err(_) => {}
            }
        }
        Ok(())
    }
}

/// Whether a column of this kind can be logged with this binlog type.
fn logged_as(kind: &DbKind, t: BinlogType) -> bool {
    use BinlogType as T;
    let text = matches!(
        t,
        T::MYSQL_TYPE_VARCHAR
            | T::MYSQL_TYPE_VAR_STRING
            | T::MYSQL_TYPE_STRING
            | T::MYSQL_TYPE_TINY_BLOB
            | T::MYSQL_TYPE_MEDIUM_BLOB
            | T::MYSQL_TYPE_LONG_BLOB
            | T::MYSQL_TYPE_BLOB
    );
    match kind {
        DbKind::Integer { bits: 8, .. } => t == T::MYSQL_TYPE_TINY,
        DbKind::Integer { bits: 16, .. } => t == T::MYSQL_TYPE_SHORT,
        DbKind::Integer { bits: 24, .. } => t == T::MYSQL_TYPE_INT24,
        DbKind::Integer { bits: 32, .. } => t == T::MYSQL_TYPE_LONG,
        DbKind::Integer { .. } => t == T::MYSQL_TYPE_LONGLONG,
        DbKind::Decimal => matches!(t, T::MYSQL_TYPE_NEWDECIMAL | T::MYSQL_TYPE_DECIMAL),
        DbKind::Float => matches!(t, T::MYSQL_TYPE_FLOAT | T::MYSQL_TYPE_DOUBLE),
        DbKind::Bit { .. } => t == T::MYSQL_TYPE_BIT,
        DbKind::Date => matches!(t, T::MYSQL_TYPE_DATE | T::MYSQL_TYPE_NEWDATE),
        DbKind::Datetime => matches!(t, T::MYSQL_TYPE_DATETIME | T::MYSQL_TYPE_DATETIME2),
        DbKind::Timestamp => matches!(t, T::MYSQL_TYPE_TIMESTAMP | T::MYSQL_TYPE_TIMESTAMP2),
        DbKind::Time => matches!(t, T::MYSQL_TYPE_TIME | T::MYSQL_TYPE_TIME2),
        DbKind::Year => t == T::MYSQL_TYPE_YEAR,
        // MariaDB's JSON is a LONGTEXT.
        DbKind::Text { .. } | DbKind::Json => text || t == T::MYSQL_TYPE_JSON,
        DbKind::Enum(_) => matches!(t, T::MYSQL_TYPE_ENUM | T::MYSQL_TYPE_STRING),
        DbKind::Set(_) => matches!(t, T::MYSQL_TYPE_SET | T::MYSQL_TYPE_STRING),
        // Binary strings, and types read as bytes whatever they are.
        DbKind::Binary => true,
    }
}

/// What the server is, as found by [`check_server`].
#[derive(Debug, Clone)]
pub(crate) struct ServerInfo {
    pub mariadb: bool,
    /// Whether positions can be GTIDs: always on MariaDB (every transaction has
    /// one), with `gtid_mode = ON` on MySQL.
    pub gtid: bool,
}

/// Maps a driver error: lost connections are transient, refusals that need an
/// operator (credentials, grants, unknown database, purged binlog) are definite.
pub(crate) fn driver_error(context: &str, err: mysql_async::Error) -> CaptureError {
    use mysql_async::Error;
    match err {
        Error::Server(ref e) => {
            let (message, hint) = match e.code {
                1044 | 1045 => (
                    format!("{context}: access denied: {}", e.message),
                    "check the user and password in `source.url`",
                ),
                1049 => (
                    format!("{context}: {}", e.message),
                    "create the database or fix the database name in `source.url`",
                ),
                1142 | 1143 | 1227 => (
                    format!("{context}: missing privilege: {}", e.message),
                    "GRANT SELECT, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO the capture user \
                     (MariaDB 10.5+: BINLOG MONITOR instead of REPLICATION CLIENT)",
                ),
                1236 => return binlog_read_error(context, &e.message),
                // Lock waits, deadlocks, too many connections, server shutting down.
                _ => {
                    return CaptureError::Transient {
                        message: format!("{context}: server error {}: {}", e.code, e.message),
                        source: Some(Box::new(err)),
                    }
                }
            };
            CaptureError::Definite { message, hint: Some(hint.into()) }
        }
        Error::Url(e) => CaptureError::Definite {
            message: format!("{context}: invalid `source.url`: {e}"),
            hint: Some("use mysql://USER:PASSWORD@HOST:PORT/DATABASE".into()),
        },
        other => CaptureError::Transient {
            message: format!("{context}: {other}"),
            source: Some(Box::new(other)),
        },
    }
}

/// Error 1236 is the server refusing to send the binlog: purged file, duplicate
/// server id, or a corrupt position. All need an operator.
fn binlog_read_error(context: &str, message: &str) -> CaptureError {
    let lower = message.to_ascii_lowercase();
    let hint = if lower.contains("could not find first log file")
        || lower.contains("purged")
        || lower.contains("could not find")
    {
        "the binlog needed to resume was purged: start with a new store to take a new \
         snapshot, and raise `binlog_expire_logs_seconds` / `expire_logs_days` so it does not recur"
    } else if lower.contains("server_id")
        || lower.contains("server id")
        || lower.contains("same server")
    {
        "another replica uses this `source.server_id`: give caudal a unique one"
    } else {
        "the checkpoint's binlog position is not valid on this server: start with a new store"
    };
    CaptureError::Definite {
        message: format!("{context}: server cannot send the binlog: {message}"),
        hint: Some(hint.into()),
    }
}

fn cell<T: mysql_async::prelude::FromValue>(
    row: &mut Row,
    i: usize,
    what: &str,
) -> Result<T, CaptureError> {
    match row.take_opt::<T, usize>(i) {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(CaptureError::Definite {
            message: format!("unexpected value of `{what}` from the server: {e}"),
            hint: None,
        }),
        None => Err(CaptureError::Definite {
            message: format!("the server returned no `{what}`"),
            hint: None,
        }),
    }
}

/// Checks the binlog settings and the grants binlog capture needs.
///
/// # Errors
/// A [`CaptureError::Definite`] naming the setting or grant and the fix; transient
/// errors when the server is unreachable.
pub(crate) async fn check_server(conn: &mut Conn) -> Result<ServerInfo, CaptureError> {
    let ctx = "checking the server";
    let mut row: Row = conn
        .query_first(
            "SELECT @@version, CAST(@@log_bin AS CHAR), @@binlog_format, @@binlog_row_image",
        )
        .await
        .map_err(|e| driver_error(ctx, e))?
        .ok_or_else(|| CaptureError::Definite {
            message: "the server returned no settings".into(),
            hint: None,
        })?;
    let version: String = cell(&mut row, 0, "@@version")?;
    let log_bin: String = cell(&mut row, 1, "@@log_bin")?;
    let format: String = cell(&mut row, 2, "@@binlog_format")?;
    let image: String = cell(&mut row, 3, "@@binlog_row_image")?;
    check_settings(&log_bin, &format, &image)?;

    let privileges: Vec<String> = conn
        .query(
            "SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES \
             WHERE GRANTEE = CONCAT('''', SUBSTRING_INDEX(CURRENT_USER(), '@', 1), '''@''', \
             SUBSTRING_INDEX(CURRENT_USER(), '@', -1), '''')",
        )
        .await
        .map_err(|e| driver_error(ctx, e))?;
    check_grants(&privileges)?;
    let mariadb = version.to_ascii_lowercase().contains("mariadb");
    let gtid = if mariadb {
        true
    } else {
        // MySQL 5.7+ has `gtid_mode`; OFF, OFF_PERMISSIVE and ON_PERMISSIVE may leave
        // transactions without a GTID, so only ON makes the executed set a position.
        let mode: Option<String> = conn
            .query_first("SELECT CAST(@@GLOBAL.gtid_mode AS CHAR)")
            .await
            .map_err(|e| driver_error(ctx, e))?;
        mode.is_some_and(|m| m.eq_ignore_ascii_case("ON"))
    };
    Ok(ServerInfo { mariadb, gtid })
}

/// The pure part of [`check_server`]'s settings check.
pub(crate) fn check_settings(log_bin: &str, format: &str, image: &str) -> Result<(), CaptureError> {
    if !matches!(log_bin, "1" | "ON") {
        return Err(CaptureError::Definite {
            message: format!("binary logging is off (`log_bin` = {log_bin})"),
            hint: Some(
                "start the server with `log_bin` (e.g. `--log-bin=mysql-bin`), \
                 `binlog_format = ROW` and `binlog_row_image = FULL`"
                    .into(),
            ),
        });
    }
    if !format.eq_ignore_ascii_case("ROW") {
        return Err(CaptureError::Definite {
            message: format!("`binlog_format` is `{format}`, caudal needs `ROW`"),
            hint: Some(
                "run `SET GLOBAL binlog_format = 'ROW'` and set `binlog_format = ROW` in the \
                 server configuration; sessions already open keep the old format until they reconnect"
                    .into(),
            ),
        });
    }
    if !image.eq_ignore_ascii_case("FULL") {
        return Err(CaptureError::Definite {
            message: format!("`binlog_row_image` is `{image}`, caudal needs `FULL`"),
            hint: Some(
                "run `SET GLOBAL binlog_row_image = 'FULL'` and set `binlog_row_image = FULL` in \
                 the server configuration"
                    .into(),
            ),
        });
    }
    Ok(())
}

/// The pure part of [`check_server`]'s grant check, over the global privileges of
/// the current user. Privileges granted through roles are not seen here; the
/// binlog request itself still reports a missing grant by name.
pub(crate) fn check_grants(privileges: &[String]) -> Result<(), CaptureError> {
    let has =
        |names: &[&str]| privileges.iter().any(|p| names.iter().any(|n| p.eq_ignore_ascii_case(n)));
    if !has(&["REPLICATION SLAVE", "REPLICATION REPLICA"]) {
        return Err(CaptureError::Definite {
            message: "the capture user lacks the `REPLICATION SLAVE` grant".into(),
            hint: Some("GRANT REPLICATION SLAVE ON *.* TO the capture user".into()),
        });
    }
    if !has(&["REPLICATION CLIENT", "BINLOG MONITOR", "SUPER"]) {
        return Err(CaptureError::Definite {
            message: "the capture user lacks the `REPLICATION CLIENT` grant (`BINLOG MONITOR` on MariaDB 10.5+)"
                .into(),
            hint: Some(
                "GRANT REPLICATION CLIENT ON *.* TO the capture user (MariaDB 10.5+: GRANT BINLOG MONITOR)"
                    .into(),
            ),
        });
    }
    Ok(())
}

/// Reads a table's columns and primary key from `information_schema`; `None` when
/// the table does not exist.
///
/// # Errors
/// Transient when the server is unreachable; definite on refusals.
pub(crate) async fn load_table(
    conn: &mut Conn,
    db: &str,
    table: &str,
) -> Result<Option<DbTable>, CaptureError> {
    let ctx = "reading the table schema";
    let rows: Vec<Row> = conn
        .exec(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, CHARACTER_SET_NAME \
             FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
             ORDER BY ORDINAL_POSITION",
            (db, table),
        )
        .await
        .map_err(|e| driver_error(ctx, e))?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut columns = Vec::with_capacity(rows.len());
    for mut row in rows {
        let name: String = cell(&mut row, 0, "COLUMN_NAME")?;
        let data_type: String = cell(&mut row, 1, "DATA_TYPE")?;
        let column_type: String = cell(&mut row, 2, "COLUMN_TYPE")?;
        let charset: Option<String> = cell(&mut row, 3, "CHARACTER_SET_NAME")?;
        let kind = db_kind(&data_type, &column_type, charset.as_deref());
        columns.push(DbColumn { name, kind });
    }
    let key_names: Vec<String> = conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY' \
             ORDER BY ORDINAL_POSITION",
            (db, table),
        )
        .await
        .map_err(|e| driver_error(ctx, e))?;
    let key = key_names.iter().filter_map(|k| columns.iter().position(|c| &c.name == k)).collect();
    let collation: Option<Option<String>> = conn
        .exec_first(
            "SELECT TABLE_COLLATION FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
            (db, table),
        )
        .await
        .map_err(|e| driver_error(ctx, e))?;
    let default_latin1 = collation.flatten().is_some_and(|c| c.starts_with("latin1"));
    Ok(Some(DbTable { name: table.to_owned(), columns, key, default_latin1 }))
}

/// Classifies a column from `information_schema.COLUMNS`.
pub(crate) fn db_kind(data_type: &str, column_type: &str, charset: Option<&str>) -> DbKind {
    let unsigned = column_type.to_ascii_lowercase().contains("unsigned");
    let integer = |bits| DbKind::Integer { bits, unsigned };
    match data_type.to_ascii_lowercase().as_str() {
        "tinyint" | "bool" | "boolean" => integer(8),
        "smallint" => integer(16),
        "mediumint" => integer(24),
        "int" | "integer" => integer(32),
        "bigint" => integer(64),
        "decimal" | "numeric" => DbKind::Decimal,
        "float" | "double" | "real" => DbKind::Float,
        "bit" => DbKind::Bit { bits: paren_number(column_type).unwrap_or(1) },
        "date" => DbKind::Date,
        "datetime" => DbKind::Datetime,
        "timestamp" => DbKind::Timestamp,
        "time" => DbKind::Time,
        "year" => DbKind::Year,
        "json" => DbKind::Json,
        "enum" => DbKind::Enum(labels(column_type)),
        "set" => DbKind::Set(labels(column_type)),
        "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" => {
            DbKind::Text { latin1: charset.is_some_and(|c| c.eq_ignore_ascii_case("latin1")) }
        }
        _ => DbKind::Binary,
    }
}

fn paren_number(column_type: &str) -> Option<u32> {
    let (_, rest) = column_type.split_once('(')?;
    rest.split_once(')')?.0.trim().parse().ok()
}

/// The labels of `enum('a','b''c')` / `set(...)`, unquoted.
fn labels(column_type: &str) -> Vec<String> {
    let Some(start) = column_type.find('(') else { return Vec::new() };
    let inner = column_type[start + 1..].strip_suffix(')').unwrap_or(&column_type[start + 1..]);
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\'' {
            continue;
        }
        let mut label = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    label.push('\'');
                }
                '\'' => break,
                '\\' => {
                    if let Some(n) = chars.next() {
                        label.push(n);
                    }
                }
                c => label.push(c),
            }
        }
        out.push(label);
    }
    out
}

/// Characters of ISO-8859-1 bytes (MySQL's `latin1` is cp1252, which differs
/// only in 0x80-0x9F; those are kept as their ISO code points).
fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

fn text(bytes: Vec<u8>, latin: bool) -> Result<Value, String> {
    if latin {
        return Ok(Value::Str(latin1(&bytes).into()));
    }
    String::from_utf8(bytes)
        .map(|s| Value::Str(s.into()))
        .map_err(|_| "text that is not valid UTF-8".to_owned())
}

fn civil_micros(y: u16, m: u8, d: u8, h: u8, mi: u8, s: u8, us: u32) -> Option<i64> {
    // MySQL's zero date (and dates with a zero part) has no calendar meaning:
    // Debezium emits null for it.
    if y == 0 || m == 0 || d == 0 {
        return None;
    }
    let days = time::days_from_civil(i64::from(y), u32::from(m), u32::from(d));
    Some(
        days * time::MICROS_PER_DAY
            + (i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(s)) * 1_000_000
            + i64::from(us),
    )
}

fn int_of(v: &MyValue) -> Option<i128> {
    match v {
        MyValue::Int(i) => Some(i128::from(*i)),
        MyValue::UInt(u) => Some(i128::from(*u)),
        MyValue::Bytes(b) => std::str::from_utf8(b).ok()?.trim().parse().ok(),
        _ => None,
    }
}

fn unexpected(v: &MyValue, col: &DbColumn) -> String {
    format!("unexpected value {v:?} for column `{}` ({:?})", col.name, col.kind)
}

/// Reads a driver value by its column's MySQL type (see the module doc).
///
/// # Errors
/// A description when the value is not what the column type allows.
pub(crate) fn native(v: MyValue, col: &DbColumn, via: Via) -> Result<Value, String> {
    if matches!(v, MyValue::NULL) {
        return Ok(Value::Null);
    }
    match &col.kind {
        DbKind::Integer { bits, unsigned } => {
            let i = int_of(&v).ok_or_else(|| unexpected(&v, col))?;
            if *unsigned {
                // Without signedness metadata the binlog decodes an unsigned column as
                // signed of its width: take the bits back as unsigned.
                let mask: u128 =
                    if *bits >= 64 { u128::from(u64::MAX) } else { (1u128 << bits) - 1 };
                let u = (i as u128 & mask) as u64;
                Ok(Value::UInt(u))
            } else {
                i64::try_from(i).map(Value::Int).map_err(|_| unexpected(&v, col))
            }
        }
        DbKind::Decimal => match &v {
            MyValue::Bytes(b) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| Decimal::from_str(s.trim()).ok())
                .map(Value::Decimal)
                .ok_or_else(|| format!("decimal out of range for column `{}`", col.name)),
            MyValue::Int(i) => Ok(Value::Decimal(Decimal::from(*i))),
            MyValue::UInt(u) => Ok(Value::Decimal(Decimal::from(*u))),
            _ => Err(unexpected(&v, col)),
        },
        DbKind::Float => match v {
            MyValue::Float(f) => Ok(Value::Float(f64::from(f))),
            MyValue::Double(d) => Ok(Value::Float(d)),
            MyValue::Bytes(ref b) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .map(Value::Float)
                .ok_or_else(|| unexpected(&v, col)),
            _ => Err(unexpected(&v, col)),
        },
        DbKind::Bit { bits } => match v {
            MyValue::Bytes(b) if *bits == 1 => Ok(Value::Bool(b.iter().any(|x| *x != 0))),
            MyValue::Bytes(b) => Ok(Value::Bytes(b.into())),
            MyValue::Int(_) | MyValue::UInt(_) => {
                let n = int_of(&v).unwrap_or_default() as u64;
                if *bits == 1 {
                    Ok(Value::Bool(n != 0))
                } else {
                    let len = (*bits as usize).div_ceil(8);
                    Ok(Value::Bytes(n.to_be_bytes()[8 - len.min(8)..].into()))
                }
            }
            _ => Err(unexpected(&v, col)),
        },
        DbKind::Date => match v {
            MyValue::Date(y, m, d, ..) => Ok(civil_micros(y, m, d, 0, 0, 0, 0)
                .map_or(Value::Null, |us| Value::Date((us / time::MICROS_PER_DAY) as i32))),
            _ => Err(unexpected(&v, col)),
        },
        DbKind::Datetime => match v {
            MyValue::Date(y, m, d, h, mi, s, us) => {
                Ok(civil_micros(y, m, d, h, mi, s, us).map_or(Value::Null, Value::Timestamp))
            }
            _ => Err(unexpected(&v, col)),
        },
        DbKind::Timestamp => match (&v, via) {
            // The snapshot session runs in UTC, so the civil time is UTC.
            (MyValue::Date(y, m, d, h, mi, s, us), _) => {
                Ok(civil_micros(*y, *m, *d, *h, *mi, *s, *us).map_or(Value::Null, Value::Timestamp))
            }
            (MyValue::Bytes(b), Via::Binlog) => epoch_seconds(b).ok_or_else(|| unexpected(&v, col)),
            (MyValue::Int(secs), Via::Binlog) => {
                Ok(if *secs == 0 { Value::Null } else { Value::Timestamp(secs * 1_000_000) })
            }
            _ => Err(unexpected(&v, col)),
        },
        DbKind::Time => match v {
            MyValue::Time(neg, days, h, m, s, us) => {
                let micros = ((i64::from(days) * 24 + i64::from(h)) * 3600
                    + i64::from(m) * 60
                    + i64::from(s))
                    * 1_000_000
                    + i64::from(us);
                Ok(Value::Time(if neg { -micros } else { micros }))
            }
            _ => Err(unexpected(&v, col)),
        },
        DbKind::Year => int_of(&v)
            .and_then(|y| i64::try_from(y).ok())
            .map(Value::Int)
            .ok_or_else(|| unexpected(&v, col)),
        DbKind::Text { latin1 } => match v {
            // Result sets are converted to the connection's utf8mb4 by the server;
            // rows events carry the column's own bytes.
            MyValue::Bytes(b) => text(b, *latin1 && via == Via::Binlog),
            _ => Err(unexpected(&v, col)),
        },
        DbKind::Json => match v {
            // MySQL prints JSON with spaces, its binlog holds binary JSON that is
            // printed compact: normalize text from either path so both agree.
            MyValue::Bytes(b) => text(b, false).map(|t| match t {
                Value::Str(s) => Value::Json(normalize_json(&s).into()),
                other => other,
            }),
            _ => Err(unexpected(&v, col)),
        },
        DbKind::Binary => match v {
            MyValue::Bytes(b) => Ok(Value::Bytes(b.into())),
            _ => Err(unexpected(&v, col)),
        },
        DbKind::Enum(labels) => match (v, via) {
            (MyValue::Bytes(b), _) => text(b, false),
            (MyValue::Int(i), Via::Binlog) => {
                // Index 0 is the empty string MySQL stores for an invalid value.
                let label = usize::try_from(i)
                    .ok()
                    .and_then(|i| i.checked_sub(1))
                    .and_then(|i| labels.get(i))
                    .cloned()
                    .unwrap_or_default();
                Ok(Value::Str(label.into()))
            }
            (other, _) => Err(unexpected(&other, col)),
        },
        DbKind::Set(labels) => match (v, via) {
            (MyValue::Bytes(b), Via::Query) => text(b, false),
            (MyValue::Bytes(b), Via::Binlog) => {
                let mut picked = Vec::new();
                for (i, label) in labels.iter().enumerate() {
                    if b.get(i / 8).is_some_and(|byte| byte & (1 << (i % 8)) != 0) {
                        picked.push(label.as_str());
                    }
                }
                Ok(Value::Str(picked.join(",").into()))
            }
            (other, _) => Err(unexpected(&other, col)),
        },
    }
}

/// Compacts MySQL's printed JSON (`{"a": 1}`) to serde_json's form (`{"a":1}`),
/// which is how binlog JSON is printed; text that does not parse is kept.
fn normalize_json(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .map_or_else(|_| text.to_owned(), |v| v.to_string())
}

/// `secs[.micros]` as the binlog decoder prints a TIMESTAMP.
fn epoch_seconds(b: &[u8]) -> Option<Value> {
    let s = std::str::from_utf8(b).ok()?;
    let (secs, frac) = match s.split_once('.') {
        Some((a, f)) => (a, f),
        None => (s, ""),
    };
    let secs: i64 = secs.parse().ok()?;
    let mut micros: i64 = if frac.is_empty() { 0 } else { frac.parse().ok()? };
    for _ in frac.len()..6 {
        micros *= 10;
    }
    // Epoch 0 is MySQL's zero TIMESTAMP ('0000-00-00 00:00:00'); TIMESTAMP's range
    // starts at 1 s past the epoch, so no real value is lost.
    if secs == 0 && micros == 0 {
        return Some(Value::Null);
    }
    Some(Value::Timestamp(secs * 1_000_000 + micros))
}

/// Reads a binlog value (binary JSON of MySQL 8 becomes its compact text).
///
/// # Errors
/// A description when the value cannot be read.
pub(crate) fn native_binlog(
    v: mysql_async::binlog::value::BinlogValue<'_>,
    col: &DbColumn,
) -> Result<Value, String> {
    use mysql_async::binlog::value::BinlogValue;
    match v {
        BinlogValue::Value(v) => native(v, col, Via::Binlog),
        BinlogValue::Jsonb(j) => serde_json::Value::try_from(j)
            .map(|j| Value::Json(j.to_string().into()))
            .map_err(|e| format!("unreadable binary JSON in column `{}`: {e}", col.name)),
        BinlogValue::JsonDiff(_) => Err(format!(
            "partial JSON update of column `{}`: set `binlog_row_value_options` to ''",
            col.name
        )),
    }
}

/// Fits a native value to the column type the pipeline declares.
///
/// # Errors
/// A description when the value has no meaning in that type.
pub(crate) fn coerce(v: Value, ty: ColumnType, column: &str) -> Result<Value, String> {
    let mismatch = |v: &Value| {
        format!("column `{column}` holds a {} that does not fit `{}`", v.kind(), ty.name())
    };
    Ok(match (ty, v) {
        (_, Value::Null) => Value::Null,
        (ColumnType::Bool, Value::Bool(b)) => Value::Bool(b),
        (ColumnType::Bool, v @ (Value::Int(_) | Value::UInt(_))) => {
            Value::Bool(v.to_decimal().is_some_and(|d| !d.is_zero()))
        }
        (ColumnType::Int, Value::Int(i)) => Value::Int(i),
        (ColumnType::Int, Value::UInt(u)) => match i64::try_from(u) {
            Ok(i) => Value::Int(i),
            // Too big for a signed column type: keep the exact value.
            Err(_) => Value::UInt(u),
        },
        (ColumnType::Int, Value::Bool(b)) => Value::Int(i64::from(b)),
        (ColumnType::UInt, Value::UInt(u)) => Value::UInt(u),
        (ColumnType::UInt, Value::Int(i)) => match u64::try_from(i) {
            Ok(u) => Value::UInt(u),
            Err(_) => return Err(mismatch(&Value::Int(i))),
        },
        (ColumnType::Int | ColumnType::UInt, Value::Decimal(d)) if d.fract().is_zero() => {
            let d = d.trunc();
            match (i64::try_from(d), u64::try_from(d)) {
                (Ok(i), _) if ty == ColumnType::Int => Value::Int(i),
                (_, Ok(u)) => Value::UInt(u),
                (Ok(i), _) => Value::Int(i),
                _ => return Err(mismatch(&Value::Decimal(d))),
            }
        }
        (ColumnType::Float, Value::Float(f)) => Value::Float(f),
        (ColumnType::Float, Value::Int(i)) => Value::Float(i as f64),
        (ColumnType::Float, Value::UInt(u)) => Value::Float(u as f64),
        (ColumnType::Float, Value::Decimal(d)) => match d.to_string().parse() {
            Ok(f) => Value::Float(f),
            Err(_) => return Err(mismatch(&Value::Decimal(d))),
        },
        (ColumnType::Decimal, Value::Decimal(d)) => Value::Decimal(d),
        (ColumnType::Decimal, Value::Int(i)) => Value::Decimal(Decimal::from(i)),
        (ColumnType::Decimal, Value::UInt(u)) => Value::Decimal(Decimal::from(u)),
        (ColumnType::Decimal, Value::Float(f)) => match Decimal::try_from(f) {
            Ok(d) => Value::Decimal(d),
            Err(_) => return Err(mismatch(&Value::Float(f))),
        },
        (
            ColumnType::Decimal | ColumnType::Int | ColumnType::UInt | ColumnType::Float,
            Value::Str(s),
        ) => {
            let parsed =
                Decimal::from_str(s.trim()).map_err(|_| mismatch(&Value::Str(s.clone())))?;
            return coerce(Value::Decimal(parsed), ty, column);
        }
        (ColumnType::String, Value::Str(s) | Value::Json(s)) => Value::Str(s),
        (ColumnType::String, Value::Bytes(b)) => match String::from_utf8(b.into_vec()) {
            Ok(s) => Value::Str(s.into()),
            Err(e) => return Err(mismatch(&Value::Bytes(e.into_bytes().into()))),
        },
        (
            ColumnType::String,
            v @ (Value::Int(_)
            | Value::UInt(_)
            | Value::Decimal(_)
            | Value::Float(_)
            | Value::Bool(_)),
        ) => Value::Str(v.to_string().into()),
        (ColumnType::Bytes, Value::Bytes(b)) => Value::Bytes(b),
        (ColumnType::Bytes, Value::Str(s) | Value::Json(s)) => Value::Bytes(s.as_bytes().into()),
        (ColumnType::Json, Value::Json(s) | Value::Str(s)) => Value::Json(s),
        (ColumnType::Json, Value::Bytes(b)) => match String::from_utf8(b.into_vec()) {
            Ok(s) => Value::Json(s.into()),
            Err(e) => return Err(mismatch(&Value::Bytes(e.into_bytes().into()))),
        },
        (
            ColumnType::TimestampMillis | ColumnType::TimestampMicros | ColumnType::TimestampZoned,
            Value::Timestamp(t),
        ) => Value::Timestamp(t),
        (
            ColumnType::TimestampMillis | ColumnType::TimestampMicros | ColumnType::TimestampZoned,
            Value::Date(d),
        ) => Value::Timestamp(i64::from(d) * time::MICROS_PER_DAY),
        (ColumnType::Date, Value::Date(d)) => Value::Date(d),
        (ColumnType::Date, Value::Timestamp(t)) => {
            Value::Date(t.div_euclid(time::MICROS_PER_DAY) as i32)
        }
        (ColumnType::Time, Value::Time(t)) => Value::Time(t),
        (_, v) => return Err(mismatch(&v)),
    })
}

/// A native value as JSON for `Change.extra` (columns the pipeline does not
/// declare), encoded the way Debezium encodes the column's MySQL type.
pub(crate) fn extra_json(v: &Value, kind: &DbKind) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Null => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::UInt(u) => J::from(*u),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::Decimal(d) => J::String(d.to_string()),
        Value::Str(s) | Value::Json(s) => J::String(s.to_string()),
        Value::Bytes(b) => J::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Value::Timestamp(t) if *kind == DbKind::Timestamp => {
            J::String(time::format_timestamp(*t, 6))
        }
        Value::Timestamp(t) | Value::Time(t) => J::from(*t),
        Value::Date(d) => J::from(*d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(kind: DbKind) -> DbColumn {
        DbColumn { name: "c".into(), kind }
    }

    #[test]
    fn unsigned_columns_read_as_signed_by_the_binlog_come_back_unsigned() {
        let int = col(DbKind::Integer { bits: 32, unsigned: true });
        assert_eq!(native(MyValue::Int(-1), &int, Via::Binlog), Ok(Value::UInt(4_294_967_295)));
        let big = col(DbKind::Integer { bits: 64, unsigned: true });
        assert!(matches!(native(MyValue::Int(-1), &big, Via::Binlog), Ok(Value::UInt(u64::MAX))));
        assert!(matches!(
            native(MyValue::UInt(u64::MAX), &big, Via::Query),
            Ok(Value::UInt(u64::MAX))
        ));
        let signed = col(DbKind::Integer { bits: 8, unsigned: false });
        assert!(matches!(native(MyValue::Int(-128), &signed, Via::Binlog), Ok(Value::Int(-128))));
    }

    #[test]
    fn temporal_values_are_the_same_by_query_and_by_binlog() {
        let dt = col(DbKind::Datetime);
        let v = native(MyValue::Date(2026, 1, 5, 8, 10, 0, 123_456), &dt, Via::Query).unwrap();
        assert_eq!(v.to_string(), "2026-01-05T08:10:00.123456Z");
        let ts = col(DbKind::Timestamp);
        let by_query =
            native(MyValue::Date(2026, 1, 5, 8, 10, 0, 500_000), &ts, Via::Query).unwrap();
        let by_binlog = native(MyValue::Bytes(b"1767600600.5".to_vec()), &ts, Via::Binlog).unwrap();
        assert!(
            matches!((&by_query, &by_binlog), (Value::Timestamp(a), Value::Timestamp(b)) if a == b)
        );
        assert!(native(MyValue::Bytes(b"0".to_vec()), &ts, Via::Binlog).unwrap().is_null());
        assert!(native(MyValue::Date(0, 0, 0, 0, 0, 0, 0), &ts, Via::Query).unwrap().is_null());
        let date = col(DbKind::Date);
        assert!(matches!(
            native(MyValue::Date(2026, 1, 5, 0, 0, 0, 0), &date, Via::Binlog),
            Ok(Value::Date(20_458))
        ));
        let t = col(DbKind::Time);
        assert!(matches!(
            native(MyValue::Time(true, 1, 2, 0, 0, 5), &t, Via::Binlog),
            Ok(Value::Time(-93_600_000_005))
        ));
    }

    #[test]
    fn enums_and_sets_read_labels_from_indexes_and_masks() {
        let kind = db_kind("enum", "enum('new','it''s','x,y')", Some("utf8mb4"));
        assert_eq!(kind, DbKind::Enum(vec!["new".into(), "it's".into(), "x,y".into()]));
        let e = col(kind);
        assert_eq!(native(MyValue::Int(2), &e, Via::Binlog).unwrap().as_str(), Some("it's"));
        assert_eq!(native(MyValue::Int(0), &e, Via::Binlog).unwrap().as_str(), Some(""));
        let s = col(db_kind("set", "set('a','b','c')", None));
        assert_eq!(
            native(MyValue::Bytes(vec![0b101]), &s, Via::Binlog).unwrap().as_str(),
            Some("a,c")
        );
        assert_eq!(
            native(MyValue::Bytes(b"a,c".to_vec()), &s, Via::Query).unwrap().as_str(),
            Some("a,c")
        );
    }

    #[test]
    fn decimals_stay_exact_and_keep_their_scale() {
        let d = col(DbKind::Decimal);
        let v =
            native(MyValue::Bytes(b"-1234567890123456.7890".to_vec()), &d, Via::Binlog).unwrap();
        assert_eq!(v.to_string(), "-1234567890123456.7890");
        assert_eq!(
            coerce(v, ColumnType::Decimal, "c").unwrap().to_string(),
            "-1234567890123456.7890"
        );
    }

    #[test]
    fn text_is_utf8_or_latin1_by_column_charset() {
        let latin = col(db_kind("varchar", "varchar(10)", Some("latin1")));
        assert_eq!(
            native(MyValue::Bytes(vec![0xe9]), &latin, Via::Binlog).unwrap().as_str(),
            Some("é")
        );
        let utf8 = col(db_kind("varchar", "varchar(10)", Some("utf8mb4")));
        assert_eq!(
            native(MyValue::Bytes("𝄞".as_bytes().to_vec()), &utf8, Via::Binlog).unwrap().as_str(),
            Some("𝄞")
        );
        assert!(native(MyValue::Bytes(vec![0xff]), &utf8, Via::Binlog).is_err());
    }

    #[test]
    fn json_printed_by_mysql_is_compacted_like_binlog_json() {
        let j = col(DbKind::Json);
        let v = native(MyValue::Bytes(br#"{"a": [1, 2]}"#.to_vec()), &j, Via::Query).unwrap();
        assert_eq!(v.as_str(), Some(r#"{"a":[1,2]}"#));
    }

    #[test]
    fn coercion_to_declared_types_refuses_what_does_not_fit() {
        assert!(matches!(coerce(Value::UInt(5), ColumnType::Int, "c"), Ok(Value::Int(5))));
        assert!(matches!(
            coerce(Value::UInt(u64::MAX), ColumnType::Int, "c"),
            Ok(Value::UInt(u64::MAX))
        ));
        assert!(coerce(Value::Int(-1), ColumnType::UInt, "c").is_err());
        assert!(coerce(Value::Str("abc".into()), ColumnType::Int, "c").is_err());
        assert!(matches!(coerce(Value::Int(1), ColumnType::Bool, "c"), Ok(Value::Bool(true))));
        assert!(matches!(
            coerce(Value::Date(1), ColumnType::TimestampMillis, "c"),
            Ok(Value::Timestamp(86_400_000_000))
        ));
    }

    #[test]
    fn settings_and_grants_name_what_is_wrong() {
        let err = check_settings("1", "STATEMENT", "FULL").unwrap_err().to_string();
        assert!(err.contains("`binlog_format`"), "{err}");
        let err = check_settings("0", "ROW", "FULL").unwrap_err().to_string();
        assert!(err.contains("`log_bin`"), "{err}");
        let err = check_settings("1", "ROW", "MINIMAL").unwrap_err().to_string();
        assert!(err.contains("`binlog_row_image`"), "{err}");
        assert!(check_settings("ON", "row", "full").is_ok());
        let err = check_grants(&["SELECT".into()]).unwrap_err().to_string();
        assert!(err.contains("`REPLICATION SLAVE`"), "{err}");
        let err = check_grants(&["REPLICATION SLAVE".into()]).unwrap_err().to_string();
        assert!(err.contains("`REPLICATION CLIENT`"), "{err}");
        assert!(check_grants(&["REPLICATION SLAVE".into(), "BINLOG MONITOR".into()]).is_ok());
    }
}
