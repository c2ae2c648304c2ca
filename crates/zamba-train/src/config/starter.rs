//! `zamba-train config init`: a starter run config for a model preset, commented from the
//! config's schema (each key's doc comment; optional keys commented out at their defaults).

use super::schema_text::*;
use serde_json::Value as Json;
use std::fmt::Write as _;
use zamba_data::tokenizer::byte;
use zamba_model::config::PRESETS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StarterStyle {
    /// Every section, each key with its description; optional keys commented out at their defaults.
    Commented,
    /// Only the required sections, without comments (the reference's minimal example).
    RequiredOnly,
}

#[derive(Debug)]
pub struct StarterError(String);

impl std::fmt::Display for StarterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StarterError {}

/// The commented starter config for `preset`.
pub fn starter_config(preset: &str) -> Result<String, StarterError> {
    render_starter(preset, StarterStyle::Commented)
}

/// The run each preset's starter describes: sizes that suit the model, on the synthetic sets
/// (generated on first use, so the config trains as it is) for the CPU-sized presets, and on
/// tokenized shards to be made with `zamba-train data tokenize` for the GPU presets (zamba-1b in
/// bf16 on one GPU, Zamba-7B on 128); every starter fits an 80 GB GPU.
fn starter_values(preset: &str) -> Result<toml::Table, StarterError> {
    // The synthetic sets use the byte tokenizer; its vocabulary padded to a multiple of 8.
    let synthetic_model = format!(
        "vocab_size = {}\npad_token_id = {}\nbos_token_id = {}\neos_token_id = {}\n",
        byte::VOCAB.next_multiple_of(8),
        byte::PAD,
        byte::BOS,
        byte::EOS
    );
    let synthetic_sources = "\
        [data.sources.web]\npaths = [\"synthetic:web\"]\nvalidation = [\"synthetic:web\"]\nweight = 0.8\n\
        [data.sources.instruct]\npaths = [\"synthetic:instruct\"]\nvalidation = [\"synthetic:instruct\"]\nweight = 0.2\n";
    // The LR decays to a tenth of its peak.
    // `train` adds keys to [train]; `tail` is the last sections ([optimizer], [runtime]).
    let (model, sources, seq_len, sequences, micro_batch, steps, lr, warmup, every, train, tail) =
        match preset {
            "zamba-tiny" => (
                &synthetic_model,
                synthetic_sources,
                128,
                16,
                8,
                300,
                ("3e-3", "3e-4"),
                30,
                100,
                "",
                "",
            ),
            "zamba-bench" | "zamba-7b-shape" => (
                &synthetic_model,
                synthetic_sources,
                256,
                32,
                8,
                1000,
                ("1e-3", "1e-4"),
                100,
                250,
                "",
                "",
            ),
            "zamba-7b" => (
                &String::new(),
                "[data.sources.web]\npaths = [\"data/web\"]\nvalidation = [\"data/web-validation\"]\nweight = 1.0\n",
                4096,
                512,
                1,
                476_837,
                ("2e-4", "2e-5"),
                2000,
                2000,
                // The paper's setting: 128 GPUs, the optimizer state sharded, bf16, each layer
                // recomputed — what fits an 80 GB GPU (see --dry-run's memory/rank line).
                "activation_checkpointing = \"layers\"\n",
                "[optimizer]\nzero = 1\n\
                 [runtime]\ndevice = \"cuda:0\"\nprecision = \"bf16\"\nworld_size = 128\n",
            ),
            "zamba-1b" => (
                &String::new(),
                "[data.sources.web]\npaths = [\"data/web\"]\nvalidation = [\"data/web-validation\"]\nweight = 1.0\n",
                4096,
                256,
                4,
                20_000,
                ("3e-4", "3e-5"),
                1000,
                1000,
                "activation_checkpointing = \"layers\"\n",
                "[runtime]\ndevice = \"cuda:0\"\nprecision = \"bf16\"\n",
            ),
            other => {
                return Err(StarterError(format!(
                    "unknown preset {other:?}; expected one of {}",
                    PRESETS.join(", ")
                )));
            }
        };
    let text = format!(
        "[run]\ndir = \"runs/{preset}\"\n\
         [model]\npreset = \"{preset}\"\n{model}\
         [data]\nseq_len = {seq_len}\n{sources}\
         [batch]\nsequences = {sequences}\nmicro_batch = {micro_batch}\n\
         [schedule]\nkind = \"cosine\"\npeak_lr = {}\nmin_lr = {}\nwarmup_steps = {warmup}\n\
         [train]\nsteps = {steps}\n{train}\
         [checkpoint]\nevery = {every}\n\
         [eval]\nevery = {every}\nbatches = 4\n\
         {tail}",
        lr.0, lr.1
    );
    toml::from_str(&text)
        .map_err(|e| StarterError(format!("the starter for {preset} is not valid TOML: {e}")))
}

