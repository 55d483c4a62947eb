//! The built-in ERP simulator: the change stream of `shared/workload/erpgen.py`,
//! generated in process as typed [`Change`]s instead of JSON lines.
//!
//! What it emits, in order:
//! - an initial snapshot (op `r`, `source.snapshot` `true`, `last` on the very last
//!   row) of `customers`, `products` and `employees`;
//! - then a stream on a virtual clock (exponential gaps, mean 900 ms, as erpgen):
//!   new orders (`c`) with 1 to 5 order lines each; later status changes of the
//!   order (`pending` -> `paid` with a `payments` insert, -> `shipped`, about 5%
//!   `cancelled` at either step); later quantity corrections (`u`) and deletes
//!   (`d`) of some lines; product price changes (the category never changes) and
//!   customer phone changes.
//!
//! The dirt is erpgen's: about `dup_rate` of the streamed events are re-delivered
//! up to 500 events later as the *same* change (same binlog position, own
//! `origin`); null discounts (~5% of lines), quantities 0/-1/-3 and 500..5000,
//! negative prices (~0.1%), dangling product ids (900000+), messy emails and phones,
//! missing cities, and `orders.order_ts` up to 2 minutes behind the stream.
//!
//! Determinism contract: for the same `seed`, `customers`, `products`, `employees`,
//! `dup_rate`, start time and mean gap, [`ErpGenerator`] yields the same sequence of
//! changes (same rows, positions, timestamps and origins) on every run and
//! platform, for a given version of this crate and of `rand`/`rand_pcg`. `events`
//! only truncates that sequence, so a shorter stream is a prefix of a longer one;
//! pacing (`rate`, `burst`) never changes the content, only when it is delivered.
//! That prefix property is what makes resuming by fast-forwarding exact. The byte
//! stream is not erpgen's (Python's RNG differs); the kinds of events, their
//! rates and their meaning are, so the README's gold rules hold on it.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{CaptureError, Source};
use crate::bus;
use crate::config::spec::{Burst, SimulateSpec};
use crate::event::debezium::encode_line;
use crate::event::{
    Batch, Catalog, Change, Checkpoint, ColumnType, Event, Op, Position, Row, Snapshot,
    Source as ChangeSource, SourceMeta, TableId, Value,
};

/// Changes one step of the virtual clock emits on average (an order, its lines, and
/// the status changes, payments and corrections that fall due), measured over 1M
/// events; used to tie the clock to the rate in live mode.
const LIVE_EVENTS_PER_STEP: f64 = 6.9;

/// erpgen's mean gap between loop iterations of the virtual clock.
pub const DEFAULT_MEAN_GAP_MS: f64 = 900.0;
/// Events per batch when running as fast as possible: large enough to amortize the
/// channel, small enough that a batch stays a few MB.
const MAX_BATCH: u64 = 4096;
/// How often a paced source hands over the events that have come due.
const TICK: Duration = Duration::from_millis(50);

const CHANNELS: [&str; 4] = ["store", "web", "phone", "partner"];
const CATEGORIES: [&str; 8] =
    ["electronics", "grocery", "home", "fashion", "toys", "sports", "beauty", "books"];
const METHODS: [&str; 4] = ["card", "cash", "transfer", "wallet"];
const REGIONS: [&str; 4] = ["norte", "sur", "centro", "oriente"];
const EMAIL_DOMAINS: [&str; 3] = ["correo.pe", "mail.co", "empresa.mx"];
const CITIES: [(&str, &str); 12] = [
    ("Lima", "PE"),
    ("Bogotá", "CO"),
    ("Ciudad de México", "MX"),
    ("Santiago", "CL"),
    ("Buenos Aires", "AR"),
    ("Quito", "EC"),
    ("Madrid", "ES"),
    ("Medellín", "CO"),
    ("Arequipa", "PE"),
    ("Guadalajara", "MX"),
    ("Montevideo", "UY"),
    ("Cusco", "PE"),
];
const FIRST: [&str; 16] = [
    "Ana",
    "Luis",
    "María",
    "José",
    "Lucía",
    "Carlos",
    "Sofía",
    "Jorge",
    "Valentina",
    "Diego",
    "Camila",
    "Andrés",
    "Isabel",
    "Mateo",
    "Paula",
    "Núñez",
];
const LAST: [&str; 14] = [
    "García",
    "Rodríguez",
    "Pérez",
    "Gómez",
    "Sánchez",
    "Díaz",
    "Torres",
    "Ramírez",
    "Flores",
    "Castro",
    "Vargas",
    "Rojas",
    "Ibáñez",
    "Muñoz",
];

// ---- table layouts -----------------------------------------------------------

/// The kind of value the simulator writes into a column, and the declared column
/// types that can carry it through the Debezium codec unchanged.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Int,
    Decimal,
    Str,
    Timestamp,
    Date,
}

impl Kind {
    fn accepts(self, ty: ColumnType) -> bool {
        match self {
            Kind::Int => ty == ColumnType::Int,
            Kind::Decimal => ty == ColumnType::Decimal,
            Kind::Str => ty == ColumnType::String,
            Kind::Timestamp => matches!(
                ty,
                ColumnType::TimestampMillis
                    | ColumnType::TimestampMicros
                    | ColumnType::TimestampZoned
            ),
            Kind::Date => ty == ColumnType::Date,
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Kind::Int => "\"int\"",
            Kind::Decimal => "\"decimal\"",
            Kind::Str => "\"string\"",
            Kind::Timestamp => "\"timestamp\", \"timestamp_us\" or \"timestamptz\"",
            Kind::Date => "\"date\"",
        }
    }
}

use Kind::{Date as D, Decimal as M, Int as I, Str as S, Timestamp as T};

const CUSTOMERS: [(&str, Kind); 8] = [
    ("id", I),
    ("name", S),
    ("email", S),
    ("phone", S),
    ("city", S),
    ("country", S),
    ("created_at", T),
    ("updated_at", T),
];
const PRODUCTS: [(&str, Kind); 7] = [
    ("id", I),
    ("sku", S),
    ("name", S),
    ("category", S),
    ("unit_price", M),
    ("active", I),
    ("updated_at", T),
];
const EMPLOYEES: [(&str, Kind); 6] =
    [("id", I), ("name", S), ("email", S), ("channel", S), ("region", S), ("hired_at", D)];
const ORDERS: [(&str, Kind); 9] = [
    ("id", I),
    ("customer_id", I),
    ("employee_id", I),
    ("channel", S),
    ("status", S),
    ("order_ts", T),
    ("currency", S),
    ("total", M),
    ("city", S),
];
const ORDER_ITEMS: [(&str, Kind); 6] = [
    ("id", I),
    ("order_id", I),
    ("product_id", I),
    ("quantity", I),
    ("unit_price", M),
    ("discount", M),
];
const PAYMENTS: [(&str, Kind); 6] =
    [("id", I), ("order_id", I), ("amount", M), ("method", S), ("status", S), ("paid_at", T)];

/// Where the simulator's fields (in the order of the constant lists above) sit in a
/// table as the pipeline declares it, so rows follow the catalog's column order.
#[derive(Debug, Clone)]
struct Layout<const N: usize> {
    table: TableId,
    width: usize,
    idx: [usize; N],
}

