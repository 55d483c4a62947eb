//! The pipeline file as written: plain serde types, no meaning attached yet.
//!
//! Every struct denies unknown fields so that a typo is an error naming the key,
//! not a silently ignored setting. Doc comments here are the user reference.

use indexmap::IndexMap;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    #[serde(default)]
    pub pipeline: RawSettings,
    pub source: RawSource,
    #[serde(default)]
    pub store: Option<RawStore>,
    /// Source tables by name: their columns, key, cleaning rules and lookups.
    pub tables: IndexMap<String, RawTable>,
    /// Window aggregates written to gold tables.
    #[serde(default)]
    pub gold: Vec<RawGold>,
    /// The Kafka bus between `caudal capture` and processing (topics, producer).
    #[serde(default)]
    pub kafka: Option<RawKafka>,
    /// Alert rules, evaluated by `caudal serve` (and `demo`/`run` with `--listen`).
    #[serde(default)]
    pub alerts: Vec<RawAlert>,
    /// Where alerts are sent, by name.
    #[serde(default)]
    pub notifiers: IndexMap<String, RawNotifier>,
}

/// `[[alerts]]`: one rule. `kind` says which of the other keys apply:
///
/// - `gold_threshold`: `gold`, `measure`, `below` or `above` (a decimal), `on`;
/// - `gold_change`: `gold`, `measure`, `drop_percent` or `rise_percent`, `on`
///   (the window against the one before it, summed over all groups);
/// - `quarantine_rate`: `above_percent`, `window` (records opened over events read);
/// - `lag`: `max_lag` (now minus the newest source time applied).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlert {
    /// A unique name, used in messages and as the metric label.
    pub name: String,
    /// `gold_threshold`, `gold_change`, `quarantine_rate` or `lag`.
    pub kind: String,
    /// `info`, `warning` (default) or `critical`.
    pub severity: Option<String>,
    /// After a notification, the rule stays quiet this long even if it fires
    /// again (default `"10m"`).
    pub cooldown: Option<String>,
    /// Names of `[notifiers.<name>]` to send to (default: none, dashboard only).
    #[serde(default)]
    pub notify: Vec<String>,
    /// The gold table, by `[[gold]]` name.
    pub gold: Option<String>,
    /// One of the gold table's measures (`count` or `sum`).
    pub measure: Option<String>,
    pub below: Option<toml::Value>,
    pub above: Option<toml::Value>,
    pub drop_percent: Option<toml::Value>,
    pub rise_percent: Option<toml::Value>,
    /// Which gold window: `last_closed` (default: the newest window is still
    /// filling, comparing it would fire at every window start) or `current`.
    pub on: Option<String>,
    pub above_percent: Option<toml::Value>,
    /// The span a `quarantine_rate` is measured over (default `"10m"`).
    pub window: Option<String>,
    /// A duration, e.g. `"60s"`.
    pub max_lag: Option<String>,
}

/// `[notifiers.<name>]`: a destination for alert messages.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawNotifier {
    /// A Slack-compatible incoming webhook: posts `{"text": "..."}`.
    Slack { url: String },
    /// Any HTTP endpoint: posts the alert event as JSON.
    Webhook {
        url: String,
        /// Extra request headers, e.g. `{ Authorization = "Bearer ..." }`.
        #[serde(default)]
        headers: IndexMap<String, String>,
    },
    /// Mail over SMTP.
    Smtp {
        host: String,
        /// Default 587 (`starttls`), 465 (`tls`), 25 (`none`).
        port: Option<i64>,
        /// `starttls` (default), `tls` (implicit TLS) or `none` (local relays only).
        tls: Option<String>,
        username: Option<String>,
        /// The environment variable holding the password (never the file).
        password_env: Option<String>,
        /// A PEM file of CA certificates to trust besides the public roots (a
        /// private relay's own CA); read when a mail is sent.
        ca_file: Option<String>,
        /// `Name <address>` or `address`.
        from: String,
        to: Vec<String>,
    },
}

