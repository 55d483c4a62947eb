//! The Debezium MySQL JSON envelope, read and written.
//!
//! Accepted line shapes (one JSON object per line):
//! - `{"topic": "erp_db.orders", "key": {...}, "value": ENVELOPE}` (the shared workload format);
//! - a bare `ENVELOPE` (a Kafka message value with `schemas.enable=false`);
//! - `{"schema": ..., "payload": ENVELOPE}` (`schemas.enable=true`).
//!
//! ENVELOPE is `{"before", "after", "source", "op", "ts_ms"}`; column values are read
//! according to the table's declared [`ColumnType`] (decimals as strings or numbers,
//! exactly; temporal types as Debezium encodes them). The table comes from
//! `source.table`, or from the topic's last segment.
//!
//! Decoding is the hot path of file and Kafka sources, so it deserializes straight
//! into typed rows with serde visitors: no intermediate `serde_json::Value`, no
//! allocation for field names. A line that cannot be decoded becomes a
//! [`BadEvent`] with a stable reason code; it never stops the stream.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine as _;
use rust_decimal::Decimal;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use sonic_rs::LazyValue;

use super::{
    time, BadEvent, Catalog, Change, ColumnType, Event, Key, Op, Position, RawSpan, Row, Snapshot,
    Source, SourceMeta, TableSchema, Value,
};

/// Reason codes of lines that cannot be decoded.
pub mod reason {
    pub const MALFORMED_JSON: &str = "malformed_json";
    pub const MISSING_FIELD: &str = "missing_field";
    pub const UNKNOWN_TABLE: &str = "unknown_table";
    pub const WRONG_TYPE: &str = "wrong_type";
    pub const INVALID_OP: &str = "invalid_op";
    pub const MISSING_KEY: &str = "missing_key";
}

/// Decodes envelope lines for the tables of a [`Catalog`].
///
/// Keeps the last source metadata it saw so that consecutive events share one
/// allocation of it.
pub struct Decoder {
    catalog: Arc<Catalog>,
    /// Decode `before` images only for deletes (see [`Decoder::lazy_before`]).
    lazy_before: bool,
    meta: Arc<SourceMeta>,
    file: Arc<str>,
}