impl<const N: usize> Layout<N> {
    fn resolve(
        catalog: &Catalog,
        name: &str,
        fields: &[(&str, Kind); N],
    ) -> Result<Self, CaptureError> {
        let table = catalog.id(name).ok_or_else(|| CaptureError::Definite {
            message: format!(
                "the ERP simulator needs table `{name}`, which the pipeline does not declare"
            ),
            hint: Some(format!("declare [tables.{name}] as in config/examples/erp.toml")),
        })?;
        let schema = catalog.table(table);
        let mut idx = [0usize; N];
        for (slot, (col, kind)) in idx.iter_mut().zip(fields) {
            let Some(i) = schema.column_index(col) else {
                return Err(CaptureError::Definite {
                    message: format!(
                        "the ERP simulator writes column `{name}.{col}`, which the pipeline does not declare"
                    ),
                    hint: Some(format!(
                        "add `{col}` to [tables.{name}].columns, as in config/examples/erp.toml"
                    )),
                });
            };
            let ty = schema.columns[i].ty;
            if !kind.accepts(ty) {
                return Err(CaptureError::Definite {
                    message: format!(
                        "column `{name}.{col}` is declared \"{}\", but the ERP simulator writes {} values",
                        ty.name(),
                        kind.expected()
                    ),
                    hint: Some(format!("declare it as {}", kind.expected())),
                });
            }
            *slot = i;
        }
        // A key column the simulator leaves null would make every row undecodable.
        if let Some(&k) = schema.key.iter().find(|k| !idx.contains(k)) {
            return Err(CaptureError::Definite {
                message: format!(
                    "table `{name}` has key column `{}`, which the ERP simulator does not write",
                    schema.columns[k].name
                ),
                hint: Some("use key = [\"id\"]".to_owned()),
            });
        }
        Ok(Self { table, width: schema.columns.len(), idx })
    }

    /// A row in catalog order; declared columns the ERP does not have stay null,
    /// as they would from a real connector.
    fn row(&self, values: [Value; N]) -> Row {
        let mut row = vec![Value::Null; self.width];
        for (&i, v) in self.idx.iter().zip(values) {
            row[i] = v;
        }
        row.into_boxed_slice()
    }
}

#[derive(Debug, Clone)]
struct Layouts {
    customers: Layout<8>,
    products: Layout<7>,
    employees: Layout<6>,
    orders: Layout<9>,
    order_items: Layout<6>,
    payments: Layout<6>,
}

impl Layouts {
    fn resolve(catalog: &Catalog) -> Result<Self, CaptureError> {
        Ok(Self {
            customers: Layout::resolve(catalog, "customers", &CUSTOMERS)?,
            products: Layout::resolve(catalog, "products", &PRODUCTS)?,
            employees: Layout::resolve(catalog, "employees", &EMPLOYEES)?,
            orders: Layout::resolve(catalog, "orders", &ORDERS)?,
            order_items: Layout::resolve(catalog, "order_items", &ORDER_ITEMS)?,
            payments: Layout::resolve(catalog, "payments", &PAYMENTS)?,
        })
    }
}

// ---- entity state --------------------------------------------------------------

struct Customer {
    name: Box<str>,
    email: Box<str>,
    phone: Box<str>,
    city: Option<&'static str>,
    country: &'static str,
    created_at: i64,
    updated_at: i64,
}

struct Product {
    category: &'static str,
    unit_price: Decimal,
    updated_at: i64,
}

struct Employee {
    name: Box<str>,
    channel: &'static str,
    region: &'static str,
    hired_at: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pending,
    Paid,
    Shipped,
    Cancelled,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Paid => "paid",
            Status::Shipped => "shipped",
            Status::Cancelled => "cancelled",
        }
    }
}

struct Order {
    id: i64,
    customer_id: i64,
    employee_id: i64,
    channel: &'static str,
    status: Status,
    order_ts: i64,
    total: Decimal,
    city: Option<&'static str>,
}

