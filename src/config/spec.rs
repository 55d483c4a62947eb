//! The validated pipeline: resolved types that cannot be wrong.
//!
//! [`PipelineSpec::from_raw`] is pure (no network, no files) and collects every
//! problem before it fails, so a user fixes a file in one pass.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;

use super::error::{did_you_mean, Problems};
use super::expr::{self, Ast, BinOp, Lit};
use super::raw::{RawGold, RawKafka, RawPipeline, RawRule, RawSource, RawStore, RawTable};
use crate::event::{time, Catalog, Column, ColumnType, TableId, TableSchema, Value};

/// Default micro-batch commit interval: a second keeps the dashboard live while
/// amortizing a store transaction over many events.
pub const DEFAULT_TRIGGER_INTERVAL: Duration = Duration::from_secs(1);
/// Commit earlier than the interval once this many events are pending, which bounds
/// the memory a batch holds when a source reads faster than real time.
pub const DEFAULT_MAX_BATCH_EVENTS: usize = 100_000;
/// Batches in flight between two stages; small, so a slow store slows the source.
pub const DEFAULT_QUEUE_BATCHES: usize = 4;
/// The gold rules of the ERP workload use 10-minute windows.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(600);

/// A validated pipeline.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub name: String,
    pub trigger_interval: Duration,
    pub max_batch_events: usize,
    pub queue_batches: usize,
    pub source: SourceSpec,
    pub store: Option<StoreSpec>,
    pub catalog: Arc<Catalog>,
    /// Per table, same index as the catalog.
    pub tables: Vec<TableSpec>,
    pub gold: Vec<GoldSpec>,
    /// Alert rules (`[[alerts]]`), evaluated while serving.
    pub alerts: Vec<super::alerts::AlertSpec>,
    /// Alert destinations (`[notifiers.<name>]`), in file order.
    pub notifiers: Vec<super::alerts::NotifierSpec>,
    /// The Kafka bus (`[kafka]`, defaults when absent).
    pub kafka: KafkaSpec,
}

#[derive(Debug, Clone)]
pub enum SourceSpec {
    File { path: PathBuf, follow: bool },
    Mysql(MysqlSpec),
    Simulate(SimulateSpec),
    Kafka(KafkaSourceSpec),
}

/// The Kafka bus: where `caudal capture` publishes, and the default of a `kafka` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSpec {
    pub brokers: String,
    /// Topics are `<topic_prefix>.<table>`.
    pub topic_prefix: String,
    pub partitions: i32,
    pub replication: i16,
    pub compression: Compression,
    pub group: String,
}

/// Kafka's conventional local listener.
pub const DEFAULT_KAFKA_BROKERS: &str = "localhost:9092";
/// Partitions per table topic: room for a few processing workers without
/// re-partitioning (a topic's partition count can only grow, and growing it moves keys).
pub const DEFAULT_KAFKA_PARTITIONS: i32 = 4;
/// One copy: right for a single broker; production clusters set 3.
pub const DEFAULT_KAFKA_REPLICATION: i16 = 1;
pub const DEFAULT_KAFKA_GROUP: &str = "caudal";

impl KafkaSpec {
    /// The topic of a table's changes: `<prefix>.<table>`.
    pub fn topic(&self, table: &str) -> String {
        format!("{}.{table}", self.topic_prefix)
    }

    /// Where `caudal capture` puts inputs it could not decode (raw payloads).
    pub fn unreadable_topic(&self) -> String {
        self.topic("caudal_unreadable")
    }

    /// The compacted topic holding `caudal capture`'s own checkpoint.
    pub fn capture_topic(&self) -> String {
        self.topic("caudal_capture")
    }

    /// Every topic a pipeline's changes go to: one per table, then the unreadable one.
    pub fn data_topics(&self, catalog: &Catalog) -> Vec<String> {
        let mut topics: Vec<String> =
            catalog.tables().iter().map(|t| self.topic(&t.name)).collect();
        topics.push(self.unreadable_topic());
        topics
    }
}

/// Producer compression codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Best ratio for JSON at little CPU cost; Kafka 2.1+ and Redpanda read it.
    #[default]
    Zstd,
    Lz4,
    None,
}

impl Compression {
    /// The librdkafka `compression.codec` value.
    pub fn codec(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
            Compression::None => "none",
        }
    }
}

/// Settings of the `kafka` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSourceSpec {
    pub brokers: String,
    pub topics: Vec<String>,
    pub exit_at_end: bool,
    pub group: String,
}

/// Settings of the `mysql` source.
#[derive(Clone, PartialEq, Eq)]
pub struct MysqlSpec {
    pub url: String,
    pub server_id: u32,
    pub include: Vec<String>,
    pub server_name: String,
    pub snapshot: SnapshotMode,
}

/// How the `mysql` source reads its initial snapshot (`source.snapshot`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Primary-key chunks, each in its own short consistent-snapshot transaction,
    /// merged into the binlog stream at the chunk's binlog position (DBLog). The
    /// default: no transaction stays open longer than one chunk, so the server's
    /// MVCC history does not grow with the size of the tables.
    #[default]
    Incremental,
    /// Every table in one consistent-snapshot transaction, then the binlog.
    Consistent,
}

impl SnapshotMode {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "incremental" => Some(Self::Incremental),
            "consistent" => Some(Self::Consistent),
            _ => None,
        }
    }
}

/// The URL may hold a password: never print it.
impl std::fmt::Debug for MysqlSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlSpec")
            .field("server_id", &self.server_id)
            .field("include", &self.include)
            .field("server_name", &self.server_name)
            .field("snapshot", &self.snapshot)
            .finish_non_exhaustive()
    }
}

/// Debezium's documented example replica id; any id unique among the server's replicas works.
pub const DEFAULT_SERVER_ID: u32 = 184_054;

/// Settings of the ERP simulator.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulateSpec {
    pub seed: u64,
    /// Events per second; `None` is as fast as possible.
    pub rate: Option<f64>,
    pub burst: Option<Burst>,
    pub events: Option<u64>,
    pub customers: u32,
    pub products: u32,
    pub employees: u32,
    pub dup_rate: f64,
    /// Event-time origin in epoch ms; `None` is the wall clock at the first start.
    pub start_ms: Option<i64>,
}

