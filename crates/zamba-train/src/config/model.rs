//! `[model]`: a preset and/or any field of [`ZambaConfig`], resolved to a validated config.
//!
//! Serialized as `preset` plus *every* resolved field, so a saved config does not depend on
//! what a preset means in a later version.

use super::error::{ConfigError, ConfigErrorKind, closest};
use super::schema_text::{KEY_ORDER, field_names};
use super::summary::human_count;
use crate::schema::check_value;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use zamba_model::ZambaConfig;
use zamba_model::config::PRESETS;
use zamba_model::params::ParamCounts;

#[derive(Clone, Debug, PartialEq)]
pub struct ModelSection {
    /// The preset the fields override (`None`: transformers' defaults, i.e. Zamba-7B).
    pub preset: Option<String>,
    /// The resolved, validated model config.
    pub config: ZambaConfig,
}

impl ModelSection {
    /// Resolves `[model]` (key → value) into a validated config; errors name `model.<key>`.
    pub fn resolve(table: &BTreeMap<String, Value>) -> Result<Self, ConfigError> {
        let preset = match table.get("preset") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(ConfigError::new(
                    ConfigErrorKind::WrongType,
                    Some("model.preset".into()),
                    format!(
                        "invalid type: {other}, expected a preset name (one of {})",
                        PRESETS.join(", ")
                    ),
                ));
            }
        };
        let base = match &preset {
            None => ZambaConfig::default(),
            Some(name) => ZambaConfig::preset(name).map_err(|_| {
                let mut e = ConfigError::new(
                    ConfigErrorKind::UnknownKey,
                    Some("model.preset".into()),
                    format!(
                        "unknown preset {name:?}; expected one of {}",
                        PRESETS.join(", ")
                    ),
                );
                e.did_you_mean = closest(name, PRESETS.iter().copied()).map(|s| format!("\"{s}\""));
                e
            })?,
        };
        let mut merged = match serde_json::to_value(&base) {
            Ok(Value::Object(map)) => map,
            _ => {
                return Err(ConfigError::invalid(
                    "model",
                    "the model config does not serialize to a table",
                ));
            }
        };
        let known: Vec<String> = merged.keys().cloned().collect();
        let schema = crate::schema::schema_of::<ModelSection>();
        for (key, value) in table.iter().filter(|(k, _)| k.as_str() != "preset") {
            if !merged.contains_key(key) {
                let mut e = ConfigError::new(
                    ConfigErrorKind::UnknownKey,
                    Some(format!("model.{key}")),
                    "unknown key; expected `preset` or a field of the Zamba config (see crates/zamba-model/src/config.rs)",
                );
                e.did_you_mean = closest(key, known.iter().map(String::as_str).chain(["preset"]))
                    .map(|s| format!("model.{s}"));
                return Err(e);
            }
            // Type-check each field alone so the error names it (ZambaConfig fills in the rest).
            let single = Value::Object([(key.clone(), value.clone())].into_iter().collect());
            if let Err(e) = serde_json::from_value::<ZambaConfig>(single) {
                return Err(ConfigError::new(
                    ConfigErrorKind::WrongType,
                    Some(format!("model.{key}")),
                    friendly_type_error(&e.to_string()),
                ));
            }
            // Ranges first: sizes the model's own checks would overflow on are refused here.
            if let (Some(property), Ok(as_toml)) = (
                schema.pointer(&format!("/properties/{key}")),
                toml::Value::try_from(value),
            ) {
                check_value(property, &as_toml, &format!("model.{key}"))?;
            }
            merged.insert(key.clone(), value.clone());
        }
        let config: ZambaConfig = serde_json::from_value(Value::Object(merged)).map_err(|e| {
            ConfigError::new(
                ConfigErrorKind::WrongType,
                Some("model".into()),
                e.to_string(),
            )
        })?;
        config.validate().map_err(|e| {
            let message = e.to_string();
            // ZambaConfig's messages mention the offending field(s); prefer one the user set.
            let mentioned = |k: &&String| message.contains(k.as_str());
            let set_by_user = table
                .keys()
                .filter(|k| k.as_str() != "preset")
                .filter(mentioned)
                .max_by_key(|k| k.len());
            let key = set_by_user
                .or_else(|| known.iter().filter(mentioned).max_by_key(|k| k.len()))
                .map(|k| format!("model.{k}"));
            ConfigError::new(
                ConfigErrorKind::Invalid,
                key.or(Some("model".into())),
                message,
            )
        })?;
        Ok(Self { preset, config })
    }
}

fn friendly_type_error(message: &str) -> String {
    message
        .replace("expected usize", "expected a non-negative integer")
        .replace("expected f64", "expected a number")
}

impl Serialize for ModelSection {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let map: BTreeMap<String, Value> =
            match serde_json::to_value(&self.config).map_err(S::Error::custom)? {
                // TOML has no null: absent optional fields are simply left out.
                Value::Object(m) => m.into_iter().filter(|(_, v)| !v.is_null()).collect(),
                _ => {
                    return Err(S::Error::custom(
                        "the model config does not serialize to a table",
                    ));
                }
            };
        // The preset first, so a reader sees what the fields override.
        use serde::ser::SerializeMap;
        let mut out = s.serialize_map(Some(map.len() + 1))?;
        if let Some(p) = &self.preset {
            out.serialize_entry("preset", p)?;
        }
        for (k, v) in &map {
            out.serialize_entry(k, v)?;
        }
        out.end()
    }
}