impl Decoder {
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self {
            catalog,
            lazy_before: false,
            meta: Arc::new(SourceMeta::default()),
            file: Arc::from(""),
        }
    }

    /// Skips decoding the `before` image of inserts and updates (deletes still get
    /// theirs, for the key). Processing uses its own current row as the before state,
    /// and a source that keeps the original bytes loses nothing; this saves about a
    /// fifth of the decoding work on update-heavy streams.
    pub fn lazy_before(mut self, lazy: bool) -> Self {
        self.lazy_before = lazy;
        self
    }

    /// Starts a new batch: later changes share fresh copies of the source metadata
    /// and binlog file name. Why: a change holds reference counts on both; if every
    /// batch shared the same ones, the decoding thread (incrementing) and the
    /// processing thread (decrementing) would fight over one cache line per event.
    pub fn start_batch(&mut self) {
        self.meta = Arc::new((*self.meta).clone());
        self.file = Arc::from(&*self.file);
    }

    /// Decodes one line. `origin` is its sequence number in the source (1-based line).
    pub fn decode(&mut self, line: &[u8], origin: u64, raw: Option<RawSpan>) -> Event {
        match self.decode_inner(line, origin, raw) {
            Ok(change) => Event::Change(change),
            Err(bad) => Event::Bad(BadEvent {
                reason: bad.reason,
                detail: bad.detail,
                origin,
                table: bad.table,
                payload: String::from_utf8_lossy(line).into_owned(),
            }),
        }
    }

    fn decode_inner(
        &mut self,
        line: &[u8],
        origin: u64,
        raw: Option<RawSpan>,
    ) -> Result<Change, Failure> {
        // Checking UTF-8 once per line and reading a `str` spares serde_json the
        // check of every string (a tenth of decoding); invalid UTF-8 goes the byte
        // way, which reports where it is.
        let text = std::str::from_utf8(line).map_err(|e| {
            Failure::new(
                reason::MALFORMED_JSON,
                format!("invalid UTF-8 at byte {}", e.valid_up_to()),
            )
        })?;
        let mut parsed = ParsedLine::default();
        let seed =
            LineSeed { catalog: &self.catalog, lazy_before: self.lazy_before, out: &mut parsed };
        let mut de = sonic_rs::Deserializer::from_str(text);
        seed.deserialize(&mut de).and_then(|()| de.end()).map_err(Failure::from_json)?;
        let topic_table = parsed.topic_table;
        let env =
            parsed.envelope().ok_or_else(|| Failure::new(reason::MISSING_FIELD, "no envelope"))?;
        let src = env
            .source
            .as_ref()
            .ok_or_else(|| Failure::new(reason::MISSING_FIELD, "no `source`"))?;
        // Borrowed from the line: an owned name is made only for a failure.
        let Some(table_name) = src.table.or(topic_table) else {
            return Err(Failure::new(reason::MISSING_FIELD, "no `source.table` and no `topic`"));
        };
        let Some(table) = self.catalog.id(table_name) else {
            return Err(Failure {
                reason: reason::UNKNOWN_TABLE,
                detail: format!("table `{table_name}` is not declared in the pipeline"),
                table: Some(table_name.to_owned()),
            });
        };
        let schema = self.catalog.table(table);
        let with_table = |f: Failure| Failure { table: Some(table_name.to_owned()), ..f };
        let op = match env.op {
            Some(code) => Op::from_code(code).ok_or_else(|| {
                with_table(Failure::new(reason::INVALID_OP, format!("unknown op `{code}`")))
            })?,
            None => return Err(with_table(Failure::new(reason::MISSING_FIELD, "no `op`"))),
        };
        let before = if self.lazy_before && op != Op::Delete {
            None
        } else {
            std::mem::take(&mut env.before).into_row(schema).map_err(with_table)?
        };
        let after = std::mem::take(&mut env.after).into_row(schema).map_err(with_table)?;
        let needed = match op {
            Op::Delete => before.is_some(),
            _ => after.is_some(),
        };
        if !needed {
            let which = if op == Op::Delete { "before" } else { "after" };
            return Err(with_table(Failure::new(
                reason::MISSING_FIELD,
                format!("op `{}` without `{which}` image", op.code()),
            )));
        }
        let (after, extra) = match after {
            Some((row, extra)) => (Some(row), extra),
            None => (None, None),
        };
        let before = before.map(|(row, _)| row);
        let image = after.as_ref().or(before.as_ref()).map(|r| &r[..]).unwrap_or_default();
        if Key::of(image, &schema.key).is_none() {
            return Err(with_table(Failure::new(
                reason::MISSING_KEY,
                "a primary-key column is null",
            )));
        }
        if !self.meta_matches(src) {
            self.meta = Arc::new(SourceMeta {
                server: src.name.unwrap_or_default().into(),
                db: src.db.unwrap_or_default().into(),
                server_id: src.server_id.unwrap_or(0),
                connector: src.connector.unwrap_or_default().into(),
                version: src.version.unwrap_or_default().into(),
            });
        }
        let position = match (src.file, src.pos, src.lsn) {
            (Some(file), Some(pos), _) => {
                if &*self.file != file {
                    self.file = Arc::from(file);
                }
                Some(Position::Binlog { file: self.file.clone(), pos, row: src.row.unwrap_or(0) })
            }
            (_, _, Some(lsn)) => Some(Position::Lsn(lsn)),
            _ => None,
        };
        let snapshot = match src.snapshot {
            Some("true") | Some("incremental") => Snapshot::True,
            Some("last") | Some("last_in_data_collection") => Snapshot::Last,
            _ => Snapshot::False,
        };
        Ok(Change {
            table,
            op,
            before,
            after,
            extra,
            source: Source {
                meta: self.meta.clone(),
                position,
                gtid: src.gtid.map(Into::into),
                snapshot,
                ts_ms: src.ts_ms.unwrap_or(0),
                partition: None,
            },
            ts_ms: env.ts_ms.unwrap_or(0),
            origin,
            raw,
        })
    }

    fn meta_matches(&self, src: &SourceFields<'_>) -> bool {
        let m = &self.meta;
        *m.server == *src.name.unwrap_or_default()
            && *m.db == *src.db.unwrap_or_default()
            && m.server_id == src.server_id.unwrap_or(0)
            && *m.connector == *src.connector.unwrap_or_default()
            && *m.version == *src.version.unwrap_or_default()
    }
}