impl Default for SimulateSpec {
    fn default() -> Self {
        Self {
            seed: 7,
            rate: Some(200.0),
            burst: None,
            events: None,
            customers: 5000,
            products: 1000,
            employees: 60,
            dup_rate: 0.01,
            start_ms: None,
        }
    }
}

/// `factor`x the rate for `length` every `every`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Burst {
    pub factor: f64,
    pub length: Duration,
    pub every: Duration,
}

#[derive(Debug, Clone)]
pub enum StoreSpec {
    Sqlite {
        path: PathBuf,
    },
    /// `url` starts with `postgres://` or `postgresql://`; `stream` is not empty.
    Postgres {
        url: String,
        stream: String,
    },
    /// `url` starts with `mysql://` and names a database; `stream` is not empty.
    Mysql {
        url: String,
        stream: String,
    },
}

/// Cleaning and lookups of one table.
#[derive(Debug, Clone, Default)]
pub struct TableSpec {
    pub rules: Vec<Rule>,
    pub lookups: Vec<LookupSpec>,
    pub silver: bool,
}

/// A per-column fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixOp {
    Trim,
    Lower,
    Upper,
    CollapseSpaces,
    /// Keeps digits and a leading `+`.
    Phone,
    /// Trim and lowercase.
    Email,
}

impl FixOp {
    const NAMES: [&'static str; 6] =
        ["trim", "lower", "upper", "collapse_spaces", "phone", "email"];

    fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "trim" => Self::Trim,
            "lower" => Self::Lower,
            "upper" => Self::Upper,
            "collapse_spaces" => Self::CollapseSpaces,
            "phone" => Self::Phone,
            "email" => Self::Email,
            _ => return None,
        })
    }
}

/// What a failing check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The row leaves the clean data and is stored in quarantine with the reason.
    Quarantine,
    /// The row stays, marked with the reason in its `_flags` column.
    Flag,
}

#[derive(Debug, Clone)]
pub enum Rule {
    Fix { column: usize, ops: Vec<FixOp> },
    Default { column: usize, value: Value },
    Check { expr: Expr, action: Action, reason: Arc<str> },
}

/// How a fact row that has no matching dimension row is treated until one arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// Not counted, not reported: the dimension row is expected soon.
    Wait,
    /// Reported in quarantine with the reason; resolved when the row arrives.
    Quarantine(Arc<str>),
}

/// Enrichment of a fact table with one dimension table, kept current from its stream.
#[derive(Debug, Clone)]
pub struct LookupSpec {
    pub name: String,
    pub table: TableId,
    /// (fact column, dimension column) pairs.
    pub on: Vec<(usize, usize)>,
    pub missing: Missing,
}

/// A column of the fact row (`lookup` None) or of a looked-up row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ColRef {
    pub lookup: Option<usize>,
    pub column: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Round,
    Coalesce,
    Abs,
    Lower,
    Upper,
    Length,
    /// `valid_email(x)`: one `@`, no spaces, a dot in the domain.
    ValidEmail,
    /// `valid_phone(x)`: 7 to 15 digits after removing spaces, dashes, dots and parentheses.
    ValidPhone,
}

