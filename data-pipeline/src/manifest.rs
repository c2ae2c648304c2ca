//! `manifest.json`: what a directory of tokenized shards contains and how it was made.

use crate::tokenizer::TokenizerInfo;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const MANIFEST_FILE: &str = "manifest.json";
/// Journal of a tokenization in progress; replaced by `manifest.json` when the run completes.
pub const PROGRESS_FILE: &str = "progress.json";
pub const FORMAT: &str = "zamba-data/tokenized-parquet";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    pub fn name(self) -> &'static str {
        match self {
            Self::U16 => "u16",
            Self::U32 => "u32",
        }
    }

    /// u16 halves shard size and read bandwidth whenever every id fits.
    pub fn for_vocab(vocab_size: u32) -> Self {
        if vocab_size <= 1 << 16 {
            Self::U16
        } else {
            Self::U32
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowGroupInfo {
    pub docs: u64,
    pub tokens: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name relative to the manifest's directory.
    pub file: String,
    pub docs: u64,
    pub tokens: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// blake3 of the file bytes.
    pub blake3: String,
    pub row_groups: Vec<RowGroupInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRecord {
    pub path: String,
    pub bytes: u64,
}

/// Settings that define a tokenization run; a resume must match them exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSettings {
    pub tokenizer: TokenizerInfo,
    pub token_dtype: TokenDtype,
    pub add_bos: bool,
    pub text_column: String,
    pub id_column: String,
    pub source_column: String,
    pub source_name: Option<String>,
    pub shard_tokens: u64,
    pub row_group_tokens: u64,
    pub inputs: Vec<InputRecord>,
    /// Set when documents are conversations rendered with a chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatSettings>,
}

impl RunSettings {
    /// Whether the shards have a `loss_mask` column.
    pub fn has_loss_mask(&self) -> bool {
        self.chat
            .as_ref()
            .is_some_and(|c| c.loss_on == LossOn::Assistant)
    }
}

/// Which tokens of a rendered conversation are training targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossOn {
    /// Every token (no mask column).
    #[default]
    All,
    /// Only the tokens the assistant messages add (their content and end-of-turn markup, and the
    /// final EOS after an assistant message).
    Assistant,
}

/// How conversations were turned into documents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatSettings {
    /// Column (or JSON field) holding the list of messages.
    pub messages_column: String,
    /// blake3 of the chat template text.
    pub template_hash: String,
    pub loss_on: LossOn,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    #[serde(flatten)]
    pub settings: RunSettings,
    pub shards: Vec<ShardInfo>,
    pub total_docs: u64,
    pub total_tokens: u64,
    /// blake3 over the tokenizer hash and every shard's hash, in order: equal fingerprints mean equal token streams.
    pub content_fingerprint: String,
}

impl Manifest {
    pub fn new(settings: RunSettings, shards: Vec<ShardInfo>) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(settings.tokenizer.hash.as_bytes());
        for shard in &shards {
            hasher.update(shard.file.as_bytes());
            hasher.update(shard.blake3.as_bytes());
        }
        Self {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            total_docs: shards.iter().map(|s| s.docs).sum(),
            total_tokens: shards.iter().map(|s| s.tokens).sum(),
            content_fingerprint: hasher.finalize().to_hex().to_string(),
            settings,
            shards,
        }
    }

    pub fn vocab_size(&self) -> u32 {
        self.settings.tokenizer.vocab_size
    }

    /// Loads `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        if !path.exists() {
            if dir.join(PROGRESS_FILE).exists() {
                bail!(
                    "{} holds an unfinished tokenization (no {MANIFEST_FILE} yet); rerun the same `data tokenize` command to finish it",
                    dir.display()
                );
            }
            bail!(
                "{} has no {MANIFEST_FILE}: expected a directory written by `zamba-train data tokenize`",
                dir.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid manifest", path.display()))?;
        if manifest.format != FORMAT || manifest.version != FORMAT_VERSION {
            bail!(
                "{} has format {} v{}, this build reads {FORMAT} v{FORMAT_VERSION}",
                path.display(),
                manifest.format,
                manifest.version
            );
        }
        Ok(manifest)
    }
}

/// The journal written after every finished shard.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Progress {
    pub settings: RunSettings,
    pub shards: Vec<ShardInfo>,
    /// Where to continue: input index and record index inside it.
    pub next_input: usize,
    pub next_record: u64,
}