struct Item {
    id: i64,
    order_id: i64,
    product_id: i64,
    quantity: i64,
    unit_price: Decimal,
    discount: Option<Decimal>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum FollowUp {
    Status,
    Quantity,
    Delete,
}

/// A change scheduled for re-delivery once `due` events have been written.
struct Redelivery {
    due: u64,
    seq: u64,
    change: Change,
}

// Ordered by (due, seq) only, as erpgen's heap of (due, seq, line): the payload
// never takes part in the order.
impl PartialEq for Redelivery {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}

impl Eq for Redelivery {}

impl PartialOrd for Redelivery {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Redelivery {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

fn ts(ms: i64) -> Value {
    Value::Timestamp(ms.saturating_mul(1000))
}

fn text(s: &str) -> Value {
    Value::Str(s.into())
}

fn opt_text(s: Option<&str>) -> Value {
    s.map_or(Value::Null, text)
}

/// erpgen's `money`: round half up (away from zero) to cents, always two decimals.
fn money(d: Decimal) -> Decimal {
    let mut r = d.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
    r.rescale(2);
    r
}

fn cents(c: i64) -> Decimal {
    Decimal::new(c, 2)
}

fn pick<T: Copy, const N: usize>(rng: &mut Pcg64, items: &[T; N]) -> T {
    items[rng.gen_range(0..N)]
}

fn title(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map_or_else(String::new, |c| c.to_uppercase().chain(chars).collect())
}

fn messy_email(rng: &mut Pcg64, name: &str, id: i64) -> String {
    let first = name.split(' ').next().unwrap_or(name).to_lowercase();
    let base = format!("{first}.{id}@{}", pick(rng, &EMAIL_DOMAINS));
    let r: f64 = rng.gen();
    if r < 0.02 {
        base.replace('@', "@@") // invalid
    } else if r < 0.12 {
        format!("  {} ", base.to_uppercase()) // needs trim + lowercase
    } else {
        base
    }
}

fn messy_phone(rng: &mut Pcg64) -> String {
    let d: String = (0..9).map(|_| char::from(b'0' + rng.gen_range(0..10u8))).collect();
    match rng.gen_range(0..3) {
        0 => format!("+51 {} {} {}", &d[..3], &d[3..6], &d[6..]),
        1 => format!("(01) {}-{}", &d[..3], &d[3..7]),
        _ => d,
    }
}

fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

// ---- the generator ---------------------------------------------------------------

/// Deterministic generator of the ERP change stream (see the module docs).
pub struct ErpGenerator {
    rng: Pcg64,
    layouts: Layouts,
    meta: Arc<SourceMeta>,
    file: Arc<str>,
    limit: Option<u64>,
    dup_rate: f64,
    mean_gap_ms: f64,
    /// The virtual clock, epoch ms.
    now: i64,
    /// Binlog offset of the last new event.
    pos: u64,
    /// Events produced into `ready` so far (the origin of the last one).
    written: u64,
    /// Events handed out by `next_change`.
    emitted: u64,
    ready: VecDeque<Change>,
    redeliver: BinaryHeap<Reverse<Redelivery>>,
    redeliver_seq: u64,
    /// Index of the next snapshot row over customers, products, employees.
    snapshot_next: usize,
    customers: Vec<Customer>,
    products: Vec<Product>,
    employees: Vec<Employee>,
    /// Orders that can still change (pending or paid); shipped and cancelled ones
    /// never change again, so they are dropped to keep a long run's memory bounded.
    orders: HashMap<i64, Order>,
    /// Only the order lines that have a correction or delete scheduled: no other
    /// line is ever touched again.
    items: HashMap<i64, Item>,
    followups: BinaryHeap<Reverse<(i64, u64, FollowUp, i64)>>,
    followup_seq: u64,
    next_order: i64,
    next_item: i64,
    next_pay: i64,
}

impl ErpGenerator {
    /// A generator whose virtual clock starts at `start_ms` (epoch ms).
    ///
    /// # Errors
    /// [`CaptureError::Definite`] when the catalog lacks one of the six ERP tables
    /// or a column the simulator writes (or declares it with an incompatible type),
    /// or when the spec asks for no customers, products or employees.
    pub fn new(
        spec: &SimulateSpec,
        catalog: Arc<Catalog>,
        start_ms: i64,
    ) -> Result<Self, CaptureError> {
        let layouts = Layouts::resolve(&catalog)?;
        for (what, n) in [
            ("customers", spec.customers),
            ("products", spec.products),
            ("employees", spec.employees),
        ] {
            if n == 0 {
                return Err(CaptureError::Definite {
                    message: format!("the ERP simulator needs at least one of {what}"),
                    hint: Some(format!("set source.{what} to a positive number")),
                });
            }
        }
        if !(0.0..1.0).contains(&spec.dup_rate) {
            return Err(CaptureError::Definite {
                message: format!("simulator dup_rate {} is not in [0, 1)", spec.dup_rate),
                hint: Some("e.g. dup_rate = 0.01".to_owned()),
            });
        }
        let mut rng = Pcg64::seed_from_u64(spec.seed);
        let now = start_ms;

        let customers = (1..=i64::from(spec.customers))
            .map(|id| {
                let name = format!("{} {}", pick(&mut rng, &FIRST), pick(&mut rng, &LAST));
                let (city, country) = pick(&mut rng, &CITIES);
                let email = messy_email(&mut rng, &name, id);
                let phone = messy_phone(&mut rng);
                let city = if rng.gen::<f64>() < 0.03 { None } else { Some(city) };
                let created_at = now - rng.gen_range(0..=400i64) * 86_400_000;
                Customer {
                    name: name.into(),
                    email: email.into(),
                    phone: phone.into(),
                    city,
                    country,
                    created_at,
                    updated_at: now,
                }
            })
            .collect();
        let products = (1..=spec.products)
            .map(|_| Product {
                category: pick(&mut rng, &CATEGORIES),
                unit_price: cents(rng.gen_range(150..=90_000)),
                updated_at: now,
            })
            .collect();
        let employees = (1..=spec.employees as usize)
            .map(|id| Employee {
                name: format!("{} {}", pick(&mut rng, &FIRST), pick(&mut rng, &LAST)).into(),
                channel: CHANNELS[id % CHANNELS.len()],
                region: pick(&mut rng, &REGIONS),
                hired_at: 19_000 + rng.gen_range(0..=1500),
            })
            .collect();

        Ok(Self {
            rng,
            layouts,
            meta: Arc::new(SourceMeta {
                server: "erp".into(),
                db: "erp_db".into(),
                server_id: 1,
                connector: "mysql".into(),
                version: "2.7.0.Final".into(),
            }),
            file: Arc::from("mysql-bin.000001"),
            limit: spec.events,
            dup_rate: spec.dup_rate,
            mean_gap_ms: DEFAULT_MEAN_GAP_MS,
            now,
            pos: 4,
            written: 0,
            emitted: 0,
            ready: VecDeque::new(),
            redeliver: BinaryHeap::new(),
            redeliver_seq: 0,
            snapshot_next: 0,
            customers,
            products,
            employees,
            orders: HashMap::new(),
            items: HashMap::new(),
            followups: BinaryHeap::new(),
            followup_seq: 0,
            next_order: 1,
            next_item: 1,
            next_pay: 1,
        })
    }

    /// Changes the mean gap of the virtual clock between loop iterations (each
    /// iteration is a new order with its lines, or a dimension change). Part of the
    /// determinism contract: the same gap gives the same stream. Ignored unless
    /// finite and positive.
    #[must_use]
    pub fn with_mean_gap_ms(mut self, ms: f64) -> Self {
        if ms.is_finite() && ms > 0.0 {
            self.mean_gap_ms = ms;
        }
        self
    }

    /// The next change, or `None` once `spec.events` changes have been emitted
    /// (duplicates included). Pending re-deliveries are not flushed at the end.
    pub fn next_change(&mut self) -> Option<Change> {
        if self.limit.is_some_and(|n| self.emitted >= n) {
            return None;
        }
        // Every step writes at least one event, so this terminates.
        while self.ready.is_empty() {
            self.step();
        }
        let change = self.ready.pop_front()?;
        self.emitted += 1;
        Some(change)
    }

    /// Generates and discards up to `n` changes (resume by fast-forward); returns
    /// how many there were.
    pub fn skip(&mut self, n: u64) -> u64 {
        let mut skipped = 0;
        while skipped < n && self.next_change().is_some() {
            skipped += 1;
        }
        skipped
    }

    /// Snapshot reads still to come before the stream of changes starts.
    pub fn snapshot_remaining(&self) -> u64 {
        (self.total_snapshot() - self.snapshot_next) as u64
    }

    /// Changes emitted so far, duplicates included.
    pub fn emitted(&self) -> u64 {
        self.emitted
    }

    /// Virtual time (epoch ms) of the last event generated; the start time before any.
    pub fn now_ms(&self) -> i64 {
        self.now
    }

    fn total_snapshot(&self) -> usize {
        self.customers.len() + self.products.len() + self.employees.len()
    }

    fn step(&mut self) {
        if self.snapshot_next < self.total_snapshot() {
            self.snapshot_step();
        } else {
            self.stream_step();
        }
    }

    /// Writes one change at the current virtual time, then any re-deliveries that
    /// have come due, exactly as erpgen's `Binlog.emit`.
    fn emit(
        &mut self,
        table: TableId,
        op: Op,
        before: Option<Row>,
        after: Option<Row>,
        snapshot: Snapshot,
    ) {
        self.pos += self.rng.gen_range(180..=420u64);
        self.written += 1;
        let change = Change {
            table,
            op,
            before,
            after,
            extra: None,
            source: ChangeSource {
                meta: self.meta.clone(),
                position: Some(Position::Binlog { file: self.file.clone(), pos: self.pos, row: 0 }),
                gtid: None,
                snapshot,
                ts_ms: self.now,
                partition: None,
            },
            ts_ms: self.now + self.rng.gen_range(1..=40i64),
            origin: self.written,
            raw: None,
        };
        // Snapshot reads are never re-delivered, as in erpgen.
        if snapshot == Snapshot::False && self.rng.gen::<f64>() < self.dup_rate {
            self.redeliver_seq += 1;
            let due = self.written + self.rng.gen_range(1..=500u64);
            self.redeliver.push(Reverse(Redelivery {
                due,
                seq: self.redeliver_seq,
                change: change.clone(),
            }));
        }
        self.ready.push_back(change);
        while self.redeliver.peek().is_some_and(|Reverse(r)| r.due <= self.written) {
            if let Some(Reverse(r)) = self.redeliver.pop() {
                self.written += 1;
                let mut dup = r.change;
                dup.origin = self.written;
                self.ready.push_back(dup);
            }
        }
    }

