//! zamba-data: the data pipeline of zamba-train.
//!
//! - [`tokenize()`]: raw parquet / jsonl(.gz) / txt → tokenized zstd parquet shards + manifest.
//! - [`train_tokenizer()`]: a byte-level BPE tokenizer.json for small proxy runs.
//! - [`synth()`]: deterministic synthetic `web` and `instruct` sets (raw parquet).
//! - [`MixtureLoader`]: a deterministic, resumable, world-size-independent mixture of sources.
//! - [`ensure_synthetic_cache`]: all of the above, cached, for a download-free quickstart.
//!
//! See docs/data.md for the formats and the design.

pub mod cache;
pub mod chat;
pub mod cli;
pub mod error;
mod fsutil;
pub mod input;
pub mod loader;
pub mod manifest;
pub mod rng;
pub mod shard;
pub mod synth;
pub mod tokenize;
pub mod tokenizer;
pub mod train_tokenizer;

pub use cache::{SyntheticCache, SyntheticCacheOptions, ensure_synthetic_cache};
pub use cli::{DataCommand, run};
pub use error::DataError;
pub use loader::{
    Batch, DataConfig, LoaderState, MixtureLoader, SourceConfig, SourceCursor, ValidationBatches,
};
pub use manifest::{Manifest, ShardInfo, TokenDtype};
pub use synth::{SynthKind, SynthOptions, synth};
pub use tokenize::{TokenizeOptions, tokenize};
pub use tokenizer::{TokenizerInfo, TokenizerSpec};
pub use train_tokenizer::{TrainTokenizerOptions, train_tokenizer};