/// A resolved expression.
#[derive(Debug, Clone)]
pub enum Expr {
    Lit(Value),
    Col(ColRef),
    Bin(BinOp, Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Neg(Box<Expr>),
    IsNull(Box<Expr>, bool),
    Func(Func, Vec<Expr>),
}

impl Expr {
    /// Every column the expression reads.
    pub fn columns(&self, out: &mut Vec<ColRef>) {
        match self {
            Expr::Lit(_) => {}
            Expr::Col(c) => out.push(*c),
            Expr::Bin(_, a, b) => {
                a.columns(out);
                b.columns(out);
            }
            Expr::Not(a) | Expr::Neg(a) | Expr::IsNull(a, _) => a.columns(out),
            Expr::Func(_, args) => args.iter().for_each(|a| a.columns(out)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    Count,
    Sum,
    Avg,
    Min,
    Max,
}

#[derive(Debug, Clone)]
pub struct MeasureSpec {
    pub name: String,
    pub agg: Agg,
    /// `None` for `count()`.
    pub expr: Option<Expr>,
}

/// A tumbling-window aggregate over a fact table and its lookups.
#[derive(Debug, Clone)]
pub struct GoldSpec {
    pub name: String,
    pub table: TableId,
    pub time: Expr,
    pub window_micros: i64,
    pub filter: Option<Expr>,
    pub group_by: Vec<(String, Expr)>,
    pub measures: Vec<MeasureSpec>,
    pub trend: Option<usize>,
}

impl PipelineSpec {
    /// Validates a parsed file. Collects every problem before failing.
    pub fn from_raw(raw: RawPipeline) -> Result<Self, Vec<super::Problem>> {
        let mut p = Problems::default();
        let s = &raw.pipeline;
        let trigger_interval = match &s.trigger_interval {
            Some(v) => parse_duration(v).unwrap_or_else(|| {
                p.hint(
                    "pipeline.trigger_interval",
                    Some(quote(v)),
                    "not a duration",
                    "e.g. \"1s\", \"500ms\", \"1m\"",
                );
                DEFAULT_TRIGGER_INTERVAL
            }),
            None => DEFAULT_TRIGGER_INTERVAL,
        };
        let max_batch_events = positive(
            &mut p,
            "pipeline.max_batch_events",
            s.max_batch_events,
            DEFAULT_MAX_BATCH_EVENTS,
        );
        let queue_batches =
            positive(&mut p, "pipeline.queue_batches", s.queue_batches, DEFAULT_QUEUE_BATCHES);
        let mut source = source_spec(&mut p, &raw.source);
        let kafka = kafka_spec(&mut p, raw.kafka.as_ref(), &source, s.name.as_deref());
        if let SourceSpec::Mysql(m) = &source {
            for (i, t) in m.include.iter().enumerate() {
                if !raw.tables.contains_key(t) {
                    let hint = did_you_mean(t, raw.tables.keys().map(String::as_str)).map_or_else(
                        || "declare it under [tables]".to_owned(),
                        |x| format!("did you mean `{x}`?"),
                    );
                    p.hint(format!("source.include[{i}]"), Some(quote(t)), "unknown table", hint);
                }
            }
        }
        let store = raw.store.as_ref().map(|s| store_spec(&mut p, s));

        // Schemas first: rules, lookups and gold refer to them by name.
        let mut schemas = Vec::new();
        for (name, t) in &raw.tables {
            schemas.push(table_schema(&mut p, name, t));
        }
        let catalog = Arc::new(Catalog::new(schemas));
        if let SourceSpec::Kafka(k) = &mut source {
            if k.brokers.is_empty() {
                k.brokers = kafka.brokers.clone();
            }
            if k.topics.is_empty() {
                k.topics = kafka.data_topics(&catalog);
            }
            k.group = kafka.group.clone();
        }
        let mut tables = Vec::new();
        for (id, (name, t)) in raw.tables.iter().enumerate() {
            tables.push(table_spec(&mut p, &catalog, id, name, t));
        }
        let mut gold = Vec::new();
        for (i, g) in raw.gold.iter().enumerate() {
            if let Some(spec) = gold_spec(&mut p, &catalog, &tables, i, g) {
                gold.push(spec);
            }
        }
        for (i, g) in gold.iter().enumerate() {
            if gold[..i].iter().any(|o| o.name == g.name) {
                p.add(format!("gold[{i}].name"), Some(quote(&g.name)), "duplicate gold table name");
            }
        }
        let (alerts, notifiers) =
            super::alerts::alerts_spec(&mut p, &raw.alerts, &raw.notifiers, &gold);
        if !p.0.is_empty() {
            return Err(p.0);
        }
        Ok(PipelineSpec {
            name: s.name.clone().unwrap_or_else(|| "pipeline".into()),
            trigger_interval,
            max_batch_events,
            queue_batches,
            source,
            store,
            catalog,
            tables,
            gold,
            kafka,
            alerts,
            notifiers,
        })
    }
}

fn quote(s: &str) -> String {
    format!("{s:?}")
}

fn positive(p: &mut Problems, key: &str, v: Option<i64>, default: usize) -> usize {
    match v {
        None => default,
        Some(n) if n > 0 => usize::try_from(n).unwrap_or(default),
        Some(n) => {
            p.add(key, Some(n.to_string()), "must be a positive whole number");
            default
        }
    }
}

/// Parses `"500ms"`, `"1s"`, `"10m"`, `"2h"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => return None,
    };
    (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs))
}

/// Parses `"200/s"`, `"1000/m"`, `"max"`.
pub fn parse_rate(s: &str) -> Option<Option<f64>> {
    if s.trim() == "max" {
        return Some(None);
    }
    let (n, unit) = s.trim().split_once('/')?;
    let n: f64 = n.trim().parse().ok()?;
    let per = match unit.trim() {
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    (n.is_finite() && n > 0.0).then_some(Some(n / per))
}

/// Parses `"5x for 2m every 10m"`.
pub fn parse_burst(s: &str) -> Option<Burst> {
    let words: Vec<&str> = s.split_whitespace().collect();
    let [factor, "for", length, "every", every] = words[..] else { return None };
    let factor: f64 = factor.strip_suffix('x')?.parse().ok()?;
    let (length, every) = (parse_duration(length)?, parse_duration(every)?);
    (factor > 0.0 && length <= every).then_some(Burst { factor, length, every })
}

fn store_spec(p: &mut Problems, raw: &RawStore) -> StoreSpec {
    match raw {
        RawStore::Sqlite { path } => StoreSpec::Sqlite { path: path.into() },
        RawStore::Postgres { url, stream } => {
            // The URL is not echoed: it may hold a password.
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                p.hint(
                    "store.url",
                    None,
                    "not a PostgreSQL URL",
                    "postgres://USER:PASSWORD@HOST:PORT/DATABASE",
                );
            }
            let stream = match stream {
                Some(s) if s.trim().is_empty() => {
                    p.add("store.stream", Some(quote(s)), "must not be empty");
                    crate::store::postgres::DEFAULT_STREAM.to_owned()
                }
                Some(s) => s.clone(),
                None => crate::store::postgres::DEFAULT_STREAM.to_owned(),
            };
            StoreSpec::Postgres { url: url.clone(), stream }
        }
        RawStore::Mysql { url, stream } => {
            // The URL is not echoed: it may hold a password. It must name the
            // database the tables go in.
            let db = url.strip_prefix("mysql://").and_then(|rest| rest.split_once('/'));
            let db = db.map(|(_, db)| db.split('?').next().unwrap_or_default());
            if db.is_none_or(str::is_empty) {
                p.hint(
                    "store.url",
                    None,
                    "not a MySQL URL with a database",
                    "mysql://USER:PASSWORD@HOST:PORT/DATABASE",
                );
            }
            let stream = match stream {
                Some(s) if s.trim().is_empty() => {
                    p.add("store.stream", Some(quote(s)), "must not be empty");
                    crate::store::mysql::DEFAULT_STREAM.to_owned()
                }
                Some(s) => s.clone(),
                None => crate::store::mysql::DEFAULT_STREAM.to_owned(),
            };
            StoreSpec::Mysql { url: url.clone(), stream }
        }
    }
}

fn source_spec(p: &mut Problems, raw: &RawSource) -> SourceSpec {
    match raw {
        RawSource::File { path, follow } => SourceSpec::File { path: path.into(), follow: *follow },
        RawSource::Mysql { url, server_id, include, server_name, snapshot } => {
            if !(url.starts_with("mysql://") || url.starts_with("mariadb://")) {
                p.hint(
                    "source.url",
                    None,
                    "not a MySQL URL",
                    "mysql://USER:PASSWORD@HOST:PORT/DATABASE",
                );
            }
            let server_id = match server_id {
                None => DEFAULT_SERVER_ID,
                Some(n) => match u32::try_from(*n) {
                    Ok(n) if n > 0 => n,
                    _ => {
                        p.add(
                            "source.server_id",
                            Some(n.to_string()),
                            "must be a whole number from 1 to 4294967295",
                        );
                        DEFAULT_SERVER_ID
                    }
                },
            };
            let snapshot = match snapshot.as_deref() {
                None => SnapshotMode::default(),
                Some(text) => SnapshotMode::parse(text).unwrap_or_else(|| {
                    let message = "must be \"incremental\" or \"consistent\"";
                    match did_you_mean(text, ["incremental", "consistent"]) {
                        Some(m) => p.hint(
                            "source.snapshot",
                            Some(quote(text)),
                            message,
                            format!("did you mean `{m}`?"),
                        ),
                        None => p.add("source.snapshot", Some(quote(text)), message),
                    }
                    SnapshotMode::default()
                }),
            };
            SourceSpec::Mysql(MysqlSpec {
                url: url.replacen("mariadb://", "mysql://", 1),
                server_id,
                include: include.clone(),
                server_name: server_name.clone().unwrap_or_else(|| "caudal".into()),
                snapshot,
            })
        }
        RawSource::Simulate {
            seed,
            rate,
            burst,
            events,
            customers,
            products,
            employees,
            dup_rate,
            start,
        } => {
            let mut sim = SimulateSpec::default();
            if let Some(seed) = seed {
                sim.seed = *seed as u64;
            }
            if let Some(r) = rate {
                match parse_rate(r) {
                    Some(r) => sim.rate = r,
                    None => p.hint(
                        "source.rate",
                        Some(quote(r)),
                        "not a rate",
                        "e.g. \"200/s\", \"5000/m\" or \"max\"",
                    ),
                }
            }
            if let Some(b) = burst {
                match parse_burst(b) {
                    Some(b) => sim.burst = Some(b),
                    None => p.hint(
                        "source.burst",
                        Some(quote(b)),
                        "not a burst shape",
                        "e.g. \"5x for 2m every 10m\"",
                    ),
                }
            }
            if let Some(n) = events {
                match u64::try_from(*n) {
                    Ok(n) if n > 0 => sim.events = Some(n),
                    _ => p.add(
                        "source.events",
                        Some(n.to_string()),
                        "must be a positive whole number",
                    ),
                }
            }
            for (key, v, slot) in [
                ("source.customers", customers, &mut sim.customers),
                ("source.products", products, &mut sim.products),
                ("source.employees", employees, &mut sim.employees),
            ] {
                if let Some(n) = v {
                    match u32::try_from(*n) {
                        Ok(n) if n > 0 => *slot = n,
                        _ => p.add(key, Some(n.to_string()), "must be a positive whole number"),
                    }
                }
            }
            if let Some(d) = dup_rate {
                if (0.0..1.0).contains(d) {
                    sim.dup_rate = *d;
                } else {
                    p.add("source.dup_rate", Some(d.to_string()), "must be at least 0 and below 1");
                }
            }
            if let Some(s) = start {
                if s != "now" {
                    match time::parse_timestamp(s) {
                        Some(us) => sim.start_ms = Some(us / 1000),
                        None => p.hint(
                            "source.start",
                            Some(quote(s)),
                            "not a timestamp",
                            "\"now\" or e.g. \"2026-01-05T08:00:00Z\"",
                        ),
                    }
                }
            }
            SourceSpec::Simulate(sim)
        }
        RawSource::Kafka { brokers, topics, exit_at_end } => {
            if let Some(b) = brokers {
                check_brokers(p, "source.brokers", b);
            }
            if let Some(topics) = topics {
                if topics.is_empty() {
                    p.hint(
                        "source.topics",
                        Some("[]".into()),
                        "no topics",
                        "leave it out to read every table's topic",
                    );
                }
                for (i, t) in topics.iter().enumerate() {
                    check_topic_name(p, &format!("source.topics[{i}]"), t);
                }
            }
            SourceSpec::Kafka(KafkaSourceSpec {
                // Filled from `[kafka]` once the tables are known (see `from_raw`).
                brokers: brokers.clone().unwrap_or_default(),
                topics: topics.clone().unwrap_or_default(),
                exit_at_end: *exit_at_end,
                group: String::new(),
            })
        }
    }
}

fn kafka_spec(
    p: &mut Problems,
    raw: Option<&RawKafka>,
    source: &SourceSpec,
    pipeline: Option<&str>,
) -> KafkaSpec {
    let default_raw = RawKafka::default();
    let raw = raw.unwrap_or(&default_raw);
    let brokers = raw.brokers.clone().unwrap_or_else(|| DEFAULT_KAFKA_BROKERS.into());
    check_brokers(p, "kafka.brokers", &brokers);
    let topic_prefix = match &raw.topic_prefix {
        Some(t) => {
            check_topic_name(p, "kafka.topic_prefix", t);
            t.clone()
        }
        // Debezium's MySQL topics are `<server>.<db>.<table>`; the shared workload
        // and most deployments route them to `<db>.<table>`.
        None => match source {
            SourceSpec::Mysql(m) => mysql_database(&m.url).unwrap_or("caudal").to_owned(),
            _ => pipeline
                .unwrap_or("caudal")
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-') { c } else { '_' })
                .collect(),
        },
    };
    let partitions = match raw.partitions {
        None => DEFAULT_KAFKA_PARTITIONS,
        Some(n) => match i32::try_from(n) {
            Ok(n) if (1..=100_000).contains(&n) => n,
            _ => {
                p.add(
                    "kafka.partitions",
                    Some(n.to_string()),
                    "must be a whole number from 1 to 100000",
                );
                DEFAULT_KAFKA_PARTITIONS
            }
        },
    };
    let replication = match raw.replication {
        None => DEFAULT_KAFKA_REPLICATION,
        Some(n) => match i16::try_from(n) {
            Ok(n) if n >= 1 => n,
            _ => {
                p.add(
                    "kafka.replication",
                    Some(n.to_string()),
                    "must be a whole number from 1 to 32767",
                );
                DEFAULT_KAFKA_REPLICATION
            }
        },
    };
    let compression = match raw.compression.as_deref() {
        None | Some("zstd") => Compression::Zstd,
        Some("lz4") => Compression::Lz4,
        Some("none") => Compression::None,
        Some(other) => {
            p.hint(
                "kafka.compression",
                Some(quote(other)),
                "unknown compression",
                "one of \"zstd\", \"lz4\", \"none\"",
            );
            Compression::Zstd
        }
    };
    let group = raw.group.clone().unwrap_or_else(|| DEFAULT_KAFKA_GROUP.into());
    if group.trim().is_empty() {
        p.add("kafka.group", Some(quote(&group)), "must not be empty");
    }
    KafkaSpec { brokers, topic_prefix, partitions, replication, compression, group }
}

/// The database of `mysql://user:password@host:port/DATABASE?options`.
fn mysql_database(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let path = rest.split_once('/')?.1;
    let db = path.split(['?', '/']).next()?;
    (!db.is_empty()).then_some(db)
}

/// `host:port[,host:port...]`.
fn check_brokers(p: &mut Problems, key: &str, brokers: &str) {
    let ok = !brokers.trim().is_empty()
        && brokers.split(',').all(|b| {
            b.trim().rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|n| n > 0)
            })
        });
    if !ok {
        p.hint(
            key,
            Some(quote(brokers)),
            "not a broker list",
            "host:port[,host:port...], e.g. \"localhost:9092\"",
        );
    }
}