    fn insert(&mut self, table: TableId, row: Row) {
        self.emit(table, Op::Insert, None, Some(row), Snapshot::False);
    }

    fn update(&mut self, table: TableId, before: Option<Row>, after: Option<Row>) {
        self.emit(table, Op::Update, before, after, Snapshot::False);
    }

    fn delete(&mut self, table: TableId, row: Row) {
        self.emit(table, Op::Delete, Some(row), None, Snapshot::False);
    }

    fn later(&mut self, delay_ms: i64, kind: FollowUp, id: i64) {
        self.followup_seq += 1;
        self.followups.push(Reverse((self.now + delay_ms, self.followup_seq, kind, id)));
    }

    fn customer_row(&self, id: i64) -> Option<Row> {
        let c = self.customers.get(usize::try_from(id - 1).ok()?)?;
        Some(self.layouts.customers.row([
            Value::Int(id),
            text(&c.name),
            text(&c.email),
            text(&c.phone),
            opt_text(c.city),
            text(c.country),
            ts(c.created_at),
            ts(c.updated_at),
        ]))
    }

    fn product_row(&self, id: i64) -> Option<Row> {
        let p = self.products.get(usize::try_from(id - 1).ok()?)?;
        Some(self.layouts.products.row([
            Value::Int(id),
            Value::Str(format!("SKU-{id:05}").into()),
            Value::Str(format!("{} item {id}", title(p.category)).into()),
            text(p.category),
            Value::Decimal(p.unit_price),
            Value::Int(1),
            ts(p.updated_at),
        ]))
    }

    fn employee_row(&self, id: i64) -> Option<Row> {
        let e = self.employees.get(usize::try_from(id - 1).ok()?)?;
        Some(self.layouts.employees.row([
            Value::Int(id),
            text(&e.name),
            Value::Str(format!("emp{id}@erp.example").into()),
            text(e.channel),
            text(e.region),
            Value::Date(e.hired_at),
        ]))
    }

    fn order_row(&self, o: &Order) -> Row {
        self.layouts.orders.row([
            Value::Int(o.id),
            Value::Int(o.customer_id),
            Value::Int(o.employee_id),
            text(o.channel),
            text(o.status.name()),
            ts(o.order_ts),
            text("PEN"),
            Value::Decimal(o.total),
            opt_text(o.city),
        ])
    }

    fn item_row(&self, it: &Item) -> Row {
        self.layouts.order_items.row([
            Value::Int(it.id),
            Value::Int(it.order_id),
            Value::Int(it.product_id),
            Value::Int(it.quantity),
            Value::Decimal(it.unit_price),
            it.discount.map_or(Value::Null, Value::Decimal),
        ])
    }

    fn snapshot_step(&mut self) {
        let i = self.snapshot_next;
        self.snapshot_next += 1;
        let snapshot = if self.snapshot_next == self.total_snapshot() {
            Snapshot::Last
        } else {
            Snapshot::True
        };
        let (nc, np) = (self.customers.len(), self.products.len());
        let (table, row) = if i < nc {
            (self.layouts.customers.table, self.customer_row(i as i64 + 1))
        } else if i < nc + np {
            (self.layouts.products.table, self.product_row((i - nc) as i64 + 1))
        } else {
            (self.layouts.employees.table, self.employee_row((i - nc - np) as i64 + 1))
        };
        self.emit(table, Op::Read, None, row, snapshot);
    }

    /// One iteration of erpgen's streaming loop.
    fn stream_step(&mut self) {
        // Inverse-CDF exponential; 1 - u is in (0, 1], so the log is finite.
        let u: f64 = self.rng.gen();
        self.now += (-(1.0 - u).ln() * self.mean_gap_ms) as i64 + 1;
        while self.followups.peek().is_some_and(|Reverse(f)| f.0 <= self.now) {
            if let Some(Reverse((_, _, kind, id))) = self.followups.pop() {
                self.follow_up(kind, id);
            }
        }

        let r: f64 = self.rng.gen();
        if r < 0.004 {
            self.price_change();
        } else if r < 0.008 {
            self.phone_change();
        } else {
            self.new_order();
        }
    }

    fn follow_up(&mut self, kind: FollowUp, id: i64) {
        match kind {
            FollowUp::Status => {
                let Some(mut o) = self.orders.remove(&id) else { return };
                let before = self.order_row(&o);
                if self.rng.gen::<f64>() < 0.05 {
                    o.status = Status::Cancelled;
                } else if o.status == Status::Pending {
                    o.status = Status::Paid;
                    let after = self.order_row(&o);
                    self.update(self.layouts.orders.table, Some(before), Some(after));
                    let method = pick(&mut self.rng, &METHODS);
                    let pay = self.layouts.payments.row([
                        Value::Int(self.next_pay),
                        Value::Int(id),
                        Value::Decimal(o.total),
                        text(method),
                        text("ok"),
                        ts(self.now),
                    ]);
                    self.insert(self.layouts.payments.table, pay);
                    self.next_pay += 1;
                    let delay = self.rng.gen_range(60_000..=6 * 3_600_000);
                    self.later(delay, FollowUp::Status, id);
                    self.orders.insert(id, o);
                    return;
                } else {
                    o.status = Status::Shipped;
                }
                // Shipped or cancelled: final, so the order is not kept.
                let after = self.order_row(&o);
                self.update(self.layouts.orders.table, Some(before), Some(after));
            }
            FollowUp::Quantity => {
                // Each line gets at most one follow-up, so it is not needed after it.
                let Some(mut it) = self.items.remove(&id) else { return };
                let before = self.item_row(&it);
                it.quantity = (it.quantity + pick(&mut self.rng, &[-1i64, 1, 2])).max(1);
                let after = self.item_row(&it);
                self.update(self.layouts.order_items.table, Some(before), Some(after));
            }
            FollowUp::Delete => {
                let Some(it) = self.items.remove(&id) else { return };
                let before = self.item_row(&it);
                self.delete(self.layouts.order_items.table, before);
            }
        }
    }

    /// A product's price changes; its category never does.
    fn price_change(&mut self) {
        let i = self.rng.gen_range(0..self.products.len());
        let factor =
            pick(&mut self.rng, &[Decimal::new(9, 1), Decimal::new(105, 2), Decimal::new(11, 1)]);
        let id = i as i64 + 1;
        let before = self.product_row(id);
        let now = self.now;
        if let Some(p) = self.products.get_mut(i) {
            p.unit_price = money(p.unit_price * factor);
            p.updated_at = now;
        }
        let after = self.product_row(id);
        self.update(self.layouts.products.table, before, after);
    }

    fn phone_change(&mut self) {
        let i = self.rng.gen_range(0..self.customers.len());
        let id = i as i64 + 1;
        let before = self.customer_row(id);
        let phone = messy_phone(&mut self.rng);
        let now = self.now;
        if let Some(c) = self.customers.get_mut(i) {
            c.phone = phone.into();
            c.updated_at = now;
        }
        let after = self.customer_row(id);
        self.update(self.layouts.customers.table, before, after);
    }

