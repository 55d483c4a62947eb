//! Tumbling-window aggregates, maintained incrementally with retractions.
//!
//! Every fact row contributes `+1` of its measure inputs to one (window, group);
//! an update or delete contributes `-1` of what it had added. Accumulators
//! therefore support retraction exactly (DataFusion's `retract_batch`): sums and
//! counts subtract, min/max keep a multiset. A group whose row count drops to
//! zero is deleted, so the result is always the aggregate of the current rows.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use crate::config::spec::Agg;
use crate::event::Value;

/// The running value of one measure in one group.
#[derive(Debug, Clone)]
pub enum Accumulator {
    Count(i64),
    /// Sum of non-null inputs, their count, and whether to print as an integer.
    Sum {
        sum: Decimal,
        n: i64,
        integer: bool,
    },
    Avg {
        sum: Decimal,
        n: i64,
    },
    /// Value -> multiplicity, for retractable min/max.
    MinMax {
        values: BTreeMap<Value, i64>,
        max: bool,
    },
}

impl Accumulator {
    pub fn new(agg: Agg, integer: bool) -> Self {
        match agg {
            Agg::Count => Accumulator::Count(0),
            Agg::Sum => Accumulator::Sum { sum: Decimal::ZERO, n: 0, integer },
            Agg::Avg => Accumulator::Avg { sum: Decimal::ZERO, n: 0 },
            Agg::Min => Accumulator::MinMax { values: BTreeMap::new(), max: false },
            Agg::Max => Accumulator::MinMax { values: BTreeMap::new(), max: true },
        }
    }

    /// Adds (`diff = 1`) or retracts (`diff = -1`) one input.
    pub fn update(&mut self, input: &Value, diff: i64) {
        match self {
            Accumulator::Count(c) => *c += diff,
            Accumulator::Sum { sum, n, .. } | Accumulator::Avg { sum, n } => {
                if let Some(d) = input.to_decimal() {
                    // Sums of money stay far inside Decimal's 28 digits; saturate rather
                    // than panic if a pathological input overflows.
                    let delta = if diff >= 0 { d } else { -d };
                    *sum = sum.checked_add(delta).unwrap_or(*sum);
                    *n += diff;
                }
            }
            Accumulator::MinMax { values, .. } => {
                if input.is_null() {
                    return;
                }
                let e = values.entry(input.clone()).or_insert(0);
                *e += diff;
                if *e == 0 {
                    values.remove(input);
                }
            }
        }
    }

    /// The current value.
    pub fn value(&self) -> Value {
        match self {
            Accumulator::Count(c) => Value::Int(*c),
            Accumulator::Sum { n: 0, .. } => Value::Null,
            Accumulator::Sum { sum, integer: true, .. } if sum.scale() == 0 => {
                i64::try_from(*sum).map_or(Value::Decimal(*sum), Value::Int)
            }
            Accumulator::Sum { sum, .. } => Value::Decimal(*sum),
            Accumulator::Avg { n: 0, .. } => Value::Null,
            Accumulator::Avg { sum, n } => {
                sum.checked_div(Decimal::from(*n)).map_or(Value::Null, Value::Decimal)
            }
            Accumulator::MinMax { values, max } => {
                let v = if *max { values.keys().next_back() } else { values.keys().next() };
                v.cloned().unwrap_or(Value::Null)
            }
        }
    }
}

/// All measures of one (window, group), with the number of rows in it.
#[derive(Debug, Clone)]
pub struct GroupState {
    pub rows: i64,
    pub measures: Vec<Accumulator>,
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    #[test]
    fn retracting_what_was_added_is_a_no_op() {
        let d = |s| Value::Decimal(Decimal::from_str(s).unwrap());
        let mut sum = Accumulator::new(Agg::Sum, false);
        let mut max = Accumulator::new(Agg::Max, false);
        for v in ["1.10", "2.25", "2.25"] {
            sum.update(&d(v), 1);
            max.update(&d(v), 1);
        }
        sum.update(&d("2.25"), -1);
        max.update(&d("2.25"), -1);
        assert_eq!(sum.value().to_string(), "3.35");
        assert_eq!(max.value().to_string(), "2.25");
        max.update(&d("2.25"), -1);
        assert_eq!(max.value().to_string(), "1.10");
    }

    #[test]
    fn integer_sums_print_as_integers() {
        let mut units = Accumulator::new(Agg::Sum, true);
        units.update(&Value::Int(3), 1);
        units.update(&Value::Int(4), 1);
        assert_eq!(units.value(), Value::Int(7));
        assert!(matches!(units.value(), Value::Int(7)));
    }
}
