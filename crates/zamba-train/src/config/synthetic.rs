//! Synthetic data sources: a source path or validation entry `"synthetic:web"` or
//! `"synthetic:instruct"` names the data pipeline's generated sets (train split in `paths`,
//! held-out split in `validation`). They are generated and tokenized into `[synthetic].cache_dir`
//! on first use (zamba_data::ensure_synthetic_cache), so a config can train on a fresh clone.

use super::error::{ConfigError, ConfigErrorKind, closest};
use super::rules::Section;
use anyhow::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use zamba_data::synth::instruct::TaskMix;
use zamba_data::{DataConfig, SyntheticCache, SyntheticCacheOptions, TokenizerSpec};

/// Prefix of a data path that names a synthetic set.
pub const SYNTHETIC_PREFIX: &str = "synthetic:";
/// The synthetic sets the data pipeline generates.
pub const SYNTHETIC_SETS: &[&str] = &["web", "instruct"];

/// The most documents or examples a synthetic set may have (a billion: far more than a proxy
/// run needs, and few enough to generate).
const MAX_SYNTHETIC_ITEMS: u64 = 1_000_000_000;

/// How the `"synthetic:web"` / `"synthetic:instruct"` data sources are generated; present
/// (with these defaults) whenever a source uses them. The sets are generated and tokenized into
/// `cache_dir` on first use; different values give a different cache subdirectory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticSection {
    /// Where the generated, tokenized sets are kept. Relative to the working directory (like
    /// `run.dir`: it is an output), made absolute at load.
    pub cache_dir: PathBuf,
    /// Seed of the generated text (independent of `run.seed` and `data.seed`).
    pub seed: u64,
    /// Documents of the web-like set.
    #[schemars(range(min = 1, max = MAX_SYNTHETIC_ITEMS))]
    pub web_docs: u64,
    /// Examples of the instruction set.
    #[schemars(range(min = 1, max = MAX_SYNTHETIC_ITEMS))]
    pub instruct_examples: u64,
    /// The instruct tasks and their relative weights, e.g. `{ add = 1, fact = 2 }` (tasks:
    /// `arithmetic`, `sort`, `copy`, `reverse`, `count`, `fact`, `add`; see docs/data.md).
    /// Absent: the standard mix (arithmetic 2/7, each other task but `add` 1/7).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("additionalProperties" = {"type": "number", "minimum": 0.0, "maximum": 1e9}))]
    pub tasks: Option<BTreeMap<String, f64>>,
    /// Share of each set held out for validation (the sources' `validation` split).
    #[schemars(extend("exclusiveMinimum" = 0.0, "exclusiveMaximum" = 1.0))]
    pub validation_fraction: f64,
    /// `"byte"` (256 bytes + bos/eos/pad: `model.vocab_size` ≥ 259) or a tokenizer.json path
    /// (relative to the config file).
    pub tokenizer: String,
    /// Tokens per parquet row group (the unit the loader shuffles); small sets need small groups.
    #[schemars(range(min = 1, max = 1u64 << 32))]
    pub row_group_tokens: u64,
}

impl Default for SyntheticSection {
    fn default() -> Self {
        let d = SyntheticCacheOptions::default();
        Self {
            cache_dir: PathBuf::from(".cache/synthetic"),
            seed: d.seed,
            web_docs: d.web_docs,
            instruct_examples: d.instruct_examples,
            tasks: None,
            validation_fraction: d.validation_fraction,
            tokenizer: "byte".into(),
            row_group_tokens: d.row_group_tokens,
        }
    }
}

impl SyntheticSection {
    pub fn options(&self) -> SyntheticCacheOptions {
        SyntheticCacheOptions {
            seed: self.seed,
            web_docs: self.web_docs,
            instruct_examples: self.instruct_examples,
            // A loaded config has a valid mix (checked by `validate`).
            tasks: self.task_mix().unwrap_or_default(),
            validation_fraction: self.validation_fraction,
            tokenizer: self
                .tokenizer
                .parse::<TokenizerSpec>()
                .unwrap_or(TokenizerSpec::Byte),
            row_group_tokens: self.row_group_tokens,
        }
    }