struct Failure {
    reason: &'static str,
    detail: String,
    table: Option<String>,
}

impl Failure {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into(), table: None }
    }

    /// Our own visitors report `reason|detail`; anything else from serde_json is syntax.
    fn from_json(err: sonic_rs::Error) -> Self {
        let text = err.to_string();
        if err.classify() == sonic_rs::error::Category::TypeUnmatched {
            if let Some((code, detail)) = text.split_once('|') {
                let reason = [reason::WRONG_TYPE, reason::MISSING_FIELD]
                    .into_iter()
                    .find(|r| *r == code)
                    .unwrap_or(reason::WRONG_TYPE);
                return Self::new(reason, detail);
            }
            return Self::new(reason::WRONG_TYPE, text);
        }
        Self::new(reason::MALFORMED_JSON, text)
    }
}

fn data_error<E: de::Error>(reason: &str, detail: impl fmt::Display) -> E {
    E::custom(format_args!("{reason}|{detail}"))
}

/// An object key: borrowed from the input unless it had escapes.
enum FieldName<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl std::ops::Deref for FieldName<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            FieldName::Borrowed(s) => s,
            FieldName::Owned(s) => s,
        }
    }
}

impl<'de> serde::Deserialize<'de> for FieldName<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FieldName<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(FieldName::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(FieldName::Owned(v.to_owned()))
            }
        }
        d.deserialize_str(V)
    }
}

// ---- decoding ----------------------------------------------------------------

/// What one line holds, filled in place by the seeds below. Why in place: returned by
/// value, these structs (a few hundred bytes) were copied through every `Result` and
/// `Option` layer of the deserializer, 6% of the decoding time under `perf`.
#[derive(Default)]
struct ParsedLine<'de> {
    topic_table: Option<&'de str>,
    /// The envelope under `value` / `payload`, when that was an object.
    value: EnvelopeFields<'de>,
    has_value: bool,
    /// Envelope fields at the top level (a bare envelope, no `value` wrapper).
    bare: EnvelopeFields<'de>,
    is_bare: bool,
}

impl<'de> ParsedLine<'de> {
    fn envelope(&mut self) -> Option<&mut EnvelopeFields<'de>> {
        if self.has_value {
            Some(&mut self.value)
        } else if self.is_bare {
            Some(&mut self.bare)
        } else {
            None
        }
    }
}

#[derive(Default)]
struct EnvelopeFields<'de> {
    before: RowField<'de>,
    after: RowField<'de>,
    source: Option<SourceFields<'de>>,
    op: Option<&'de str>,
    ts_ms: Option<i64>,
}

/// A decoded row and its undeclared columns as a JSON object.
type RowWithExtra = (Row, Option<Box<str>>);

/// A row image: decoded when the table was known at that point of the line,
/// otherwise kept raw and decoded once `source.table` is read.
#[derive(Default)]
enum RowField<'de> {
    #[default]
    Absent,
    Decoded(Row, Option<Box<str>>),
    Raw(LazyValue<'de>),
}

impl RowField<'_> {
    fn into_row(self, schema: &TableSchema) -> Result<Option<RowWithExtra>, Failure> {
        match self {
            RowField::Absent => Ok(None),
            RowField::Decoded(row, extra) => Ok(Some((row, extra))),
            RowField::Raw(raw) => {
                let mut de = sonic_rs::Deserializer::from_str(raw.as_raw_str());
                let row = de::Deserializer::deserialize_option(&mut de, OptRowSeed { schema })
                    .map_err(Failure::from_json)?;
                Ok(row)
            }
        }
    }
}

