//! The run config: one strict TOML file per run (phase 1 and the anneal are two such files).
//!
//! ```toml
//! [run]        name, dir, seed
//! [model]      preset and/or any field of zamba_model::ZambaConfig
//! [init]       from, load_optimizer                     (optional)
//! [data]       zamba_data::DataConfig: seq_len, seed, [data.sources.NAME] paths/weight/validation
//! [synthetic]  how "synthetic:web" / "synthetic:instruct" sources are generated (optional)
//! [batch]      tokens | sequences, micro_batch
//! [optimizer]  beta1, beta2, eps, weight_decay, decay_embeddings, clip_grad_norm
//! [schedule]   kind = "constant" | "cosine" | "wsd" | "anneal", … (see crate::schedule)
//! [train]      steps, max_consecutive_skips, spike_zscore, spike_window, activation_checkpointing
//! [checkpoint] every, keep_last, keep_every
//! [eval]       every, batches
//! [logging]    every, progress
//! [runtime]    device, precision, threads, world_size, peak_gflops
//! ```
//!
//! Paths: data shard paths and `synthetic.tokenizer` are inputs shipped next to the config and
//! are relative to the config file's directory; `run.dir`, `init.from` and
//! `synthetic.cache_dir` are run outputs and are relative to the working directory. All are
//! absolute after [`RunConfig::load`], so a saved config means the same thing from anywhere.
//! Nothing is opened at load time: shards and checkpoints are checked when the trainer opens them.

mod error;
mod model;
mod overrides;
mod sections;
mod summary;
mod synthetic;

pub use error::{ConfigError, ConfigErrorKind, closest};
pub use model::ModelSection;
pub use overrides::{Override, parse_value};
pub use sections::*;
pub use summary::human_count;
pub use synthetic::{SYNTHETIC_PREFIX, SYNTHETIC_SETS, SyntheticSection, synthetic_set};