/// `[kafka]`: where `caudal capture` publishes and a `kafka` source reads by default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    /// Bootstrap brokers, `host:port[,host:port...]` (default `localhost:9092`).
    pub brokers: Option<String>,
    /// Topics are `<topic_prefix>.<table>` (default: the database of a `mysql`
    /// source, else the pipeline name).
    pub topic_prefix: Option<String>,
    /// Partitions of the topics `caudal capture` creates (default 4).
    pub partitions: Option<i64>,
    /// Replication factor of the topics `caudal capture` creates (default 1).
    pub replication: Option<i64>,
    /// Producer compression: `zstd` (default), `lz4` or `none`.
    pub compression: Option<String>,
    /// Consumer group id (default `caudal`).
    pub group: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    /// A name for logs and metrics.
    pub name: Option<String>,
    /// How often a micro-batch is committed to the store, e.g. `"1s"`, `"60s"`.
    pub trigger_interval: Option<String>,
    /// Commit earlier once this many events are pending.
    pub max_batch_events: Option<i64>,
    /// Length, in batches, of the bounded queues between stages.
    pub queue_batches: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawSource {
    /// Debezium JSON lines from a file.
    File {
        path: String,
        /// Stop at the end of the file (default) or keep reading lines appended to it.
        #[serde(default)]
        follow: bool,
    },
    /// A MySQL or MariaDB database, read as a replica: snapshot, then the binlog.
    Mysql {
        /// `mysql://USER:PASSWORD@HOST:PORT/DATABASE`; the database is the one captured.
        url: String,
        /// The replica server id caudal registers with; unique among the server's replicas.
        server_id: Option<i64>,
        /// Tables to capture (default: every table declared under [tables]).
        #[serde(default)]
        include: Vec<String>,
        /// The logical server name (Debezium's `source.name`, the topic prefix).
        server_name: Option<String>,
        /// How the initial snapshot is read: `"incremental"` (default: primary-key
        /// chunks in short transactions while the binlog streams, the DBLog
        /// watermark method) or `"consistent"` (every table in one long
        /// consistent-snapshot transaction, then the binlog).
        snapshot: Option<String>,
    },
    /// Kafka topics of Debezium envelopes (written by `caudal capture` or by Debezium).
    Kafka {
        /// Bootstrap brokers (default: `kafka.brokers`).
        brokers: Option<String>,
        /// Topics to read (default: `<kafka.topic_prefix>.<table>` for every table
        /// declared, and `<kafka.topic_prefix>.caudal_unreadable`).
        topics: Option<Vec<String>>,
        /// Stop once every partition reached the end it had at start (replays, tests).
        #[serde(default)]
        exit_at_end: bool,
    },
    /// The built-in ERP simulator.
    Simulate {
        seed: Option<i64>,
        /// Events per second, e.g. `"200/s"`, or `"max"` for as fast as possible.
        rate: Option<String>,
        /// A burst shape, e.g. `"5x for 2m every 10m"`.
        burst: Option<String>,
        /// Stop after this many events (default: run until stopped).
        events: Option<i64>,
        customers: Option<i64>,
        products: Option<i64>,
        employees: Option<i64>,
        /// Share of events delivered twice, 0..1.
        dup_rate: Option<f64>,
        /// Event-time origin: `"now"` (default) or an ISO-8601 UTC timestamp.
        start: Option<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawStore {
    /// An embedded SQLite file.
    Sqlite { path: String },
    /// A PostgreSQL database, `postgres://USER@HOST:PORT/DATABASE`.
    Postgres {
        url: String,
        /// Name the checkpoint is kept under, so that several workers can share one
        /// database (default `"main"`).
        stream: Option<String>,
    },
    /// A MySQL or MariaDB database, `mysql://USER:PASSWORD@HOST:PORT/DATABASE`
    /// (single worker: consumer groups need PostgreSQL).
    Mysql {
        url: String,
        /// Name the checkpoint is kept under (default `"main"`).
        stream: Option<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTable {
    /// Primary-key column names.
    pub key: Vec<String>,
    /// Column name -> type (`int`, `decimal`, `string`, `timestamp`, …).
    pub columns: IndexMap<String, String>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
    #[serde(default)]
    pub lookups: Vec<RawLookup>,
    /// Write the clean current state to a silver table (default true).
    pub silver: Option<bool>,
}

/// One cleaning rule. Exactly one of `fix`, `default`, `format`, `min`/`max` or
/// `check` says what it does.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub column: Option<String>,
    /// Fixes applied in order: `trim`, `lower`, `upper`, `collapse_spaces`, `phone`, `email`.
    pub fix: Option<Vec<String>>,
    /// The value to use when the column is null.
    pub default: Option<toml::Value>,
    /// A format check: `email` or `phone`.
    pub format: Option<String>,
    pub min: Option<toml::Value>,
    pub max: Option<toml::Value>,
    /// A boolean expression over the row's columns that must hold.
    pub check: Option<String>,
    /// What a failing check does: `quarantine` (default) or `flag`.
    pub action: Option<String>,
    /// The stable snake_case reason code recorded when the check fails.
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLookup {
    /// The name expressions use for the looked-up row (`product.category`).
    pub name: String,
    /// The dimension table.
    pub table: String,
    /// This table's column -> the dimension table's column.
    pub on: IndexMap<String, String>,
    /// While the dimension row is missing: `wait` (default) or `quarantine`.
    pub missing: Option<String>,
    /// Reason code when `missing = "quarantine"`.
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGold {
    pub name: String,
    /// The fact table aggregated.
    pub table: String,
    /// The event-time column, e.g. `order.order_ts`.
    pub time: String,
    /// Tumbling window size (default `"10m"`).
    pub window: Option<String>,
    /// A boolean expression; rows for which it does not hold are not counted.
    pub filter: Option<String>,
    /// Grouping expressions, `"order.channel"` or `"<expr> as name"`.
    #[serde(default)]
    pub group_by: Vec<String>,
    /// Aggregates, `"count() as lines"`, `"sum(quantity) as units"`; count, sum, avg, min, max.
    pub measures: Vec<String>,
    /// A measure whose change against the previous window is shown as a trend.
    pub trend: Option<String>,
}
