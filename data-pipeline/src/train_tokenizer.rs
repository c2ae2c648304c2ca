//! `data train-tokenizer`: a byte-level BPE of a chosen vocabulary size, saved as a standard tokenizer.json.

use crate::fsutil::write_atomic;
use crate::input::{Columns, for_each_doc, inspect, resolve_inputs};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::mpsc::sync_channel;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

#[derive(Clone, Debug)]
pub struct TrainTokenizerOptions {
    pub inputs: Vec<String>,
    /// Path of the tokenizer.json to write.
    pub out: PathBuf,
    pub vocab_size: usize,
    pub min_frequency: u64,
    pub columns: Columns,
    /// Stop reading the corpus after this many bytes of text (None: read everything).
    pub max_bytes: Option<u64>,
    /// Special tokens, given the first ids; the first is the end-of-document token.
    pub special_tokens: Vec<String>,
}

impl TrainTokenizerOptions {
    pub fn new(inputs: Vec<String>, out: impl Into<PathBuf>, vocab_size: usize) -> Self {
        Self {
            inputs,
            out: out.into(),
            vocab_size,
            min_frequency: 2,
            columns: Columns::default(),
            max_bytes: None,
            special_tokens: vec!["<|endoftext|>".into(), "<|bos|>".into(), "<|pad|>".into()],
        }
    }
}

/// Trains and writes the tokenizer; returns its final vocabulary size.
pub fn train_tokenizer(opts: &TrainTokenizerOptions) -> Result<usize> {
    let minimum = 256 + opts.special_tokens.len();
    if opts.vocab_size < minimum {
        bail!(
            "--vocab-size {} is too small: a byte-level BPE needs at least {minimum} (256 bytes + special tokens)",
            opts.vocab_size
        );
    }
    if opts.special_tokens.is_empty() {
        bail!("at least one special token (the end-of-document token) is required");
    }
    let inputs = resolve_inputs(&opts.inputs)?;
    for input in &inputs {
        inspect(input, &opts.columns)?;
    }

    let mut trainer = TrainerWrapper::from(
        BpeTrainerBuilder::new()
            .vocab_size(opts.vocab_size)
            .min_frequency(opts.min_frequency)
            .special_tokens(
                opts.special_tokens
                    .iter()
                    .map(|t| AddedToken::from(t.clone(), true))
                    .collect(),
            )
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .show_progress(false)
            .build(),
    );
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
        .with_post_processor(Some(ByteLevel::default().trim_offsets(false)))
        .with_decoder(Some(ByteLevel::default()));

    // The corpus is streamed from a reader thread so it never has to fit in memory.
    let read_error = Mutex::new(None);
    let (tx, rx) = sync_channel::<String>(1024);
    std::thread::scope(|scope| -> Result<()> {
        let read_error = &read_error;
        scope.spawn(move || {
            let mut read = 0u64;
            for input in &inputs {
                let mut full = false;
                let result = for_each_doc(input, &opts.columns, 0, &|_| {}, &mut |doc| {
                    read += doc.text.len() as u64;
                    full = opts.max_bytes.is_some_and(|m| read >= m);
                    Ok(tx.send(doc.text).is_ok() && !full)
                });
                if let Err(e) = result {
                    *read_error.lock().expect("no panics while holding the lock") = Some(e);
                    return;
                }
                if full {
                    return;
                }
            }
        });
        tokenizer
            .train(&mut trainer, rx.into_iter())
            .map_err(|e| anyhow::anyhow!("training the tokenizer failed: {e}"))?;
        Ok(())
    })?;
    if let Some(e) = read_error.into_inner().expect("reader thread finished") {
        return Err(e);
    }
    let json = tokenizer
        .to_string(true)
        .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
    if let Some(parent) = opts.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    write_atomic(&opts.out, json.as_bytes())?;
    Ok(tokenizer.get_vocab_size(true))
}
