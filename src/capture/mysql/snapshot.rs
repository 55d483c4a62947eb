//! The consistent snapshot (`source.snapshot = "consistent"`): every included
//! table read in one consistent view, in primary-key chunks, as op `r` changes at
//! the binlog position of that view. [`begin`] also opens the first view of the
//! incremental snapshot (see [`super::incremental`]).
//!
//! The view is an InnoDB consistent-snapshot transaction (no table locks on
//! MariaDB, which reports the binlog position of the view in
//! `binlog_snapshot_file` / `binlog_snapshot_position`; MySQL holds a global read
//! lock only for the instant it takes to open the view and read the position).
//! Chunks are keyset-paginated (`WHERE key > last ORDER BY key LIMIT n`), so each
//! chunk is an index range scan and a resumed snapshot starts at the next chunk.
//! Tables without a primary key are read by offset and restart from their first
//! row when resumed. The view's GTID position is recorded with its file/offset
//! (see [`super`]), and each table logs rows read against the server's estimate
//! every few seconds. Connection loss is transient (the source resumes from the
//! last chunk sent); a missing table is definite.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Params, Row, Value as MyValue};

use super::binlog;
use super::schema::{self, driver_error, DbTable, ServerInfo, Via};
use super::{send, Capture, MysqlCheckpoint, RowChange, SnapshotProgress, BATCH_ROWS};
use crate::bus;
use crate::capture::CaptureError;
use crate::event::{Batch, Event, Op, Position, Snapshot};

const CTX: &str = "snapshot";

/// The binlog position of the consistent view: file, offset and, when the server
/// has GTIDs, the same position as a GTID set.
pub(crate) struct ViewPosition {
    pub file: String,
    pub pos: u64,
    pub gtid: Option<String>,
}

/// Opens the consistent view and returns the binlog position it corresponds to.
pub(crate) async fn begin(
    conn: &mut Conn,
    server: &ServerInfo,
) -> Result<ViewPosition, CaptureError> {
    let mariadb = server.mariadb;
    let q = |e| driver_error(CTX, e);
    // TIMESTAMP columns are then read as UTC, as the binlog holds them.
    conn.query_drop("SET SESSION time_zone = '+00:00'").await.map_err(q)?;
    conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ").await.map_err(q)?;
    if mariadb {
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT").await.map_err(q)?;
        let rows: Vec<(String, String)> =
            conn.query("SHOW STATUS LIKE 'binlog_snapshot_%'").await.map_err(q)?;
        let get = |name: &str| {
            rows.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
        };
        let file = get("binlog_snapshot_file").filter(|f| !f.is_empty());
        let pos = get("binlog_snapshot_position").and_then(|p| p.parse().ok());
        let (Some(file), Some(pos)) = (file, pos) else {
            return Err(CaptureError::Definite {
                message: "the server reports no binlog snapshot position".into(),
                hint: Some("is the binlog on (`log_bin`)?".into()),
            });
        };
        // The GTID position is derived from the view's file and offset by the
        // server itself, so the two name the same point by construction.
        let gtid = binlog::mariadb_gtid_pos(conn, &file, pos).await?;
        return Ok(ViewPosition { file, pos, gtid });
    }
    // MySQL has no snapshot status: hold a global read lock while the view opens.
    conn.query_drop("FLUSH TABLES WITH READ LOCK").await.map_err(q)?;
    let opened = async {
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT").await?;
        let status: Option<Row> = match conn.query_first("SHOW BINARY LOG STATUS").await {
            Ok(r) => r,
            // Before 8.2 the statement has its old name.
            Err(_) => conn.query_first("SHOW MASTER STATUS").await?,
        };
        Ok::<_, mysql_async::Error>(status)
    }
    .await;
    let unlocked = conn.query_drop("UNLOCK TABLES").await;
    let mut status = opened.map_err(q)?.ok_or_else(|| CaptureError::Definite {
        message: "the server reports no binlog position".into(),
        hint: Some("is the binlog on (`log_bin`)?".into()),
    })?;
    unlocked.map_err(q)?;
    let file: Option<String> = status.take_opt(0).and_then(Result::ok);
    let pos: Option<u64> = status.take_opt(1).and_then(Result::ok);
    // `Executed_Gtid_Set` (column 4) was read under the global read lock with the
    // file and offset, so it names the same point (MySQL 8, from its manual).
    let gtid: Option<String> = if server.gtid {
        status.take_opt(4).and_then(Result::ok).filter(|g: &String| !g.trim().is_empty())
    } else {
        None
    };
    match (file, pos) {
        (Some(file), Some(pos)) => Ok(ViewPosition { file, pos, gtid }),
        _ => Err(CaptureError::Definite {
            message: "the server reports no binlog position".into(),
            hint: None,
        }),
    }
}

