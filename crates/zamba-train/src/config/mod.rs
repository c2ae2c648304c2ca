//! The run config: one strict TOML file per run (phase 1 and the anneal are two such files).
//! docs/configuration.md lists every section and key; it is generated from this module's types
//! (`zamba-train config reference`) and a test keeps it current.
//!
//! # Adding a key or a section
//! - A key: add the field to its section struct with a `///` doc comment (what it does, which
//!   keys it interacts with), a serde default if it is optional (the struct's `Default` for
//!   sections with `#[serde(default)]`), and its range as `#[schemars(range(min = …, max = …))]`
//!   or `#[schemars(extend("exclusiveMinimum" = 0.0))]` — [`check_ranges`] enforces it. Rules
//!   involving other keys go in the section's [`Section::validate`].
//! - A section: a struct deriving `Serialize, Deserialize, JsonSchema` with
//!   `#[serde(deny_unknown_fields)]` and a doc comment, a field of [`RunConfig`]
//!   (`#[serde(default)]` unless the section must be written), `impl Section` for it, and a line
//!   in [`RunConfig::validate`].
//! - Then regenerate the reference: `cargo run -p zamba-train -- config reference > docs/configuration.md`.

mod cli;
mod data;
mod error;
mod model;
mod overrides;
mod reference;
mod rules;
mod schema_text;
mod sections;
mod starter;
mod summary;
mod synthetic;

pub use crate::schema::{check_ranges, schema_of};
pub use cli::{ConfigCommand, run_command};
pub use error::{ConfigError, ConfigErrorKind, closest};
pub use model::ModelSection;
pub use overrides::{Override, parse_value};
pub use reference::{REGENERATE, reference_markdown};
pub use rules::Section;
pub use sections::*;
pub use starter::{StarterError, StarterStyle, render_starter, starter_config};
pub use summary::human_count;
pub use synthetic::{SYNTHETIC_PREFIX, SYNTHETIC_SETS, SyntheticSection, synthetic_set};

use crate::schedule::{
    AnnealSchedule, ConstantSchedule, CosineSchedule, ScheduleConfig, WsdSchedule,
};
use error::from_serde;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use zamba_data::DataConfig;
use zamba_model::ZambaConfig;

/// The sections that describe *what* is trained — the run's directory, the model, the data, the
/// batch, the LR schedule and the number of steps — must be written; the others have defaults
/// (`[init]` and `[synthetic]`: absent = not used).
///
/// Paths: data shard paths and `synthetic.tokenizer` are inputs shipped next to the config and
/// are relative to the config file's directory; `run.dir`, `init.from` and
/// `synthetic.cache_dir` are run outputs and are relative to the working directory. All are
/// absolute once loaded, so a saved config means the same thing from anywhere. Nothing is
/// opened at load time: shards and checkpoints are checked when the trainer opens them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub run: RunSection,
    pub model: ModelSection,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitSection>,
    pub data: DataConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<SyntheticSection>,
    pub batch: BatchSection,
    #[serde(default)]
    pub optimizer: OptimizerSection,
    pub schedule: ScheduleConfig,
    pub train: TrainSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub logging: LoggingSection,
    #[serde(default)]
    pub runtime: RuntimeSection,
    #[serde(default)]
    pub dist: DistSection,
}

/// The values of `schedule.kind`, as serde names the [`ScheduleConfig`] variants.
const SCHEDULE_KINDS: &[&str] = &["constant", "cosine", "wsd", "anneal"];

