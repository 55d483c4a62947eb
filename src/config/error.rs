//! Configuration errors: every problem names the file, the key and the value.

use std::fmt;
use std::path::PathBuf;

/// One thing wrong with a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `tables.order_items.rules[2].action`.
    pub key: String,
    /// The offending value as written, if there is one.
    pub value: Option<String>,
    /// What is wrong, lowercase, no trailing period.
    pub message: String,
    /// How to fix it.
    pub hint: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`", self.key)?;
        if let Some(v) = &self.value {
            write!(f, " = {v}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// Why a pipeline file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read pipeline file `{}`", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or a value has the wrong shape.
    #[error("{}:{line}:{column}: {problem}", file.display())]
    Parse { file: PathBuf, line: usize, column: usize, problem: Box<Problem> },
    /// The file parsed, but its settings do not make a valid pipeline.
    #[error("{}", render_invalid(file, problems))]
    Invalid { file: PathBuf, problems: Vec<Problem> },
}

fn render_invalid(file: &std::path::Path, problems: &[Problem]) -> String {
    let mut out = format!("{}: {} problem(s)", file.display(), problems.len());
    for p in problems {
        out.push_str(&format!("\n  {}: {p}", file.display()));
    }
    out
}

/// Collects problems during validation so that all of them are reported at once.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn add(
        &mut self,
        key: impl Into<String>,
        value: Option<String>,
        message: impl Into<String>,
    ) {
        self.0.push(Problem { key: key.into(), value, message: message.into(), hint: None });
    }

    pub fn hint(
        &mut self,
        key: impl Into<String>,
        value: Option<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.0.push(Problem {
            key: key.into(),
            value,
            message: message.into(),
            hint: Some(hint.into()),
        });
    }
}

/// The closest of `candidates` to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let best =
        candidates.into_iter().map(|c| (edit_distance(word, c), c)).min_by_key(|(d, _)| *d)?;
    (best.0 <= 2.max(word.len() / 3)).then_some(best.1)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_near_misses_only() {
        assert_eq!(did_you_mean("quarantin", ["fix", "flag", "quarantine"]), Some("quarantine"));
        assert_eq!(did_you_mean("xyz", ["quarantine"]), None);
    }
}
