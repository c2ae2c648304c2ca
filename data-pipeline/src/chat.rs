//! Conversations → documents: a list of messages rendered with a tokenizer's Jinja chat template,
//! the way transformers' `apply_chat_template(..., tokenize=False)` renders it, and the byte spans
//! the assistant messages add (for `--loss-on assistant`).
//!
//! Templates run in minijinja configured like transformers' environment: `trim_blocks`,
//! `lstrip_blocks`, loop controls, Python string/dict methods (`.strip()`, `.items()`, …), and the
//! globals and filters transformers adds: `raise_exception`, `strftime_now`, and a `tojson` that
//! writes what Python's `json.dumps(ensure_ascii=False)` writes. The special tokens of the
//! tokenizer_config.json (`bos_token`, `eos_token`, …) are template variables.
//!
//! An assistant message's span runs from where its text starts to the end of what rendering the
//! message adds (so its end-of-turn markup is included): the rendering of the conversation up to
//! and including it, minus the rendering before it with the generation prompt (the assistant
//! header) — or, for templates whose generation prompt the message does not continue, minus the
//! part before the message's text. Templates that do not render conversations incrementally cannot
//! be masked this way, and are reported as such.

use anyhow::{Context, Result, bail};
use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use crate::tokenizer::TOKENIZER_CONFIG_FILE;

/// Roles a message may have once ShareGPT names (`human`, `gpt`) are mapped.
pub const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Reads one conversation: a JSON array of `{role, content}` or ShareGPT `{from, value}` objects
/// (`human` → user, `gpt` → assistant, `system`). The error says what is wrong and where.
pub fn parse_conversation(value: &serde_json::Value) -> Result<Vec<Message>, String> {
    let serde_json::Value::Array(items) = value else {
        return Err(format!(
            "expected a list of messages, got {}",
            kind_of(value)
        ));
    };
    if items.is_empty() {
        return Err("the conversation is an empty list of messages".into());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_message(item).map_err(|e| format!("message {i}: {e}")))
        .collect()
}

fn parse_message(item: &serde_json::Value) -> Result<Message, String> {
    let serde_json::Value::Object(map) = item else {
        return Err(format!("expected an object, got {}", kind_of(item)));
    };
    let (role_key, content_key) = if map.contains_key("role") || map.contains_key("content") {
        ("role", "content")
    } else if map.contains_key("from") || map.contains_key("value") {
        ("from", "value")
    } else {
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        return Err(format!(
            "has neither role/content nor from/value fields (fields: {})",
            keys.join(", ")
        ));
    };
    let role = match map.get(role_key) {
        Some(serde_json::Value::String(r)) => r.as_str(),
        Some(other) => {
            return Err(format!(
                "{role_key} is {}, expected a string",
                kind_of(other)
            ));
        }
        None => return Err(format!("has no {role_key:?} field")),
    };
    let role = match role {
        "human" => "user",
        "gpt" => "assistant",
        r if ROLES.contains(&r) => r,
        other => {
            return Err(format!(
                "unknown role {other:?} (expected one of {}, or ShareGPT's human/gpt)",
                ROLES.join(", ")
            ));
        }
    };
    let content = match map.get(content_key) {
        Some(serde_json::Value::String(c)) => c.clone(),
        Some(other) => {
            return Err(format!(
                "{content_key} is {}, expected a string",
                kind_of(other)
            ));
        }
        None => return Err(format!("has no {content_key:?} field")),
    };
    Ok(Message {
        role: role.to_owned(),
        content,
    })
}

fn kind_of(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A compiled chat template with the tokenizer's special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// `bos_token`, `eos_token`, … as strings.
    special: BTreeMap<String, String>,
    /// The template text (its hash is recorded in the manifest).
    pub source: String,
}

