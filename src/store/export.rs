//! Gold and quarantine in the reference CSV format of `shared/workload`:
//! `gold_<name>.csv` (`window_start,<groups>,<measures>`, sorted) and
//! `quarantine_summary.csv` (`reason,rows`, sorted), comma-separated, `\n` line ends,
//! fields quoted only when they must be (Python's `csv` minimal quoting).

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use crate::config::spec::GoldSpec;
use crate::event::{time, Value};

/// One gold row: window start (µs), group values, measure values.
pub type GoldRow = (i64, Vec<Value>, Vec<Value>);

/// Writes `gold_<name>.csv` for one gold table; rows are sorted here.
///
/// # Errors
/// I/O errors creating or writing the file.
pub fn write_gold(dir: &Path, spec: &GoldSpec, mut rows: Vec<GoldRow>) -> io::Result<()> {
    rows.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut out = String::from("window_start");
    for (name, _) in &spec.group_by {
        out.push(',');
        push_field(&mut out, name);
    }
    for m in &spec.measures {
        out.push(',');
        push_field(&mut out, &m.name);
    }
    out.push('\n');
    for (window, group, measures) in rows {
        out.push_str(&time::format_timestamp(window, 0));
        for v in group.iter().chain(&measures) {
            out.push(',');
            push_field(&mut out, &v.to_string());
        }
        out.push('\n');
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(format!("gold_{}.csv", spec.name)), out)
}

/// Writes `quarantine_summary.csv`; rows are sorted by reason here.
///
/// # Errors
/// I/O errors creating or writing the file.
pub fn write_quarantine_summary(dir: &Path, mut counts: Vec<(String, u64)>) -> io::Result<()> {
    counts.sort();
    let mut out = String::from("reason,rows\n");
    for (reason, n) in counts.into_iter().filter(|(_, n)| *n > 0) {
        push_field(&mut out, &reason);
        let _ = writeln!(out, ",{n}");
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("quarantine_summary.csv"), out)
}

fn push_field(out: &mut String, s: &str) {
    if s.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_like_python_csv() {
        let mut s = String::new();
        push_field(&mut s, "a,\"b\"");
        assert_eq!(s, "\"a,\"\"b\"\"\"");
    }
}