pub(crate) fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// The chunk query of `table`: keyset-paginated with a primary key (one row more
/// than a chunk, to know whether another chunk follows), by offset without one.
pub(crate) fn chunk_sql(db: &str, table: &DbTable, after: bool, offset: u64) -> String {
    let cols: Vec<String> = table.columns.iter().map(|c| quote(&c.name)).collect();
    let mut sql = format!("SELECT {} FROM {}.{}", cols.join(", "), quote(db), quote(&table.name));
    if table.key.is_empty() {
        sql.push_str(&format!(" LIMIT {} OFFSET {offset}", BATCH_ROWS + 1));
        return sql;
    }
    let keys: Vec<&str> = table.key.iter().map(|&i| table.columns[i].name.as_str()).collect();
    if after {
        // (k1 > ?) OR (k1 = ? AND k2 > ?) OR ...: a row-value comparison that every
        // server turns into a range scan.
        let mut ors = Vec::with_capacity(keys.len());
        for j in 0..keys.len() {
            let mut ands: Vec<String> =
                keys[..j].iter().map(|k| format!("{} = ?", quote(k))).collect();
            ands.push(format!("{} > ?", quote(keys[j])));
            ors.push(format!("({})", ands.join(" AND ")));
        }
        sql.push_str(&format!(" WHERE {}", ors.join(" OR ")));
    }
    let order: Vec<String> = keys.iter().map(|k| quote(k)).collect();
    sql.push_str(&format!(" ORDER BY {} LIMIT {}", order.join(", "), BATCH_ROWS + 1));
    sql
}

/// The parameters of [`chunk_sql`]'s keyset condition.
pub(crate) fn chunk_params(after: &[MyValue]) -> Vec<MyValue> {
    let mut params = Vec::new();
    for j in 0..after.len() {
        params.extend(after[..=j].iter().cloned());
    }
    params
}

/// A key value for the checkpoint (JSON, so the checkpoint stays readable).
pub(crate) fn key_to_json(v: &MyValue) -> serde_json::Value {
    use serde_json::{json, Value as J};
    match v {
        MyValue::NULL => J::Null,
        MyValue::Int(i) => json!(i),
        MyValue::UInt(u) => json!(u),
        MyValue::Float(f) => json!(f),
        MyValue::Double(d) => json!(d),
        MyValue::Bytes(b) => match std::str::from_utf8(b) {
            Ok(s) => J::String(s.to_owned()),
            Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) }),
        },
        MyValue::Date(y, m, d, h, mi, s, us) => {
            J::String(format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}"))
        }
        MyValue::Time(neg, days, h, m, s, us) => {
            let hours = u64::from(*days) * 24 + u64::from(*h);
            let sign = if *neg { "-" } else { "" };
            J::String(format!("{sign}{hours:02}:{m:02}:{s:02}.{us:06}"))
        }
    }
}

/// The inverse of [`key_to_json`], as a statement parameter.
pub(crate) fn key_from_json(j: &serde_json::Value) -> Option<MyValue> {
    use serde_json::Value as J;
    Some(match j {
        J::Null => MyValue::NULL,
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                MyValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                MyValue::UInt(u)
            } else {
                MyValue::Double(n.as_f64()?)
            }
        }
        J::String(s) => MyValue::Bytes(s.as_bytes().to_vec()),
        J::Object(o) => MyValue::Bytes(
            base64::engine::general_purpose::STANDARD.decode(o.get("base64")?.as_str()?).ok()?,
        ),
        J::Bool(_) | J::Array(_) => return None,
    })
}

/// How often a long table snapshot logs its progress.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The server's estimate of a table's row count (InnoDB samples it), for progress
/// logs only: an exact `COUNT(*)` would read the table twice.
pub(crate) async fn estimated_rows(conn: &mut Conn, db: &str, table: &str) -> Option<u64> {
    let sql = "SELECT TABLE_ROWS FROM information_schema.TABLES \
               WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?";
    conn.exec_first::<Option<u64>, _, _>(sql, (db, table)).await.ok().flatten().flatten()
}

/// Whether `table` has no rows in the view.
pub(crate) async fn is_empty(conn: &mut Conn, db: &str, table: &str) -> Result<bool, CaptureError> {
    let sql = format!("SELECT 1 FROM {}.{} LIMIT 1", quote(db), quote(table));
    let row: Option<Row> = conn.query_first(sql).await.map_err(|e| driver_error(CTX, e))?;
    Ok(row.is_none())
}