#[derive(Default)]
struct SourceFields<'de> {
    table: Option<&'de str>,
    db: Option<&'de str>,
    name: Option<&'de str>,
    connector: Option<&'de str>,
    version: Option<&'de str>,
    server_id: Option<u64>,
    gtid: Option<&'de str>,
    file: Option<&'de str>,
    pos: Option<u64>,
    row: Option<u32>,
    lsn: Option<u64>,
    snapshot: Option<&'de str>,
    ts_ms: Option<i64>,
}

struct LineSeed<'c, 'p, 'de> {
    catalog: &'c Catalog,
    lazy_before: bool,
    out: &'p mut ParsedLine<'de>,
}

impl<'de> DeserializeSeed<'de> for LineSeed<'_, '_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for LineSeed<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let out = self.out;
        let mut table: Option<&TableSchema> = None;
        while let Some(key) = map.next_key::<FieldName<'de>>()? {
            match &*key {
                "topic" => {
                    let topic: Option<&'de str> = map.next_value()?;
                    if let Some(t) = topic {
                        let name = t.rsplit('.').next().unwrap_or(t);
                        out.topic_table = Some(name);
                        table = self.catalog.id(name).map(|id| self.catalog.table(id));
                    }
                }
                "value" | "payload" => {
                    // A repeated key: the last one wins, as before.
                    out.value = EnvelopeFields::default();
                    out.has_value = map.next_value_seed(OptEnvelopeSeed {
                        table,
                        lazy_before: self.lazy_before,
                        out: &mut out.value,
                    })?;
                }
                other => {
                    if envelope_field(other, &mut out.bare, table, self.lazy_before, &mut map)? {
                        out.is_bare = true;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Reads one envelope field into `env`; returns false for keys that are not envelope fields.
fn envelope_field<'de, A: MapAccess<'de>>(
    key: &str,
    env: &mut EnvelopeFields<'de>,
    table: Option<&TableSchema>,
    lazy_before: bool,
    map: &mut A,
) -> Result<bool, A::Error> {
    match key {
        "before" | "after" => {
            // A lazy `before` is kept raw (scanned, not built) and decoded only for deletes.
            let table = if lazy_before && key == "before" { None } else { table };
            let field = match table {
                Some(schema) => match map.next_value_seed(OptRowSeedDe { schema })? {
                    Some((row, extra)) => RowField::Decoded(row, extra),
                    None => RowField::Absent,
                },
                None => {
                    let raw: LazyValue<'de> = map.next_value()?;
                    if raw.as_raw_str() == "null" {
                        RowField::Absent
                    } else {
                        RowField::Raw(raw)
                    }
                }
            };
            if key == "before" {
                env.before = field;
            } else {
                env.after = field;
            }
        }
        "source" => {
            let source = env.source.insert(SourceFields::default());
            if !map.next_value_seed(OptSourceSeed { out: source })? {
                env.source = None;
            }
        }
        "op" => env.op = map.next_value()?,
        "ts_ms" => env.ts_ms = map.next_value()?,
        _ => return Ok(false),
    }
    Ok(true)
}

/// Fills `out` from an envelope object; yields false for `null`.
struct OptEnvelopeSeed<'t, 'p, 'de> {
    table: Option<&'t TableSchema>,
    lazy_before: bool,
    out: &'p mut EnvelopeFields<'de>,
}

impl<'de> DeserializeSeed<'de> for OptEnvelopeSeed<'_, '_, 'de> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for OptEnvelopeSeed<'_, '_, 'de> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an envelope object or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(false)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(false)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while let Some(key) = map.next_key::<FieldName<'de>>()? {
            if !envelope_field(&key, self.out, self.table, self.lazy_before, &mut map)? {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(true)
    }
}

/// Fills `out` from a `source` object; yields false for `null`.
struct OptSourceSeed<'p, 'de> {
    out: &'p mut SourceFields<'de>,
}

impl<'de> DeserializeSeed<'de> for OptSourceSeed<'_, 'de> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for OptSourceSeed<'_, 'de> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a source object")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(false)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(false)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let s = self.out;
        while let Some(key) = map.next_key::<FieldName<'de>>()? {
            match &*key {
                "table" => s.table = map.next_value()?,
                "db" => s.db = map.next_value()?,
                "name" => s.name = map.next_value()?,
                "connector" => s.connector = map.next_value()?,
                "version" => s.version = map.next_value()?,
                "server_id" => s.server_id = map.next_value()?,
                "gtid" => s.gtid = map.next_value()?,
                "file" => s.file = map.next_value()?,
                "pos" => s.pos = map.next_value()?,
                "row" => s.row = map.next_value()?,
                "lsn" => s.lsn = map.next_value()?,
                "ts_ms" => s.ts_ms = map.next_value()?,
                "snapshot" => {
                    // Debezium 1.x wrote a boolean here; 2.x writes a string.
                    let v: SnapshotField<'de> = map.next_value()?;
                    s.snapshot = v.0;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(true)
    }
}

struct SnapshotField<'de>(Option<&'de str>);

