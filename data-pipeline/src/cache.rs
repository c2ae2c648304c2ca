//! A ready-to-train synthetic dataset, generated and tokenized once into a cache directory, so a
//! fresh clone can run the quickstart with one command and no downloads.

use crate::fsutil::{hash_file, write_json_atomic};
use crate::loader::{DataConfig, SourceConfig};
use crate::synth::instruct::TaskMix;
use crate::synth::{SynthKind, SynthOptions, synth};
use crate::tokenize::{TokenizeOptions, tokenize};
use crate::tokenizer::{TokenizerInfo, TokenizerSpec};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Bumped whenever the generators change, so stale caches are not reused.
const CACHE_VERSION: u32 = 1;
const CACHE_FILE: &str = "cache.json";

#[derive(Clone, Debug)]
pub struct SyntheticCacheOptions {
    pub seed: u64,
    pub web_docs: u64,
    pub instruct_examples: u64,
    pub tasks: TaskMix,
    pub validation_fraction: f64,
    pub tokenizer: TokenizerSpec,
    /// Small row groups give small synthetic sets enough blocks to shuffle.
    pub row_group_tokens: u64,
}

impl Default for SyntheticCacheOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            web_docs: 20_000,
            instruct_examples: 20_000,
            tasks: TaskMix::Standard,
            validation_fraction: 0.05,
            tokenizer: TokenizerSpec::Byte,
            row_group_tokens: 1 << 16,
        }
    }
}

/// Tokenized synthetic sets; paths are absolute once loaded.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyntheticCache {
    pub dir: PathBuf,
    pub web_train: PathBuf,
    pub web_validation: PathBuf,
    pub instruct_train: PathBuf,
    pub instruct_validation: PathBuf,
    pub tokenizer: TokenizerInfo,
    pub web_train_tokens: u64,
    pub instruct_train_tokens: u64,
}

impl SyntheticCache {
    fn source(train: &Path, validation: &Path, weight: f64) -> SourceConfig {
        SourceConfig {
            paths: vec![train.to_string_lossy().into_owned()],
            weight,
            validation: vec![validation.to_string_lossy().into_owned()],
        }
    }

    /// Phase 1: synthetic web only.
    pub fn web_config(&self, seq_len: usize, seed: u64) -> DataConfig {
        DataConfig {
            sources: BTreeMap::from([(
                "web".to_owned(),
                Self::source(&self.web_train, &self.web_validation, 1.0),
            )]),
            seq_len,
            seed,
            shuffle_blocks: 16,
            prefetch: 4,
            model_vocab_size: None,
        }
    }

    /// Phase 2: replayed web and instruct data with the given weights.
    pub fn mixture_config(
        &self,
        seq_len: usize,
        seed: u64,
        web_weight: f64,
        instruct_weight: f64,
    ) -> DataConfig {
        let mut config = self.web_config(seq_len, seed);
        config.sources.get_mut("web").expect("web source").weight = web_weight;
        config.sources.insert(
            "instruct".to_owned(),
            Self::source(
                &self.instruct_train,
                &self.instruct_validation,
                instruct_weight,
            ),
        );
        config
    }
}

/// Returns the cache for `opts` under `cache_dir`, generating and tokenizing it first if absent.
/// The same options always give the same token shards (and content fingerprints); different
/// options get a different subdirectory.
pub fn ensure_synthetic_cache(
    cache_dir: &Path,
    opts: &SyntheticCacheOptions,
) -> Result<SyntheticCache> {
    let tokenizer_hash = match &opts.tokenizer {
        TokenizerSpec::Byte => "byte-v1".to_owned(),
        TokenizerSpec::File(path) => hash_file(path)?,
    };
    let mut key_text = format!(
        "v{CACHE_VERSION}/{}/{}/{}/{}/{tokenizer_hash}/{}",
        opts.seed,
        opts.web_docs,
        opts.instruct_examples,
        opts.validation_fraction,
        opts.row_group_tokens
    );
    // Only a non-standard mix is part of the key, so caches of the standard mix keep their names.
    if let Some(mix) = opts.tasks.key() {
        key_text.push_str(&format!("/tasks:{mix}"));
    }
    let key = &blake3::hash(key_text.as_bytes()).to_hex()[..16];
    let dir = cache_dir.join(format!("synth-{key}"));
    if dir.join(CACHE_FILE).exists() {
        return load(&dir);
    }
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating cache directory {}", cache_dir.display()))?;
    // Built under a private name and renamed, so an interrupted build is never mistaken for a cache.
    let building = cache_dir.join(format!(".synth-{key}.building-{}", std::process::id()));
    if building.exists() {
        std::fs::remove_dir_all(&building)
            .with_context(|| format!("removing {}", building.display()))?;
    }
    let result = build(&building, opts);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&building);
        return Err(e.context(format!(
            "building the synthetic data cache in {}",
            cache_dir.display()
        )));
    }
    if let Err(e) = std::fs::rename(&building, &dir) {
        let _ = std::fs::remove_dir_all(&building);
        // Another process may have finished the same cache first.
        if !dir.join(CACHE_FILE).exists() {
            return Err(e)
                .with_context(|| format!("moving the synthetic cache into {}", dir.display()));
        }
    }
    load(&dir)
}

fn build(dir: &Path, opts: &SyntheticCacheOptions) -> Result<()> {
    let raw = dir.join("raw");
    let mut synth_opts = SynthOptions::new(SynthKind::All, &raw);
    synth_opts.seed = opts.seed;
    synth_opts.web_docs = opts.web_docs;
    synth_opts.instruct_examples = opts.instruct_examples;
    synth_opts.tasks = opts.tasks.clone();
    synth_opts.validation_fraction = opts.validation_fraction;
    synth(&synth_opts)?;
    let mut manifests = BTreeMap::new();
    for split in [
        "web/train",
        "web/validation",
        "instruct/train",
        "instruct/validation",
    ] {
        let out = dir.join("tokenized").join(split.replace('/', "-"));
        let mut t = TokenizeOptions::new(
            vec![raw.join(split).to_string_lossy().into_owned()],
            &out,
            opts.tokenizer.clone(),
        );
        t.row_group_tokens = opts.row_group_tokens;
        manifests.insert(split, tokenize(&t)?);
    }
    let relative = SyntheticCache {
        dir: PathBuf::new(),
        web_train: "tokenized/web-train".into(),
        web_validation: "tokenized/web-validation".into(),
        instruct_train: "tokenized/instruct-train".into(),
        instruct_validation: "tokenized/instruct-validation".into(),
        tokenizer: manifests["web/train"].settings.tokenizer.clone(),
        web_train_tokens: manifests["web/train"].total_tokens,
        instruct_train_tokens: manifests["instruct/train"].total_tokens,
    };
    // Manifests store input paths; the raw copies are not needed once tokenized.
    std::fs::remove_dir_all(&raw).with_context(|| format!("removing {}", raw.display()))?;
    write_json_atomic(&dir.join(CACHE_FILE), &relative)
}

fn load(dir: &Path) -> Result<SyntheticCache> {
    let path = dir.join(CACHE_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut cache: SyntheticCache = serde_json::from_str(&text)
        .with_context(|| format!("{} is corrupt; delete {}", path.display(), dir.display()))?;
    let dir = std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
    for p in [
        &mut cache.web_train,
        &mut cache.web_validation,
        &mut cache.instruct_train,
        &mut cache.instruct_validation,
    ] {
        *p = dir.join(&*p);
    }
    cache.dir = dir;
    Ok(cache)
}