/// Reads the included tables from where `checkpoint` left off (or all of them)
/// and sends them chunk by chunk. Returns `Ok(true)` once the snapshot is complete
/// (`checkpoint` then holds the binlog position to stream from), `Ok(false)` on
/// shutdown.
///
/// # Errors
/// Transient on connection loss, definite on refusals.
pub(crate) async fn run(
    cap: &mut Capture,
    mut conn: Conn,
    checkpoint: &mut Option<MysqlCheckpoint>,
    out: &bus::Sender,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<bool, CaptureError> {
    let view = begin(&mut conn, &cap.server).await?;
    // A resumed snapshot streams from the first view's position (see the module
    // doc of `mysql`); a new one from this view's.
    let (file, pos, gtid, progress) = match checkpoint.as_ref() {
        Some(cp) => (cp.file.clone(), cp.pos, cp.gtid.clone(), cp.snapshot.clone()),
        None => (view.file, view.pos, view.gtid, None),
    };
    let file: Arc<str> = Arc::from(file.as_str());
    let snapshot_ts = super::now_ms();
    let tables = cap.tables.clone();
    let start = match &progress {
        Some(p) => tables.iter().position(|(_, t)| *t == p.table).ok_or_else(|| {
            CaptureError::Definite {
                message: format!(
                    "the checkpoint's snapshot table `{}` is no longer included",
                    p.table
                ),
                hint: Some("start with a new store to take a new snapshot".into()),
            }
        })?,
        None => 0,
    };
    tracing::info!(tables = tables.len() - start, file = %file, pos, gtid = gtid.as_deref().unwrap_or(""), "mysql snapshot started");

    for (t, (_, name)) in tables.iter().enumerate().skip(start) {
        let Some(mapping) = cap.mappings.get(name).cloned() else {
            return Err(CaptureError::Definite {
                message: format!("table `{name}` has no schema"),
                hint: None,
            });
        };
        let keyed = !mapping.db.key.is_empty();
        let mut after: Option<Vec<MyValue>> = match (&progress, t == start, keyed) {
            (Some(SnapshotProgress { after: Some(keys), .. }), true, true) => {
                let parsed: Option<Vec<MyValue>> = keys.iter().map(key_from_json).collect();
                Some(parsed.ok_or_else(|| CaptureError::Definite {
                    message: format!("the checkpoint's snapshot key of `{name}` is unreadable"),
                    hint: Some("start with a new store to take a new snapshot".into()),
                })?)
            }
            _ => None,
        };
        let mut offset = 0u64;
        // Progress for the log: rows read by this run of the table's snapshot.
        let estimate = estimated_rows(&mut conn, &cap.db, name).await;
        let mut done = 0u64;
        let table_started = Instant::now();
        let mut logged = Instant::now();
        tracing::info!(table = %name, rows_estimate = estimate.unwrap_or(0), resumed = after.is_some(), "mysql snapshot of table started");
        loop {
            let sql = chunk_sql(&cap.db, &mapping.db, after.is_some(), offset);
            let params = after.as_deref().map_or_else(Vec::new, chunk_params);
            let params = if params.is_empty() { Params::Empty } else { Params::Positional(params) };
            let mut rows: Vec<Row> =
                conn.exec(sql, params).await.map_err(|e| driver_error(CTX, e))?;
            let more = rows.len() > BATCH_ROWS;
            rows.truncate(BATCH_ROWS);
            offset += rows.len() as u64;
            done += rows.len() as u64;
            if logged.elapsed() >= PROGRESS_EVERY {
                logged = Instant::now();
                let total = estimate.unwrap_or(0).max(done);
                let percent = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
                tracing::info!(table = %name, rows = done, rows_estimate = total, percent = format!("{percent:.0}"), "mysql snapshot progress");
            }

            let mut events = Vec::with_capacity(rows.len());
            let mut last_key: Option<Vec<MyValue>> = None;
            let n = rows.len();
            for (i, row) in rows.into_iter().enumerate() {
                let values = row.unwrap_raw();
                if keyed && i + 1 == n {
                    let key = mapping
                        .db
                        .key
                        .iter()
                        .map(|&k| values.get(k).cloned().flatten().unwrap_or(MyValue::NULL))
                        .collect();
                    last_key = Some(key);
                }
                let natives = values
                    .into_iter()
                    .zip(&mapping.db.columns)
                    .map(|(v, col)| schema::native(v.unwrap_or(MyValue::NULL), col, Via::Query))
                    .collect();
                events.push(cap.event(RowChange {
                    table: name.clone(),
                    op: Op::Read,
                    before: None,
                    after: Some(natives),
                    position: Position::Binlog { file: file.clone(), pos, row: 0 },
                    snapshot: Snapshot::True,
                    gtid: None,
                    ts_ms: snapshot_ts,
                    server_id: 0,
                }));
            }

            let next = if more {
                let after_json = last_key.as_ref().map(|k| k.iter().map(key_to_json).collect());
                Some(SnapshotProgress::consistent(name.clone(), after_json))
            } else {
                tables.get(t + 1).map(|(_, n)| SnapshotProgress::consistent(n.clone(), None))
            };
            if !more {
                let mut rest_empty = true;
                for (_, later) in &tables[t + 1..] {
                    if !is_empty(&mut conn, &cap.db, later).await? {
                        rest_empty = false;
                        break;
                    }
                }
                if rest_empty {
                    mark_last(&mut events);
                }
            }
            let cp = MysqlCheckpoint {
                file: file.to_string(),
                pos,
                gtid: gtid.clone(),
                skip: None,
                snapshot: next,
                origin: cap.origin,
                schemas: Some(cap.schemas.clone()),
            };
            let batch = Batch { events, checkpoint: cp.token(), bytes: None, caught_up_ms: None };
            if !send(out, shutdown, batch).await? {
                return Ok(false);
            }
            *checkpoint = Some(cp);
            if !more {
                break;
            }
            if keyed {
                after = last_key;
            }
        }
        let secs = table_started.elapsed().as_secs_f64();
        tracing::info!(table = %name, rows = done, seconds = format!("{secs:.1}"), "mysql snapshot of table finished");
    }
    // The view only read; ending it releases its undo history.
    conn.query_drop("COMMIT").await.map_err(|e| driver_error(CTX, e))?;
    let _ = conn.disconnect().await;
    if checkpoint.is_none() {
        // No included table: stream from the view's position.
        let cp = MysqlCheckpoint {
            file: file.to_string(),
            pos,
            gtid: gtid.clone(),
            skip: None,
            snapshot: None,
            origin: cap.origin,
            schemas: Some(cap.schemas.clone()),
        };
        if !send(
            out,
            shutdown,
            Batch { events: Vec::new(), checkpoint: cp.token(), bytes: None, caught_up_ms: None },
        )
        .await?
        {
            return Ok(false);
        }
        *checkpoint = Some(cp);
    }
    tracing::info!(file = %file, pos, "mysql snapshot finished");
    Ok(true)
}

pub(crate) fn mark_last(events: &mut [Event]) {
    if let Some(Event::Change(c)) = events.iter_mut().rev().find(|e| matches!(e, Event::Change(_)))
    {
        c.source.snapshot = Snapshot::Last;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::mysql::schema::{DbColumn, DbKind};

    fn table(key: Vec<usize>) -> DbTable {
        let int = DbKind::Integer { bits: 32, unsigned: false };
        DbTable {
            default_latin1: false,
            name: "or`ders".into(),
            columns: vec![
                DbColumn { name: "a".into(), kind: int.clone() },
                DbColumn { name: "b".into(), kind: int.clone() },
                DbColumn { name: "c".into(), kind: int },
            ],
            key,
        }
    }

    #[test]
    fn chunks_follow_the_primary_key_from_the_last_row() {
        let first = chunk_sql("erp", &table(vec![0, 1]), false, 0);
        assert_eq!(first, "SELECT `a`, `b`, `c` FROM `erp`.`or``ders` ORDER BY `a`, `b` LIMIT 501");
        let next = chunk_sql("erp", &table(vec![0, 1]), true, 0);
        assert!(
            next.contains("WHERE (`a` > ?) OR (`a` = ? AND `b` > ?) ORDER BY `a`, `b`"),
            "{next}"
        );
        let params = chunk_params(&[MyValue::Int(1), MyValue::Int(2)]);
        assert_eq!(params, vec![MyValue::Int(1), MyValue::Int(1), MyValue::Int(2)]);
        let keyless = chunk_sql("erp", &table(vec![]), false, 1000);
        assert!(keyless.ends_with("LIMIT 501 OFFSET 1000"), "{keyless}");
    }

    #[test]
    fn checkpoint_keys_round_trip() {
        let keys = [
            MyValue::Int(-5),
            MyValue::UInt(u64::MAX),
            MyValue::Bytes(b"abc".to_vec()),
            MyValue::Bytes(vec![0xff, 0]),
            MyValue::Date(2026, 1, 5, 8, 10, 0, 5),
        ];
        for k in keys {
            let back = key_from_json(&key_to_json(&k)).unwrap();
            match (&k, &back) {
                (MyValue::Date(..), MyValue::Bytes(b)) => {
                    assert_eq!(b, b"2026-01-05 08:10:00.000005")
                }
                _ => assert_eq!(k, back),
            }
        }
    }
}
