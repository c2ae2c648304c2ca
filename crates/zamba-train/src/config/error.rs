//! Config errors that name the key, say what was expected, and suggest close key names.

use std::fmt;
use std::path::PathBuf;

use crate::schema::{RangeError, join_key};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// The file could not be read.
    Read,
    /// Not valid TOML.
    Syntax,
    /// A key that no section has (or a value not among the allowed names, e.g. a schedule `kind`).
    UnknownKey,
    /// A value of the wrong type.
    WrongType,
    /// A required key is absent.
    MissingKey,
    /// A `--set` argument that is not `section.key=value`.
    BadOverride,
    /// Values that are each well-typed but make no sense (alone or together).
    Invalid,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ConfigError {
    pub kind: ConfigErrorKind,
    /// The config file, when the error concerns one.
    pub file: Option<PathBuf>,
    /// Dotted key path, e.g. `optimizer.beta2` or `data.sources.web.weight`.
    pub key: Option<String>,
    pub message: String,
    /// A close existing key (full dotted path) or allowed value.
    pub did_you_mean: Option<String>,
    /// The `--set` argument the key came from, if any.
    pub from_override: Option<String>,
}

impl ConfigError {
    pub fn new(kind: ConfigErrorKind, key: Option<String>, message: impl Into<String>) -> Self {
        Self {
            kind,
            file: None,
            key,
            message: message.into(),
            did_you_mean: None,
            from_override: None,
        }
    }

    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ConfigErrorKind::Invalid, Some(key.into()), message)
    }

    pub(crate) fn with_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.file.get_or_insert_with(|| file.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(key) = &self.key {
            write!(f, "`{key}`: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(s) = &self.did_you_mean {
            write!(f, "; did you mean `{s}`?")?;
        }
        if let Some(o) = &self.from_override {
            write!(f, " (from --set {o})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The candidate closest to `name` by edit distance, if close enough to be a plausible typo.
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = match name.chars().count() {
        0..=4 => 1,
        5..=8 => 2,
        _ => 3,
    };
    let name = name.to_lowercase();
    // Ties (beta3 → beta1 or beta2?) go to the candidate whose differing characters are nearest
    // (beta2): typos usually hit a neighbouring key or digit.
    let nearness = |c: &str| -> u32 {
        name.chars()
            .zip(c.chars())
            .map(|(a, b)| (a as u32).abs_diff(b as u32))
            .sum()
    };
    candidates
        .into_iter()
        .map(|c| {
            let lower = c.to_lowercase();
            (
                strsim::damerau_levenshtein(&name, &lower),
                nearness(&lower),
                c,
            )
        })
        .filter(|(d, _, _)| *d <= limit)
        .min_by_key(|(d, n, _)| (*d, *n))
        .map(|(_, _, c)| c)
}

impl From<RangeError> for ConfigError {
    fn from(e: RangeError) -> Self {
        ConfigError::invalid(e.key, e.message)
    }
}

/// Names inside backticks in a serde message, e.g. the expected fields of
/// "unknown field `beta3`, expected `beta1` or `beta2`".
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// Turns a serde error at `path` (as reported by serde_path_to_error, relative to `prefix`) into a
/// ConfigError with a full key path, the expected type or names, and a suggestion.
pub(crate) fn from_serde(prefix: &str, path: &str, message: &str) -> ConfigError {
    let path = if path == "." {
        String::new()
    } else {
        path.to_owned()
    };
    let full = |p: &str| join_key(prefix, p);
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (field, expected_text) = rest.split_once('`').unwrap_or((rest, ""));
        let expected = backticked(expected_text);
        // serde_path_to_error includes the unknown key in the path for plain structs only.
        let parent = match path.rsplit_once('.') {
            Some((parent, last)) if last == field => parent.to_owned(),
            None if path == field => String::new(),
            _ => path.clone(),
        };
        let key = full(&join_key(&parent, field));
        let mut e = ConfigError::new(
            ConfigErrorKind::UnknownKey,
            Some(key),
            if expected.is_empty() {
                "unknown key; this table takes no keys".to_owned()
            } else {
                format!(
                    "unknown key; expected one of {}",
                    expected
                        .iter()
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        );
        e.did_you_mean =
            closest(field, expected.iter().copied()).map(|s| full(&join_key(&parent, s)));
        return e;
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let (value, expected_text) = rest.split_once('`').unwrap_or((rest, ""));
        let expected = backticked(expected_text);
        let mut e = ConfigError::new(
            ConfigErrorKind::UnknownKey,
            Some(full(&path)),
            format!(
                "unknown value {value:?}; expected one of {}",
                expected
                    .iter()
                    .map(|s| format!("\"{s}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        e.did_you_mean = closest(value, expected.iter().copied()).map(|s| format!("\"{s}\""));
        return e;
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or(rest);
        return ConfigError::new(
            ConfigErrorKind::MissingKey,
            Some(full(&join_key(&path, field))),
            "missing required key",
        );
    }
    if message.starts_with("invalid type")
        || message.starts_with("invalid value")
        || message.starts_with("invalid length")
    {
        // Messages read "invalid type: string \"x\", expected f64"; keep them, with friendlier type names.
        let friendly = message
            .replace("expected f64", "expected a number")
            .replace("expected usize", "expected a non-negative integer")
            .replace("expected u64", "expected a non-negative integer")
            .replace("expected u32", "expected a non-negative integer")
            .replace("expected a boolean", "expected true or false");
        return ConfigError::new(ConfigErrorKind::WrongType, Some(full(&path)), friendly);
    }
    let key = full(&path);
    ConfigError::new(
        ConfigErrorKind::Invalid,
        (!key.is_empty()).then_some(key),
        message.to_owned(),
    )
}
