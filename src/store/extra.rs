//! Undeclared columns promoted to silver columns, the rules both sinks share.
//!
//! A change carries the source columns the pipeline file does not declare as one
//! JSON object (`Change.extra`). A sink turns each key of it into a column of the
//! silver table the first time it sees the key, so that a column added upstream
//! (`ALTER TABLE .. ADD COLUMN`) appears downstream without editing the pipeline.
//! A key that cannot be a column, or a value its column cannot hold exactly, stays
//! in the row's `_extra` object: every value is either in its column or in `_extra`,
//! never lost.
//!
//! Values are read from the JSON text without going through `f64`: a number keeps
//! its exact text, and integers are told apart from the other numbers, so that
//! `18446744073709551615` or `1.50` are stored as written.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use serde_json::value::RawValue;

/// At most this many columns are added to one table: a source that generates
/// column names (one per tenant, per day) must not grow a table without bound.
/// Keys beyond it stay in `_extra`.
pub(crate) const MAX_ADDED_COLUMNS: usize = 1000;
/// PostgreSQL truncates identifiers to 63 bytes (NAMEDATALEN - 1): two longer keys
/// sharing a prefix would land in one column. SQLite follows the same rule so that
/// both sinks make the same tables.
pub(crate) const MAX_NAME_BYTES: usize = 63;

/// One value of an `_extra` object, as written in the JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Json<'a> {
    Null,
    Bool(bool),
    /// A number without fraction or exponent, as its text (it may exceed `i64`).
    Integer(&'a str),
    /// Any other number, as its text.
    Number(&'a str),
    /// A string, unescaped.
    Text(String),
    /// An array or an object, as its JSON text.
    Nested(&'a str),
}

/// One key of an `_extra` object with its raw JSON text and its value.
#[derive(Debug)]
pub(crate) struct Entry<'a> {
    pub key: String,
    pub raw: &'a str,
    pub value: Json<'a>,
}

/// The entries of an `_extra` object in their order. `None` when the text is not a
/// JSON object: the caller then keeps the text as it is, whole, in `_extra`.
pub(crate) fn parse(extra: &str) -> Option<Vec<Entry<'_>>> {
    // `IndexMap` keeps the keys in order; a repeated key keeps its last value, as
    // every JSON reader of `_extra` would.
    let map: indexmap::IndexMap<String, &RawValue> = serde_json::from_str(extra).ok()?;
    let mut out = Vec::with_capacity(map.len());
    for (key, raw) in map {
        let raw = raw.get().trim();
        out.push(Entry { key, raw, value: classify(raw)? });
    }
    Some(out)
}

/// What the raw text of one JSON value is; `None` when it is not valid JSON.
fn classify(raw: &str) -> Option<Json<'_>> {
    Some(match raw.as_bytes().first()? {
        b'n' => Json::Null,
        b't' => Json::Bool(true),
        b'f' => Json::Bool(false),
        b'"' => Json::Text(serde_json::from_str(raw).ok()?),
        b'[' | b'{' => Json::Nested(raw),
        _ if raw.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) => Json::Number(raw),
        _ => Json::Integer(raw),
    })
}

/// The `_extra` object of the entries `keep` selects, with their values as they
/// were written; `None` when no entry is kept.
pub(crate) fn rest(entries: &[Entry<'_>], mut keep: impl FnMut(usize) -> bool) -> Option<String> {
    let mut out: Option<String> = None;
    for (i, e) in entries.iter().enumerate() {
        if !keep(i) {
            continue;
        }
        let buf = out.get_or_insert_with(|| String::from("{"));
        if buf.len() > 1 {
            buf.push(',');
        }
        // A `String` always serializes.
        buf.push_str(&serde_json::to_string(&e.key).unwrap_or_default());
        buf.push(':');
        buf.push_str(e.raw);
    }
    out.map(|mut s| {
        s.push('}');
        s
    })
}

/// The integer `text` denotes, when it is an `i64` written the way `i64` prints
/// (so that storing the integer loses nothing, not even a `-0`).
pub(crate) fn exact_i64(text: &str) -> Option<i64> {
    text.parse::<i64>().ok().filter(|i| i.to_string() == text)
}

/// The float `text` denotes, when the float prints back as exactly `text` (the way
/// a JSON writer prints it): `0.1` or `2.5e-7` from a DOUBLE column, but not
/// `1.50` (the scale would be lost) nor `0.30000000000000000001` (digits would).
pub(crate) fn exact_f64(text: &str) -> Option<f64> {
    let f: f64 = text.parse().ok()?;
    // SQLite keeps an integral REAL as an integer on disk: -0.0 would come back 0.
    if !f.is_finite() || (f == 0.0 && f.is_sign_negative()) {
        return None;
    }
    let printed = serde_json::Number::from_f64(f)?.to_string();
    (printed == text).then_some(f)
}

/// Whether a JSON number fits PostgreSQL's NUMERIC: an exponent within ±1000 (its
/// input limit), at most 131072 digits before the decimal point and 16383 after.
/// A value outside would fail the whole commit.
pub(crate) fn fits_numeric(text: &str) -> bool {
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(i) => (&unsigned[..i], &unsigned[i + 1..]),
        None => (unsigned, "0"),
    };
    let Ok(exponent) = exponent.parse::<i64>() else {
        return false;
    };
    if !(-1000..=1000).contains(&exponent) {
        return false;
    }
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let significant = int.trim_start_matches('0').len() as i64;
    let before = if significant == 0 { 0 } else { significant + exponent };
    let after = frac.len() as i64 - exponent;
    before <= 131_072 && after <= 16_383
}