impl RunConfig {
    /// Reads `path`, applies `--set key=value` overrides, checks every key and value, resolves
    /// the model and the paths, and validates the whole. Errors name the file and the key.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                ConfigErrorKind::Read,
                None,
                format!("cannot read the config: {e}"),
            )
            .with_file(path)
        })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Self::from_toml_str(&text, dir, overrides).map_err(|e| e.with_file(path))
    }

    /// As [`load`](Self::load), for TOML text whose relative data paths are relative to `base_dir`.
    pub fn from_toml_str(
        text: &str,
        base_dir: &Path,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            ConfigError::new(
                ConfigErrorKind::Syntax,
                None,
                format!("not valid TOML: {e}"),
            )
        })?;
        let overrides = overrides
            .iter()
            .map(|o| Override::parse(o))
            .collect::<Result<Vec<_>, _>>()?;
        for o in &overrides {
            o.apply(&mut table)?;
        }
        let attribute = |mut e: ConfigError| {
            if let Some(key) = &e.key
                && e.from_override.is_none()
            {
                e.from_override = overrides
                    .iter()
                    .rev()
                    .find(|o| keys_overlap(key, &o.key))
                    .map(|o| o.raw.clone());
            }
            e
        };
        Self::parse_table(table, base_dir).map_err(attribute)
    }

    fn parse_table(table: toml::Table, base_dir: &Path) -> Result<Self, ConfigError> {
        // Sections whose shape serde cannot report precisely are checked first, with full key paths.
        if let Some(model) = table.get("model") {
            let toml::Value::Table(model) = model else {
                return Err(type_error("model", model, "a table"));
            };
            let json: BTreeMap<String, serde_json::Value> = serde_json::to_value(model)
                .and_then(serde_json::from_value)
                .map_err(|e| ConfigError::invalid("model", e.to_string()))?;
            ModelSection::resolve(&json)?;
        }
        if let Some(schedule) = table.get("schedule") {
            check_schedule(schedule)?;
        }
        let mut config: RunConfig = deserialize_at("", toml::Value::Table(table))?;
        config.resolve_paths(base_dir)?;
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base_dir: &Path) -> Result<(), ConfigError> {
        let absolute = |p: &Path, key: &str| {
            std::path::absolute(p).map_err(|e| {
                ConfigError::invalid(key, format!("cannot make {} absolute: {e}", p.display()))
            })
        };
        let base = absolute(base_dir, "data")?;
        synthetic::resolve_paths(&mut self.data, &base);
        if self.run.dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "run.dir",
                "is empty; expected the run's output directory",
            ));
        }
        self.run.dir = absolute(&self.run.dir, "run.dir")?;
        if self.run.name.is_empty() {
            self.run.name = self
                .run
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into());
        }
        if let Some(init) = &mut self.init {
            if init.from.as_os_str().is_empty() {
                return Err(ConfigError::invalid(
                    "init.from",
                    "is empty; expected a checkpoint or transformers directory",
                ));
            }
            init.from = absolute(&init.from, "init.from")?;
        }
        if self.synthetic.is_none() && synthetic::uses_synthetic(&self.data) {
            self.synthetic = Some(SyntheticSection::default());
        }
        if let Some(s) = &mut self.synthetic {
            s.cache_dir = absolute(&s.cache_dir, "synthetic.cache_dir")?;
            if s.tokenizer != "byte" && Path::new(&s.tokenizer).is_relative() {
                s.tokenizer = base.join(&s.tokenizer).to_string_lossy().into_owned();
            }
        }
        Ok(())
    }

    /// Checks every key's range, then each section's rules; errors name the key to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_ranges(self, "")?;
        let sections: [Option<&dyn Section>; 13] = [
            Some(&self.run),
            self.init.as_ref().map(|s| s as &dyn Section),
            Some(&self.data),
            self.synthetic.as_ref().map(|s| s as &dyn Section),
            Some(&self.batch),
            Some(&self.optimizer),
            Some(&self.schedule),
            Some(&self.train),
            Some(&self.checkpoint),
            Some(&self.eval),
            Some(&self.logging),
            Some(&self.runtime),
            Some(&self.dist),
        ];
        for section in sections.into_iter().flatten() {
            section.validate(self)?;
        }
        Ok(())
    }

    /// The resolved model config.
    pub fn model_config(&self) -> &ZambaConfig {
        &self.model.config
    }

    /// Sequences per optimizer step, over all ranks.
    pub fn global_sequences(&self) -> usize {
        self.batch
            .sequences
            .unwrap_or_else(|| self.batch.tokens.unwrap_or(0) / self.data.seq_len.max(1))
    }

    /// Training tokens per optimizer step (targets, i.e. sequences × seq_len).
    pub fn tokens_per_step(&self) -> usize {
        self.global_sequences() * self.data.seq_len
    }

    /// Micro-batches each rank accumulates per optimizer step.
    pub fn grad_accum_steps(&self) -> usize {
        self.global_sequences() / (self.batch.micro_batch * self.runtime.world_size).max(1)
    }

    /// Whether checkpoints are written in the background (`checkpoint.async`, by default on
    /// GPU runs).
    pub fn checkpoint_async(&self) -> bool {
        self.checkpoint
            .asynchronous
            .unwrap_or(matches!(self.runtime.device, Device::Cuda(_)))
    }

    /// Training tokens of the whole run.
    pub fn total_tokens(&self) -> u64 {
        self.tokens_per_step() as u64 * self.train.steps as u64
    }

    /// The LR of optimizer step `step` (0-based) of this run.
    pub fn lr(&self, step: usize) -> f64 {
        self.schedule.lr(step, self.train.steps)
    }

    /// The data config the loader opens: synthetic sets generated (or found in the cache) and
    /// referenced by path, and `model_vocab_size` set from the model so mismatched data is refused.
    pub fn resolve_data(&self) -> anyhow::Result<DataConfig> {
        let mut data = match &self.synthetic {
            Some(s) => synthetic::materialize(&self.data, s)?,
            None => self.data.clone(),
        };
        data.model_vocab_size
            .get_or_insert(self.model.config.vocab_size as u32);
        Ok(data)
    }

    /// The resolved config as TOML (what the trainer saves in the run dir); loading it again
    /// gives an equal config.
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        let body = toml::to_string(self).map_err(|e| {
            ConfigError::invalid("run", format!("cannot write the config as TOML: {e}"))
        })?;
        Ok(format!(
            "# Resolved config of run {:?} (zamba-train); all paths absolute.\n\n{body}",
            self.run.name
        ))
    }

    /// The `--dry-run` report: resolved config, sizes, token and FLOP counts, LR schedule.
    pub fn summary(&self) -> String {
        summary::summary(self)
    }
}

