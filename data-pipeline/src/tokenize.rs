//! `data tokenize`: raw documents → tokenized parquet shards + manifest, in parallel and resumable.

use crate::fsutil::write_json_atomic;
use crate::input::{Columns, Doc, InputFile, for_each_doc, inspect, resolve_inputs};
use crate::manifest::{
    InputRecord, MANIFEST_FILE, Manifest, PROGRESS_FILE, Progress, RunSettings, TokenDtype,
};
use crate::shard::ShardWriter;
use crate::tokenizer::{SpecialTokens, TextTokenizer, TokenizerSpec};
use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

/// Text handed to the tokenizer threads at a time; with a queue of two chunks this bounds memory.
const CHUNK_TEXT_BYTES: usize = 4 << 20;

#[derive(Clone, Debug)]
pub struct TokenizeOptions {
    /// Files, directories or globs of parquet / jsonl(.gz) / txt.
    pub inputs: Vec<String>,
    pub out: PathBuf,
    pub tokenizer: TokenizerSpec,
    pub columns: Columns,
    /// Value of the `source` column when the input has none; defaults to the input file's name.
    pub source_name: Option<String>,
    /// A shard is closed after the document that brings it to at least this many tokens.
    pub shard_tokens: u64,
    /// Row group size in tokens: the unit the loader reads and shuffles.
    pub row_group_tokens: u64,
    pub add_bos: bool,
    pub special: SpecialTokens,
    /// Tokenizer threads (default: all cores).
    pub threads: Option<usize>,
    pub progress: bool,
    /// Test hook: fail as if interrupted after this many shards were finished.
    #[doc(hidden)]
    pub interrupt_after_shards: Option<usize>,
}

impl TokenizeOptions {
    pub fn new(inputs: Vec<String>, out: impl Into<PathBuf>, tokenizer: TokenizerSpec) -> Self {
        Self {
            inputs,
            out: out.into(),
            tokenizer,
            columns: Columns::default(),
            source_name: None,
            shard_tokens: 1 << 27,
            row_group_tokens: 1 << 18,
            add_bos: false,
            special: SpecialTokens::default(),
            threads: None,
            progress: false,
            interrupt_after_shards: None,
        }
    }
}

/// Tokenizes the inputs into `opts.out`. Re-running after an interruption continues from the last
/// finished shard; re-running a finished run returns its manifest without work.
pub fn tokenize(opts: &TokenizeOptions) -> Result<Manifest> {
    // Everything that can be wrong with the inputs is checked before the output directory is touched.
    let inputs = resolve_inputs(&opts.inputs)?;
    let tokenizer = TextTokenizer::load(&opts.tokenizer, &opts.special)?;
    if opts.add_bos && tokenizer.info.bos_id.is_none() {
        bail!(
            "--bos was given but tokenizer {} has no known begin-of-document token; name it with --bos-token or --bos-id",
            tokenizer.info.name
        );
    }
    for input in &inputs {
        inspect(input, &opts.columns)?;
    }
    let settings = RunSettings {
        token_dtype: TokenDtype::for_vocab(tokenizer.info.vocab_size),
        tokenizer: tokenizer.info.clone(),
        add_bos: opts.add_bos,
        text_column: opts.columns.text.clone(),
        id_column: opts.columns.id.clone(),
        source_column: opts.columns.source.clone(),
        source_name: opts.source_name.clone(),
        shard_tokens: opts.shard_tokens,
        row_group_tokens: opts.row_group_tokens,
        inputs: inputs
            .iter()
            .map(|i| InputRecord {
                path: i.path.display().to_string(),
                bytes: i.bytes,
            })
            .collect(),
    };

    let out = &opts.out;
    if out.join(MANIFEST_FILE).exists() {
        let manifest = Manifest::load(out)?;
        if manifest.settings == settings {
            return Ok(manifest);
        }
        bail!(
            "{} already holds a finished tokenization with different inputs or settings; choose another --out or delete it",
            out.display()
        );
    }
    let created_dir = !out.exists();
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating output directory {}", out.display()))?;
    let progress = match load_progress(out)? {
        Some(p) if p.settings == settings => p,
        Some(_) => bail!(
            "{} holds an unfinished tokenization with different inputs or settings; rerun that command to finish it, or choose another --out",
            out.display()
        ),
        None => Progress {
            settings: settings.clone(),
            shards: Vec::new(),
            next_input: 0,
            next_record: 0,
        },
    };
    remove_stale_files(out, &progress)?;

    let mut progress = progress;
    let result = run(opts, &inputs, &tokenizer, &mut progress);
    match result {
        Ok(()) => {
            let manifest = Manifest::new(settings, progress.shards);
            write_json_atomic(&out.join(MANIFEST_FILE), &manifest)?;
            let _ = std::fs::remove_file(out.join(PROGRESS_FILE));
            Ok(manifest)
        }
        Err(e) => {
            if created_dir && progress.shards.is_empty() {
                let _ = std::fs::remove_dir_all(out);
            }
            Err(e)
        }
    }
}

fn load_progress(out: &Path) -> Result<Option<Progress>> {
    let path = out.join(PROGRESS_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let progress = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a valid tokenization journal; delete {} to start over",
            path.display(),
            out.display()
        )
    })?;
    Ok(Some(progress))
}