    /// The instruct task mix `tasks` describes (validation reports a bad one with its key).
    pub fn task_mix(&self) -> Result<TaskMix, String> {
        match &self.tasks {
            None => Ok(TaskMix::Standard),
            Some(weights) => TaskMix::weighted(weights.iter().map(|(t, &w)| (t.as_str(), w))),
        }
    }
}

impl Section for SyntheticSection {
    fn validate(&self, _run: &super::RunConfig) -> Result<(), ConfigError> {
        self.task_mix()
            .map(|_| ())
            .map_err(|message| ConfigError::invalid("synthetic.tasks", message))
    }
}

/// The set a data path names, if it is a synthetic reference.
pub fn synthetic_set(path: &str) -> Option<&str> {
    path.strip_prefix(SYNTHETIC_PREFIX)
}

/// Checks every `synthetic:` reference of the data sources; errors name the key.
pub(crate) fn check_references(data: &DataConfig) -> Result<(), ConfigError> {
    for (name, source) in &data.sources {
        for (list, entries) in [("paths", &source.paths), ("validation", &source.validation)] {
            for (i, p) in entries.iter().enumerate() {
                if let Some(set) = synthetic_set(p)
                    && !SYNTHETIC_SETS.contains(&set)
                {
                    let mut e = ConfigError::new(
                        ConfigErrorKind::Invalid,
                        Some(format!("data.sources.{name}.{list}[{i}]")),
                        format!(
                            "unknown synthetic set {set:?}; expected \"synthetic:web\" or \"synthetic:instruct\""
                        ),
                    );
                    e.did_you_mean = closest(set, SYNTHETIC_SETS.iter().copied())
                        .map(|s| format!("\"synthetic:{s}\""));
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn uses_synthetic(data: &DataConfig) -> bool {
    data.sources
        .values()
        .flat_map(|s| s.paths.iter().chain(&s.validation))
        .any(|p| synthetic_set(p).is_some())
}

/// Makes relative data paths relative to `base`, leaving synthetic references alone (the
/// pipeline's `DataConfig::resolve_relative_to` would turn them into file paths).
pub(crate) fn resolve_paths(data: &mut DataConfig, base: &Path) {
    for source in data.sources.values_mut() {
        for p in source.paths.iter_mut().chain(source.validation.iter_mut()) {
            if synthetic_set(p).is_none() && Path::new(p).is_relative() {
                *p = base.join(&*p).to_string_lossy().into_owned();
            }
        }
    }
}

/// Replaces synthetic references with the cached sets' directories, generating them first if
/// needed (this can take a while the first time; the log says so).
pub(crate) fn materialize(data: &DataConfig, section: &SyntheticSection) -> Result<DataConfig> {
    let mut data = data.clone();
    if !uses_synthetic(&data) {
        return Ok(data);
    }
    let cache = open_cache(section)?;
    for source in data.sources.values_mut() {
        for (entries, validation) in [(&mut source.paths, false), (&mut source.validation, true)] {
            for p in entries.iter_mut() {
                let dir = match (synthetic_set(p), validation) {
                    (Some("web"), false) => &cache.web_train,
                    (Some("web"), true) => &cache.web_validation,
                    (Some("instruct"), false) => &cache.instruct_train,
                    (Some("instruct"), true) => &cache.instruct_validation,
                    (Some(other), _) => anyhow::bail!(
                        "unknown synthetic set {other:?}; expected \"synthetic:web\" or \"synthetic:instruct\""
                    ),
                    (None, _) => continue,
                };
                *p = dir.to_string_lossy().into_owned();
            }
        }
    }
    Ok(data)
}

fn open_cache(section: &SyntheticSection) -> Result<SyntheticCache> {
    let opts = section.options();
    eprintln!(
        "synthetic data: opening the cache in {} (generated and tokenized on first use, deterministically from seed {}; this can take a minute)",
        section.cache_dir.display(),
        section.seed
    );
    let cache = zamba_data::ensure_synthetic_cache(&section.cache_dir, &opts)?;
    eprintln!("synthetic data: using {}", cache.dir.display());
    Ok(cache)
}