use crate::schedule::{
    AnnealSchedule, ConstantSchedule, CosineSchedule, ScheduleConfig, WsdSchedule,
};
use error::from_serde;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use zamba_data::DataConfig;
use zamba_model::ZambaConfig;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub run: RunSection,
    pub model: ModelSection,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitSection>,
    pub data: DataConfig,
    /// Present (with defaults filled in) whenever a source uses a synthetic set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<SyntheticSection>,
    pub batch: BatchSection,
    #[serde(default)]
    pub optimizer: OptimizerSection,
    pub schedule: ScheduleConfig,
    pub train: TrainSection,
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub logging: LoggingSection,
    #[serde(default)]
    pub runtime: RuntimeSection,
}

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

    /// Checks that the values make sense together; errors name the key(s).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_data()?;
        self.validate_batch()?;
        if let Some(peak) = self.runtime.peak_gflops
            && !(peak > 0.0 && peak.is_finite())
        {
            return Err(ConfigError::invalid(
                "runtime.peak_gflops",
                format!("is {peak}; expected a number of GFLOP/s > 0"),
            ));
        }
        let o = &self.optimizer;
        for (key, beta) in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(ConfigError::invalid(
                    key,
                    format!("is {beta}; expected a number in [0, 1)"),
                ));
            }
        }
        if !(o.eps > 0.0 && o.eps.is_finite()) {
            return Err(ConfigError::invalid(
                "optimizer.eps",
                format!("is {}; expected a number > 0", o.eps),
            ));
        }
        for (key, v) in [
            ("optimizer.weight_decay", o.weight_decay),
            ("optimizer.clip_grad_norm", o.clip_grad_norm),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(ConfigError::invalid(
                    key,
                    format!("is {v}; expected a number >= 0 (0 = off)"),
                ));
            }
        }
        let t = &self.train;
        if t.steps == 0 {
            return Err(ConfigError::invalid(
                "train.steps",
                "is 0; expected the number of optimizer steps (> 0)",
            ));
        }
        if t.max_consecutive_skips == 0 {
            return Err(ConfigError::invalid(
                "train.max_consecutive_skips",
                "is 0; expected at least 1",
            ));
        }
        if let Some(z) = t.spike_zscore
            && !(z > 0.0 && z.is_finite())
        {
            return Err(ConfigError::invalid(
                "train.spike_zscore",
                format!("is {z}; expected a number of standard deviations > 0"),
            ));
        }
        if t.spike_zscore.is_some() && t.spike_window < 2 {
            return Err(ConfigError::invalid(
                "train.spike_window",
                format!(
                    "is {}; a z-score needs a window of at least 2 losses",
                    t.spike_window
                ),
            ));
        }
        self.schedule
            .validate(t.steps)
            .map_err(|e| ConfigError::invalid(format!("schedule.{}", e.field), e.message))?;
        if self.checkpoint.keep_last == 0 {
            return Err(ConfigError::invalid(
                "checkpoint.keep_last",
                "is 0; keep at least the newest checkpoint (1)",
            ));
        }
        if self.eval.every > 0 {
            if self.eval.batches == 0 {
                return Err(ConfigError::invalid(
                    "eval.batches",
                    "is 0 while eval.every > 0; expected at least 1",
                ));
            }
            if self.data.sources.values().all(|s| s.validation.is_empty()) {
                return Err(ConfigError::invalid(
                    "eval.every",
                    "is set but no data source lists `validation` shards; add data.sources.NAME.validation or set eval.every = 0",
                ));
            }
        }
        if self.logging.every == 0 {
            return Err(ConfigError::invalid(
                "logging.every",
                "is 0; expected at least 1",
            ));
        }
        if self.runtime.threads == Some(0) {
            return Err(ConfigError::invalid(
                "runtime.threads",
                "is 0; expected at least 1 (or leave it out for all cores)",
            ));
        }
        Ok(())
    }

    fn validate_data(&self) -> Result<(), ConfigError> {
        let d = &self.data;
        if d.sources.is_empty() {
            return Err(ConfigError::invalid(
                "data.sources",
                "no sources; add a [data.sources.NAME] table with paths and weight",
            ));
        }
        if d.seq_len == 0 {
            return Err(ConfigError::invalid(
                "data.seq_len",
                "is 0; expected the tokens per training sequence",
            ));
        }
        for (name, s) in &d.sources {
            if !(s.weight.is_finite() && s.weight >= 0.0) {
                return Err(ConfigError::invalid(
                    format!("data.sources.{name}.weight"),
                    format!("is {}; expected a finite number >= 0", s.weight),
                ));
            }
            if s.paths.is_empty() {
                return Err(ConfigError::invalid(
                    format!("data.sources.{name}.paths"),
                    "is empty; list shard directories, files or globs",
                ));
            }
        }
        if d.sources.values().all(|s| s.weight == 0.0) {
            return Err(ConfigError::invalid(
                "data.sources",
                "all source weights are 0; give at least one source a positive weight",
            ));
        }
        if let Some(v) = d.model_vocab_size
            && v as usize != self.model.config.vocab_size
        {
            return Err(ConfigError::invalid(
                "data.model_vocab_size",
                format!(
                    "is {v} but model.vocab_size is {}; leave it out (the trainer sets it from the model)",
                    self.model.config.vocab_size
                ),
            ));
        }
        synthetic::check_references(d)?;
        if let Some(s) = &self.synthetic {
            s.validate()?;
        }
        // The pipeline's own checks, as a backstop for anything added there later.
        d.validate()
            .map_err(|e| ConfigError::invalid("data", e.to_string()))
    }

    fn validate_batch(&self) -> Result<(), ConfigError> {
        let b = &self.batch;
        let seq = self.data.seq_len;
        let global = match (b.tokens, b.sequences) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "batch.tokens",
                    "give the global batch as batch.tokens or batch.sequences, not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::new(
                    ConfigErrorKind::MissingKey,
                    Some("batch.sequences".into()),
                    "missing: give the global batch as batch.sequences or batch.tokens",
                ));
            }
            (Some(0), None) | (None, Some(0)) => {
                let key = if b.tokens.is_some() {
                    "batch.tokens"
                } else {
                    "batch.sequences"
                };
                return Err(ConfigError::invalid(
                    key,
                    "is 0; expected a positive global batch",
                ));
            }
            (Some(t), None) if t % seq != 0 => {
                return Err(ConfigError::invalid(
                    "batch.tokens",
                    format!(
                        "{t} is not a multiple of data.seq_len = {seq}; e.g. {} or {}",
                        (t / seq).max(1) * seq,
                        (t / seq + 1) * seq
                    ),
                ));
            }
            (Some(t), None) => t / seq,
            (None, Some(s)) => s,
        };
        if b.micro_batch == 0 {
            return Err(ConfigError::invalid(
                "batch.micro_batch",
                "is 0; expected at least 1 sequence",
            ));
        }
        if self.runtime.world_size == 0 {
            return Err(ConfigError::invalid(
                "runtime.world_size",
                "is 0; expected at least 1",
            ));
        }
        let per_pass = b.micro_batch * self.runtime.world_size;
        if global % per_pass != 0 {
            let key = if b.tokens.is_some() {
                "batch.tokens"
            } else {
                "batch.sequences"
            };
            return Err(ConfigError::invalid(
                key,
                format!(
                    "the global batch of {global} sequences is not divisible by batch.micro_batch ({}) × runtime.world_size ({}) = {per_pass}, \
                     so gradient accumulation would not be a whole number of micro-batches",
                    b.micro_batch, self.runtime.world_size
                ),
            ));
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