/// The columns of one silver table that came from `_extra`, and the names a new
/// one must not take. `T` is how the sink types such a column.
#[derive(Debug)]
pub(crate) struct ExtraColumns<T> {
    /// Learned columns in table order.
    columns: Vec<(String, T)>,
    index: HashMap<String, usize>,
    /// Every column name of the table, lowercased: SQLite compares column names
    /// without case, and in PostgreSQL `Note` next to `note` would be a trap for
    /// every query written without quotes. A key equal to one of them without
    /// case stays in `_extra`.
    taken: HashSet<String>,
    /// How many columns the table may still have (the store's own limit).
    room: usize,
}

impl<T> ExtraColumns<T> {
    /// A table with the columns `existing` (declared and bookkeeping columns, and
    /// any other the table has), which may have at most `max_columns` columns.
    pub fn new<'n>(existing: impl IntoIterator<Item = &'n str>, max_columns: usize) -> Self {
        let taken: HashSet<String> = existing.into_iter().map(str::to_lowercase).collect();
        let room = max_columns.saturating_sub(taken.len());
        Self { columns: Vec::new(), index: HashMap::new(), taken, room }
    }

    pub fn columns(&self) -> &[(String, T)] {
        &self.columns
    }

    /// The learned column named exactly `key`.
    pub fn position(&self, key: &str) -> Option<usize> {
        self.index.get(key).copied()
    }

    /// Whether `key` may become a new column. Names that are empty, start with `_`
    /// (the sinks' bookkeeping columns all do, and later ones will), are longer
    /// than [`MAX_NAME_BYTES`], contain NUL (no SQL identifier can), or equal an
    /// existing column without case stay in `_extra`; so do all keys once the table
    /// has [`MAX_ADDED_COLUMNS`] learned columns or no room left.
    pub fn admits(&self, key: &str) -> bool {
        !key.is_empty()
            && !key.starts_with('_')
            && key.len() <= MAX_NAME_BYTES
            && !key.contains('\0')
            && self.columns.len() < MAX_ADDED_COLUMNS
            && self.room > 0
            && !self.taken.contains(&key.to_lowercase())
    }

    /// Records a column: one the sink just added, or one it found in the table.
    /// The caller checked [`Self::admits`] for a new one.
    pub fn add(&mut self, name: String, ty: T) {
        if self.taken.insert(name.to_lowercase()) {
            self.room = self.room.saturating_sub(1);
        }
        self.index.insert(name.clone(), self.columns.len());
        self.columns.push((name, ty));
    }

    /// Records a column of the table that is not a learned one (another tool added
    /// it, or its type is not one the sink gives learned columns).
    pub fn take(&mut self, name: &str) {
        if self.taken.insert(name.to_lowercase()) {
            self.room = self.room.saturating_sub(1);
        }
    }
}

/// One row's undeclared values split between the learned columns and `_extra`.
#[derive(Debug, Default)]
pub(crate) struct Split<'a, V> {
    /// One value per learned column, in column order; `None` is NULL.
    pub values: Vec<Option<V>>,
    /// What stays in `_extra` (borrowed when that is all of it).
    pub rest: Option<Cow<'a, str>>,
}

