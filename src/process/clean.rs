//! Per-row cleaning: fixes, defaults for missing values, and checks.
//!
//! Rules run in the order of the pipeline file. Fixes and defaults rewrite the
//! row; a failing `flag` check marks it; the first failing `quarantine` check
//! takes it out of the clean data with its reason (the order of the checks is the
//! order of the reasons).

use std::sync::Arc;

use super::expr::{eval, is_true, Scope};
use crate::config::spec::{Action, FixOp, Rule};
use crate::event::Value;

/// The verdict on one row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Reasons of failed `flag` checks.
    pub flags: Vec<Arc<str>>,
    /// The reason of the first failed `quarantine` check.
    pub failed: Option<Arc<str>>,
}

/// Applies `rules` to `row` in place and returns the verdict.
pub fn clean(rules: &[Rule], row: &mut [Value]) -> Verdict {
    let mut verdict = Verdict::default();
    for rule in rules {
        match rule {
            Rule::Fix { column, ops } => {
                if let Some(Value::Str(s)) = row.get_mut(*column) {
                    for op in ops {
                        if let Some(fixed) = fix(*op, s) {
                            *s = fixed.into_boxed_str();
                        }
                    }
                }
            }
            Rule::Default { column, value } => {
                if let Some(slot @ Value::Null) = row.get_mut(*column) {
                    *slot = value.clone();
                }
            }
            Rule::Check { expr, action, reason } => {
                let ok = is_true(&eval(expr, &Scope { row, lookups: &[] }));
                if !ok {
                    match action {
                        Action::Flag => verdict.flags.push(reason.clone()),
                        Action::Quarantine => {
                            verdict.failed = Some(reason.clone());
                            return verdict;
                        }
                    }
                }
            }
        }
    }
    verdict
}

/// The fixed string, or `None` when the fix changes nothing (no allocation then).
fn fix(op: FixOp, s: &str) -> Option<String> {
    let out = match op {
        FixOp::Trim => {
            let t = s.trim();
            (t.len() != s.len()).then(|| t.to_owned())?
        }
        FixOp::Lower => {
            if !s.chars().any(char::is_uppercase) {
                return None;
            }
            s.to_lowercase()
        }
        FixOp::Upper => {
            if !s.chars().any(char::is_lowercase) {
                return None;
            }
            s.to_uppercase()
        }
        FixOp::CollapseSpaces => {
            let c = s.split_whitespace().collect::<Vec<_>>().join(" ");
            (c != s).then_some(c)?
        }
        FixOp::Email => {
            let t = s.trim();
            if t.len() == s.len() && !t.chars().any(char::is_uppercase) {
                return None;
            }
            t.to_lowercase()
        }
        FixOp::Phone => {
            let t = s.trim();
            let plus = t.starts_with('+');
            let digits: String = t.chars().filter(char::is_ascii_digit).collect();
            let p = if plus { format!("+{digits}") } else { digits };
            (p != s).then_some(p)?
        }
    };
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixes_only_when_needed() {
        assert_eq!(fix(FixOp::Email, "  ANA.1@CORREO.PE "), Some("ana.1@correo.pe".into()));
        assert_eq!(fix(FixOp::Email, "ana@x.pe"), None);
        assert_eq!(fix(FixOp::Phone, "+51 123 456 789"), Some("+51123456789".into()));
        assert_eq!(fix(FixOp::Phone, "(01) 123-4567"), Some("011234567".into()));
        assert_eq!(fix(FixOp::CollapseSpaces, "a  b"), Some("a b".into()));
        assert_eq!(fix(FixOp::Trim, "a"), None);
    }
}
