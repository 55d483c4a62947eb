//! Evaluation of resolved expressions over a fact row and its looked-up rows.
//!
//! Semantics follow SQL where it matters: `null` propagates through arithmetic and
//! comparisons, `and`/`or` are three-valued, and arithmetic on integers and decimals
//! is exact (`rust_decimal`); floats only mix with floats.

use std::borrow::Cow;

use rust_decimal::{Decimal, RoundingStrategy};

use crate::config::expr::BinOp;
use crate::config::spec::{ColRef, Expr, Func};
use crate::event::{Catalog, ColumnType, TableSchema, Value};

/// The rows an expression can read: the fact row and, per lookup, the dimension row.
pub struct Scope<'a> {
    pub row: &'a [Value],
    pub lookups: &'a [Option<&'a [Value]>],
}

impl<'a> Scope<'a> {
    fn column(&self, c: ColRef) -> &'a Value {
        let row = match c.lookup {
            None => Some(self.row),
            Some(l) => self.lookups.get(l).copied().flatten(),
        };
        row.and_then(|r| r.get(c.column)).unwrap_or(&Value::Null)
    }
}

/// True only for `Value::Bool(true)`: a check that yields `null` fails.
pub fn is_true(v: &Value) -> bool {
    matches!(v, Value::Bool(true))
}

/// Evaluates `expr`. Borrowed when the result is a column value.
pub fn eval<'a>(expr: &'a Expr, scope: &Scope<'a>) -> Cow<'a, Value> {
    match expr {
        Expr::Lit(v) => Cow::Borrowed(v),
        Expr::Col(c) => Cow::Borrowed(scope.column(*c)),
        Expr::Bin(op, a, b) => {
            let a = eval(a, scope);
            match op {
                BinOp::And => {
                    if matches!(*a, Value::Bool(false)) {
                        return Cow::Owned(Value::Bool(false));
                    }
                    let b = eval(b, scope);
                    Cow::Owned(match (&*a, &*b) {
                        (_, Value::Bool(false)) => Value::Bool(false),
                        (Value::Bool(true), Value::Bool(true)) => Value::Bool(true),
                        _ => Value::Null,
                    })
                }
                BinOp::Or => {
                    if matches!(*a, Value::Bool(true)) {
                        return Cow::Owned(Value::Bool(true));
                    }
                    let b = eval(b, scope);
                    Cow::Owned(match (&*a, &*b) {
                        (_, Value::Bool(true)) => Value::Bool(true),
                        (Value::Bool(false), Value::Bool(false)) => Value::Bool(false),
                        _ => Value::Null,
                    })
                }
                _ => Cow::Owned(binary(*op, &a, &eval(b, scope))),
            }
        }
        Expr::Not(a) => Cow::Owned(match &*eval(a, scope) {
            Value::Bool(b) => Value::Bool(!b),
            _ => Value::Null,
        }),
        Expr::Neg(a) => Cow::Owned(match &*eval(a, scope) {
            Value::Int(i) => {
                i.checked_neg().map_or_else(|| Value::Decimal(-Decimal::from(*i)), Value::Int)
            }
            Value::Float(f) => Value::Float(-f),
            v => v.to_decimal().map_or(Value::Null, |d| Value::Decimal(-d)),
        }),
        Expr::IsNull(a, negated) => Cow::Owned(Value::Bool(eval(a, scope).is_null() != *negated)),
        Expr::Func(f, args) => call(*f, args, scope),
    }
}