impl<'de> serde::Deserialize<'de> for SnapshotField<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SnapshotField<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a snapshot marker")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(SnapshotField(Some(if v { "true" } else { "false" })))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(SnapshotField(Some(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                let known = ["true", "last", "false", "incremental", "last_in_data_collection"];
                Ok(SnapshotField(known.into_iter().find(|k| *k == v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(SnapshotField(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// `Option<row>` where the row is decoded with a known schema.
struct OptRowSeedDe<'t> {
    schema: &'t TableSchema,
}

impl<'de> DeserializeSeed<'de> for OptRowSeedDe<'_> {
    type Value = Option<(Row, Option<Box<str>>)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(OptRowSeed { schema: self.schema })
    }
}

struct OptRowSeed<'t> {
    schema: &'t TableSchema,
}

impl<'de> Visitor<'de> for OptRowSeed<'_> {
    type Value = Option<(Row, Option<Box<str>>)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a row object or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let columns = &self.schema.columns;
        let mut row = vec![Value::Null; columns.len()];
        let mut extra: Option<String> = None;
        // Columns usually arrive in declared order: try the next expected one first.
        let mut next = 0usize;
        while let Some(key) = map.next_key::<FieldName<'de>>()? {
            let idx = if columns.get(next).is_some_and(|c| *c.name == *key) {
                Some(next)
            } else {
                columns.iter().position(|c| *c.name == *key)
            };
            match idx {
                Some(i) => {
                    next = i + 1;
                    let col = &columns[i];
                    row[i] = map.next_value_seed(ValueSeed { ty: col.ty, column: &col.name })?;
                }
                None => {
                    let raw: LazyValue<'de> = map.next_value()?;
                    let buf = extra.get_or_insert_with(|| String::from("{"));
                    if buf.len() > 1 {
                        buf.push(',');
                    }
                    buf.push_str(&serde_json::to_string(&*key).unwrap_or_default());
                    buf.push(':');
                    buf.push_str(raw.as_raw_str());
                }
            }
        }
        let extra = extra.map(|mut s| {
            s.push('}');
            s.into_boxed_str()
        });
        Ok(Some((row.into_boxed_slice(), extra)))
    }
}

/// Decodes one column value as its declared type.
struct ValueSeed<'a> {
    ty: ColumnType,
    column: &'a str,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        if self.ty == ColumnType::Decimal {
            // Read the raw token so that numbers keep every digit (a float would not).
            let raw: LazyValue<'de> = serde::Deserialize::deserialize(d)?;
            let text = raw.as_raw_str();
            if text == "null" {
                return Ok(Value::Null);
            }
            let digits = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(text);
            return parse_decimal(digits).map(Value::Decimal).ok_or_else(|| {
                data_error(
                    reason::WRONG_TYPE,
                    format_args!("column `{}`: expected decimal, found {text}", self.column),
                )
            });
        }
        d.deserialize_any(self)
    }
}

/// Parses a decimal exactly, accepting exponents (`1.5E+2`) as JSON numbers may have.
pub fn parse_decimal(s: &str) -> Option<Decimal> {
    Decimal::from_str_exact(s).ok().or_else(|| Decimal::from_scientific(s).ok())
}

