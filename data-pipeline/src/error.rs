//! Errors a caller may want to tell apart (the rest are `anyhow` errors with context).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "the loader state was saved for data with fingerprint {saved}, but the data config now has fingerprint {current}: \
         the sources, their shards, weights, seq_len, seed or shuffle settings changed since the checkpoint. \
         Resume with the original data config, or explicitly allow the change (allow_fingerprint_mismatch / --allow-data-change) \
         to continue each source from its saved position on the new data"
    )]
    FingerprintMismatch { saved: String, current: String },

    #[error(
        "sources were tokenized with different tokenizers: {first_dir} used {first} but {other_dir} used {other}; \
         re-tokenize one of them with the same tokenizer.json"
    )]
    TokenizerMismatch {
        first_dir: PathBuf,
        first: String,
        other_dir: PathBuf,
        other: String,
    },

    #[error(
        "token id {id} in {file} (row group {row_group}) is >= the vocabulary size {vocab}: \
         the shard does not belong to this tokenizer/model; re-tokenize it or fix model_vocab_size"
    )]
    TokenOutOfVocab {
        file: PathBuf,
        row_group: usize,
        id: u32,
        vocab: u32,
    },
}
