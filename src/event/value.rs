//! Typed values, rows and keys.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};

use rust_decimal::Decimal;

use super::time;

/// The declared type of a column, which says how its Debezium JSON encoding is read.
///
/// The names are the ones used in pipeline files (`columns = { id = "int", … }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    /// BOOLEAN / BIT(1): JSON `true`/`false` (or 0/1).
    Bool,
    /// TINYINT..BIGINT: a JSON integer.
    Int,
    /// BIGINT UNSIGNED: a JSON integer up to 2^64-1.
    UInt,
    /// FLOAT / DOUBLE: a JSON number.
    Float,
    /// DECIMAL / NUMERIC: a string (`decimal.handling.mode=string`) or a number, read exactly.
    Decimal,
    /// CHAR / VARCHAR / TEXT / ENUM / SET: a JSON string.
    String,
    /// BINARY / VARBINARY / BLOB / BIT(n>1): base64 in JSON (`binary.handling.mode=base64`).
    Bytes,
    /// JSON: a string holding JSON text (`io.debezium.data.Json`).
    Json,
    /// DATETIME(0-3): epoch milliseconds (`io.debezium.time.Timestamp`).
    TimestampMillis,
    /// DATETIME(4-6): epoch microseconds (`io.debezium.time.MicroTimestamp`).
    TimestampMicros,
    /// TIMESTAMP: an ISO-8601 UTC string (`io.debezium.time.ZonedTimestamp`).
    TimestampZoned,
    /// DATE: days since epoch (`io.debezium.time.Date`).
    Date,
    /// TIME: microseconds since midnight (`io.debezium.time.MicroTime`).
    Time,
}

impl ColumnType {
    /// Every type name accepted in a pipeline file, for error hints.
    pub const NAMES: &'static [&'static str] = &[
        "bool",
        "int",
        "uint",
        "float",
        "decimal",
        "string",
        "bytes",
        "json",
        "timestamp",
        "timestamp_us",
        "timestamptz",
        "date",
        "time",
    ];

    /// Parses a pipeline-file type name.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "bool" => Self::Bool,
            "int" => Self::Int,
            "uint" => Self::UInt,
            "float" => Self::Float,
            "decimal" => Self::Decimal,
            "string" => Self::String,
            "bytes" => Self::Bytes,
            "json" => Self::Json,
            "timestamp" => Self::TimestampMillis,
            "timestamp_us" => Self::TimestampMicros,
            "timestamptz" => Self::TimestampZoned,
            "date" => Self::Date,
            "time" => Self::Time,
            _ => return None,
        })
    }

    /// The pipeline-file name of this type.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bool => "bool",
            Self::Int => "int",
            Self::UInt => "uint",
            Self::Float => "float",
            Self::Decimal => "decimal",
            Self::String => "string",
            Self::Bytes => "bytes",
            Self::Json => "json",
            Self::TimestampMillis => "timestamp",
            Self::TimestampMicros => "timestamp_us",
            Self::TimestampZoned => "timestamptz",
            Self::Date => "date",
            Self::Time => "time",
        }
    }
}

/// One typed value. Money is [`Decimal`], never a float.
#[derive(Debug, Clone, Default)]
pub enum Value {
    #[default]
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Decimal(Decimal),
    Str(Box<str>),
    Bytes(Box<[u8]>),
    /// JSON text, kept as the source sent it.
    Json(Box<str>),
    /// UTC epoch microseconds.
    Timestamp(i64),
    /// Days since epoch.
    Date(i32),
    /// Microseconds since midnight (may be negative or exceed a day, as MySQL TIME does).
    Time(i64),
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) | Value::Json(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an exact decimal, for arithmetic; `None` for non-numbers.
    pub fn to_decimal(&self) -> Option<Decimal> {
        match self {
            Value::Int(i) => Some(Decimal::from(*i)),
            Value::UInt(u) => Some(Decimal::from(*u)),
            Value::Decimal(d) => Some(*d),
            Value::Bool(b) => Some(Decimal::from(u8::from(*b))),
            _ => None,
        }
    }

    /// A short name of the variant, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::UInt(_) => "uint",
            Value::Float(_) => "float",
            Value::Decimal(_) => "decimal",
            Value::Str(_) => "string",
            Value::Bytes(_) => "bytes",
            Value::Json(_) => "json",
            Value::Timestamp(_) => "timestamp",
            Value::Date(_) => "date",
            Value::Time(_) => "time",
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Int(_) | Value::UInt(_) | Value::Decimal(_) | Value::Float(_) => 2,
            Value::Str(_) => 3,
            Value::Bytes(_) => 4,
            Value::Json(_) => 5,
            Value::Timestamp(_) => 6,
            Value::Date(_) => 7,
            Value::Time(_) => 8,
        }
    }
}

/// Equality is by value: `Int(2)`, `UInt(2)` and `Decimal(2.00)` are equal, so keys and
/// group-by values compare the way SQL does. Floats compare by bits for hashing.
impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Value {}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        use Value::*;
        match (self, other) {
            (Null, Null) => Ordering::Equal,
            (Bool(a), Bool(b)) => a.cmp(b),
            (Int(a), Int(b)) => a.cmp(b),
            (UInt(a), UInt(b)) => a.cmp(b),
            (Float(a), Float(b)) => a.total_cmp(b),
            (Str(a), Str(b)) | (Json(a), Json(b)) => a.cmp(b),
            (Bytes(a), Bytes(b)) => a.cmp(b),
            (Timestamp(a), Timestamp(b)) | (Time(a), Time(b)) => a.cmp(b),
            (Date(a), Date(b)) => a.cmp(b),
            (Float(a), b) if b.rank() == 2 => rust_decimal::Decimal::try_from(*a)
                .map_or(Ordering::Less, |d| d.cmp(&b.to_decimal().unwrap_or_default())),
            (a, Float(b)) if a.rank() == 2 => rust_decimal::Decimal::try_from(*b)
                .map_or(Ordering::Greater, |d| a.to_decimal().unwrap_or_default().cmp(&d)),
            (a, b) if a.rank() == 2 && b.rank() == 2 => {
                a.to_decimal().unwrap_or_default().cmp(&b.to_decimal().unwrap_or_default())
            }
            (a, b) => a.rank().cmp(&b.rank()),
        }
    }
}

impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            Value::Null => 0u8.hash(state),
            Value::Bool(b) => b.hash(state),
            // Numbers hash by normalized decimal so that equal numbers hash alike.
            Value::Int(i) => Decimal::from(*i).normalize().hash(state),
            Value::UInt(u) => Decimal::from(*u).normalize().hash(state),
            Value::Decimal(d) => d.normalize().hash(state),
            Value::Float(f) => match Decimal::try_from(*f) {
                Ok(d) => d.normalize().hash(state),
                Err(_) => f.to_bits().hash(state),
            },
            Value::Str(s) | Value::Json(s) => s.hash(state),
            Value::Bytes(b) => b.hash(state),
            Value::Timestamp(t) | Value::Time(t) => t.hash(state),
            Value::Date(d) => d.hash(state),
        }
    }
}

/// Human and CSV rendering: decimals keep their scale (`12.50`), timestamps are ISO-8601 UTC.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => Ok(()),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::UInt(u) => write!(f, "{u}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Decimal(d) => write!(f, "{d}"),
            Value::Str(s) | Value::Json(s) => f.write_str(s),
            Value::Bytes(b) => {
                for byte in b.iter() {
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
            Value::Timestamp(t) => {
                let digits = if t % 1000 != 0 {
                    6
                } else if t % 1_000_000 != 0 {
                    3
                } else {
                    0
                };
                f.write_str(&time::format_timestamp(*t, digits))
            }
            Value::Date(d) => f.write_str(&time::format_date(i64::from(*d))),
            Value::Time(t) => f.write_str(&time::format_time(*t)),
        }
    }
}

/// A row image: one value per declared column, in the table's column order.
pub type Row = Box<[Value]>;

/// A primary key. Single integer keys (the common case) avoid an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Int(i64),
    Values(Box<[Value]>),
}

impl Key {
    /// Builds the key of `row` from the key column indexes; `None` when a key column is null.
    pub fn of(row: &[Value], key_columns: &[usize]) -> Option<Key> {
        if let [only] = key_columns {
            return Key::single(row.get(*only)?);
        }
        let mut values = Vec::with_capacity(key_columns.len());
        for &c in key_columns {
            match row.get(c)? {
                Value::Null => return None,
                v => values.push(v.clone()),
            }
        }
        Some(Key::Values(values.into_boxed_slice()))
    }

    /// The key of one value. Integral numbers of any type become `Key::Int`, so a
    /// `uint` or `decimal` column joins an `int` key of the same value.
    pub fn single(v: &Value) -> Option<Key> {
        match v {
            Value::Null => None,
            Value::Int(i) => Some(Key::Int(*i)),
            Value::UInt(u) => Some(
                i64::try_from(*u).map_or_else(|_| Key::Values(Box::new([v.clone()])), Key::Int),
            ),
            Value::Decimal(d) if d.fract().is_zero() => Some(
                i64::try_from(d.trunc())
                    .map_or_else(|_| Key::Values(Box::new([v.clone()])), Key::Int),
            ),
            other => Some(Key::Values(Box::new([other.clone()]))),
        }
    }

    /// Builds a key from looked-up values (a foreign key), `None` if any is null.
    pub fn from_values(values: &[&Value]) -> Option<Key> {
        if let [only] = values {
            return Key::single(only);
        }
        if values.iter().any(|v| v.is_null()) {
            return None;
        }
        Some(Key::Values(values.iter().map(|v| (*v).clone()).collect()))
    }

    /// The key's values (allocates for the integer case).
    pub fn values(&self) -> Vec<Value> {
        match self {
            Key::Int(i) => vec![Value::Int(*i)],
            Key::Values(v) => v.to_vec(),
        }
    }
}

/// `5` for a single-column key, `[5,"a"]` for a composite one.
impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Int(i) => write!(f, "{i}"),
            Key::Values(v) if v.len() == 1 => write!(f, "{}", v[0]),
            Key::Values(v) => {
                f.write_str("[")?;
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{x}")?;
                }
                f.write_str("]")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn numbers_compare_and_hash_by_value() {
        use std::collections::hash_map::DefaultHasher;
        let h = |v: &Value| {
            let mut s = DefaultHasher::new();
            v.hash(&mut s);
            s.finish()
        };
        let a = Value::Int(2);
        let b = Value::Decimal(Decimal::from_str("2.00").unwrap());
        assert_eq!(a, b);
        assert_eq!(h(&a), h(&b));
        assert!(Value::Int(-1) < Value::UInt(u64::MAX));
    }

    #[test]
    fn decimals_keep_their_scale_when_displayed() {
        let d = Value::Decimal(Decimal::from_str("12.50").unwrap());
        assert_eq!(d.to_string(), "12.50");
    }

    #[test]
    fn keys_of_null_columns_are_missing() {
        let row = [Value::Null, Value::Int(3)];
        assert_eq!(Key::of(&row, &[0]), None);
        assert_eq!(Key::of(&row, &[1]), Some(Key::Int(3)));
        assert_eq!(Key::of(&row, &[1, 1]).unwrap().to_string(), "[3,3]");
    }
}