impl ValueSeed<'_> {
    fn mismatch<E: de::Error>(&self, found: impl fmt::Display) -> E {
        data_error(
            reason::WRONG_TYPE,
            format_args!("column `{}`: expected {}, found {found}", self.column, self.ty.name()),
        )
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a {} value", self.ty.name())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        match self.ty {
            ColumnType::Bool => Ok(Value::Bool(v)),
            ColumnType::Int => Ok(Value::Int(i64::from(v))),
            _ => Err(self.mismatch("a boolean")),
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        match self.ty {
            ColumnType::Int => Ok(Value::Int(v)),
            ColumnType::UInt => {
                u64::try_from(v).map(Value::UInt).map_err(|_| self.mismatch(format_args!("{v}")))
            }
            ColumnType::Float => Ok(Value::Float(v as f64)),
            ColumnType::Bool => Ok(Value::Bool(v != 0)),
            ColumnType::TimestampMillis => v
                .checked_mul(1000)
                .map(Value::Timestamp)
                .ok_or_else(|| self.mismatch(format_args!("{v}"))),
            ColumnType::TimestampMicros => Ok(Value::Timestamp(v)),
            ColumnType::Date => {
                i32::try_from(v).map(Value::Date).map_err(|_| self.mismatch(format_args!("{v}")))
            }
            ColumnType::Time => Ok(Value::Time(v)),
            _ => Err(self.mismatch(format_args!("number {v}"))),
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        match (self.ty, i64::try_from(v)) {
            (ColumnType::UInt, _) => Ok(Value::UInt(v)),
            (_, Ok(i)) => self.visit_i64(i),
            (ColumnType::Float, Err(_)) => Ok(Value::Float(v as f64)),
            _ => Err(self.mismatch(format_args!("number {v}"))),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        match self.ty {
            ColumnType::Float => Ok(Value::Float(v)),
            _ => Err(self.mismatch(format_args!("number {v}"))),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        let bad = || self.mismatch(format_args!("string {v:?}"));
        match self.ty {
            ColumnType::String => Ok(Value::Str(v.into())),
            ColumnType::Json => Ok(Value::Json(v.into())),
            ColumnType::Bytes => base64::engine::general_purpose::STANDARD
                .decode(v)
                .map(|b| Value::Bytes(b.into_boxed_slice()))
                .map_err(|_| bad()),
            ColumnType::TimestampZoned => {
                time::parse_timestamp(v).map(Value::Timestamp).ok_or_else(bad)
            }
            ColumnType::Decimal => parse_decimal(v).map(Value::Decimal).ok_or_else(bad),
            ColumnType::Float => f64::from_str(v).map(Value::Float).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

// ---- encoding ----------------------------------------------------------------

/// Writes a change as one line of the shared workload format:
/// `{"topic": "<db>.<table>", "key": {...}, "value": ENVELOPE}`.
pub fn encode_line(catalog: &Catalog, change: &Change) -> String {
    let schema = catalog.table(change.table);
    let line = Line { schema, change };
    // Serializing our own types into a String cannot fail.
    serde_json::to_string(&line).unwrap_or_default()
}

/// The bare Debezium envelope (a Kafka message value) of a change.
pub fn encode_envelope(catalog: &Catalog, change: &Change) -> String {
    let schema = catalog.table(change.table);
    serde_json::to_string(&Envelope { schema, change }).unwrap_or_default()
}

/// The Debezium message key of a change: `{"id": 5}`.
pub fn encode_key(catalog: &Catalog, change: &Change) -> String {
    let schema = catalog.table(change.table);
    serde_json::to_string(&KeyJson { schema, change }).unwrap_or_default()
}

/// A row image alone, as a JSON object in the Debezium encoding.
pub fn encode_row(schema: &TableSchema, row: &Row) -> String {
    serde_json::to_string(&RowJson { schema, row }).unwrap_or_default()
}

/// The topic a change belongs to: `<db>.<table>`.
pub fn topic(schema: &TableSchema, change: &Change) -> String {
    format!("{}.{}", change.source.meta.db, schema.name)
}

struct Line<'a> {
    schema: &'a TableSchema,
    change: &'a Change,
}

impl Serialize for Line<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("topic", &topic(self.schema, self.change))?;
        m.serialize_entry("key", &KeyJson { schema: self.schema, change: self.change })?;
        m.serialize_entry("value", &Envelope { schema: self.schema, change: self.change })?;
        m.end()
    }
}

struct KeyJson<'a> {
    schema: &'a TableSchema,
    change: &'a Change,
}

impl Serialize for KeyJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let image = self.change.image().map(|r| &r[..]).unwrap_or_default();
        let mut m = s.serialize_map(Some(self.schema.key.len()))?;
        for &k in &self.schema.key {
            let col = &self.schema.columns[k];
            let v = image.get(k).unwrap_or(&Value::Null);
            m.serialize_entry(&*col.name, &Encoded { ty: col.ty, value: v })?;
        }
        m.end()
    }
}