/// Removes temp files and shards that were written after the last journal entry (a crash between
/// renaming a shard and journaling it): they are rewritten identically.
fn remove_stale_files(out: &Path, progress: &Progress) -> Result<()> {
    let kept: std::collections::HashSet<&str> =
        progress.shards.iter().map(|s| s.file.as_str()).collect();
    for entry in std::fs::read_dir(out).with_context(|| format!("listing {}", out.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stale_shard = name.starts_with("shard-")
            && name.ends_with(".parquet")
            && !kept.contains(name.as_str());
        if name.ends_with(".tmp") || stale_shard {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
    }
    Ok(())
}

fn run(
    opts: &TokenizeOptions,
    inputs: &[InputFile],
    tokenizer: &TextTokenizer,
    progress: &mut Progress,
) -> Result<()> {
    let out = &opts.out;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .context("starting tokenizer threads")?;
    let total_bytes: u64 = inputs.iter().map(|i| i.bytes).sum();
    let bar = progress_bar(opts.progress, total_bytes);
    let done_bytes: u64 = inputs[..progress.next_input.min(inputs.len())]
        .iter()
        .map(|i| i.bytes)
        .sum();
    bar.set_position(done_bytes);

    let mut writer = ShardWriter::new(
        out,
        progress.settings.token_dtype,
        opts.shard_tokens,
        opts.row_group_tokens,
        progress.shards.len(),
    );
    let (start_input, start_record) = (progress.next_input, progress.next_record);
    // Each chunk carries the input bytes it covers, so the bar (and its ETA) follows tokenization, not reading.
    let (tx, rx) = sync_channel::<Result<(Vec<(usize, Doc)>, u64)>>(2);
    let started = Instant::now();
    let (mut docs, mut tokens, mut text_bytes) = (0u64, 0u64, 0u64);

    std::thread::scope(|scope| -> Result<()> {
        scope.spawn(move || {
            let read_bytes = std::cell::Cell::new(0u64);
            let mut chunk = Vec::new();
            let mut chunk_bytes = 0;
            let mut stopped = false;
            for (index, input) in inputs.iter().enumerate().skip(start_input) {
                let skip = if index == start_input {
                    start_record
                } else {
                    0
                };
                let result = for_each_doc(
                    input,
                    &opts.columns,
                    skip,
                    &|b| read_bytes.set(read_bytes.get() + b),
                    &mut |doc| {
                        chunk_bytes += doc.text.len();
                        chunk.push((index, doc));
                        if chunk_bytes >= CHUNK_TEXT_BYTES {
                            chunk_bytes = 0;
                            stopped = tx
                                .send(Ok((std::mem::take(&mut chunk), read_bytes.take())))
                                .is_err();
                        }
                        Ok(!stopped)
                    },
                );
                if let Err(e) = result {
                    let _ = tx.send(Err(e));
                    return;
                }
                if stopped {
                    return;
                }
            }
            let _ = tx.send(Ok((chunk, read_bytes.take())));
        });

        // Dropping `rx` on error makes the reader's next send fail, which stops it.
        for message in rx {
            let (chunk, chunk_input_bytes) = message?;
            let encoded: Vec<Result<Vec<u32>>> = pool.install(|| {
                chunk
                    .par_iter()
                    .map(|(_, doc)| tokenizer.encode_document(&doc.text, opts.add_bos))
                    .collect()
            });
            for ((input_index, doc), ids) in chunk.iter().zip(encoded) {
                let input = &inputs[*input_index];
                let ids = ids.with_context(|| {
                    format!(
                        "tokenizing record {} of {}",
                        doc.record,
                        input.path.display()
                    )
                })?;
                let source = doc
                    .source
                    .as_deref()
                    .or(opts.source_name.as_deref())
                    .unwrap_or_else(|| file_stem(&input.path));
                docs += 1;
                tokens += ids.len() as u64;
                text_bytes += doc.text.len() as u64;
                if let Some(shard) = writer.push(&ids, source, doc.id.as_deref())? {
                    progress.shards.push(shard);
                    progress.next_input = *input_index;
                    progress.next_record = doc.record + 1;
                    write_json_atomic(&out.join(PROGRESS_FILE), &*progress)?;
                    if opts.interrupt_after_shards == Some(progress.shards.len()) {
                        bail!(
                            "interrupted after {} shards (test hook)",
                            progress.shards.len()
                        );
                    }
                }
            }
            bar.inc(chunk_input_bytes);
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "{docs} docs · {tokens} tokens · {:.1} MB/s text",
                text_bytes as f64 / secs / 1e6
            ));
        }
        Ok(())
    })?;
    if let Some(shard) = writer.finish()? {
        progress.shards.push(shard);
    }
    bar.finish_with_message(format!("{docs} docs · {tokens} tokens"));
    Ok(())
}

fn file_stem(path: &Path) -> &str {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("input");
    name.split('.').next().unwrap_or(name)
}

fn progress_bar(visible: bool, total_bytes: u64) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ETA {eta} {msg}",
        )
        .expect("valid progress template"),
    );
    bar
}
