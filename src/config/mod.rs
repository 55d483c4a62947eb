//! Pipeline files: TOML in, a validated [`PipelineSpec`] out.
//!
//! Two phases, as ripgrep's `LowArgs -> HiArgs`: [`raw`] is the file's shape
//! (serde, unknown keys rejected), [`spec`] the resolved meaning. Loading reports
//! the file, the key path and the value of every problem; validation is pure.

pub mod alerts;
pub mod error;
pub mod expr;
pub mod raw;
pub mod spec;

use std::path::Path;

pub use error::{ConfigError, Problem};
pub use spec::PipelineSpec;

/// Reads and validates a pipeline file.
///
/// # Errors
/// [`ConfigError`] with every problem found, each naming its key.
pub fn load(path: &Path) -> Result<PipelineSpec, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { file: path.to_owned(), source })?;
    parse(path, &text)
}

/// Validates pipeline text; `path` is only used in messages.
///
/// # Errors
/// [`ConfigError::Parse`] for TOML or shape errors, [`ConfigError::Invalid`] otherwise.
pub fn parse(path: &Path, text: &str) -> Result<PipelineSpec, ConfigError> {
    let de = toml::Deserializer::new(text);
    let raw: raw::RawPipeline = serde_path_to_error::deserialize(de).map_err(|err| {
        let key = err.path().to_string();
        let inner = err.into_inner();
        let (line, column) = inner.span().map_or((0, 0), |s| line_col(text, s.start));
        let message = inner.message().trim().to_owned();
        let hint = unknown_field_hint(&message);
        ConfigError::Parse {
            file: path.to_owned(),
            line,
            column,
            problem: Box::new(Problem {
                key: if key == "." { "(top level)".into() } else { key },
                value: None,
                message,
                hint,
            }),
        }
    })?;
    PipelineSpec::from_raw(raw)
        .map_err(|problems| ConfigError::Invalid { file: path.to_owned(), problems })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, column)
}

/// serde says "unknown field `colums`, expected one of `key`, `columns`"; name the likely one.
fn unknown_field_hint(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (word, rest) = rest.split_once('`')?;
    let candidates: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    error::did_you_mean(word, candidates).map(|m| format!("did you mean `{m}`?"))
}