impl ChatTemplate {
    /// `template_file` if given, else the `chat_template` of the tokenizer_config.json beside
    /// `tokenizer_json`; special tokens from that tokenizer_config.json when present.
    pub fn load(tokenizer_json: &Path, template_file: Option<&Path>) -> Result<Self> {
        let config_path = tokenizer_json.with_file_name(TOKENIZER_CONFIG_FILE);
        let config: Option<serde_json::Value> = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not valid JSON", config_path.display()))?,
            )
        } else {
            None
        };
        let template = match template_file {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading the chat template {}", path.display()))?,
            None => config
                .as_ref()
                .and_then(|c| template_from_config(c))
                .with_context(|| {
                    format!(
                        "no chat template: {} has no \"chat_template\"; pass one with --chat-template FILE",
                        if config.is_some() {
                            config_path.display().to_string()
                        } else {
                            format!("there is no {}", config_path.display())
                        }
                    )
                })?,
        };
        let special = config.as_ref().map(special_tokens).unwrap_or_default();
        Self::new(&template, special).with_context(|| {
            format!(
                "compiling the chat template for {}",
                tokenizer_json.display()
            )
        })
    }

    pub fn new(template: &str, special: BTreeMap<String, String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", template.to_owned())
            .map_err(|e| anyhow::anyhow!("the chat template does not compile: {e:#}"))?;
        Ok(Self {
            env,
            special,
            source: template.to_owned(),
        })
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_iter([
                    ("role", Value::from(m.role.clone())),
                    ("content", Value::from(m.content.clone())),
                ])
            })
            .collect();
        let mut vars: Vec<(String, Value)> = self
            .special
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect();
        vars.push(("messages".into(), Value::from(messages)));
        vars.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let context = Value::from_iter(vars);
        self.env
            .get_template("chat")
            .and_then(|t| t.render(context))
            .map_err(|e| anyhow::anyhow!("rendering the chat template: {e:#}"))
    }

    /// The rendered conversation and the byte range of each assistant message: from where the
    /// assistant's text starts to the end of what the message adds (its end-of-turn markup).
    pub fn render_with_spans(&self, messages: &[Message]) -> Result<(String, Vec<Range<usize>>)> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], false)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                bail!(
                    "the chat template does not render conversations incrementally (the rendering up to \
                     message {i} is not a prefix of the whole), so assistant spans cannot be found; \
                     use --loss-on all with this template"
                );
            }
            // The generation prompt is the assistant header when the template renders one that
            // the message continues; otherwise find the message's text in what it adds.
            let prompted = self.render(&messages[..i], true)?;
            let start = if through.starts_with(&prompted) {
                prompted.len()
            } else {
                let added = &through[before.len()..];
                let found = [m.content.as_str(), m.content.trim()]
                    .into_iter()
                    .filter(|c| !c.is_empty())
                    .find_map(|c| added.find(c));
                match found {
                    Some(offset) => before.len() + offset,
                    None => bail!(
                        "cannot locate assistant message {i} in what the chat template renders for it \
                         (its generation prompt is not a prefix of it, and its text does not appear); \
                         use --loss-on all with this template"
                    ),
                }
            };
            spans.push(start..through.len());
        }
        Ok((full, spans))
    }
}

/// A tokenizer_config.json's `chat_template`: a string, or a list of named templates of which
/// `default` is used (transformers' convention).
fn template_from_config(config: &serde_json::Value) -> Option<String> {
    match &config["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_owned),
        _ => None,
    }
}

/// `*_token` entries of a tokenizer_config.json (strings or AddedToken objects) as strings.
fn special_tokens(config: &serde_json::Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(map) = config.as_object() {
        for (key, value) in map {
            if !key.ends_with("_token") {
                continue;
            }
            let text = value.as_str().or_else(|| value["content"].as_str());
            if let Some(text) = text {
                out.insert(key.clone(), text.to_owned());
            }
        }
    }
    out
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `strftime_now(format)`: the current UTC time formatted with C `strftime`
/// directives (%d %m %Y %y %b %B %a %A %H %M %S %j %%).
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?
        .as_secs() as i64;
    Ok(Value::from(strftime(&format, secs)?))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

fn strftime(format: &str, unix_secs: i64) -> Result<String, Error> {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before_month =
        [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][(month - 1) as usize];
    let day_of_year = before_month + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let month_name = MONTHS[(month - 1) as usize];
        match d {
            'd' => out.push_str(&format!("{day:02}")),
            'm' => out.push_str(&format!("{month:02}")),
            'Y' => out.push_str(&year.to_string()),
            'y' => out.push_str(&format!("{:02}", year % 100)),
            'B' => out.push_str(month_name),
            'b' => out.push_str(&month_name[..3]),
            'A' => out.push_str(WEEKDAYS[weekday]),
            'a' => out.push_str(&WEEKDAYS[weekday][..3]),
            'H' => out.push_str(&format!("{:02}", secs / 3600)),
            'M' => out.push_str(&format!("{:02}", secs / 60 % 60)),
            'S' => out.push_str(&format!("{:02}", secs % 60)),
            'j' => out.push_str(&format!("{day_of_year:03}")),
            '%' => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{other}"),
                ));
            }
        }
    }
    Ok(out)
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match &separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ));
        }
        // Python's defaults: ", " without indent, "," with it.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let dumper = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    dumper.write(&value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct PyJson {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn write(&self, value: &Value, depth: usize, out: &mut String) -> Result<(), Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                let text = value.to_string();
                // Python writes floats with a decimal point (1.0), minijinja may not.
                out.push_str(&text);
            }
            ValueKind::String => write_json_string(value.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.container(out, depth, '[', ']', items.len(), |i, out| {
                    self.write(&items[i], depth + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                self.container(out, depth, '{', '}', keys.len(), |i, out| {
                    write_json_string(&keys[i].to_string(), out);
                    out.push_str(&self.key_sep);
                    self.write(&value.get_item(&keys[i])?, depth + 1, out)
                })?;
            }
            _ => write_json_string(&value.to_string(), out),
        }
        Ok(())
    }

    fn container(
        &self,
        out: &mut String,
        depth: usize,
        open: char,
        close: char,
        len: usize,
        mut item: impl FnMut(usize, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }
        for i in 0..len {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(n) = self.indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * (depth + 1)));
            }
            item(i, out)?;
        }
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
        out.push(close);
        Ok(())
    }
}

