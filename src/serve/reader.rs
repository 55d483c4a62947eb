//! Reads what the dashboard and the alerts need from the store the pipeline writes,
//! read-only: SQLite through a read-only connection (WAL lets it read while the
//! pipeline commits, without blocking it), PostgreSQL through its own connection.
//!
//! Every query returns rows of text (PostgreSQL's simple-query protocol does; SQLite
//! values are rendered the same way), so one set of statements and one parser serve
//! both stores: decimals stay exact text until `rust_decimal` parses them.

use std::path::PathBuf;
use std::str::FromStr;

use rust_decimal::Decimal;
use tokio::sync::Mutex;

use crate::config::spec::{Agg, GoldSpec, PipelineSpec, StoreSpec};
use crate::event::time;
use crate::store::{ident, postgres, sqlite, StoreError};

/// Gold windows the dashboard charts (6 hours of 10-minute windows).
pub const RECENT_WINDOWS: usize = 36;
/// Latest quarantine rows listed on the dashboard.
pub const LATEST_QUARANTINE: usize = 8;

type TextRow = Vec<Option<String>>;

/// A read-only view of one store.
pub struct StoreReader {
    target: Target,
}

enum Target {
    Sqlite(PathBuf),
    Postgres(Box<PgTarget>),
    /// A MySQL store: the dashboard's queries are written for SQLite and
    /// PostgreSQL, so every read reports that it cannot read this store.
    Mysql,
}

struct PgTarget {
    url: String,
    stream: String,
    /// Kept between reads and replaced after an error.
    client: Mutex<Option<tokio_postgres::Client>>,
}

/// One gold table's recent rows: window start (epoch ms), group values, measures as
/// exact decimals (`None` for measures that are not count or sum).
#[derive(Debug, Clone, Default)]
pub struct GoldView {
    pub rows: Vec<(i64, Vec<String>, Vec<Option<Decimal>>)>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct QuarantineItem {
    pub id: i64,
    pub table: Option<String>,
    pub key: Option<String>,
    pub stage: String,
    pub reason: String,
    pub detail: Option<String>,
    pub quarantined_at: Option<String>,
    pub payload: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckpointView {
    pub name: String,
    pub event_count: i64,
    pub updated_at: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TopItem {
    pub name: String,
    pub units: i64,
    pub lines: i64,
}

/// What one refresh read.
#[derive(Debug, Clone, Default)]
pub struct StoreView {
    pub gold: Vec<GoldView>,
    /// Open quarantine by reason; `None` when not asked for in this read.
    pub quarantine_by_reason: Option<Vec<(String, u64)>>,
    pub latest_quarantine: Vec<QuarantineItem>,
    /// The highest quarantine id: records ever opened, cheaply (the primary key).
    pub quarantine_max_id: i64,
    pub checkpoint: Option<CheckpointView>,
}

/// Top lists over the current silver state of the ERP pipeline's tables.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TopLists {
    pub products: Vec<TopItem>,
    pub cities: Vec<TopItem>,
}

impl StoreReader {
    pub fn new(store: &StoreSpec) -> Self {
        let target = match store {
            StoreSpec::Sqlite { path } => Target::Sqlite(path.clone()),
            StoreSpec::Postgres { url, stream } => Target::Postgres(Box::new(PgTarget {
                url: url.clone(),
                stream: stream.clone(),
                client: Mutex::new(None),
            })),
            StoreSpec::Mysql { .. } => Target::Mysql,
        };
        Self { target }
    }

    /// Where this reads, for display (no credentials).
    pub fn describe(&self) -> String {
        match &self.target {
            Target::Sqlite(p) => format!("sqlite {}", p.display()),
            Target::Postgres(pg) => {
                let url = &pg.url;
                let host = url.rsplit('@').next().unwrap_or(url);
                format!("postgres {}", host.trim_start_matches("postgres://"))
            }
            Target::Mysql => "mysql (not readable by the dashboard)".to_owned(),
        }
    }

    /// Runs `queries` in order and returns their rows.
    async fn query(&self, queries: Vec<String>) -> Result<Vec<Vec<TextRow>>, StoreError> {
        match &self.target {
            Target::Sqlite(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || sqlite_queries(&path, &queries))
                    .await
                    .map_err(|e| StoreError::Unavailable { message: e.to_string(), source: None })?
            }
            Target::Postgres(pg) => {
                let mut guard = pg.client.lock().await;
                if guard.as_ref().is_none_or(|c| c.is_closed()) {
                    *guard = Some(postgres::connect(&pg.url).await?);
                }
                let result = match guard.as_ref() {
                    Some(c) => pg_queries(c, &queries).await,
                    None => Err(StoreError::Unavailable {
                        message: "not connected".into(),
                        source: None,
                    }),
                };
                if result.is_err() {
                    // Reconnect next time: the connection may be what failed.
                    *guard = None;
                }
                result
            }
            Target::Mysql => Err(StoreError::Definite {
                message: "the dashboard reads SQLite and PostgreSQL stores, not MySQL".to_owned(),
                source: None,
            }),
        }
    }

    /// Whether the store answers (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.query(vec!["SELECT 1".to_owned()]).await.map(|_| ())
    }