/// Splits `extra` over the learned columns of `table`. `fit` gives the value a
/// column stores for a JSON value, or `None` when the column cannot hold it exactly
/// (then the value stays in `_extra` and the column is NULL for this row). Keys
/// without a column stay in `_extra`; columns without a key are NULL, as declared
/// columns missing from a change are.
pub(crate) fn split<'a, T, V>(
    extra: Option<&'a str>,
    table: &ExtraColumns<T>,
    mut fit: impl FnMut(&T, &Json<'a>) -> Option<V>,
) -> Split<'a, V> {
    let mut values: Vec<Option<V>> = table.columns.iter().map(|_| None).collect();
    let Some(text) = extra else {
        return Split { values, rest: None };
    };
    let whole = Split { values: Vec::new(), rest: Some(Cow::Borrowed(text)) };
    if table.columns.is_empty() {
        return whole;
    }
    let Some(entries) = parse(text) else {
        return Split { values, ..whole };
    };
    let mut promoted = vec![false; entries.len()];
    for (i, e) in entries.iter().enumerate() {
        let Some(c) = table.position(&e.key) else { continue };
        if e.value == Json::Null {
            promoted[i] = true;
            continue;
        }
        if let Some(v) = fit(&table.columns[c].1, &e.value) {
            values[c] = Some(v);
            promoted[i] = true;
        }
    }
    let rest = if promoted.iter().any(|p| *p) {
        self::rest(&entries, |i| !promoted[i]).map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(text))
    };
    Split { values, rest }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keep_their_exact_text_and_kind() {
        let e = parse(
            r#"{"i":18446744073709551615,"n":1.50,"x":2.5e-7,"s":"a \"q\"","b":true,"z":null,"o":{"k":[1,2.0]}}"#,
        )
        .expect("an object");
        let got: Vec<(&str, &Json<'_>)> = e.iter().map(|e| (e.key.as_str(), &e.value)).collect();
        assert_eq!(
            got,
            vec![
                ("i", &Json::Integer("18446744073709551615")),
                ("n", &Json::Number("1.50")),
                ("x", &Json::Number("2.5e-7")),
                ("s", &Json::Text("a \"q\"".to_owned())),
                ("b", &Json::Bool(true)),
                ("z", &Json::Null),
                ("o", &Json::Nested(r#"{"k":[1,2.0]}"#)),
            ]
        );
        assert!(parse("[1]").is_none());
        assert!(parse("not json").is_none());
    }

    #[test]
    fn exact_numbers_only() {
        assert_eq!(exact_i64("-42"), Some(-42));
        assert_eq!(exact_i64("-0"), None);
        assert_eq!(exact_i64("18446744073709551615"), None);
        assert_eq!(exact_f64("0.1"), Some(0.1));
        assert_eq!(exact_f64("2.5e-7"), Some(2.5e-7));
        assert_eq!(exact_f64("1.50"), None, "the scale would be lost");
        assert_eq!(exact_f64("0.30000000000000000001"), None, "digits would be lost");
        assert_eq!(exact_f64("-0.0"), None);
        assert_eq!(exact_f64("1e400"), None);
        assert!(fits_numeric("-12.50"));
        assert!(fits_numeric("1e400"));
        assert!(fits_numeric("1e-1000"));
        assert!(!fits_numeric("1e1001"));
        assert!(!fits_numeric("1e-1001"));
        assert!(!fits_numeric(&format!("0.{}1", "0".repeat(16_383))));
        assert!(!fits_numeric("1e99999999999999999999"));
    }

    #[test]
    fn names_that_cannot_be_columns_stay_in_extra() {
        let mut t: ExtraColumns<()> = ExtraColumns::new(["id", "Name", "_extra"], 2000);
        assert!(t.admits("note"));
        for bad in ["", "_flag", "name", "NAME", "_EXTRA", "nul\0l", &"x".repeat(64)] {
            assert!(!t.admits(bad), "{bad:?} is refused");
        }
        assert!(t.admits(&"x".repeat(63)));
        t.add("note".to_owned(), ());
        assert!(!t.admits("Note"), "case-insensitive clash with a learned column");
        t.take("legacy");
        assert!(!t.admits("LEGACY"));
        assert_eq!(t.position("note"), Some(0));
        assert_eq!(t.position("Note"), None);
    }

    #[test]
    fn added_columns_are_capped() {
        let mut t: ExtraColumns<()> = ExtraColumns::new(["id"], usize::MAX);
        for i in 0..MAX_ADDED_COLUMNS {
            assert!(t.admits(&format!("c{i}")));
            t.add(format!("c{i}"), ());
        }
        assert!(!t.admits("one_more"));
        let mut small: ExtraColumns<()> = ExtraColumns::new(["id", "a"], 3);
        assert!(small.admits("b"));
        small.add("b".to_owned(), ());
        assert!(!small.admits("c"), "the store's column limit");
    }

    #[test]
    fn split_promotes_what_fits_and_keeps_the_rest() {
        let mut t: ExtraColumns<&str> = ExtraColumns::new(["id"], 2000);
        t.add("n".to_owned(), "int");
        t.add("s".to_owned(), "text");
        t.add("gone".to_owned(), "text");
        let fit = |ty: &&str, v: &Json<'_>| match (*ty, v) {
            ("int", Json::Integer(i)) => exact_i64(i).map(|i| i.to_string()),
            ("text", Json::Text(s)) => Some(s.clone()),
            _ => None,
        };
        let s = split(Some(r#"{"n":7,"s":"x","new":1.5}"#), &t, fit);
        assert_eq!(s.values, vec![Some("7".to_owned()), Some("x".to_owned()), None]);
        assert_eq!(s.rest.as_deref(), Some(r#"{"new":1.5}"#));
        // A misfit stays in `_extra`, its column is NULL; a null is promoted.
        let s = split(Some(r#"{"n":1.5,"s":null}"#), &t, fit);
        assert_eq!(s.values, vec![None, None, None]);
        assert_eq!(s.rest.as_deref(), Some(r#"{"n":1.5}"#));
        let s = split(Some(r#"{"n":1}"#), &t, fit);
        assert_eq!(s.rest, None);
        let s = split(None, &t, fit);
        assert_eq!((s.values.len(), s.rest), (3, None));
        let s = split(Some("garbage"), &t, fit);
        assert_eq!(s.rest.as_deref(), Some("garbage"), "unreadable text is kept whole");
    }
}