    /// A new order with its lines, in one transaction.
    fn new_order(&mut self) {
        let ci = self.rng.gen_range(0..self.customers.len());
        let ei = self.rng.gen_range(0..self.employees.len());
        let oid = self.next_order;
        self.next_order += 1;
        // Event time may be late by up to 2 minutes.
        let order_ts = self.now - self.rng.gen_range(0..=120_000i64);
        let n_lines = self.rng.gen_range(1..=5);
        let mut lines = Vec::with_capacity(n_lines);
        for _ in 0..n_lines {
            let (product_id, mut unit_price) = if self.rng.gen::<f64>() < 0.002 {
                // A dangling foreign key: the product does not exist.
                (900_000 + self.rng.gen_range(1..=99i64), cents(self.rng.gen_range(100..=5000)))
            } else {
                let pi = self.rng.gen_range(0..self.products.len());
                (pi as i64 + 1, self.products[pi].unit_price)
            };
            let mut quantity = self.rng.gen_range(1..=6i64);
            let x: f64 = self.rng.gen();
            if x < 0.003 {
                quantity = pick(&mut self.rng, &[0, -1, -3]);
            } else if x < 0.005 {
                quantity = self.rng.gen_range(500..=5000);
            }
            if self.rng.gen::<f64>() < 0.001 {
                unit_price = -unit_price;
            }
            let discount = if self.rng.gen::<f64>() < 0.05 {
                None
            } else {
                Some(Decimal::new(pick(&mut self.rng, &[0, 0, 500, 1000, 1500]), 4))
            };
            lines.push(Item {
                id: self.next_item,
                order_id: oid,
                product_id,
                quantity,
                unit_price,
                discount,
            });
            self.next_item += 1;
        }
        let total = money(lines.iter().map(|l| l.unit_price * Decimal::from(l.quantity)).sum());
        let customer = &self.customers[ci];
        let order = Order {
            id: oid,
            customer_id: ci as i64 + 1,
            employee_id: ei as i64 + 1,
            channel: self.employees[ei].channel,
            status: Status::Pending,
            order_ts,
            total,
            city: customer.city,
        };
        let row = self.order_row(&order);
        self.orders.insert(oid, order);
        self.insert(self.layouts.orders.table, row);
        for line in lines {
            let row = self.item_row(&line);
            self.insert(self.layouts.order_items.table, row);
            let y: f64 = self.rng.gen();
            let kind = if y < 0.03 {
                FollowUp::Quantity
            } else if y < 0.04 {
                FollowUp::Delete
            } else {
                continue;
            };
            let delay = self.rng.gen_range(1000..=3_600_000);
            self.later(delay, kind, line.id);
            self.items.insert(line.id, line);
        }
        let delay = self.rng.gen_range(1000..=1_800_000);
        self.later(delay, FollowUp::Status, oid);
    }
}

// ---- the source ------------------------------------------------------------------

/// The simulator's resume token: how many changes were emitted, and the virtual
/// start time, which together re-create the stream exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct ResumeToken {
    emitted: u64,
    start_ms: i64,
    /// The virtual clock's mean gap in µs, when it was tied to the rate (live mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gap_us: Option<u64>,
}

impl ResumeToken {
    fn parse(cp: &Checkpoint) -> Result<Option<Self>, CaptureError> {
        super::parse_checkpoint(cp, "simulator position")
    }

    fn checkpoint(self) -> Checkpoint {
        Checkpoint(serde_json::to_string(&self).unwrap_or_default())
    }
}

/// Events per second over time, with optional bursts, as a cumulative schedule so
/// that pacing never drifts however late the ticks are.
#[derive(Debug, Clone, Copy)]
struct Pace {
    rate: f64,
    burst: Option<Burst>,
}

impl Pace {
    /// Events due in the first `elapsed` of the run.
    fn due(&self, elapsed: Duration) -> u64 {
        let t = elapsed.as_secs_f64();
        let normal_secs = match self.burst {
            Some(b) if b.every > Duration::ZERO => {
                let every = b.every.as_secs_f64();
                let length = b.length.as_secs_f64().min(every);
                let factor = b.factor.max(0.0);
                let periods = (t / every).floor();
                let within = t - periods * every;
                let per_period = length * factor + (every - length);
                periods * per_period + within.min(length) * factor + (within - length).max(0.0)
            }
            _ => t,
        };
        // Float to int casts saturate (NaN gives 0), which is what a bad rate deserves.
        (self.rate * normal_secs).floor() as u64
    }
}

/// A [`Source`] running the ERP simulator, paced on the wall clock: the initial
/// snapshot as fast as the bus takes it, then `rate` changes per second (times the
/// burst factor during bursts), handed over about every 50 ms. Its checkpoint is
/// `{"emitted": N, "start_ms": S}`; resuming re-creates the generator and skips N.
pub struct SimulatorSource {
    spec: SimulateSpec,
    catalog: Arc<Catalog>,
}

impl SimulatorSource {
    pub fn new(spec: SimulateSpec, catalog: Arc<Catalog>) -> Self {
        Self { spec, catalog }
    }
}

/// Up to `n` changes from the generator; `true` when the generator has ended.
fn fill(gen: &mut ErpGenerator, n: u64) -> (Vec<Event>, bool) {
    let mut events = Vec::with_capacity(n.min(MAX_BATCH) as usize);
    for _ in 0..n {
        match gen.next_change() {
            Some(c) => events.push(Event::Change(c)),
            None => return (events, true),
        }
    }
    (events, false)
}

use super::send;

/// Generates up to `n` changes and sends them as one batch with the checkpoint
/// after them; `Ok(false)` means stop (the generator ended, or shutdown).
async fn deliver(
    gen: &mut ErpGenerator,
    n: u64,
    start_ms: i64,
    gap_us: Option<u64>,
    out: &bus::Sender,
    shutdown: &CancellationToken,
) -> Result<bool, CaptureError> {
    let (events, done) = fill(gen, n);
    if !events.is_empty() {
        let checkpoint = ResumeToken { emitted: gen.emitted(), start_ms, gap_us }.checkpoint();
        if !send(out, shutdown, Batch { events, checkpoint, bytes: None, caught_up_ms: None })
            .await?
        {
            return Ok(false);
        }
    }
    Ok(!done)
}

#[async_trait]
impl Source for SimulatorSource {
    fn kind(&self) -> &'static str {
        "simulate"
    }

