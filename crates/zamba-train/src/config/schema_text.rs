//! Reading the run config's JSON Schema for people: key order, types with their ranges, defaults
//! as TOML. Shared by the reference (docs/configuration.md) and the starter config.

use super::RunConfig;
use crate::schema::{range_text, schema_of};
use serde::Deserialize;
use serde_json::Value as Json;

/// The schema of the whole run config.
pub fn run_schema() -> Json {
    schema_of::<RunConfig>()
}

/// The sections in the order [`RunConfig`] declares them (the schema's maps are sorted by name).
pub fn section_order() -> Vec<&'static str> {
    field_names::<RunConfig>()
}

/// The field names serde's derive hands to `deserialize_struct`, in declaration order.
pub fn field_names<'de, T: Deserialize<'de>>() -> Vec<&'static str> {
    /// A deserializer that only records the fields it is asked for, then stops.
    struct Recorder<'a>(&'a mut Vec<&'static str>);

    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field names recorded")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }

    impl<'de> serde::Deserializer<'de> for Recorder<'_> {
        type Error = Stop;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Stop> {
            self.0.extend_from_slice(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    let mut names = Vec::new();
    let _ = T::deserialize(Recorder(&mut names));
    names
}

/// The object schema of a section or key: an optional section (`anyOf [object, null]`) is its object.
pub fn object_schema(schema: &Json) -> &Json {
    schema
        .get("anyOf")
        .and_then(Json::as_array)
        .and_then(|alts| alts.iter().find(|a| a.get("properties").is_some()))
        .unwrap_or(schema)
}

pub fn properties(schema: &Json) -> Option<&serde_json::Map<String, Json>> {
    schema.get("properties").and_then(Json::as_object)
}

pub fn required(schema: &Json) -> Vec<&str> {
    schema
        .get("required")
        .and_then(Json::as_array)
        .map(|r| r.iter().filter_map(Json::as_str).collect())
        .unwrap_or_default()
}

/// Extension keyword of a schema that lists its keys in the order to show them.
pub const KEY_ORDER: &str = "x-key-order";

/// The keys of an object schema: in its [`KEY_ORDER`] when it has one, else the required ones in
/// declaration order, then the others by name (the schema's maps are sorted by name).
pub fn ordered_keys(schema: &Json) -> Vec<String> {
    if let Some(order) = schema.get(KEY_ORDER).and_then(Json::as_array) {
        return order
            .iter()
            .filter_map(Json::as_str)
            .map(str::to_owned)
            .collect();
    }
    let required = required(schema);
    let mut keys: Vec<String> = required.iter().map(|k| k.to_string()).collect();
    if let Some(props) = properties(schema) {
        keys.extend(
            props
                .keys()
                .filter(|k| !required.contains(&k.as_str()))
                .cloned(),
        );
    }
    keys
}

/// The schema of the values of a map key such as `data.sources` (`NAME` → table).
pub fn map_value_schema(schema: &Json) -> Option<&Json> {
    schema
        .get("additionalProperties")
        .filter(|v| v.is_object() && properties(v).is_some())
}

/// The variants of a tagged enum (a schedule): `(tag value, variant schema)` for a tag key.
pub fn tagged_variants<'a>(schema: &'a Json, tag: &str) -> Vec<(String, &'a Json)> {
    schema
        .get("oneOf")
        .and_then(Json::as_array)
        .map(|alts| {
            alts.iter()
                .filter_map(|alt| {
                    let value = alt.pointer(&format!("/properties/{tag}/const"))?;
                    Some((value.as_str()?.to_owned(), alt))
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn description(schema: &Json) -> &str {
    schema
        .get("description")
        .and_then(Json::as_str)
        .unwrap_or("")
}

/// The first paragraph of a description, on one line.
pub fn first_paragraph(schema: &Json) -> String {
    description(schema)
        .split("\n\n")
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first sentence of `text` (abbreviations such as "e.g." do not end it).
pub fn first_sentence(text: &str) -> &str {
    let mut from = 0;
    while let Some(i) = text[from..].find(". ") {
        let end = from + i;
        let before = &text[..end];
        if !(before.ends_with("e.g") || before.ends_with("i.e") || before.ends_with("etc")) {
            return &text[..=end];
        }
        from = end + 2;
    }
    text
}

/// The type of a key in words, with its allowed values or range: `integer ≥ 1`,
/// `number in [0, 1)`, `"linear" | "cosine"`, `list of string`.
pub fn type_text(schema: &Json) -> String {
    if let Some(values) = enum_values(schema) {
        return values
            .iter()
            .map(|(v, _)| format!("`{}`", toml_literal(v)))
            .collect::<Vec<_>>()
            .join(" | ");
    }
    if let Some(alts) = schema
        .get("anyOf")
        .or_else(|| schema.get("oneOf"))
        .and_then(Json::as_array)
    {
        let texts: Vec<String> = alts
            .iter()
            .filter(|a| a.get("type") != Some(&Json::from("null")))
            .map(type_text)
            .collect();
        return texts.join(" or ");
    }
    let kind = match schema.get("type") {
        Some(Json::Array(types)) => types
            .iter()
            .filter_map(Json::as_str)
            .find(|t| *t != "null")
            .unwrap_or("any"),
        Some(Json::String(t)) => t.as_str(),
        _ => "any",
    };
    match kind {
        "integer" | "number" => match range_text(schema) {
            Some(range) => format!("{kind} {range}"),
            None => kind.to_owned(),
        },
        "boolean" => "bool".to_owned(),
        "array" => {
            let items = schema.get("items").map(type_text).unwrap_or_default();
            let non_empty = schema.get("minItems").and_then(Json::as_u64).unwrap_or(0) > 0;
            format!(
                "{}list of {items}",
                if non_empty { "non-empty " } else { "" }
            )
        }
        "object" => "table".to_owned(),
        other => other.to_owned(),
    }
}

/// The allowed values of an enumeration, each with its description (may be empty).
pub fn enum_values(schema: &Json) -> Option<Vec<(Json, String)>> {
    if let Some(values) = schema.get("enum").and_then(Json::as_array) {
        return Some(values.iter().map(|v| (v.clone(), String::new())).collect());
    }
    if let Some(value) = schema.get("const") {
        return Some(vec![(value.clone(), first_paragraph(schema))]);
    }
    let alts = schema.get("oneOf")?.as_array()?;
    let mut values = Vec::new();
    for alt in alts {
        values.extend(enum_values(alt)?);
    }
    Some(values)
}

/// The default of a key as TOML text; `None` when it has none (required, or unset).
pub fn default_text(schema: &Json) -> Option<String> {
    match schema.get("default") {
        None | Some(Json::Null) => None,
        Some(value) => Some(toml_literal(value)),
    }
}

/// A JSON value written as TOML (inline), e.g. `1e-8`, `"cpu"`, `[1, 2]`.
pub fn toml_literal(value: &Json) -> String {
    match value {
        Json::Null => "unset".to_owned(),
        Json::Bool(b) => b.to_string(),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (None, Some(u), _) => u.to_string(),
            (_, _, Some(x)) => format!("{x:?}"),
            _ => n.to_string(),
        },
        Json::String(s) => format!("{s:?}"),
        Json::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(toml_literal)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Json::Object(map) => format!(
            "{{ {} }}",
            map.iter()
                .map(|(k, v)| format!("{k} = {}", toml_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