/// Whether an error at `error_key` concerns the `--set` key `set_key`.
fn keys_overlap(error_key: &str, set_key: &str) -> bool {
    let within = |a: &str, b: &str| {
        a == b
            || a.strip_prefix(b)
                .is_some_and(|r| r.starts_with('.') || r.starts_with('['))
    };
    within(error_key, set_key) || within(set_key, error_key)
}

fn type_error(key: &str, value: &toml::Value, expected: &str) -> ConfigError {
    ConfigError::new(
        ConfigErrorKind::WrongType,
        Some(key.to_owned()),
        format!("invalid type: {}, expected {expected}", value.type_str()),
    )
}

/// Deserializes `value` strictly, turning the first error into one that names its key path.
fn deserialize_at<T: DeserializeOwned>(prefix: &str, value: toml::Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        from_serde(prefix, &path, e.inner().message())
    })
}

/// Checks `[schedule]` by its `kind` (serde's tagged enums lose the key path of inner errors).
fn check_schedule(value: &toml::Value) -> Result<(), ConfigError> {
    let toml::Value::Table(table) = value else {
        return Err(type_error("schedule", value, "a table with a `kind`"));
    };
    let kinds = SCHEDULE_KINDS
        .iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let kind = match table.get("kind") {
        None => {
            return Err(ConfigError::new(
                ConfigErrorKind::MissingKey,
                Some("schedule.kind".into()),
                format!("missing; expected one of {kinds}"),
            ));
        }
        Some(toml::Value::String(k)) => k.as_str(),
        Some(other) => {
            return Err(type_error(
                "schedule.kind",
                other,
                &format!("one of {kinds}"),
            ));
        }
    };
    let mut rest = table.clone();
    rest.remove("kind");
    let rest = toml::Value::Table(rest);
    match kind {
        "constant" => deserialize_at::<ConstantSchedule>("schedule", rest).map(drop),
        "cosine" => deserialize_at::<CosineSchedule>("schedule", rest).map(drop),
        "wsd" => deserialize_at::<WsdSchedule>("schedule", rest).map(drop),
        "anneal" => deserialize_at::<AnnealSchedule>("schedule", rest).map(drop),
        other => {
            let mut e = ConfigError::new(
                ConfigErrorKind::UnknownKey,
                Some("schedule.kind".into()),
                format!("unknown schedule {other:?}; expected one of {kinds}"),
            );
            e.did_you_mean =
                closest(other, SCHEDULE_KINDS.iter().copied()).map(|s| format!("\"{s}\""));
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_kinds_are_the_schema_tags() {
        let schema = schema_of::<ScheduleConfig>();
        let tags: Vec<String> = schema_text::tagged_variants(&schema, "kind")
            .into_iter()
            .map(|(tag, _)| tag)
            .collect();
        assert_eq!(tags, SCHEDULE_KINDS);
    }
}