    async fn run(
        self: Box<Self>,
        resume: Option<Checkpoint>,
        out: bus::Sender,
        shutdown: CancellationToken,
    ) -> Result<(), CaptureError> {
        let token = match &resume {
            Some(cp) => ResumeToken::parse(cp)?,
            None => None,
        };
        let start_ms =
            token.map(|t| t.start_ms).or(self.spec.start_ms).unwrap_or_else(wall_clock_ms);
        let skip = token.map_or(0, |t| t.emitted);
        // Live mode (event time from the wall clock, paced): tie the virtual clock to
        // the rate so event time keeps up with the wall clock instead of running
        // erpgen's 900 ms per step, ~26x faster than real time at 200/s. Saved in the
        // token so that a resumed stream is the same stream.
        let gap_us = match token {
            Some(t) => t.gap_us,
            None => match (self.spec.start_ms, self.spec.rate) {
                (None, Some(rate)) if rate > 0.0 => {
                    Some((LIVE_EVENTS_PER_STEP * 1_000_000.0 / rate).round().max(1.0) as u64)
                }
                _ => None,
            },
        };
        let (spec, catalog) = (self.spec.clone(), self.catalog.clone());
        // Fast-forwarding millions of events is CPU work: keep it off the async threads.
        let mut gen = tokio::task::spawn_blocking(move || {
            let mut gen = ErpGenerator::new(&spec, catalog, start_ms)?;
            if let Some(us) = gap_us {
                gen = gen.with_mean_gap_ms(us as f64 / 1000.0);
            }
            gen.skip(skip);
            Ok::<_, CaptureError>(gen)
        })
        .await
        .map_err(|e| CaptureError::Definite {
            message: format!("the simulator failed while starting: {e}"),
            hint: None,
        })??;
        // The initial snapshot goes out as fast as the consumer takes it, as a
        // connector reads tables; `rate` paces the live database's changes after it
        // (at 200/s the 6,060 default snapshot rows would otherwise take 30 s).
        loop {
            let n = match self.spec.rate {
                None => MAX_BATCH,
                Some(_) => gen.snapshot_remaining().min(MAX_BATCH),
            };
            if n == 0 {
                break;
            }
            if shutdown.is_cancelled()
                || !deliver(&mut gen, n, start_ms, gap_us, &out, &shutdown).await?
            {
                return Ok(());
            }
            // Let other tasks (and the shutdown signal) in between batches.
            tokio::task::yield_now().await;
        }
        let Some(rate) = self.spec.rate else { return Ok(()) };

        let pace = Pace { rate, burst: self.spec.burst };
        let started = Instant::now();
        let base = gen.emitted();
        let mut tick = tokio::time::interval(TICK);
        // After a stall, the schedule (not the ticks) catches up.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let mut due = pace.due(started.elapsed()).saturating_sub(gen.emitted() - base);
            // A backlog (after backpressure) goes out in bounded batches, as fast as
            // the consumer takes them, like a CDC reader catching up on a log.
            while due > 0 {
                let n = due.min(MAX_BATCH);
                due -= n;
                if !deliver(&mut gen, n, start_ms, gap_us, &out, &shutdown).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// Writes `spec.events` generated changes as workload JSON lines (the format of
/// erpgen.py), one [`encode_line`] per line; returns how many.
///
/// # Errors
/// `InvalidInput` when `spec.events` is unset or the catalog does not fit the
/// simulator; otherwise the writer's errors.
pub fn write_jsonl(
    spec: &SimulateSpec,
    catalog: Arc<Catalog>,
    start_ms: i64,
    out: &mut impl Write,
) -> io::Result<u64> {
    if spec.events.is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "writing a simulated stream needs a number of events (--events N)",
        ));
    }
    let mut gen = ErpGenerator::new(spec, catalog.clone(), start_ms)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut w = io::BufWriter::with_capacity(1 << 16, out);
    while let Some(change) = gen.next_change() {
        w.write_all(encode_line(&catalog, &change).as_bytes())?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(gen.emitted())
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::path::Path;

    use super::*;
    use crate::event::debezium::Decoder;

    /// erpgen's START_MS: 2026-01-05T08:00:00Z.
    const START: i64 = 1_767_600_000_000;

    fn catalog() -> Arc<Catalog> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/erp.toml");
        crate::config::load(&path).expect("the shipped ERP pipeline loads").catalog
    }

    fn spec(seed: u64, events: u64) -> SimulateSpec {
        SimulateSpec { seed, events: Some(events), rate: None, ..SimulateSpec::default() }
    }

    fn generate(spec: &SimulateSpec, catalog: &Arc<Catalog>) -> Vec<Change> {
        let mut gen = ErpGenerator::new(spec, catalog.clone(), START).expect("generator");
        std::iter::from_fn(|| gen.next_change()).collect()
    }

    fn lines(catalog: &Catalog, changes: &[Change]) -> Vec<String> {
        changes.iter().map(|c| encode_line(catalog, c)).collect()
    }

    fn binlog_pos(c: &Change) -> u64 {
        match &c.source.position {
            Some(Position::Binlog { pos, .. }) => *pos,
            other => panic!("not a binlog position: {other:?}"),
        }
    }