/// Kafka topic names: 1 to 249 of `[A-Za-z0-9._-]`.
fn check_topic_name(p: &mut Problems, key: &str, name: &str) {
    let ok = !name.is_empty()
        && name.len() <= 249
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        p.hint(
            key,
            Some(quote(name)),
            "not a Kafka topic name",
            "1 to 249 letters, digits, `.`, `_` or `-`",
        );
    }
}

fn table_schema(p: &mut Problems, name: &str, t: &RawTable) -> TableSchema {
    let mut columns = Vec::new();
    for (col, ty) in &t.columns {
        let key = format!("tables.{name}.columns.{col}");
        let ty = ColumnType::from_name(ty).unwrap_or_else(|| {
            let alias = sql_type_alias(ty);
            let hint = match alias.or_else(|| did_you_mean(ty, ColumnType::NAMES.iter().copied())) {
                Some(m) => format!("did you mean \"{m}\"? types: {}", ColumnType::NAMES.join(", ")),
                None => format!("types: {}", ColumnType::NAMES.join(", ")),
            };
            p.hint(key, Some(quote(ty)), "unknown column type", hint);
            ColumnType::String
        });
        columns.push(Column { name: col.as_str().into(), ty });
    }
    let mut key = Vec::new();
    if t.key.is_empty() {
        p.add(format!("tables.{name}.key"), None, "a table needs at least one key column");
    }
    for (i, k) in t.key.iter().enumerate() {
        match columns.iter().position(|c| &*c.name == k) {
            Some(idx) => key.push(idx),
            None => unknown_column(p, &format!("tables.{name}.key[{i}]"), k, name, &columns),
        }
    }
    TableSchema { name: name.into(), columns, key }
}

