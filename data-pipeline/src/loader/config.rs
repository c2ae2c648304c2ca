//! The data config of a training phase and its resolution into concrete shards.

use crate::error::DataError;
use crate::manifest::{Manifest, ShardInfo};
use crate::tokenizer::TokenizerInfo;
use anyhow::{Context, Result, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn default_shuffle_blocks() -> usize {
    16
}
fn default_prefetch() -> usize {
    4
}

/// One phase's data: named, weighted sources of tokenized shards, mixed into sequences of
/// `seq_len` tokens in a deterministic, resumable order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Source name → shards and weight (a `[data.sources.NAME]` table each). A BTreeMap so the
    /// order (and so the data) never depends on how the file lists them.
    #[schemars(extend("minProperties" = 1))]
    pub sources: BTreeMap<String, SourceConfig>,
    /// Tokens per training sequence; windows of seq_len + 1 tokens give inputs and shifted targets.
    #[schemars(range(min = 1, max = 1 << 20))]
    pub seq_len: usize,
    /// Seed of the data order (shuffles and source draws); independent of `run.seed`.
    #[serde(default)]
    pub seed: u64,
    /// Row groups shuffled together as one unit (more: better mixing, more memory).
    #[serde(default = "default_shuffle_blocks")]
    #[schemars(range(min = 1, max = 1 << 16))]
    pub shuffle_blocks: usize,
    /// Batches prepared ahead on the background thread.
    #[serde(default = "default_prefetch")]
    #[schemars(range(min = 1, max = 1024))]
    pub prefetch: usize,
    /// The model's vocabulary size; when set, data whose tokenizer has more ids is rejected.
    /// A run config leaves it out: the trainer sets it from `model.vocab_size`.
    #[serde(default)]
    #[schemars(range(min = 1, max = u32::MAX))]
    pub model_vocab_size: Option<u32>,
}

/// One data source: tokenized shards, its share of the training tokens, and held-out shards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Tokenized shard directories (with a manifest.json), shard files, or globs of either.
    /// In a run config, relative paths are relative to the config file's directory, and
    /// `"synthetic:web"` / `"synthetic:instruct"` name the generated sets (see `[synthetic]`).
    #[schemars(length(min = 1))]
    pub paths: Vec<String>,
    /// Share of training tokens; weights are normalised over all sources (0: held-out loss only).
    #[schemars(range(min = 0.0, max = 1e9))]
    pub weight: f64,
    /// Held-out tokenized shards for this source's validation loss (see `[eval]`).
    #[serde(default)]
    pub validation: Vec<String>,
}

impl DataConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading data config {}", path.display()))?;
        let mut config: Self = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid data config", path.display()))?;
        config.resolve_relative_to(path.parent().unwrap_or(Path::new(".")));
        Ok(config)
    }

    /// Makes relative shard paths relative to `base` (e.g. the config file's directory).
    pub fn resolve_relative_to(&mut self, base: &Path) {
        for source in self.sources.values_mut() {
            for p in source.paths.iter_mut().chain(source.validation.iter_mut()) {
                if Path::new(p).is_relative() {
                    *p = base.join(&*p).to_string_lossy().into_owned();
                }
            }
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.sources.is_empty() {
            bail!("the data config has no sources");
        }
        if self.seq_len == 0 {
            bail!("seq_len must be positive");
        }
        if self.shuffle_blocks == 0 {
            bail!("shuffle_blocks must be positive");
        }
        for (name, source) in &self.sources {
            if !source.weight.is_finite() || source.weight < 0.0 {
                bail!(
                    "source {name:?} has weight {}; weights must be finite and >= 0",
                    source.weight
                );
            }
            if source.paths.is_empty() {
                bail!("source {name:?} lists no paths");
            }
        }
        if self.sources.values().all(|s| s.weight == 0.0) {
            bail!("all source weights are zero; give at least one source a positive weight");
        }
        Ok(())
    }

    /// Weights normalised to sum to 1, in source-name order.
    pub fn normalised_weights(&self) -> Vec<f64> {
        let total: f64 = self.sources.values().map(|s| s.weight).sum();
        self.sources.values().map(|s| s.weight / total).collect()
    }
}

