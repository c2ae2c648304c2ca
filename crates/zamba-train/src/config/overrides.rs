//! `--set section.key=value` overrides, applied to the parsed TOML before it is checked.

use super::error::{ConfigError, ConfigErrorKind};

/// One parsed `--set` argument.
#[derive(Clone, Debug, PartialEq)]
pub struct Override {
    /// Dotted key path, e.g. `optimizer.beta2` or `data.sources.web.weight`.
    pub key: String,
    pub value: toml::Value,
    /// The argument as given, for error messages.
    pub raw: String,
}

impl Override {
    /// Parses `key=value`; the value is read as a TOML value (`3`, `1e-4`, `true`, `"x"`,
    /// `[1, 2]`) and, when it is not one, taken as a plain string (`runs/x`, `cosine`).
    pub fn parse(arg: &str) -> Result<Self, ConfigError> {
        let bad = |msg: &str| {
            ConfigError::new(
                ConfigErrorKind::BadOverride,
                None,
                format!("--set {arg:?}: {msg}"),
            )
        };
        let (key, value) = arg
            .split_once('=')
            .ok_or_else(|| bad("expected section.key=value"))?;
        let key = key.trim();
        if key.is_empty()
            || key
                .split('.')
                .any(|s| s.is_empty() || s.contains(char::is_whitespace))
        {
            return Err(bad("the key must be a dotted path like optimizer.beta2"));
        }
        if !key.contains('.') {
            return Err(bad(
                "set a key inside a section (e.g. train.steps=100), not a whole section",
            ));
        }
        Ok(Self {
            key: key.to_owned(),
            value: parse_value(value.trim()),
            raw: arg.to_owned(),
        })
    }

    /// Sets the value in `table`, creating missing tables along the path.
    pub fn apply(&self, table: &mut toml::Table) -> Result<(), ConfigError> {
        let segments: Vec<&str> = self.key.split('.').collect();
        let (last, parents) = segments.split_last().expect("a validated key has segments");
        let mut current = table;
        for (i, seg) in parents.iter().enumerate() {
            let entry = current
                .entry(seg.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            current = match entry {
                toml::Value::Table(t) => t,
                other => {
                    let at = segments[..=i].join(".");
                    let mut e = ConfigError::new(
                        ConfigErrorKind::BadOverride,
                        Some(at),
                        format!(
                            "is a {}, not a table, so `{}` cannot be set",
                            other.type_str(),
                            self.key
                        ),
                    );
                    e.from_override = Some(self.raw.clone());
                    return Err(e);
                }
            };
        }
        current.insert(last.to_string(), self.value.clone());
        Ok(())
    }
}

/// A TOML value if `text` is one, else `text` as a string.
pub fn parse_value(text: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {text}")) {
        Ok(mut t) if t.len() == 1 => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(text.to_owned())),
        _ => toml::Value::String(text.to_owned()),
    }
}