/// The caudal type for a SQL type name a user may write instead.
fn sql_type_alias(name: &str) -> Option<&'static str> {
    Some(match name.to_ascii_lowercase().as_str() {
        "integer" | "bigint" | "smallint" | "tinyint" | "mediumint" | "long" => "int",
        "numeric" | "money" => "decimal",
        "varchar" | "char" | "text" | "enum" | "set" | "str" => "string",
        "double" | "real" => "float",
        "boolean" => "bool",
        "datetime" => "timestamp",
        "blob" | "binary" | "varbinary" => "bytes",
        _ => return None,
    })
}

/// Whether the column's type was already reported as unknown (no cascade of errors).
fn type_reported(p: &Problems, table: &str, column: &str) -> bool {
    let key = format!("tables.{table}.columns.{column}");
    p.0.iter().any(|x| x.key == key)
}

fn unknown_column(p: &mut Problems, key: &str, col: &str, table: &str, columns: &[Column]) {
    let names = columns.iter().map(|c| &*c.name);
    let hint = match did_you_mean(col, names) {
        Some(m) => format!("did you mean `{m}`?"),
        None => format!("declare it under [tables.{table}.columns]"),
    };
    p.hint(key, Some(quote(col)), format!("table `{table}` has no column `{col}`"), hint);
}

fn table_spec(
    p: &mut Problems,
    catalog: &Catalog,
    id: TableId,
    name: &str,
    t: &RawTable,
) -> TableSpec {
    let schema = catalog.table(id);
    let mut lookups = Vec::new();
    for (i, l) in t.lookups.iter().enumerate() {
        let key = format!("tables.{name}.lookups[{i}]");
        let Some(dim) = catalog.id(&l.table) else {
            let hint = did_you_mean(&l.table, catalog.tables().iter().map(|t| &*t.name))
                .map_or_else(
                    || "declare it under [tables]".to_owned(),
                    |m| format!("did you mean `{m}`?"),
                );
            p.hint(format!("{key}.table"), Some(quote(&l.table)), "unknown table", hint);
            continue;
        };
        let dim_schema = catalog.table(dim);
        let mut on = Vec::new();
        for (fact_col, dim_col) in &l.on {
            let f = schema.column_index(fact_col);
            let d = dim_schema.column_index(dim_col);
            if f.is_none() {
                unknown_column(p, &format!("{key}.on.{fact_col}"), fact_col, name, &schema.columns);
            }
            if d.is_none() {
                unknown_column(
                    p,
                    &format!("{key}.on.{fact_col}"),
                    dim_col,
                    &l.table,
                    &dim_schema.columns,
                );
            }
            if let (Some(f), Some(d)) = (f, d) {
                on.push((f, d));
            }
        }
        let dim_key: Vec<usize> = on.iter().map(|(_, d)| *d).collect();
        if !on.is_empty() && dim_key != dim_schema.key {
            p.hint(
                format!("{key}.on"),
                None,
                format!("a lookup must join on the whole primary key of `{}`", l.table),
                format!(
                    "key of `{}`: {:?}",
                    l.table,
                    dim_schema
                        .key
                        .iter()
                        .map(|&k| &*dim_schema.columns[k].name)
                        .collect::<Vec<_>>()
                ),
            );
        }
        let missing = match (l.missing.as_deref(), &l.reason) {
            (None | Some("wait"), None) => Missing::Wait,
            (Some("quarantine"), Some(r)) => {
                Missing::Quarantine(reason_code(p, &format!("{key}.reason"), r))
            }
            (Some("quarantine"), None) => {
                p.add(
                    format!("{key}.reason"),
                    None,
                    "`missing = \"quarantine\"` needs a reason code",
                );
                Missing::Wait
            }
            (None | Some("wait"), Some(_)) => {
                p.hint(
                    format!("{key}.reason"),
                    None,
                    "a reason only applies when missing rows are quarantined",
                    "set `missing = \"quarantine\"`",
                );
                Missing::Wait
            }
            (Some(other), _) => {
                p.hint(
                    format!("{key}.missing"),
                    Some(quote(other)),
                    "unknown value",
                    "expected \"wait\" or \"quarantine\"",
                );
                Missing::Wait
            }
        };
        if lookups.iter().any(|x: &LookupSpec| x.name == l.name) {
            p.add(format!("{key}.name"), Some(quote(&l.name)), "duplicate lookup name");
        }
        lookups.push(LookupSpec { name: l.name.clone(), table: dim, on, missing });
    }
    let mut rules = Vec::new();
    for (i, r) in t.rules.iter().enumerate() {
        if let Some(rule) = rule_spec(p, &format!("tables.{name}.rules[{i}]"), schema, r) {
            rules.extend(rule);
        }
    }
    TableSpec { rules, lookups, silver: t.silver.unwrap_or(true) }
}

