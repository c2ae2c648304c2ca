//! Checking values against the JSON Schema of their type: the ranges and lengths declared on
//! fields (`#[schemars(range(min = 1, max = …))]`, `extend("exclusiveMinimum" = 0.0)`,
//! `length(min = 1)`) are enforced by [`check_ranges`] and printed by the config reference.
//! Independent of the run config, so that any module (the LR schedules too) can check its own
//! values.

use schemars::JsonSchema;
use serde::Serialize;
use serde_json::Value as Json;

/// The most optimizer steps of a run, and the bound of every key counted in steps: with it,
/// every count the trainer forms (steps × tokens per step) stays within 64 bits.
pub const MAX_STEPS: u64 = 1 << 32;
/// The largest learning rate any schedule key accepts (far above any that trains).
pub const MAX_LR: f64 = 1e3;
/// The longest duration any key accepts, in seconds: a day.
pub const MAX_SECONDS: f64 = 86_400.0;

/// A value outside what its schema allows: the key (`a.b[2]`) and what was wrong.
#[derive(Clone, Debug, PartialEq)]
pub struct RangeError {
    pub key: String,
    pub message: String,
}

impl RangeError {
    fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

/// Joins a parent key path and a child key.
pub fn join_key(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_owned()
    } else {
        format!("{parent}.{child}")
    }
}

/// The JSON Schema of `T` with every subschema inline (no `$ref`s to follow).
pub fn schema_of<T: JsonSchema>() -> Json {
    schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value()
}

/// Checks every value in `value` against the ranges and lengths its schema declares, and that
/// every number is finite. Errors name the key as `prefix.key.sub[i]`.
pub fn check_ranges<T: JsonSchema + Serialize>(value: &T, prefix: &str) -> Result<(), RangeError> {
    let value = toml::Value::try_from(value)
        .map_err(|e| RangeError::new(prefix, format!("cannot be checked: {e}")))?;
    check_value(&schema_of::<T>(), &value, prefix)
}