struct Envelope<'a> {
    schema: &'a TableSchema,
    change: &'a Change,
}

impl Serialize for Envelope<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let c = self.change;
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry(
            "before",
            &c.before.as_ref().map(|r| RowJson { schema: self.schema, row: r }),
        )?;
        m.serialize_entry(
            "after",
            &c.after.as_ref().map(|r| RowJson { schema: self.schema, row: r }),
        )?;
        m.serialize_entry("source", &SourceJson { schema: self.schema, change: c })?;
        m.serialize_entry("op", c.op.code())?;
        m.serialize_entry("ts_ms", &c.ts_ms)?;
        m.end()
    }
}

struct SourceJson<'a> {
    schema: &'a TableSchema,
    change: &'a Change,
}

impl Serialize for SourceJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let src = &self.change.source;
        let meta = &src.meta;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("version", &*meta.version)?;
        m.serialize_entry("connector", &*meta.connector)?;
        m.serialize_entry("name", &*meta.server)?;
        m.serialize_entry("ts_ms", &src.ts_ms)?;
        m.serialize_entry("snapshot", src.snapshot.code())?;
        m.serialize_entry("db", &*meta.db)?;
        m.serialize_entry("table", &*self.schema.name)?;
        m.serialize_entry("server_id", &meta.server_id)?;
        m.serialize_entry("gtid", &src.gtid.as_deref())?;
        match &src.position {
            Some(Position::Binlog { file, pos, row }) => {
                m.serialize_entry("file", &**file)?;
                m.serialize_entry("pos", pos)?;
                m.serialize_entry("row", row)?;
            }
            Some(Position::Lsn(lsn)) => m.serialize_entry("lsn", lsn)?,
            None => {}
        }
        m.end()
    }
}

struct RowJson<'a> {
    schema: &'a TableSchema,
    row: &'a Row,
}

impl Serialize for RowJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.schema.columns.len()))?;
        for (col, v) in self.schema.columns.iter().zip(self.row.iter()) {
            m.serialize_entry(&*col.name, &Encoded { ty: col.ty, value: v })?;
        }
        m.end()
    }
}

/// A value in the Debezium encoding of its column type.
pub struct Encoded<'a> {
    pub ty: ColumnType,
    pub value: &'a Value,
}

impl Serialize for Encoded<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match (self.value, self.ty) {
            (Value::Null, _) => s.serialize_none(),
            (Value::Bool(b), _) => s.serialize_bool(*b),
            (Value::Int(i), _) => s.serialize_i64(*i),
            (Value::UInt(u), _) => s.serialize_u64(*u),
            (Value::Float(f), _) => s.serialize_f64(*f),
            (Value::Decimal(d), _) => s.serialize_str(&d.to_string()),
            (Value::Str(v), _) | (Value::Json(v), _) => s.serialize_str(v),
            (Value::Bytes(b), _) => {
                s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
            }
            (Value::Timestamp(t), ColumnType::TimestampMillis) => {
                s.serialize_i64(t.div_euclid(1000))
            }
            (Value::Timestamp(t), ColumnType::TimestampZoned) => {
                let digits = if t % 1000 != 0 {
                    6
                } else if t % 1_000_000 != 0 {
                    3
                } else {
                    0
                };
                s.serialize_str(&time::format_timestamp(*t, digits))
            }
            (Value::Timestamp(t), _) => s.serialize_i64(*t),
            (Value::Date(d), _) => s.serialize_i32(*d),
            (Value::Time(t), _) => s.serialize_i64(*t),
        }
    }
}

#[cfg(test)]
mod tests;
