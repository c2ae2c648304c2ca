//! `zamba-train data …` subcommands.

use crate::input::Columns;
use crate::manifest::LossOn;
use crate::synth::instruct::TaskMix;
use crate::synth::{SynthKind, SynthOptions, synth};
use crate::tokenize::{ChatOptions, TokenizeOptions, tokenize};
use crate::tokenizer::{SpecialTokens, TokenizerSpec};
use crate::train_tokenizer::{TrainTokenizerOptions, train_tokenizer};
use anyhow::Result;
use clap::{Args, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Subcommand, Debug, Clone)]
pub enum DataCommand {
    /// Tokenize parquet / jsonl(.gz) / txt documents into zstd parquet shards with a manifest.
    Tokenize(TokenizeArgs),
    /// Train a byte-level BPE tokenizer and write it as tokenizer.json.
    TrainTokenizer(TrainTokenizerArgs),
    /// Generate the deterministic synthetic `web` and `instruct` sets as raw parquet.
    Synth(SynthArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ColumnArgs {
    /// Column (parquet) or field (JSON) holding the document text.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Column or field holding the document id, copied when present.
    #[arg(long, default_value = "id")]
    pub id_column: String,
    /// Column or field holding the document's source, copied when present.
    #[arg(long, default_value = "source")]
    pub source_column: String,
}

impl ColumnArgs {
    fn columns(&self) -> Columns {
        Columns {
            text: self.text_column.clone(),
            id: self.id_column.clone(),
            source: self.source_column.clone(),
            messages: None,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct TokenizeArgs {
    /// A Hugging Face tokenizer.json, or `byte` for the built-in byte tokenizer.
    #[arg(long)]
    pub tokenizer: String,
    /// Output directory for the shards and manifest.json (rerun the same command to resume).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub columns: ColumnArgs,
    /// `source` value for documents whose input has no source column (default: the file name).
    #[arg(long)]
    pub source_name: Option<String>,
    /// Tokens per shard (a shard closes after the document that reaches it).
    #[arg(long, default_value_t = 1 << 27)]
    pub shard_tokens: u64,
    /// Tokens per parquet row group: the unit the loader reads and shuffles.
    #[arg(long, default_value_t = 1 << 18)]
    pub row_group_tokens: u64,
    /// Prepend the BOS token to every document (EOS is always appended).
    #[arg(long)]
    pub bos: bool,
    /// End-of-document token, when the tokenizer's is not one of the usual names.
    #[arg(long)]
    pub eos_token: Option<String>,
    /// Begin-of-document token, when the tokenizer's is not one of the usual names.
    #[arg(long)]
    pub bos_token: Option<String>,
    /// End-of-document token id (instead of --eos-token).
    #[arg(long, conflicts_with = "eos_token")]
    pub eos_id: Option<u32>,
    /// Begin-of-document token id (instead of --bos-token).
    #[arg(long, conflicts_with = "bos_token")]
    pub bos_id: Option<u32>,
    /// Tokenizer threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Documents are conversations: this column (or JSON field) holds a list of messages, either
    /// {role, content} or ShareGPT {from, value} (e.g. `messages`, `conversations`).
    #[arg(long)]
    pub messages_column: Option<String>,
    /// Jinja chat template file (default: `chat_template` of the tokenizer_config.json beside
    /// the tokenizer.json).
    #[arg(long, requires = "messages_column")]
    pub chat_template: Option<PathBuf>,
    /// Which tokens of a conversation are training targets: all, or only what the assistant
    /// messages add (stored as a loss mask in the shards).
    #[arg(long, value_enum, default_value = "all", requires = "messages_column")]
    pub loss_on: LossOn,
    /// Input files, directories or globs.
    #[arg(required = true)]
    pub inputs: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct TrainTokenizerArgs {
    /// Path of the tokenizer.json to write.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub vocab_size: usize,
    /// Minimum pair frequency for a merge.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Read at most this many bytes of text.
    #[arg(long)]
    pub max_bytes: Option<u64>,
    #[command(flatten)]
    pub columns: ColumnArgs,
    /// Input files, directories or globs.
    #[arg(required = true)]
    pub inputs: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct SynthArgs {
    #[arg(long, value_enum, default_value = "all")]
    pub kind: SynthKind,
    /// Output directory; sets go to OUT/{web,instruct}/{train,validation}/.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 20_000)]
    pub web_docs: u64,
    #[arg(long, default_value_t = 20_000)]
    pub instruct_examples: u64,
    /// Instruct tasks and their relative weights, e.g. `add=1,fact=2` (tasks: arithmetic, sort,
    /// copy, reverse, count, fact, add); `standard` is the default mix of docs/data.md.
    #[arg(long, default_value = "standard")]
    pub tasks: TaskMix,
    #[arg(long, default_value_t = 0.05)]
    pub validation_fraction: f64,
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Tokenize(a) => {
            let mut opts = TokenizeOptions::new(
                a.inputs,
                a.out,
                a.tokenizer.parse::<TokenizerSpec>().expect("infallible"),
            );
            opts.columns = a.columns.columns();
            opts.source_name = a.source_name;
            opts.shard_tokens = a.shard_tokens;
            opts.row_group_tokens = a.row_group_tokens;
            opts.add_bos = a.bos;
            opts.special = SpecialTokens {
                eos: a.eos_token,
                bos: a.bos_token,
                eos_id: a.eos_id,
                bos_id: a.bos_id,
            };
            opts.threads = a.threads;
            opts.progress = !a.no_progress && std::io::stderr().is_terminal();
            opts.chat = a.messages_column.map(|messages_column| ChatOptions {
                messages_column,
                template_file: a.chat_template,
                loss_on: a.loss_on,
            });
            let manifest = tokenize(&opts)?;
            println!(
                "{}: {} shards, {} documents, {} tokens (vocab {}, {}), fingerprint {}",
                opts.out.display(),
                manifest.shards.len(),
                manifest.total_docs,
                manifest.total_tokens,
                manifest.vocab_size(),
                manifest.settings.token_dtype.name(),
                manifest.content_fingerprint
            );
        }
        DataCommand::TrainTokenizer(a) => {
            let mut opts = TrainTokenizerOptions::new(a.inputs, a.out, a.vocab_size);
            opts.min_frequency = a.min_frequency;
            opts.max_bytes = a.max_bytes;
            opts.columns = a.columns.columns();
            let vocab = train_tokenizer(&opts)?;
            println!("wrote {} (vocab {vocab})", opts.out.display());
        }
        DataCommand::Synth(a) => {
            let mut opts = SynthOptions::new(a.kind, a.out);
            opts.seed = a.seed;
            opts.web_docs = a.web_docs;
            opts.instruct_examples = a.instruct_examples;
            opts.tasks = a.tasks;
            opts.validation_fraction = a.validation_fraction;
            for split in synth(&opts)? {
                println!(
                    "{}: {} rows in {} files under {}",
                    split.name,
                    split.rows,
                    split.files.len(),
                    split.dir.display()
                );
            }
        }
    }
    Ok(())
}