/// As [`check_ranges`], for a value (a TOML table, say) against a schema.
pub fn check_value(schema: &Json, value: &toml::Value, key: &str) -> Result<(), RangeError> {
    let schema = matching_variant(schema, value);
    let fail = |message: String| {
        let message = match gist(schema) {
            Some(what) => format!("{message} ({what})"),
            None => message,
        };
        Err(RangeError::new(key, message))
    };
    match value {
        toml::Value::Integer(i) => check_number(schema, *i as f64, &i.to_string()).or_else(fail),
        toml::Value::Float(x) if !x.is_finite() => {
            fail(format!("is {x}; expected a finite number"))
        }
        toml::Value::Float(x) => check_number(schema, *x, &x.to_string()).or_else(fail),
        toml::Value::Array(items) => {
            if let Some(min) = schema.get("minItems").and_then(Json::as_u64)
                && (items.len() as u64) < min
            {
                return fail(format!(
                    "has {} entries; expected at least {min}",
                    items.len()
                ));
            }
            let item_schema = schema.get("items").unwrap_or(&Json::Null);
            for (i, item) in items.iter().enumerate() {
                check_value(item_schema, item, &format!("{key}[{i}]"))?;
            }
            Ok(())
        }
        toml::Value::Table(table) => {
            if let Some(min) = schema.get("minProperties").and_then(Json::as_u64)
                && (table.len() as u64) < min
            {
                return fail(format!(
                    "has {} entries; expected at least {min}",
                    table.len()
                ));
            }
            for (name, item) in table {
                let item_schema = schema
                    .pointer(&format!("/properties/{name}"))
                    .or_else(|| schema.get("additionalProperties"))
                    .unwrap_or(&Json::Null);
                check_value(item_schema, item, &join_key(key, name))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The first clause of a key's description, to remind what the key is in an error.
fn gist(schema: &Json) -> Option<String> {
    let text = schema.get("description")?.as_str()?;
    let end = [". ", ";", "\n\n", ":"]
        .iter()
        .filter_map(|sep| text.find(sep))
        .min()
        .unwrap_or(text.len());
    let clause = text[..end].trim_end_matches('.').replace('\n', " ");
    let mut chars = clause.chars();
    let first = chars.next()?;
    let keep_case = first.is_uppercase() && chars.next().is_some_and(char::is_uppercase);
    Some(if keep_case || !first.is_alphabetic() {
        clause
    } else {
        first.to_lowercase().chain(clause.chars().skip(1)).collect()
    })
}

/// `Err(message)` when `x` lies outside the schema's bounds.
fn check_number(schema: &Json, x: f64, shown: &str) -> Result<(), String> {
    let bound = |name: &str| schema.get(name).and_then(Json::as_f64);
    let inside = bound("minimum").is_none_or(|b| x >= b)
        && bound("exclusiveMinimum").is_none_or(|b| x > b)
        && bound("maximum").is_none_or(|b| x <= b)
        && bound("exclusiveMaximum").is_none_or(|b| x < b);
    if inside {
        Ok(())
    } else {
        Err(format!(
            "is {shown}; expected {}",
            range_text(schema).unwrap_or_default()
        ))
    }
}

/// The bounds of a numeric schema in words: "≥ 1", "> 0", "in [0, 1)"; `None` when unbounded.
/// The implicit `minimum: 0` of unsigned integers is included ("≥ 0").
pub fn range_text(schema: &Json) -> Option<String> {
    let get = |name: &str| schema.get(name).and_then(Json::as_f64);
    let lower = get("exclusiveMinimum")
        .map(|b| ('(', b))
        .or(get("minimum").map(|b| ('[', b)));
    let upper = get("exclusiveMaximum")
        .map(|b| (')', b))
        .or(get("maximum").map(|b| (']', b)));
    let num = |b: f64| {
        if b.fract() == 0.0 && b.abs() < 1e15 {
            format!("{}", b as i64)
        } else {
            format!("{b}")
        }
    };
    Some(match (lower, upper) {
        (Some((l, a)), Some((u, b))) => format!("in {l}{}, {}{u}", num(a), num(b)),
        (Some(('(', a)), None) => format!("> {}", num(a)),
        (Some((_, a)), None) => format!("≥ {}", num(a)),
        (None, Some((')', b))) => format!("< {}", num(b)),
        (None, Some((_, b))) => format!("≤ {}", num(b)),
        (None, None) => return None,
    })
}

/// For `anyOf`/`oneOf` schemas (optional values, tagged enums), the alternative `value` is an
/// instance of: same JSON type, and equal to every `const` property (e.g. a schedule's `kind`).
pub fn matching_variant<'a>(schema: &'a Json, value: &toml::Value) -> &'a Json {
    let alternatives = schema
        .get("oneOf")
        .or_else(|| schema.get("anyOf"))
        .and_then(Json::as_array);
    let Some(alternatives) = alternatives else {
        return schema;
    };
    alternatives
        .iter()
        .find(|alt| has_type(alt, value) && consts_match(alt, value))
        .map(|alt| matching_variant(alt, value))
        .unwrap_or(schema)
}

fn has_type(schema: &Json, value: &toml::Value) -> bool {
    let name = match value {
        toml::Value::Integer(_) => "integer",
        toml::Value::Float(_) => "number",
        toml::Value::String(_) => "string",
        toml::Value::Boolean(_) => "boolean",
        toml::Value::Array(_) => "array",
        toml::Value::Table(_) => "object",
        toml::Value::Datetime(_) => "string",
    };
    let fits = |t: &Json| t == name || (name == "integer" && t == "number");
    match schema.get("type") {
        Some(Json::Array(types)) => types.iter().any(fits),
        Some(t) => fits(t),
        // No type: an enumeration of strings, or anything.
        None => (schema.get("const").is_none() && schema.get("enum").is_none()) || name == "string",
    }
}

fn consts_match(schema: &Json, value: &toml::Value) -> bool {
    let Some(properties) = schema.get("properties").and_then(Json::as_object) else {
        return true;
    };
    properties
        .iter()
        .all(|(name, prop)| match prop.get("const") {
            None => true,
            Some(expected) => value
                .get(name)
                .and_then(|v| serde_json::to_value(v).ok())
                .is_some_and(|v| &v == expected),
        })
}
