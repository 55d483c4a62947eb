//! The dashboard's data: one snapshot per refresh, built from the store (business
//! panels, quarantine, checkpoint) and, when the pipeline runs in this process, its
//! progress (events/s per table, lag, latency). Built and serialized once, shared
//! by every client: a second browser tab costs nothing more.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde::Serialize;

use super::alerts::{window_totals, AlertEvent, RuleStatus};
use super::reader::{CheckpointView, QuarantineItem, StoreView, TopLists};
use crate::config::spec::{Agg, PipelineSpec};
use crate::topology::Progress;

/// Rates are averaged over this many refreshes: commits arrive in bursts.
const RATE_SAMPLES: usize = 6;

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub pipeline: String,
    pub store: String,
    /// ISO 4217 code the page formats money measures in.
    pub currency: String,
    pub generated_at_ms: i64,
    /// The last read of the store failed (the panels show the read before).
    pub store_error: Option<String>,
    pub business: Vec<GoldPanel>,
    pub top: Arc<TopLists>,
    pub health: Health,
    pub quarantine: QuarantinePanel,
    pub alerts: AlertsPanel,
}

#[derive(Debug, Serialize)]
pub struct GoldPanel {
    pub name: String,
    pub window_minutes: i64,
    pub group_by: Vec<String>,
    /// Measures that add up over groups (count, sum), in file order.
    pub measures: Vec<String>,
    /// Window starts, epoch ms, oldest first.
    pub windows: Vec<i64>,
    /// measure -> one exact decimal per window.
    pub totals: BTreeMap<String, Vec<String>>,
    /// group column -> group value -> measure -> one decimal per window.
    pub split: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<String>>>>,
    /// The newest window against the one before, per measure.
    pub current: Vec<Compare>,
}

#[derive(Debug, Serialize)]
pub struct Compare {
    pub measure: String,
    pub window_ms: i64,
    pub value: String,
    pub previous: Option<String>,
    /// Rounded to one decimal; `None` when there is no previous window or it is 0.
    pub change_percent: Option<String>,
}

#[derive(Debug, Serialize, Default)]
pub struct Health {
    /// The pipeline runs in this process (its own figures); otherwise the figures
    /// come from the store only.
    pub in_process: bool,
    pub events_total: Option<i64>,
    pub events_per_s: Option<f64>,
    pub tables: Vec<TableRate>,
    pub lag_s: Option<f64>,
    pub latency_ms: Option<Latency>,
    pub last_commit_ms: Option<u64>,
    pub commits: Option<u64>,
    pub checkpoint: Option<CheckpointView>,
}