fn reason_code(p: &mut Problems, key: &str, r: &str) -> Arc<str> {
    let ok = !r.is_empty()
        && r.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && r.starts_with(|c: char| c.is_ascii_lowercase());
    if !ok {
        p.hint(
            key,
            Some(quote(r)),
            "a reason code must be snake_case",
            "e.g. \"invalid_quantity\"",
        );
    }
    r.into()
}

fn rule_spec(p: &mut Problems, key: &str, schema: &TableSchema, r: &RawRule) -> Option<Vec<Rule>> {
    let kinds = [
        r.fix.is_some(),
        r.default.is_some(),
        r.format.is_some(),
        r.min.is_some() || r.max.is_some(),
        r.check.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        p.hint(
            key,
            None,
            "a rule needs exactly one of `fix`, `default`, `format`, `min`/`max`, `check`",
            "split it into several rules",
        );
        return None;
    }
    let column = match &r.column {
        Some(c) => match schema.column_index(c) {
            Some(i) => Some(i),
            None => {
                unknown_column(p, &format!("{key}.column"), c, &schema.name, &schema.columns);
                return None;
            }
        },
        None => None,
    };
    let needs_column = r.check.is_none();
    if needs_column && column.is_none() {
        p.add(format!("{key}.column"), None, "this rule needs a `column`");
        return None;
    }
    let is_check = r.format.is_some() || r.min.is_some() || r.max.is_some() || r.check.is_some();
    if !is_check && (r.action.is_some() || r.reason.is_some()) {
        p.add(
            key,
            None,
            "`action` and `reason` apply only to checks (`format`, `min`/`max`, `check`)",
        );
    }
    if let Some(fixes) = &r.fix {
        let mut ops = Vec::new();
        for (j, f) in fixes.iter().enumerate() {
            match FixOp::from_name(f) {
                Some(op) => ops.push(op),
                None => {
                    let hint = did_you_mean(f, FixOp::NAMES).map_or_else(
                        || format!("fixes: {}", FixOp::NAMES.join(", ")),
                        |m| format!("did you mean \"{m}\"? fixes: {}", FixOp::NAMES.join(", ")),
                    );
                    p.hint(format!("{key}.fix[{j}]"), Some(quote(f)), "unknown fix", hint);
                }
            }
        }
        return Some(vec![Rule::Fix { column: column?, ops }]);
    }
    if let Some(d) = &r.default {
        let col = column?;
        let ty = schema.columns[col].ty;
        return match literal_for(ty, d) {
            Some(value) => Some(vec![Rule::Default { column: col, value }]),
            None => {
                if !type_reported(p, &schema.name, &schema.columns[col].name) {
                    p.add(
                        format!("{key}.default"),
                        Some(d.to_string()),
                        format!("not a valid {} value", ty.name()),
                    );
                }
                None
            }
        };
    }
    // Checks.
    let action = match r.action.as_deref() {
        None | Some("quarantine") => Action::Quarantine,
        Some("flag") => Action::Flag,
        Some(other) => {
            let hint = did_you_mean(other, ["quarantine", "flag"]).map_or_else(
                || "expected \"quarantine\" or \"flag\"".to_owned(),
                |m| format!("did you mean \"{m}\"?"),
            );
            p.hint(format!("{key}.action"), Some(quote(other)), "unknown action", hint);
            Action::Quarantine
        }
    };
    let Some(reason) = &r.reason else {
        p.hint(
            format!("{key}.reason"),
            None,
            "a check needs a reason code",
            "e.g. reason = \"invalid_quantity\"",
        );
        return None;
    };
    let reason = reason_code(p, &format!("{key}.reason"), reason);
    let mut out = Vec::new();
    if let Some(fmt) = &r.format {
        let col = Expr::Col(ColRef { lookup: None, column: column? });
        let func = match fmt.as_str() {
            "email" => Func::ValidEmail,
            "phone" => Func::ValidPhone,
            other => {
                p.hint(
                    format!("{key}.format"),
                    Some(quote(other)),
                    "unknown format",
                    "expected \"email\" or \"phone\"",
                );
                return None;
            }
        };
        // A format check is `col is null or valid_<format>(col)`: missing values are
        // the business of `default` rules, not of format checks.
        let expr = Expr::Bin(
            BinOp::Or,
            Box::new(Expr::IsNull(Box::new(col.clone()), false)),
            Box::new(Expr::Func(func, vec![col])),
        );
        out.push(Rule::Check { expr, action, reason: reason.clone() });
    }
    for (bound, op, name) in [(&r.min, BinOp::Ge, "min"), (&r.max, BinOp::Le, "max")] {
        if let Some(b) = bound {
            let col = column?;
            let ty = schema.columns[col].ty;
            let Some(v) = literal_for(ty, b) else {
                if !type_reported(p, &schema.name, &schema.columns[col].name) {
                    p.add(
                        format!("{key}.{name}"),
                        Some(b.to_string()),
                        format!("not a valid {} value", ty.name()),
                    );
                }
                return None;
            };
            let expr = Expr::Bin(
                op,
                Box::new(Expr::Col(ColRef { lookup: None, column: col })),
                Box::new(Expr::Lit(v)),
            );
            out.push(Rule::Check { expr, action, reason: reason.clone() });
        }
    }
    if let Some(src) = &r.check {
        let scope = Scope { schema, lookups: &[], catalog: None };
        match expr::parse(src) {
            Ok(ast) => {
                let expr = resolve(p, &format!("{key}.check"), &scope, &ast)?;
                out.push(Rule::Check { expr, action, reason });
            }
            Err(e) => {
                p.add(
                    format!("{key}.check"),
                    Some(quote(src)),
                    format!("cannot parse expression: {e}"),
                );
                return None;
            }
        }
    }
    Some(out)
}