fn call<'a>(f: Func, args: &'a [Expr], scope: &Scope<'a>) -> Cow<'a, Value> {
    let arg = |i: usize| args.get(i).map_or(Cow::Owned(Value::Null), |a| eval(a, scope));
    Cow::Owned(match f {
        Func::Coalesce => {
            for a in args {
                let v = eval(a, scope);
                if !v.is_null() {
                    return v;
                }
            }
            Value::Null
        }
        Func::Round => {
            let places = match &*arg(1) {
                Value::Int(n) => u32::try_from(*n).unwrap_or(0).min(28),
                _ => 0,
            };
            match &*arg(0) {
                Value::Null => Value::Null,
                Value::Float(x) => {
                    let m = 10f64.powi(places as i32);
                    Value::Float((x * m).round() / m)
                }
                v => {
                    v.to_decimal().map_or(Value::Null, |d| Value::Decimal(round_half_up(d, places)))
                }
            }
        }
        Func::Abs => match &*arg(0) {
            Value::Int(i) => {
                i.checked_abs().map_or_else(|| Value::Decimal(Decimal::from(*i).abs()), Value::Int)
            }
            Value::Float(x) => Value::Float(x.abs()),
            v => v.to_decimal().map_or(Value::Null, |d| Value::Decimal(d.abs())),
        },
        Func::Lower => arg(0).as_str().map_or(Value::Null, |s| Value::Str(s.to_lowercase().into())),
        Func::Upper => arg(0).as_str().map_or(Value::Null, |s| Value::Str(s.to_uppercase().into())),
        Func::Length => {
            arg(0).as_str().map_or(Value::Null, |s| Value::Int(s.chars().count() as i64))
        }
        Func::ValidEmail => match &*arg(0) {
            Value::Null => Value::Null,
            v => Value::Bool(v.as_str().is_some_and(valid_email)),
        },
        Func::ValidPhone => match &*arg(0) {
            Value::Null => Value::Null,
            v => Value::Bool(v.as_str().is_some_and(valid_phone)),
        },
    })
}

/// Rounds half away from zero (SQL `ROUND`, Python `ROUND_HALF_UP`) to exactly
/// `places` decimal places, so `round(12.5, 2)` is `12.50` like Python's `quantize`.
pub fn round_half_up(d: Decimal, places: u32) -> Decimal {
    let mut r = d.round_dp_with_strategy(places, RoundingStrategy::MidpointAwayFromZero);
    r.rescale(places);
    r
}

/// One `@`, a non-empty local part, a dotted domain, no spaces.
pub fn valid_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else { return false };
    !local.is_empty()
        && !domain.contains('@')
        && !s.chars().any(char::is_whitespace)
        && domain.split('.').count() >= 2
        && domain.split('.').all(|p| !p.is_empty())
}

/// 7 to 15 digits (E.164 length) once spaces, dashes, dots, parentheses and a leading `+` go.
pub fn valid_phone(s: &str) -> bool {
    let body = s.trim().strip_prefix('+').unwrap_or(s.trim());
    let mut digits = 0;
    for c in body.chars() {
        match c {
            '0'..='9' => digits += 1,
            ' ' | '-' | '.' | '(' | ')' => {}
            _ => return false,
        }
    }
    (7..=15).contains(&digits)
}

fn binary(op: BinOp, a: &Value, b: &Value) -> Value {
    if a.is_null() || b.is_null() {
        return Value::Null;
    }
    match op {
        BinOp::Eq => Value::Bool(a == b),
        BinOp::Ne => Value::Bool(a != b),
        BinOp::Lt => Value::Bool(a < b),
        BinOp::Le => Value::Bool(a <= b),
        BinOp::Gt => Value::Bool(a > b),
        BinOp::Ge => Value::Bool(a >= b),
        BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div => arithmetic(op, a, b),
        BinOp::And | BinOp::Or => Value::Null,
    }
}

fn arithmetic(op: BinOp, a: &Value, b: &Value) -> Value {
    if let (Value::Int(x), Value::Int(y)) = (a, b) {
        let exact = match op {
            BinOp::Add => x.checked_add(*y),
            BinOp::Sub => x.checked_sub(*y),
            BinOp::Mul => x.checked_mul(*y),
            _ => None,
        };
        if let Some(v) = exact {
            return Value::Int(v);
        }
    }
    if let (Value::Float(_), _) | (_, Value::Float(_)) = (a, b) {
        let f = |v: &Value| match v {
            Value::Float(x) => Some(*x),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        };
        return match (f(a), f(b)) {
            (Some(x), Some(y)) => Value::Float(match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x * y,
                _ => x / y,
            }),
            _ => Value::Null,
        };
    }
    let (Some(x), Some(y)) = (a.to_decimal(), b.to_decimal()) else { return Value::Null };
    let r = match op {
        BinOp::Add => x.checked_add(y),
        BinOp::Sub => x.checked_sub(y),
        BinOp::Mul => x.checked_mul(y),
        _ => x.checked_div(y),
    };
    r.map_or(Value::Null, Value::Decimal)
}