    fn col<'a>(catalog: &Catalog, c: &'a Change, name: &str) -> &'a Value {
        let i = catalog.table(c.table).column_index(name).expect("column");
        &c.image().expect("image")[i]
    }

    fn table_name<'a>(catalog: &'a Catalog, c: &Change) -> &'a str {
        &catalog.table(c.table).name
    }

    #[test]
    fn same_seed_same_stream_different_seed_different_stream() {
        let catalog = catalog();
        let a = lines(&catalog, &generate(&spec(11, 8000), &catalog));
        let b = lines(&catalog, &generate(&spec(11, 8000), &catalog));
        let c = lines(&catalog, &generate(&spec(12, 8000), &catalog));
        assert_eq!(a.len(), 8000);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // `events` only truncates: a shorter stream is a prefix of a longer one.
        let short = lines(&catalog, &generate(&spec(11, 5000), &catalog));
        assert_eq!(short[..], a[..5000]);
    }

    #[test]
    fn positions_increase_and_duplicates_repeat_an_earlier_change_exactly() {
        let catalog = catalog();
        let s = spec(3, 20_000);
        let changes = generate(&s, &catalog);
        let n_snapshot = (s.customers + s.products + s.employees) as usize;
        let mut seen: HashMap<u64, (u64, String)> = HashMap::new();
        let mut last = 0u64;
        let mut dups = 0;
        let mut max_distance = 0;
        for (i, c) in changes.iter().enumerate() {
            assert_eq!(c.origin, i as u64 + 1, "origins number the emitted events");
            let pos = binlog_pos(c);
            let line = encode_line(&catalog, c);
            if pos > last {
                last = pos;
                seen.insert(pos, (c.origin, line));
            } else {
                let (first, original) = seen.get(&pos).expect("a repeated position was seen");
                assert_eq!(&line, original, "a re-delivery is the same change");
                max_distance = max_distance.max(c.origin - first);
                dups += 1;
            }
            // The snapshot comes first, `last` on its final row, and is never repeated.
            let expected = match i.cmp(&(n_snapshot - 1)) {
                Ordering::Less => Snapshot::True,
                Ordering::Equal => Snapshot::Last,
                Ordering::Greater => Snapshot::False,
            };
            assert_eq!(c.source.snapshot, expected, "event {}", i + 1);
            assert_eq!(c.op == Op::Read, i < n_snapshot);
        }
        let streamed = (changes.len() - n_snapshot) as f64;
        assert!(dups > 0 && (dups as f64) < streamed * 0.03, "{dups} duplicates");
        assert!(max_distance <= 500 + 10, "re-delivered {max_distance} events later");
    }

    #[test]
    fn the_stream_has_every_kind_of_change_and_dirt() {
        let catalog = catalog();
        let changes = generate(&spec(7, 20_000), &catalog);
        let mut ops = HashSet::new();
        let mut count = HashMap::<&str, usize>::new();
        let mut bump = |k| *count.entry(k).or_default() += 1;
        for c in &changes {
            ops.insert(c.op.code());
            match (table_name(&catalog, c), c.op) {
                ("order_items", Op::Insert) => {
                    bump("lines");
                    if col(&catalog, c, "discount").is_null() {
                        bump("null_discount");
                    }
                    match col(&catalog, c, "quantity") {
                        Value::Int(q) if *q <= 0 => bump("qty_le_0"),
                        Value::Int(q) if *q > 100 => bump("qty_gt_100"),
                        Value::Int(_) => {}
                        other => panic!("quantity {other:?}"),
                    }
                    match col(&catalog, c, "unit_price") {
                        Value::Decimal(d) => {
                            assert_eq!(d.scale(), 2);
                            if d.is_sign_negative() {
                                bump("negative_price");
                            }
                        }
                        other => panic!("unit_price {other:?}"),
                    }
                    if let Value::Int(p) = col(&catalog, c, "product_id") {
                        if *p >= 900_000 {
                            bump("unknown_product");
                        }
                    }
                    if let Value::Decimal(d) = col(&catalog, c, "discount") {
                        assert_eq!(d.scale(), 4);
                    }
                }
                ("order_items", Op::Update) => bump("qty_fix"),
                ("order_items", Op::Delete) => bump("line_delete"),
                ("orders", Op::Insert) => {
                    let (Value::Timestamp(ts), Value::Str(status)) =
                        (col(&catalog, c, "order_ts"), col(&catalog, c, "status"))
                    else {
                        panic!("order columns")
                    };
                    assert_eq!(&**status, "pending");
                    let lateness = c.source.ts_ms * 1000 - ts;
                    assert!((0..=120_000_000).contains(&lateness), "late by {lateness} us");
                    if lateness > 60_000_000 {
                        bump("late_order");
                    }
                }
                ("orders", Op::Update) => {
                    if let Value::Str(s) = col(&catalog, c, "status") {
                        bump(match &**s {
                            "paid" => "paid",
                            "shipped" => "shipped",
                            "cancelled" => "cancelled",
                            other => panic!("status {other}"),
                        });
                    }
                }
                ("payments", Op::Insert) => bump("payment"),
                ("products", Op::Update) => {
                    let (Some(b), Some(a)) = (&c.before, &c.after) else { panic!("images") };
                    let cat = catalog.table(c.table).column_index("category").expect("category");
                    assert_eq!(b[cat], a[cat], "categories never change");
                    bump("price_change");
                }
                ("customers", Op::Update) => bump("phone_change"),
                ("customers", Op::Read) => {
                    if col(&catalog, c, "city").is_null() {
                        bump("no_city");
                    }
                    if let Value::Str(e) = col(&catalog, c, "email") {
                        if e.contains("@@") {
                            bump("invalid_email");
                        }
                        if e.starts_with(' ') && e.chars().any(|ch| ch.is_uppercase()) {
                            bump("shouting_email");
                        }
                    }
                    if let Value::Str(p) = col(&catalog, c, "phone") {
                        bump(if p.starts_with("+51") {
                            "phone_intl"
                        } else if p.starts_with('(') {
                            "phone_local"
                        } else {
                            "phone_digits"
                        });
                    }
                }
                _ => {}
            }
        }
        assert_eq!(ops, HashSet::from(["r", "c", "u", "d"]));
        for kind in [
            "null_discount",
            "qty_le_0",
            "qty_gt_100",
            "negative_price",
            "unknown_product",
            "qty_fix",
            "line_delete",
            "late_order",
            "paid",
            "shipped",
            "cancelled",
            "payment",
            "price_change",
            "phone_change",
            "no_city",
            "invalid_email",
            "shouting_email",
            "phone_intl",
            "phone_local",
            "phone_digits",
        ] {
            assert!(count.get(kind).copied().unwrap_or(0) > 0, "no {kind} in {count:?}");
        }
        // About 5% of lines have no discount.
        let share = count["null_discount"] as f64 / count["lines"] as f64;
        assert!((0.03..0.07).contains(&share), "null discount share {share}");
    }

    #[test]
    fn fast_forward_resumes_with_the_same_continuation() {
        let catalog = catalog();
        let s = spec(5, 9000);
        let all = generate(&s, &catalog);
        let mut gen = ErpGenerator::new(&s, catalog.clone(), START).expect("generator");
        assert_eq!(gen.skip(7777), 7777);
        assert_eq!(gen.emitted(), 7777);
        let rest: Vec<Change> = std::iter::from_fn(|| gen.next_change()).collect();
        assert_eq!(lines(&catalog, &rest), lines(&catalog, &all[7777..]));
        assert_eq!(rest.first().map(|c| c.origin), Some(7778));
        assert_eq!(gen.emitted(), 9000);
        assert!(gen.now_ms() > START);
    }

    #[test]
    fn a_catalog_without_an_erp_table_or_column_is_refused_by_name() {
        let catalog = catalog();
        let s = spec(1, 10);
        let without_payments: Vec<_> =
            catalog.tables().iter().filter(|t| &*t.name != "payments").cloned().collect();
        let err = ErpGenerator::new(&s, Arc::new(Catalog::new(without_payments)), START)
            .err()
            .expect("refused");
        assert!(
            matches!(&err, CaptureError::Definite { message, .. } if message.contains("`payments`")),
            "{err}"
        );

        let mut tables = catalog.tables().to_vec();
        let items = tables.iter_mut().find(|t| &*t.name == "order_items").expect("order_items");
        items.columns.retain(|c| &*c.name != "discount");
        let err =
            ErpGenerator::new(&s, Arc::new(Catalog::new(tables)), START).err().expect("refused");
        assert!(
            matches!(&err, CaptureError::Definite { message, .. } if message.contains("order_items.discount")),
            "{err}"
        );

        let no_products = SimulateSpec { products: 0, ..s };
        assert!(ErpGenerator::new(&no_products, catalog, START).is_err());
    }

    #[test]
    fn extra_declared_columns_are_null_and_rows_follow_catalog_order() {
        let catalog = catalog();
        let mut tables = catalog.tables().to_vec();
        let orders = tables.iter_mut().find(|t| &*t.name == "orders").expect("orders");
        // Reverse the declared order and add a column the ERP does not have.
        orders.columns.reverse();
        let note = crate::event::Column { name: "note".into(), ty: ColumnType::String };
        orders.columns.insert(0, note);
        orders.key = vec![orders.column_index("id").expect("id")];
        let catalog = Arc::new(Catalog::new(tables));
        let changes = generate(&spec(2, 7000), &catalog);
        let order = changes.iter().find(|c| table_name(&catalog, c) == "orders").expect("an order");
        let row = order.after.as_ref().expect("after");
        assert!(row[0].is_null());
        assert!(matches!(col(&catalog, order, "id"), Value::Int(1)));
        assert!(matches!(col(&catalog, order, "currency"), Value::Str(s) if &**s == "PEN"));
    }

    #[test]
    fn written_lines_decode_back_and_match_the_reference_gold() {
        let catalog = catalog();
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("erp.jsonl");
        let mut out = std::fs::File::create(&file).expect("create");
        let n = write_jsonl(&spec(7, 30_000), catalog.clone(), START, &mut out).expect("write");
        drop(out);
        assert_eq!(n, 30_000);

        let text = std::fs::read_to_string(&file).expect("read back");
        let mut decoder = Decoder::new(catalog.clone());
        let mut count = 0u64;
        for (i, line) in text.lines().enumerate() {
            let origin = i as u64 + 1;
            match decoder.decode(line.as_bytes(), origin, None) {
                Event::Change(c) => {
                    assert_eq!(c.origin, origin);
                    assert_eq!(encode_line(&catalog, &c), line, "line {origin} round-trips");
                }
                Event::Bad(bad) => panic!("line {origin} did not decode: {bad:?}"),
            }
            count += 1;
        }
        assert_eq!(count, 30_000);

        let gold_dir = dir.path().join("gold");
        let status = std::process::Command::new("python3")
            .arg("/work/shared/workload/reference.py")
            .arg("--out")
            .arg(&gold_dir)
            .stdin(std::fs::File::open(&file).expect("open"))
            .status()
            .expect("python3 runs");
        assert!(status.success(), "reference.py failed: {status}");
        let gold = std::fs::read_to_string(gold_dir.join("gold_sales_10m.csv")).expect("gold");
        assert!(gold.lines().count() > 1, "gold has rows:\n{gold}");
        let quarantine =
            std::fs::read_to_string(gold_dir.join("quarantine_summary.csv")).expect("quarantine");
        for reason in ["invalid_quantity", "outlier_quantity", "invalid_price", "unknown_product"] {
            assert!(
                quarantine.lines().any(|l| l.starts_with(&format!("{reason},"))),
                "{reason} missing from:\n{quarantine}"
            );
        }
    }

    #[test]
    fn write_jsonl_needs_a_number_of_events() {
        let s = SimulateSpec { events: None, ..SimulateSpec::default() };
        let err = write_jsonl(&s, catalog(), START, &mut Vec::new()).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn bursts_multiply_the_rate_during_their_window() {
        let steady = Pace { rate: 100.0, burst: None };
        assert_eq!(steady.due(Duration::from_millis(1500)), 150);
        let burst =
            Burst { factor: 5.0, length: Duration::from_secs(2), every: Duration::from_secs(10) };
        let pace = Pace { rate: 100.0, burst: Some(burst) };
        assert_eq!(pace.due(Duration::from_secs(1)), 500);
        assert_eq!(pace.due(Duration::from_secs(2)), 1000);
        assert_eq!(pace.due(Duration::from_secs(10)), 1800);
        assert_eq!(pace.due(Duration::from_secs(11)), 2300);
        assert_eq!(pace.due(Duration::from_secs(15)), 1800 + 1000 + 300);
    }

    async fn collect(mut rx: bus::Receiver) -> Vec<Batch> {
        let mut batches = Vec::new();
        while let Some(b) = rx.recv().await {
            batches.push(b);
        }
        batches
    }

    fn token(cp: &Checkpoint) -> ResumeToken {
        serde_json::from_str(&cp.0).expect("a JSON token")
    }

    #[tokio::test]
    async fn source_runs_to_the_end_and_resumes_from_its_checkpoint() {
        let catalog = catalog();
        let s = SimulateSpec { start_ms: Some(START), ..spec(9, 10_000) };
        let expected = lines(&catalog, &generate(&s, &catalog));

        let (tx, rx) = bus::memory(4);
        let src = Box::new(SimulatorSource::new(s.clone(), catalog.clone()));
        assert_eq!(src.kind(), "simulate");
        let run = tokio::spawn(src.run(None, tx, CancellationToken::new()));
        let batches = collect(rx).await;
        run.await.expect("joined").expect("ran to the end");
        assert!(batches.iter().all(|b| b.events.len() <= MAX_BATCH as usize));
        let mut got = Vec::new();
        let mut emitted = 0;
        for b in &batches {
            emitted += b.events.len() as u64;
            assert_eq!(
                token(&b.checkpoint),
                ResumeToken { emitted, start_ms: START, gap_us: None }
            );
            for e in &b.events {
                let Event::Change(c) = e else { panic!("bad event") };
                got.push(encode_line(&catalog, c));
            }
        }
        assert_eq!(got, expected);

        // Resume after the third batch: the rest comes out exactly once more.
        let cp = batches[2].checkpoint.clone();
        let done = token(&cp).emitted as usize;
        // A different start in the spec must not matter: the token's start wins.
        let other = SimulateSpec { start_ms: Some(START + 1), ..s };
        let (tx, rx) = bus::memory(4);
        let src = Box::new(SimulatorSource::new(other, catalog.clone()));
        let run = tokio::spawn(src.run(Some(cp), tx, CancellationToken::new()));
        let batches = collect(rx).await;
        run.await.expect("joined").expect("ran to the end");
        let rest: Vec<String> = batches
            .iter()
            .flat_map(|b| &b.events)
            .map(|e| match e {
                Event::Change(c) => encode_line(&catalog, c),
                Event::Bad(b) => panic!("bad event {b:?}"),
            })
            .collect();
        assert_eq!(rest[..], expected[done..]);
    }

    #[tokio::test]
    async fn source_refuses_a_foreign_checkpoint() {
        let (tx, _rx) = bus::memory(1);
        let src = Box::new(SimulatorSource::new(spec(1, 10), catalog()));
        let cp = Checkpoint(r#"{"offset":12}"#.into());
        let err = src.run(Some(cp), tx, CancellationToken::new()).await.expect_err("refused");
        assert!(matches!(err, CaptureError::Definite { .. }), "{err}");
    }

    #[tokio::test]
    async fn source_reports_a_closed_bus() {
        let (tx, rx) = bus::memory(1);
        drop(rx);
        let s = SimulateSpec { events: None, rate: None, ..SimulateSpec::default() };
        let src = Box::new(SimulatorSource::new(s, catalog()));
        let err = src.run(None, tx, CancellationToken::new()).await.expect_err("closed");
        assert!(matches!(err, CaptureError::Closed), "{err}");
    }

    #[tokio::test]
    async fn paced_source_sends_the_snapshot_at_once_then_keeps_its_rate() {
        let rate = 400.0;
        let s = SimulateSpec {
            rate: Some(rate),
            events: None,
            customers: 300,
            products: 100,
            employees: 10,
            ..spec(4, 1)
        };
        let n_snapshot = 410;
        let (tx, mut rx) = bus::memory(64);
        let shutdown = CancellationToken::new();
        let started = std::time::Instant::now();
        let run = tokio::spawn(Box::new(SimulatorSource::new(s, catalog())).run(
            None,
            tx,
            shutdown.clone(),
        ));
        let mut events = 0usize;
        let mut batches = 0usize;
        let deadline = tokio::time::sleep(Duration::from_millis(600));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => break,
                b = rx.recv() => {
                    let b = b.expect("source still running");
                    events += b.events.len();
                    batches += 1;
                }
            }
        }
        shutdown.cancel();
        run.await.expect("joined").expect("shutdown is a clean stop");
        while let Some(b) = rx.recv().await {
            events += b.events.len();
        }
        let elapsed = started.elapsed().as_secs_f64();
        // Paced, the snapshot alone would take a second.
        assert!(events > n_snapshot, "{events} events in {elapsed}s");
        let streamed = (events - n_snapshot) as f64;
        assert!(streamed <= rate * elapsed + 1.0, "{streamed} streamed in {elapsed}s");
        assert!(streamed >= rate * 0.6 * 0.3, "{streamed} streamed in {elapsed}s");
        // Small batches about every 50 ms, not one big one.
        assert!(batches >= 4, "{batches} batches");
    }
}
