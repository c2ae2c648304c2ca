//! `data tokenize`: raw documents → tokenized parquet shards + manifest, in parallel and resumable.

use crate::chat::{ChatTemplate, parse_conversation};
use crate::fsutil::{write_atomic, write_json_atomic};
use crate::input::{Columns, Doc, InputFile, for_each_doc, inspect, resolve_inputs};
use crate::manifest::{
    ChatSettings, InputRecord, LossOn, MANIFEST_FILE, Manifest, PROGRESS_FILE, Progress,
    RunSettings, TokenDtype,
};
use crate::shard::ShardWriter;
use crate::tokenizer::{
    SpecialTokens, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TextTokenizer, TokenizerSpec,
};
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
    /// Documents are conversations rendered with a chat template.
    pub chat: Option<ChatOptions>,
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
            chat: None,
            interrupt_after_shards: None,
        }
    }
}

/// How conversations become documents.
#[derive(Clone, Debug)]
pub struct ChatOptions {
    /// Column (parquet) or field (JSON) holding each conversation's list of messages.
    pub messages_column: String,
    /// The Jinja template; default: `chat_template` of the tokenizer_config.json beside the tokenizer.
    pub template_file: Option<PathBuf>,
    pub loss_on: LossOn,
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
    let mut columns = opts.columns.clone();
    let chat = match &opts.chat {
        Some(chat) => {
            columns.messages = Some(chat.messages_column.clone());
            Some(load_chat_template(&opts.tokenizer, chat)?)
        }
        None => None,
    };
    for input in &inputs {
        inspect(input, &columns)?;
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
        chat: opts
            .chat
            .as_ref()
            .zip(chat.as_ref())
            .map(|(c, template)| ChatSettings {
                messages_column: c.messages_column.clone(),
                template_hash: blake3::hash(template.source.as_bytes())
                    .to_hex()
                    .to_string(),
                loss_on: c.loss_on,
            }),
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
    let encoder = Encoder {
        tokenizer: &tokenizer,
        chat: chat.as_ref(),
        add_bos: opts.add_bos,
        mask: settings.has_loss_mask(),
    };
    let result = run(opts, &columns, &inputs, &encoder, &mut progress);
    match result {
        Ok(()) => {
            let given_template = opts
                .chat
                .as_ref()
                .filter(|c| c.template_file.is_some())
                .and(chat.as_ref())
                .map(|t| t.source.as_str());
            copy_tokenizer_files(&opts.tokenizer, out, given_template)?;
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

/// Keeps a copy of the tokenizer (and the `tokenizer_config.json` beside it, which holds its
/// special tokens and chat template) with the shards, so that whatever trains on them can name
/// and export its tokenizer. The manifest's hash identifies the copy. A chat template given with
/// `--chat-template` goes into the copied tokenizer_config.json, as the template the data used.
fn copy_tokenizer_files(
    spec: &TokenizerSpec,
    out: &Path,
    chat_template: Option<&str>,
) -> Result<()> {
    let TokenizerSpec::File(path) = spec else {
        return Ok(());
    };
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    write_atomic(&out.join(TOKENIZER_FILE), &bytes)?;
    let config_path = path.with_file_name(TOKENIZER_CONFIG_FILE);
    let mut config: Option<serde_json::Value> = if config_path.exists() {
        let text = std::fs::read(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        Some(
            serde_json::from_slice(&text)
                .with_context(|| format!("{} is not valid JSON", config_path.display()))?,
        )
    } else {
        None
    };
    if let Some(template) = chat_template {
        config.get_or_insert_with(|| serde_json::json!({}))["chat_template"] = template.into();
    }
    if let Some(config) = config {
        write_json_atomic(&out.join(TOKENIZER_CONFIG_FILE), &config)?;
    }
    Ok(())
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

fn load_chat_template(spec: &TokenizerSpec, chat: &ChatOptions) -> Result<ChatTemplate> {
    match (spec, &chat.template_file) {
        (TokenizerSpec::File(path), file) => ChatTemplate::load(path, file.as_deref()),
        (TokenizerSpec::Byte, Some(file)) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading the chat template {}", file.display()))?;
            ChatTemplate::new(&text, Default::default())
        }
        (TokenizerSpec::Byte, None) => bail!(
            "--messages-column with the byte tokenizer needs a chat template: pass --chat-template FILE"
        ),
    }
}

/// Turns one input document into the token ids (and loss mask) stored in a shard.
struct Encoder<'a> {
    tokenizer: &'a TextTokenizer,
    chat: Option<&'a ChatTemplate>,
    add_bos: bool,
    /// Keep a per-token loss mask (`--loss-on assistant`).
    mask: bool,
}

impl Encoder<'_> {
    /// Optional BOS, the text (or rendered conversation), EOS; the mask marks the tokens that
    /// start inside an assistant span, and the EOS after a final assistant message.
    fn encode(&self, doc: &Doc) -> Result<(Vec<u32>, Option<Vec<bool>>)> {
        let (Some(template), Some(value)) = (self.chat, &doc.messages) else {
            return Ok((
                self.tokenizer.encode_document(&doc.text, self.add_bos)?,
                None,
            ));
        };
        let messages = parse_conversation(value).map_err(anyhow::Error::msg)?;
        let (text, spans) = template.render_with_spans(&messages)?;
        let (body, offsets) = self.tokenizer.encode_with_offsets(&text)?;
        let bos = self.tokenizer.info.bos_id.filter(|_| self.add_bos);
        let mut ids: Vec<u32> = bos.into_iter().chain(body).collect();
        ids.push(self.tokenizer.info.eos_id);
        if !self.mask {
            return Ok((ids, None));
        }
        let ends_with_assistant = messages.last().is_some_and(|m| m.role == "assistant");
        let mut mask: Vec<bool> = bos.map(|_| false).into_iter().collect();
        mask.extend(
            offsets
                .iter()
                .map(|&start| spans.iter().any(|s| s.contains(&start))),
        );
        mask.push(ends_with_assistant);
        Ok((ids, Some(mask)))
    }
}

fn run(
    opts: &TokenizeOptions,
    columns: &Columns,
    inputs: &[InputFile],
    encoder: &Encoder,
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
        encoder.mask,
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
                    columns,
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
            let encoded: Vec<Result<(Vec<u32>, Option<Vec<bool>>)>> = pool.install(|| {
                chunk
                    .par_iter()
                    .map(|(_, doc)| encoder.encode(doc))
                    .collect()
            });
            for ((input_index, doc), ids) in chunk.iter().zip(encoded) {
                let input = &inputs[*input_index];
                let (ids, mask) =
                    ids.with_context(|| format!("{} row {}", input.path.display(), doc.record))?;
                let source = doc
                    .source
                    .as_deref()
                    .or(opts.source_name.as_deref())
                    .unwrap_or_else(|| file_stem(&input.path));
                docs += 1;
                tokens += ids.len() as u64;
                text_bytes += doc.text.len() as u64;
                if let Some(shard) =
                    writer.push(&ids, mask.as_deref(), source, doc.id.as_deref())?
                {
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