#[derive(Debug, Serialize)]
pub struct TableRate {
    pub table: String,
    pub events: u64,
    pub per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

#[derive(Debug, Serialize, Default)]
pub struct QuarantinePanel {
    pub open_total: u64,
    pub by_reason: Vec<(String, u64)>,
    pub latest: Vec<QuarantineItem>,
}

#[derive(Debug, Serialize, Default)]
pub struct AlertsPanel {
    pub rules: Vec<RuleStatus>,
    pub history: Vec<AlertEvent>,
}

/// Event counters over the last refreshes, for rates.
#[derive(Default)]
pub struct Rates {
    samples: VecDeque<(Instant, i64, Vec<u64>)>,
}

impl Rates {
    fn push(&mut self, total: i64, tables: Vec<u64>) -> (f64, Vec<f64>) {
        let now = Instant::now();
        // A restart of the counters (a new run) starts the rates over.
        if self.samples.back().is_some_and(|s| s.1 > total) {
            self.samples.clear();
        }
        self.samples.push_back((now, total, tables));
        while self.samples.len() > RATE_SAMPLES {
            self.samples.pop_front();
        }
        let (Some(first), Some(last)) = (self.samples.front(), self.samples.back()) else {
            return (0.0, Vec::new());
        };
        let dt = last.0.duration_since(first.0).as_secs_f64();
        if dt < 0.5 {
            return (0.0, vec![0.0; last.2.len()]);
        }
        let total_rate = (last.1 - first.1) as f64 / dt;
        let per_table = last
            .2
            .iter()
            .enumerate()
            .map(|(i, n)| n.saturating_sub(first.2.get(i).copied().unwrap_or(0)) as f64 / dt)
            .collect();
        (total_rate, per_table)
    }
}

/// Builds the business panels of every gold table.
pub fn business(spec: &PipelineSpec, view: &StoreView) -> Vec<GoldPanel> {
    spec.gold
        .iter()
        .zip(&view.gold)
        .map(|(g, v)| {
            let additive: Vec<usize> = g
                .measures
                .iter()
                .enumerate()
                .filter(|(_, m)| matches!(m.agg, Agg::Count | Agg::Sum))
                .map(|(i, _)| i)
                .collect();
            let mut windows: Vec<i64> = v.rows.iter().map(|r| r.0).collect();
            windows.dedup();
            let slot = |start: i64| windows.binary_search(&start).ok();
            let mut totals = BTreeMap::new();
            let mut current = Vec::new();
            for &m in &additive {
                let name = g.measures[m].name.clone();
                let sums = window_totals(v, m);
                let mut series = vec![Decimal::ZERO; windows.len()];
                for (start, total) in &sums {
                    if let Some(i) = slot(*start) {
                        series[i] = *total;
                    }
                }
                if let Some((window_ms, value)) = sums.last().copied() {
                    let previous = sums.len().checked_sub(2).and_then(|i| sums.get(i)).map(|p| p.1);
                    let change_percent = previous
                        .filter(|p| !p.is_zero())
                        .map(|p| ((value - p) / p * Decimal::ONE_HUNDRED).round_dp(1).to_string());
                    current.push(Compare {
                        measure: name.clone(),
                        window_ms,
                        value: value.to_string(),
                        previous: previous.map(|p| p.to_string()),
                        change_percent,
                    });
                }
                totals.insert(name, series.iter().map(Decimal::to_string).collect());
            }
            let mut split: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<Decimal>>>> =
                BTreeMap::new();
            for (gi, (col, _)) in g.group_by.iter().enumerate() {
                let by_value = split.entry(col.clone()).or_default();
                for (start, group, measures) in &v.rows {
                    let Some(i) = slot(*start) else { continue };
                    let value = group.get(gi).cloned().unwrap_or_default();
                    let per_measure = by_value.entry(value).or_default();
                    for &m in &additive {
                        let series = per_measure
                            .entry(g.measures[m].name.clone())
                            .or_insert_with(|| vec![Decimal::ZERO; windows.len()]);
                        if let (Some(cell), Some(Some(x))) = (series.get_mut(i), measures.get(m)) {
                            *cell += *x;
                        }
                    }
                }
            }
            let split = split
                .into_iter()
                .map(|(col, values)| {
                    let values = values
                        .into_iter()
                        .map(|(val, ms)| {
                            let ms = ms
                                .into_iter()
                                .map(|(m, s)| (m, s.iter().map(Decimal::to_string).collect()))
                                .collect();
                            (val, ms)
                        })
                        .collect();
                    (col, values)
                })
                .collect();
            GoldPanel {
                name: g.name.clone(),
                window_minutes: g.window_micros / 60_000_000,
                group_by: g.group_by.iter().map(|(n, _)| n.clone()).collect(),
                measures: additive.iter().map(|&m| g.measures[m].name.clone()).collect(),
                windows,
                totals,
                split,
                current,
            }
        })
        .collect()
}

/// Pipeline health from the running pipeline's progress, or from the store alone.
pub fn health(
    spec: &PipelineSpec,
    view: &StoreView,
    progress: Option<&Progress>,
    store_lag_ms: Option<i64>,
    rates: &mut Rates,
    now_ms: i64,
) -> Health {
    let checkpoint = view.checkpoint.clone();
    match progress {
        Some(p) => {
            let events = i64::try_from(p.stats.events).unwrap_or(i64::MAX);
            let (per_s, per_table) = rates.push(events, p.stats.table_events.clone());
            let tables = spec
                .catalog
                .tables()
                .iter()
                .enumerate()
                .map(|(i, t)| TableRate {
                    table: t.name.to_string(),
                    events: p.stats.table_events.get(i).copied().unwrap_or(0),
                    per_s: per_table.get(i).copied().unwrap_or(0.0),
                })
                .collect();
            let latency = p.latency.quantiles(&[0.5, 0.9, 0.99, 1.0]).map(|q| Latency {
                p50: q[0],
                p90: q[1],
                p99: q[2],
                max: q[3],
            });
            Health {
                in_process: true,
                events_total: Some(events),
                events_per_s: Some(per_s),
                tables,
                lag_s: p.applied_lag_ms(now_ms).map(|l| l as f64 / 1000.0),
                latency_ms: latency,
                last_commit_ms: Some(p.last_commit_ms),
                commits: Some(p.commits),
                checkpoint,
            }
        }
        None => {
            let total = checkpoint.as_ref().map(|c| c.event_count);
            let per_s = total.map(|t| rates.push(t, Vec::new()).0);
            Health {
                in_process: false,
                events_total: total,
                events_per_s: per_s,
                lag_s: store_lag_ms.map(|l| l as f64 / 1000.0),
                checkpoint,
                ..Health::default()
            }
        }
    }
}

/// Keeps the last successful value across failed reads.
pub fn keep_last<T: Clone>(
    last: &mut Option<T>,
    next: Result<T, String>,
) -> (Option<T>, Option<String>) {
    match next {
        Ok(v) => {
            *last = Some(v.clone());
            (Some(v), None)
        }
        Err(e) => (last.clone(), Some(e)),
    }
}

/// How often the slow queries run: the top lists and the store lag join or scan the
/// silver tables (0.7 s of a core at 1M events on SQLite), and they change slowly.
pub const SLOW_EVERY: Duration = Duration::from_secs(30);
/// How often the quarantine summary is read (a scan of the open records, 40 ms at
/// 1M events), and the slow queries retried while they have no rows yet.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::reader::GoldView;
    use super::*;

    #[test]
    fn business_panels_add_exact_decimals_per_window_and_split() {
        let text = include_str!("../../config/examples/erp.toml");
        let spec = crate::config::parse(Path::new("erp.toml"), text).expect("valid");
        let d = |s: &str| s.parse::<Decimal>().ok();
        let gold = GoldView {
            rows: vec![
                (0, vec!["web".into(), "books".into()], vec![d("1"), d("2"), d("0.10")]),
                (0, vec!["store".into(), "books".into()], vec![d("1"), d("1"), d("0.20")]),
                (600_000, vec!["web".into(), "toys".into()], vec![d("2"), d("5"), d("0.15")]),
            ],
        };
        let view = StoreView { gold: vec![gold], ..StoreView::default() };
        let panels = business(&spec, &view);
        let p = &panels[0];
        assert_eq!(p.windows, vec![0, 600_000]);
        assert_eq!(p.measures, vec!["lines", "units", "revenue"]);
        assert_eq!(p.totals["revenue"], vec!["0.30", "0.15"], "exact, no float drift");
        assert_eq!(p.split["channel"]["web"]["revenue"], vec!["0.10", "0.15"]);
        assert_eq!(p.split["category"]["books"]["units"], vec!["3", "0"]);
        let rev = p.current.iter().find(|c| c.measure == "revenue").expect("revenue");
        assert_eq!(rev.change_percent.as_deref(), Some("-50.0"));
    }
}