impl<'de> Deserialize<'de> for ModelSection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let table = BTreeMap::<String, Value>::deserialize(d)?;
        Self::resolve(&table).map_err(serde::de::Error::custom)
    }
}

/// The schema of `[model]`: `preset` plus every field of [`ZambaConfig`] (with its doc comment
/// and its default, transformers' = Zamba-7B's), described with a table of the presets.
impl JsonSchema for ModelSection {
    fn schema_name() -> Cow<'static, str> {
        "ModelSection".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let mut schema = ZambaConfig::json_schema(generator);
        let preset = json_schema!({
            "type": "string",
            "enum": PRESETS,
            "description": "Start from this preset's model config; the other keys override its fields. Absent: transformers' defaults, i.e. Zamba-7B.",
        });
        let mut properties = serde_json::Map::from_iter([("preset".to_owned(), preset.to_value())]);
        if let Some(Value::Object(fields)) = schema.remove("properties") {
            properties.extend(fields);
        }
        for (key, max) in MODEL_LIMITS {
            if let Some(property) = properties.get_mut(*key) {
                set_maximum(property, *max);
            }
        }
        schema.insert("properties".into(), Value::Object(properties));
        // The preset first, then the fields in transformers' order.
        let order: Vec<&str> = std::iter::once("preset")
            .chain(field_names::<ZambaConfig>())
            .collect();
        schema.insert(KEY_ORDER.into(), serde_json::json!(order));
        schema.insert("description".into(), Value::String(description()));
        schema.remove("title");
        schema
    }
}

/// The largest value of each numeric `[model]` key: far above any model this trainer can hold,
/// and small enough that every size and count derived from them fits in 64 bits.
const MODEL_LIMITS: &[(&str, f64)] = &[
    ("vocab_size", 16_777_216.0),
    ("hidden_size", 65_536.0),
    ("attention_hidden_size", 131_072.0),
    ("intermediate_size", 262_144.0),
    ("num_hidden_layers", 4_096.0),
    ("num_attention_heads", 4_096.0),
    ("attention_head_dim", 65_536.0),
    ("num_key_value_heads", 4_096.0),
    ("n_mamba_heads", 65_536.0),
    ("initializer_range", 1e3),
    ("rms_norm_eps", 1.0),
    ("pad_token_id", 16_777_216.0),
    ("bos_token_id", 16_777_216.0),
    ("eos_token_id", 16_777_216.0),
    ("max_position_embeddings", 16_777_216.0),
    ("attn_layer_period", 4_096.0),
    ("attn_layer_offset", 4_096.0),
    ("mamba_d_state", 4_096.0),
    ("mamba_d_conv", 1_024.0),
    ("mamba_expand", 64.0),
    ("mamba_dt_rank", 65_536.0),
    ("time_step_min", 1e3),
    ("time_step_max", 1e3),
    ("time_step_floor", 1e3),
];

/// Sets `maximum` on a numeric schema, or on the numeric alternatives of a union (and
/// `minimum` 0 where none is set: no model key is negative).
fn set_maximum(schema: &mut Value, max: f64) {
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(alternatives)) = schema.get_mut(key) {
            alternatives.iter_mut().for_each(|a| set_maximum(a, max));
            return;
        }
    }
    let numeric = |t: &Value| t == "integer" || t == "number";
    let is_numeric = match schema.get("type") {
        Some(Value::Array(types)) => types.iter().any(numeric),
        Some(t) => numeric(t),
        None => false,
    };
    if let (true, Some(object)) = (is_numeric, schema.as_object_mut()) {
        object.insert("maximum".into(), serde_json::json!(max));
        object.entry("minimum").or_insert(serde_json::json!(0));
    }
}

fn description() -> String {
    let mut text = String::from(
        "The model: a `preset`, and any field of transformers' `ZambaConfig` to override it (same \
         names and meaning as in a Zamba `config.json`). The resolved config is validated as a \
         whole, and saved with every field so a run does not depend on what a preset means later.\n\n\
         | preset | layers | hybrid layers | hidden_size | attention heads | vocab_size | parameters |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for name in PRESETS {
        let Ok(c) = ZambaConfig::preset(name) else {
            continue;
        };
        let _ = writeln!(
            text,
            "| `{name}` | {} | {:?} | {} | {} | {} | {} |",
            c.num_hidden_layers,
            c.hybrid_layers(),
            c.hidden_size,
            c.num_attention_heads,
            c.vocab_size,
            human_count(ParamCounts::of(&c).total() as f64)
        );
    }
    text.push_str(
        "\n`zamba-7b` is Zyphra/Zamba-7B-v1; the others are small proxies for CPU runs and tests. \
         `zamba-train params --preset NAME` prints the parameter count by component. \
         The defaults below are transformers' (Zamba-7B's); a preset replaces them with its own.",
    );
    text
}