/// Converts a TOML literal to a value of a column type.
fn literal_for(ty: ColumnType, v: &toml::Value) -> Option<Value> {
    match (ty, v) {
        (ColumnType::Int, toml::Value::Integer(i)) => Some(Value::Int(*i)),
        (ColumnType::UInt, toml::Value::Integer(i)) => u64::try_from(*i).ok().map(Value::UInt),
        (ColumnType::Float, toml::Value::Float(f)) => Some(Value::Float(*f)),
        (ColumnType::Float, toml::Value::Integer(i)) => Some(Value::Float(*i as f64)),
        (ColumnType::Decimal, toml::Value::String(s)) => {
            Decimal::from_str_exact(s).ok().map(Value::Decimal)
        }
        (ColumnType::Decimal, toml::Value::Integer(i)) => Some(Value::Decimal(Decimal::from(*i))),
        (ColumnType::String, toml::Value::String(s)) => Some(Value::Str(s.as_str().into())),
        (ColumnType::Bool, toml::Value::Boolean(b)) => Some(Value::Bool(*b)),
        (
            ColumnType::TimestampMillis | ColumnType::TimestampMicros | ColumnType::TimestampZoned,
            toml::Value::String(s),
        ) => time::parse_timestamp(s).map(Value::Timestamp),
        (ColumnType::Date, toml::Value::String(s)) => {
            time::parse_date(s).and_then(|d| i32::try_from(d).ok()).map(Value::Date)
        }
        _ => None,
    }
}

struct Scope<'a> {
    schema: &'a TableSchema,
    lookups: &'a [LookupSpec],
    catalog: Option<&'a Catalog>,
}

fn resolve(p: &mut Problems, key: &str, scope: &Scope<'_>, ast: &Ast) -> Option<Expr> {
    Some(match ast {
        Ast::Lit(Lit::Null) => Expr::Lit(Value::Null),
        Ast::Lit(Lit::Bool(b)) => Expr::Lit(Value::Bool(*b)),
        Ast::Lit(Lit::Str(s)) => Expr::Lit(Value::Str(s.as_str().into())),
        Ast::Lit(Lit::Number(n)) => match n.parse::<i64>() {
            Ok(i) => Expr::Lit(Value::Int(i)),
            Err(_) => match Decimal::from_str(n) {
                Ok(d) => Expr::Lit(Value::Decimal(d)),
                Err(_) => {
                    p.add(key, Some(quote(n)), "not a number");
                    return None;
                }
            },
        },
        Ast::Name(None, col) => match scope.schema.column_index(col) {
            Some(i) => Expr::Col(ColRef { lookup: None, column: i }),
            None => {
                unknown_column(p, key, col, &scope.schema.name, &scope.schema.columns);
                return None;
            }
        },
        Ast::Name(Some(lookup), col) => {
            let Some(li) = scope.lookups.iter().position(|l| &l.name == lookup) else {
                let names: Vec<&str> = scope.lookups.iter().map(|l| l.name.as_str()).collect();
                p.hint(
                    key,
                    Some(quote(&format!("{lookup}.{col}"))),
                    format!("no lookup named `{lookup}` on table `{}`", scope.schema.name),
                    if names.is_empty() {
                        "declare one under [[tables.<table>.lookups]]".to_owned()
                    } else {
                        format!("lookups: {}", names.join(", "))
                    },
                );
                return None;
            };
            let catalog = scope.catalog?;
            let dim = catalog.table(scope.lookups[li].table);
            match dim.column_index(col) {
                Some(c) => Expr::Col(ColRef { lookup: Some(li), column: c }),
                None => {
                    unknown_column(p, key, col, &dim.name, &dim.columns);
                    return None;
                }
            }
        }
        Ast::Bin(op, a, b) => Expr::Bin(
            *op,
            Box::new(resolve(p, key, scope, a)?),
            Box::new(resolve(p, key, scope, b)?),
        ),
        Ast::Not(a) => Expr::Not(Box::new(resolve(p, key, scope, a)?)),
        Ast::Neg(a) => Expr::Neg(Box::new(resolve(p, key, scope, a)?)),
        Ast::IsNull(a, neg) => Expr::IsNull(Box::new(resolve(p, key, scope, a)?), *neg),
        Ast::Call(name, args) => {
            let (func, arity) = match name.as_str() {
                "round" => (Func::Round, 2..=2),
                "coalesce" => (Func::Coalesce, 1..=64),
                "abs" => (Func::Abs, 1..=1),
                "lower" => (Func::Lower, 1..=1),
                "upper" => (Func::Upper, 1..=1),
                "length" => (Func::Length, 1..=1),
                "valid_email" => (Func::ValidEmail, 1..=1),
                "valid_phone" => (Func::ValidPhone, 1..=1),
                other => {
                    p.hint(key, Some(quote(other)), "unknown function", "functions: round, coalesce, abs, lower, upper, length, valid_email, valid_phone; aggregates belong in `measures`");
                    return None;
                }
            };
            if !arity.contains(&args.len()) {
                p.add(
                    key,
                    Some(quote(name)),
                    format!("`{name}` takes {} argument(s), got {}", arity.start(), args.len()),
                );
                return None;
            }
            let args: Option<Vec<Expr>> = args.iter().map(|a| resolve(p, key, scope, a)).collect();
            let args = args?;
            if func == Func::Round && !matches!(args[1], Expr::Lit(Value::Int(0..=28))) {
                p.add(
                    key,
                    None,
                    "the second argument of `round` must be a whole number from 0 to 28",
                );
                return None;
            }
            Expr::Func(func, args)
        }
    })
}