/// Whether `expr` always yields an integer (so a `sum` of it is printed as one).
pub fn is_integer(expr: &Expr, fact: &TableSchema, lookups: &[&TableSchema]) -> bool {
    match expr {
        Expr::Lit(v) => matches!(v, Value::Int(_)),
        Expr::Col(c) => {
            let schema = match c.lookup {
                None => Some(fact),
                Some(l) => lookups.get(l).copied(),
            };
            schema
                .and_then(|s| s.columns.get(c.column))
                .is_some_and(|col| col.ty == ColumnType::Int)
        }
        Expr::Bin(BinOp::Add | BinOp::Sub | BinOp::Mul, a, b) => {
            is_integer(a, fact, lookups) && is_integer(b, fact, lookups)
        }
        Expr::Neg(a) => is_integer(a, fact, lookups),
        Expr::Func(Func::Abs, args) => args.iter().all(|a| is_integer(a, fact, lookups)),
        Expr::Func(Func::Length, _) => true,
        Expr::Func(Func::Round, args) => {
            matches!(args.get(1), Some(Expr::Lit(Value::Int(0))))
                && args.first().is_some_and(|a| is_integer(a, fact, lookups))
        }
        _ => false,
    }
}

/// The schemas of a table's lookups, in lookup order.
pub fn lookup_schemas<'c>(
    catalog: &'c Catalog,
    lookups: &[crate::config::spec::LookupSpec],
) -> Vec<&'c TableSchema> {
    lookups.iter().map(|l| catalog.table(l.table)).collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::str::FromStr;

    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn rounds_half_up_to_an_exact_scale() {
        assert_eq!(round_half_up(d("2.345"), 2).to_string(), "2.35");
        assert_eq!(round_half_up(d("-2.345"), 2).to_string(), "-2.35");
        assert_eq!(round_half_up(d("12.5"), 2).to_string(), "12.50");
        assert_eq!(round_half_up(d("7"), 2).to_string(), "7.00");
    }

    #[test]
    fn evaluates_the_revenue_measure_exactly() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/erp.toml"),
        )
        .unwrap();
        let spec = crate::config::parse(Path::new("erp.toml"), &text).unwrap();
        let revenue = spec.gold[0].measures[2].expr.clone().unwrap();
        // id, order_id, product_id, quantity, unit_price, discount
        let row = [
            Value::Int(1),
            Value::Int(1),
            Value::Int(1),
            Value::Int(3),
            Value::Decimal(d("19.99")),
            Value::Decimal(d("0.1500")),
        ];
        let v = eval(&revenue, &Scope { row: &row, lookups: &[None, None] }).into_owned();
        // 3 * 19.99 * 0.85 = 50.9745 -> 50.97
        assert_eq!(v.to_string(), "50.97");
        let filter = spec.gold[0].filter.clone().unwrap();
        let order =
            [Value::Int(1), Value::Null, Value::Null, Value::Null, Value::Str("cancelled".into())];
        let lookups = [None, Some(&order[..])];
        let v = eval(&filter, &Scope { row: &row, lookups: &lookups });
        assert!(!is_true(&v));
    }

    #[test]
    fn nulls_propagate_and_logic_is_three_valued() {
        assert!(binary(BinOp::Ge, &Value::Null, &Value::Int(1)).is_null());
        assert_eq!(
            arithmetic(BinOp::Mul, &Value::Int(i64::MAX), &Value::Int(2)).to_string(),
            "18446744073709551614"
        );
        assert_eq!(arithmetic(BinOp::Div, &Value::Int(1), &Value::Int(4)).to_string(), "0.25");
    }

    #[test]
    fn checks_emails_and_phones() {
        assert!(valid_email("ana.1@correo.pe"));
        assert!(!valid_email("ana.1@@correo.pe"));
        assert!(!valid_email(" ana@x.pe"));
        assert!(valid_phone("+51 123 456 789"));
        assert!(valid_phone("(01) 123-4567"));
        assert!(!valid_phone("12-34"));
    }
}