/// A JSON string as Python writes it with `ensure_ascii=False`.
fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs
            .iter()
            .map(|(r, c)| Message {
                role: r.to_string(),
                content: c.to_string(),
            })
            .collect()
    }

    #[test]
    fn conversations_parse_in_both_layouts_and_bad_ones_say_why() {
        let openai = serde_json::json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]);
        let sharegpt =
            serde_json::json!([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]);
        let want = msgs(&[("user", "hi"), ("assistant", "yo")]);
        assert_eq!(parse_conversation(&openai).unwrap(), want);
        assert_eq!(parse_conversation(&sharegpt).unwrap(), want);
        let cases = [
            (serde_json::json!([]), "empty"),
            (serde_json::json!("text"), "expected a list"),
            (
                serde_json::json!([{"role": "wizard", "content": "x"}]),
                "unknown role \"wizard\"",
            ),
            (
                serde_json::json!([{"role": "user", "content": ["a"]}]),
                "content is a list",
            ),
            (
                serde_json::json!([{"role": "user", "content": null}]),
                "content is null",
            ),
            (serde_json::json!([{"role": "user"}]), "no \"content\""),
            (
                serde_json::json!([{"text": "x"}]),
                "neither role/content nor from/value",
            ),
            (
                serde_json::json!([{"from": "gpt", "value": "a"}, 3]),
                "message 1: expected an object",
            ),
        ];
        for (value, want) in cases {
            let err = parse_conversation(&value).unwrap_err();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn assistant_spans_cover_what_each_assistant_message_adds() {
        let template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";
        let special = BTreeMap::from([("eos_token".to_string(), "</s>".to_string())]);
        let t = ChatTemplate::new(template, special).unwrap();
        let conv = msgs(&[
            ("user", "2+2?"),
            ("assistant", "4"),
            ("user", "and 3+3?"),
            ("assistant", "6"),
        ]);
        let (text, spans) = t.render_with_spans(&conv).unwrap();
        // trim_blocks drops the newline after `{% endif %}`, as in transformers.
        assert_eq!(
            text,
            "<|user|>\n2+2?<|assistant|>\n4</s><|user|>\nand 3+3?<|assistant|>\n6</s>"
        );
        let pieces: Vec<&str> = spans.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(pieces, vec!["4</s>", "6</s>"]);
    }

    #[test]
    fn helpers_behave_like_transformers() {
        let t = ChatTemplate::new(
            "{{ messages[0]['content'].strip() | tojson }}|{{ {'a': [1, 'é'], 'b': none} | tojson }}|{{ [1, 2] | tojson(indent=2) }}",
            BTreeMap::new(),
        )
        .unwrap();
        let out = t
            .render(&msgs(&[("user", "  say \"hi\"\n ")]), false)
            .unwrap();
        assert_eq!(
            out,
            "\"say \\\"hi\\\"\"|{\"a\": [1, \"é\"], \"b\": null}|[\n  1,\n  2\n]"
        );
        let failing = ChatTemplate::new(
            "{{ raise_exception('roles must alternate') }}",
            BTreeMap::new(),
        )
        .unwrap();
        let err = failing
            .render(&msgs(&[("user", "x")]), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("roles must alternate"), "{err}");
        // 2024-07-26 is a Friday, day 208; 13:05:09 UTC.
        let secs = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(
            strftime("%d %b %Y, %A %H:%M:%S, day %j %%", secs).unwrap(),
            "26 Jul 2024, Friday 13:05:09, day 208 %"
        );
    }
}