fn gold_spec(
    p: &mut Problems,
    catalog: &Catalog,
    tables: &[TableSpec],
    i: usize,
    g: &RawGold,
) -> Option<GoldSpec> {
    let key = format!("gold[{i}]");
    let Some(table) = catalog.id(&g.table) else {
        let hint = did_you_mean(&g.table, catalog.tables().iter().map(|t| &*t.name)).map_or_else(
            || "declare it under [tables]".to_owned(),
            |m| format!("did you mean `{m}`?"),
        );
        p.hint(format!("{key}.table"), Some(quote(&g.table)), "unknown table", hint);
        return None;
    };
    let scope = Scope {
        schema: catalog.table(table),
        lookups: &tables[table].lookups,
        catalog: Some(catalog),
    };
    let parse_expr = |p: &mut Problems, k: String, src: &str| -> Option<Expr> {
        match expr::parse(src) {
            Ok(ast) => resolve(p, &k, &scope, &ast),
            Err(e) => {
                p.add(k, Some(quote(src)), format!("cannot parse expression: {e}"));
                None
            }
        }
    };
    let time = parse_expr(p, format!("{key}.time"), &g.time);
    let window = match &g.window {
        Some(w) => match parse_duration(w) {
            Some(d) if d.as_micros() > 0 => d,
            _ => {
                p.hint(format!("{key}.window"), Some(quote(w)), "not a duration", "e.g. \"10m\"");
                DEFAULT_WINDOW
            }
        },
        None => DEFAULT_WINDOW,
    };
    let filter = g.filter.as_ref().and_then(|f| parse_expr(p, format!("{key}.filter"), f));
    let mut group_by = Vec::new();
    for (j, src) in g.group_by.iter().enumerate() {
        let k = format!("{key}.group_by[{j}]");
        match expr::parse_named(src) {
            Ok((ast, name)) => {
                let Some(name) = name else {
                    p.hint(
                        k,
                        Some(quote(src)),
                        "a computed group needs a name",
                        "append `as <name>`",
                    );
                    continue;
                };
                if let Some(e) = resolve(p, &k, &scope, &ast) {
                    group_by.push((name, e));
                }
            }
            Err(e) => p.add(k, Some(quote(src)), format!("cannot parse expression: {e}")),
        }
    }
    let mut measures = Vec::new();
    for (j, src) in g.measures.iter().enumerate() {
        let k = format!("{key}.measures[{j}]");
        match expr::parse_named(src) {
            Ok((Ast::Call(agg, args), Some(name))) => {
                let agg = match agg.as_str() {
                    "count" => Agg::Count,
                    "sum" => Agg::Sum,
                    "avg" => Agg::Avg,
                    "min" => Agg::Min,
                    "max" => Agg::Max,
                    other => {
                        p.hint(
                            k,
                            Some(quote(other)),
                            "unknown aggregate",
                            "aggregates: count, sum, avg, min, max",
                        );
                        continue;
                    }
                };
                let expr = match (agg, args.as_slice()) {
                    (Agg::Count, []) => None,
                    (_, [arg]) => match resolve(p, &k, &scope, arg) {
                        Some(e) => Some(e),
                        None => continue,
                    },
                    _ => {
                        p.add(
                            k,
                            Some(quote(src)),
                            "`count()` takes no argument; other aggregates take one",
                        );
                        continue;
                    }
                };
                measures.push(MeasureSpec { name, agg, expr });
            }
            Ok(_) => p.hint(
                k,
                Some(quote(src)),
                "a measure is an aggregate with a name",
                "e.g. \"sum(quantity) as units\"",
            ),
            Err(e) => p.add(k, Some(quote(src)), format!("cannot parse expression: {e}")),
        }
    }
    if g.measures.is_empty() {
        p.add(format!("{key}.measures"), None, "a gold table needs at least one measure");
    }
    let mut names: Vec<&str> = group_by.iter().map(|(n, _)| n.as_str()).collect();
    names.extend(measures.iter().map(|m| m.name.as_str()));
    for (j, n) in names.iter().enumerate() {
        if names[..j].contains(n) || ["window_start", "window_end"].contains(n) {
            p.add(key.clone(), Some(quote(n)), "duplicate or reserved output column name");
        }
    }
    let trend = match &g.trend {
        Some(t) => match measures.iter().position(|m| &m.name == t) {
            Some(i) => Some(i),
            None => {
                p.hint(
                    format!("{key}.trend"),
                    Some(quote(t)),
                    "no measure of that name",
                    "name one of the measures",
                );
                None
            }
        },
        None => None,
    };
    Some(GoldSpec {
        name: g.name.clone(),
        table,
        time: time?,
        window_micros: i64::try_from(window.as_micros()).unwrap_or(i64::MAX),
        filter,
        group_by,
        measures,
        trend,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_rates_and_bursts() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_rate("200/s"), Some(Some(200.0)));
        assert_eq!(parse_rate("max"), Some(None));
        let b = parse_burst("5x for 2m every 10m").unwrap();
        assert_eq!(b.factor, 5.0);
        assert_eq!(b.every, Duration::from_secs(600));
        assert!(parse_burst("5x for 20m every 10m").is_none());
    }

    #[test]
    fn postgres_store_urls_and_streams_are_checked() {
        let parse = |store: &str| {
            let text = format!(
                "[source]\ntype = \"file\"\npath = \"x.jsonl\"\n[store]\n{store}\n\
                 [tables.t]\nkey = [\"id\"]\ncolumns = {{ id = \"int\" }}\n"
            );
            crate::config::parse(std::path::Path::new("p.toml"), &text)
        };
        let spec = parse("type = \"postgres\"\nurl = \"postgresql://u@h:5/db\"").unwrap();
        assert!(matches!(
            spec.store,
            Some(StoreSpec::Postgres { ref stream, .. }) if stream == "main"
        ));
        let err = parse("type = \"postgres\"\nurl = \"mysql://u@h/db\"\nstream = \" \"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("store.url") && err.contains("store.stream"), "{err}");
    }

    #[test]
    fn mysql_store_urls_and_streams_are_checked() {
        let parse = |store: &str| {
            let text = format!(
                "[source]\ntype = \"file\"\npath = \"x.jsonl\"\n[store]\n{store}\n\
                 [tables.t]\nkey = [\"id\"]\ncolumns = {{ id = \"int\" }}\n"
            );
            crate::config::parse(std::path::Path::new("p.toml"), &text)
        };
        let spec = parse("type = \"mysql\"\nurl = \"mysql://u:p@h:3306/db\"").unwrap();
        assert!(matches!(
            spec.store,
            Some(StoreSpec::Mysql { ref stream, .. }) if stream == "main"
        ));
        for url in ["postgres://u@h/db", "mysql://u@h:3306/", "mysql://u@h:3306"] {
            let err = parse(&format!("type = \"mysql\"\nurl = \"{url}\"\nstream = \" \""))
                .unwrap_err()
                .to_string();
            assert!(err.contains("store.url") && err.contains("store.stream"), "{url}: {err}");
            assert!(!err.contains(url), "the url is not echoed: {err}");
        }
    }
}