/// A shard located on disk and described by its manifest.
#[derive(Clone, Debug)]
pub struct ResolvedShard {
    pub path: PathBuf,
    pub info: ShardInfo,
    pub manifest_fingerprint: String,
    /// The shard has a `loss_mask` column.
    pub has_loss_mask: bool,
}

/// Checks that every manifest used in one phase comes from the same tokenizer.
#[derive(Default)]
pub struct TokenizerCheck {
    first: Option<(PathBuf, TokenizerInfo)>,
}

impl TokenizerCheck {
    pub fn check(&mut self, dir: &Path, info: &TokenizerInfo) -> Result<()> {
        match &self.first {
            None => self.first = Some((dir.to_path_buf(), info.clone())),
            Some((first_dir, first)) if first != info => {
                return Err(DataError::TokenizerMismatch {
                    first_dir: first_dir.clone(),
                    first: first.describe(),
                    other_dir: dir.to_path_buf(),
                    other: info.describe(),
                }
                .into());
            }
            Some(_) => {}
        }
        Ok(())
    }

    pub fn tokenizer(&self) -> Option<&TokenizerInfo> {
        self.first.as_ref().map(|(_, t)| t)
    }
}

/// Expands a source's path patterns into shards, in a stable order, checking sizes against manifests.
pub fn resolve_shards(
    source: &str,
    patterns: &[String],
    check: &mut TokenizerCheck,
) -> Result<Vec<ResolvedShard>> {
    let mut manifests: BTreeMap<PathBuf, Manifest> = BTreeMap::new();
    let mut shards = Vec::new();
    for pattern in patterns {
        let matches: Vec<PathBuf> = if Path::new(pattern).exists() {
            vec![PathBuf::from(pattern)]
        } else {
            let mut found: Vec<PathBuf> = glob::glob(pattern)
                .with_context(|| format!("source {source:?}: {pattern} is not a valid glob"))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("source {source:?}: expanding {pattern}"))?;
            found.sort();
            found
        };
        if matches.is_empty() {
            bail!("source {source:?}: {pattern} matches no shard directory or file");
        }
        for path in matches {
            let (dir, only_file) = if path.is_dir() {
                (path.clone(), None)
            } else {
                let dir = path
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("."));
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (dir, Some(name))
            };
            if !manifests.contains_key(&dir) {
                let manifest =
                    Manifest::load(&dir).with_context(|| format!("source {source:?}"))?;
                check.check(&dir, &manifest.settings.tokenizer)?;
                manifests.insert(dir.clone(), manifest);
            }
            let manifest = &manifests[&dir];
            let selected: Vec<&ShardInfo> = match &only_file {
                None => manifest.shards.iter().collect(),
                Some(name) if name == crate::manifest::MANIFEST_FILE => {
                    manifest.shards.iter().collect()
                }
                Some(name) => match manifest.shards.iter().find(|s| &s.file == name) {
                    Some(s) => vec![s],
                    None => bail!(
                        "source {source:?}: {} is not listed in {}/manifest.json",
                        path.display(),
                        dir.display()
                    ),
                },
            };
            for info in selected {
                let shard_path = dir.join(&info.file);
                let bytes = std::fs::metadata(&shard_path)
                    .with_context(|| {
                        format!(
                            "source {source:?}: shard {} listed in the manifest is missing",
                            shard_path.display()
                        )
                    })?
                    .len();
                if bytes != info.bytes {
                    bail!(
                        "source {source:?}: shard {} has {bytes} bytes but its manifest says {}; it changed after tokenization — re-run `data tokenize`",
                        shard_path.display(),
                        info.bytes
                    );
                }
                if !shards.iter().any(|s: &ResolvedShard| s.path == shard_path) {
                    shards.push(ResolvedShard {
                        path: shard_path,
                        info: info.clone(),
                        manifest_fingerprint: manifest.content_fingerprint.clone(),
                        has_loss_mask: manifest.settings.has_loss_mask(),
                    });
                }
            }
        }
    }
    if shards.iter().all(|s| s.info.tokens == 0) {
        bail!("source {source:?}: its shards contain no tokens");
    }
    Ok(shards)
}