    /// The dashboard's and the alerts' view, in one round of queries; with
    /// `summary`, also the open quarantine by reason (a scan of the open records).
    pub async fn read(&self, spec: &PipelineSpec, summary: bool) -> Result<StoreView, StoreError> {
        let mut queries: Vec<String> = spec.gold.iter().map(recent_gold_sql).collect();
        if summary {
            queries.push(
                r#"SELECT "reason", "rows" FROM "quarantine_summary" ORDER BY "rows" DESC, "reason""#
                    .to_owned(),
            );
        }
        queries.push(latest_quarantine_sql(None, LATEST_QUARANTINE));
        queries.push(r#"SELECT MAX("id") FROM "quarantine""#.to_owned());
        queries.push(match &self.target {
            Target::Sqlite(_) => r#"SELECT "pipeline", "event_count", CAST("updated_at" AS TEXT)
                FROM "caudal_checkpoint" ORDER BY "updated_at" DESC LIMIT 1"#
                .to_owned(),
            Target::Mysql => String::new(),
            Target::Postgres(pg) => format!(
                r#"SELECT "stream", "event_count", CAST("updated_at" AS TEXT)
                FROM "caudal_checkpoint" WHERE "stream" = '{}'"#,
                pg.stream.replace('\'', "''")
            ),
        });
        let mut results = self.query(queries).await?.into_iter();
        let mut view = StoreView::default();
        for g in &spec.gold {
            let rows = results.next().unwrap_or_default();
            view.gold.push(parse_gold(g, rows));
        }
        if summary {
            let rows = results.next().unwrap_or_default();
            view.quarantine_by_reason = Some(
                rows.iter()
                    .filter_map(|r| Some((cell(r, 0)?, u64::try_from(int(r, 1)?).unwrap_or(0))))
                    .collect(),
            );
        }
        view.latest_quarantine =
            results.next().unwrap_or_default().iter().filter_map(quarantine_item).collect();
        view.quarantine_max_id =
            results.next().unwrap_or_default().first().and_then(|r| int(r, 0)).unwrap_or(0);
        view.checkpoint = results.next().unwrap_or_default().first().and_then(|r| {
            Some(CheckpointView {
                name: cell(r, 0)?,
                event_count: int(r, 1)?,
                updated_at: cell(r, 2)?,
            })
        });
        Ok(view)
    }

    /// The latest open quarantine records, newest first, optionally of one reason.
    pub async fn quarantine(
        &self,
        reason: Option<&str>,
        limit: usize,
    ) -> Result<Vec<QuarantineItem>, StoreError> {
        let rows = self.query(vec![latest_quarantine_sql(reason, limit)]).await?;
        Ok(rows.into_iter().next().unwrap_or_default().iter().filter_map(quarantine_item).collect())
    }

    /// Top products (units sold) and cities (orders) over the current silver rows,
    /// when the pipeline has the ERP's tables; empty lists otherwise. Units and
    /// order counts are integers: exact without summing money in SQL (SQLite has no
    /// decimal type).
    ///
    /// With `newest`, also the newest source timestamp of any silver row (epoch ms),
    /// for the lag when the pipeline runs elsewhere (`_source_ts_ms` has no index:
    /// this scans, hence the slow path).
    pub async fn top(
        &self,
        spec: &PipelineSpec,
        newest: bool,
    ) -> Result<(TopLists, Option<i64>), StoreError> {
        let has = |table: &str, cols: &[&str]| {
            spec.catalog.tables().iter().any(|t| {
                &*t.name == table && cols.iter().all(|c| t.columns.iter().any(|x| &*x.name == *c))
            })
        };
        let mut queries = Vec::new();
        let products = has("order_items", &["product_id", "quantity", "order_id"])
            && has("products", &["id", "name"])
            && has("orders", &["id", "status"]);
        if products {
            queries.push(
                r#"SELECT p."name", SUM(i."quantity"), COUNT(*) FROM "silver_order_items" i
                JOIN "silver_products" p ON p."id" = i."product_id"
                JOIN "silver_orders" o ON o."id" = i."order_id"
                WHERE o."status" IS NULL OR o."status" <> 'cancelled'
                GROUP BY p."name" ORDER BY 2 DESC, 1 LIMIT 5"#
                    .to_owned(),
            );
        }
        let cities = has("orders", &["city", "status"]) && has("order_items", &["order_id"]);
        if cities {
            queries.push(
                r#"SELECT o."city", COUNT(DISTINCT o."id"), COUNT(*) FROM "silver_orders" o
                JOIN "silver_order_items" i ON i."order_id" = o."id"
                WHERE o."city" IS NOT NULL AND (o."status" IS NULL OR o."status" <> 'cancelled')
                GROUP BY o."city" ORDER BY 2 DESC, 1 LIMIT 5"#
                    .to_owned(),
            );
        }
        let silver: Vec<String> = spec
            .catalog
            .tables()
            .iter()
            .zip(&spec.tables)
            .filter(|(_, t)| t.silver)
            .map(|(s, _)| {
                format!(
                    r#"SELECT MAX("_source_ts_ms") AS "m" FROM {}"#,
                    ident(&format!("silver_{}", s.name))
                )
            })
            .collect();
        let newest = newest && !silver.is_empty();
        if newest {
            queries.push(format!(
                r#"SELECT MAX("m") FROM ({}) AS "newest""#,
                silver.join(" UNION ALL ")
            ));
        }
        if queries.is_empty() {
            return Ok((TopLists::default(), None));
        }
        let mut results = self.query(queries).await?.into_iter();
        let item = |r: &TextRow| {
            Some(TopItem { name: cell(r, 0)?, units: int(r, 1)?, lines: int(r, 2).unwrap_or(0) })
        };
        let mut top = TopLists::default();
        if products {
            top.products = results.next().unwrap_or_default().iter().filter_map(item).collect();
        }
        if cities {
            top.cities = results.next().unwrap_or_default().iter().filter_map(item).collect();
        }
        let newest_ms = if newest {
            results.next().unwrap_or_default().first().and_then(|r| int(r, 0))
        } else {
            None
        };
        Ok((top, newest_ms))
    }
}

/// The rows of the newest [`RECENT_WINDOWS`] windows. The subquery is valid in both
/// SQLite and PostgreSQL and uses the primary key's leading column.
fn recent_gold_sql(g: &GoldSpec) -> String {
    let table = ident(&format!("gold_{}", g.name));
    let mut cols = vec![r#"CAST("window_start" AS TEXT)"#.to_owned()];
    cols.extend(g.group_by.iter().map(|(n, _)| ident(n)));
    cols.extend(g.measures.iter().map(|m| ident(&m.name)));
    format!(
        r#"SELECT {} FROM {table} WHERE "window_start" >= (SELECT MIN("w") FROM
        (SELECT DISTINCT "window_start" AS "w" FROM {table} ORDER BY 1 DESC LIMIT {RECENT_WINDOWS}) AS "recent")
        ORDER BY "window_start""#,
        cols.join(", ")
    )
}

fn latest_quarantine_sql(reason: Option<&str>, limit: usize) -> String {
    let filter = match reason {
        Some(r) => format!(r#" AND "reason" = '{}'"#, r.replace('\'', "''")),
        None => String::new(),
    };
    format!(
        r#"SELECT "id", "table_name", "row_key", "stage", "reason", "detail",
        CAST("quarantined_at" AS TEXT), "payload" FROM "quarantine"
        WHERE "resolved_at" IS NULL{filter} ORDER BY "id" DESC LIMIT {limit}"#
    )
}

fn parse_gold(g: &GoldSpec, rows: Vec<TextRow>) -> GoldView {
    let groups = g.group_by.len();
    let mut view = GoldView::default();
    for row in rows {
        let Some(start) = cell(&row, 0).and_then(|s| time::parse_timestamp(&s)) else {
            continue;
        };
        let group: Vec<String> =
            (0..groups).map(|i| cell(&row, 1 + i).unwrap_or_default()).collect();
        let measures = g
            .measures
            .iter()
            .enumerate()
            .map(|(i, m)| {
                matches!(m.agg, Agg::Count | Agg::Sum)
                    .then(|| cell(&row, 1 + groups + i))
                    .flatten()
                    .and_then(|s| {
                        Decimal::from_str(&s).or_else(|_| Decimal::from_scientific(&s)).ok()
                    })
            })
            .collect();
        view.rows.push((start / 1000, group, measures));
    }
    view
}

fn quarantine_item(r: &TextRow) -> Option<QuarantineItem> {
    Some(QuarantineItem {
        id: int(r, 0)?,
        table: cell(r, 1),
        key: cell(r, 2),
        stage: cell(r, 3)?,
        reason: cell(r, 4)?,
        detail: cell(r, 5),
        quarantined_at: cell(r, 6),
        payload: cell(r, 7),
    })
}

fn cell(row: &TextRow, i: usize) -> Option<String> {
    row.get(i).cloned().flatten()
}

fn int(row: &TextRow, i: usize) -> Option<i64> {
    row.get(i)?.as_deref()?.parse().ok()
}

fn sqlite_queries(
    path: &std::path::Path,
    queries: &[String],
) -> Result<Vec<Vec<TextRow>>, StoreError> {
    use rusqlite::types::ValueRef;
    let conn = sqlite::open_read_only(path)?;
    let mut out = Vec::with_capacity(queries.len());
    for q in queries {
        let context = || "dashboard query".to_owned();
        let mut stmt = conn.prepare(q).map_err(|e| sqlite::sql_error(e, context()))?;
        let n = stmt.column_count();
        let mut rows = stmt.query([]).map_err(|e| sqlite::sql_error(e, context()))?;
        let mut result = Vec::new();
        while let Some(row) = rows.next().map_err(|e| sqlite::sql_error(e, context()))? {
            let mut cells = Vec::with_capacity(n);
            for i in 0..n {
                let v = row.get_ref(i).map_err(|e| sqlite::sql_error(e, context()))?;
                cells.push(match v {
                    ValueRef::Null => None,
                    ValueRef::Integer(i) => Some(i.to_string()),
                    ValueRef::Real(f) => Some(f.to_string()),
                    ValueRef::Text(t) | ValueRef::Blob(t) => {
                        Some(String::from_utf8_lossy(t).into_owned())
                    }
                });
            }
            result.push(cells);
        }
        out.push(result);
    }
    Ok(out)
}

async fn pg_queries(
    client: &tokio_postgres::Client,
    queries: &[String],
) -> Result<Vec<Vec<TextRow>>, StoreError> {
    let mut out = Vec::with_capacity(queries.len());
    for q in queries {
        let messages = client
            .simple_query(q)
            .await
            .map_err(|e| postgres::pg_error(e, "dashboard query".to_owned()))?;
        let rows = messages
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                }
                _ => None,
            })
            .collect();
        out.push(rows);
    }
    Ok(out)
}