/// The starter config for `preset`, in `style`.
pub fn render_starter(preset: &str, style: StarterStyle) -> Result<String, StarterError> {
    let values = starter_values(preset)?;
    let schema = run_schema();
    let required = required(&schema);
    let mut out = String::new();
    if style == StarterStyle::Commented {
        let _ = writeln!(
            out,
            "# zamba-train run config: a starter for the {preset} preset (`zamba-train config init`).\n\
             #   check it:  zamba-train --config THIS_FILE --dry-run\n\
             #   train:     zamba-train --config THIS_FILE\n\
             # docs/configuration.md describes every section and key. Commented-out keys show their\n\
             # defaults; a commented-out section may stay so (its defaults apply, or, for [init] and\n\
             # [synthetic], it is not used).\n"
        );
    }
    for name in section_order() {
        let present = values.get(name).and_then(toml::Value::as_table);
        if style == StarterStyle::RequiredOnly && !required.contains(&name) {
            continue;
        }
        let section = object_schema(&schema["properties"][name]);
        let mut block = String::new();
        if style == StarterStyle::Commented {
            comment(&mut block, &first_paragraph(section));
        }
        let _ = writeln!(block, "[{name}]");
        let empty = toml::Table::new();
        let table = present.unwrap_or(&empty);
        section_keys(&mut block, name, section, table, style);
        if present.is_none() {
            // An optional section the starter does not use: shown, switched off.
            block = block
                .lines()
                .map(|l| {
                    if l.starts_with('#') {
                        format!("{l}\n")
                    } else {
                        format!("# {l}\n")
                    }
                })
                .collect();
        }
        out.push_str(&block);
        if style == StarterStyle::Commented {
            out.push('\n');
        }
    }
    Ok(out)
}

fn section_keys(
    out: &mut String,
    name: &str,
    section: &Json,
    table: &toml::Table,
    style: StarterStyle,
) {
    let variants = tagged_variants(section, "kind");
    let (schema, tag) = match table.get("kind").and_then(toml::Value::as_str) {
        Some(kind) if !variants.is_empty() => {
            let variant = variants.iter().find(|(k, _)| k == kind).map(|(_, v)| *v);
            if style == StarterStyle::Commented {
                let kinds: Vec<&str> = variants.iter().map(|(k, _)| k.as_str()).collect();
                let _ = writeln!(
                    out,
                    "# One of {}; each takes its own keys.",
                    kinds.join(", ")
                );
                if let Some(v) = variant {
                    comment(out, &first_paragraph(v));
                }
            }
            let _ = writeln!(out, "kind = {:?}", kind);
            (variant.unwrap_or(section), Some("kind"))
        }
        _ => (section, None),
    };
    // The model takes any field of the Zamba config: list only what the starter sets.
    let list_defaults = style == StarterStyle::Commented && name != "model";
    let required = required(schema);
    let mut maps = Vec::new();
    for key in ordered_keys(schema) {
        if Some(key.as_str()) == tag {
            continue;
        }
        let field = &schema["properties"][&key];
        if let Some(entry) = map_value_schema(field) {
            maps.push((key, entry));
            continue;
        }
        let described = style == StarterStyle::Commented;
        match table.get(&key) {
            Some(value) => {
                if described {
                    comment(out, &first_sentence_of(field));
                }
                let _ = writeln!(out, "{key} = {value}");
            }
            None if list_defaults && !required.contains(&key.as_str()) => {
                comment(out, &first_sentence_of(field));
                let shown =
                    default_text(field).unwrap_or_else(|| format!("<{}>", type_text(field)));
                let _ = writeln!(out, "# {key} = {shown}");
            }
            None if list_defaults => {
                comment(out, &first_sentence_of(field));
                let _ = writeln!(out, "{key} = <{}>", type_text(field));
            }
            None => {}
        }
    }
    if name == "model" && style == StarterStyle::Commented {
        comment(
            out,
            "Any other field of the Zamba config (hidden_size, num_hidden_layers, …) can be set here; see docs/configuration.md.",
        );
    }
    for (key, entry) in maps {
        let Some(entries) = table.get(&key).and_then(toml::Value::as_table) else {
            continue;
        };
        for (entry_name, value) in entries {
            let Some(entry_table) = value.as_table() else {
                continue;
            };
            if style == StarterStyle::Commented {
                out.push('\n');
            }
            let _ = writeln!(out, "[{name}.{key}.{entry_name}]");
            section_keys(
                out,
                &format!("{name}.{key}.{entry_name}"),
                entry,
                entry_table,
                style,
            );
        }
    }
}

fn first_sentence_of(field: &Json) -> String {
    first_sentence(&first_paragraph(field)).to_owned()
}

/// `text` as `#` comment lines of at most 100 characters.
fn comment(out: &mut String, text: &str) {
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && 2 + line.len() + 1 + word.len() > 100 {
            let _ = writeln!(out, "# {line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        let _ = writeln!(out, "# {line}");
    }
}
