//! The deterministic, resumable, world-size-independent mixture loader.
//!
//! The global batch at step `s` is a pure function of (config, seed, state before `s`):
//! its rows are allocated to sources by [`mixture::allocate`], each source's rows take the next
//! windows of that source's stream, and the rows are permuted with a seed derived from `s`.
//! Rank `r` of `W` materialises only rows `r·B/W .. (r+1)·B/W` of that fixed batch, so the union
//! over ranks never depends on `W`, and the state (a step and two counters per source) is the same
//! on every rank.

pub mod config;
pub mod mixture;
pub mod stream;
mod validation;

pub use config::{DataConfig, SourceConfig};
pub use validation::ValidationBatches;

use crate::error::DataError;
use crate::rng::{permutation, rng_for};
use crate::tokenizer::TokenizerInfo;
use anyhow::{Context, Result, bail};
use config::{ResolvedShard, TokenizerCheck, resolve_shards};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use stream::SourceStream;

const STATE_VERSION: u32 = 1;
const ROWS_STREAM: u64 = 0x524f_5753;

/// Where each source stands; restoring it reproduces the following batches exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub version: u32,
    /// Fingerprint of the data this state belongs to (see [`MixtureLoader::fingerprint`]).
    pub fingerprint: String,
    /// Global batches produced so far.
    pub step: u64,
    pub sources: BTreeMap<String, SourceCursor>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCursor {
    /// Windows consumed from the source's stream (its position: windows × seq_len tokens).
    pub windows: u64,
    /// Rows given to the source since this mixture started (drives the weights; reset when the data changes).
    pub mix_rows: u64,
}

/// This rank's part of one global batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Index of the global batch (0-based); for validation batches, the batch index within the pass.
    pub step: u64,
    pub rows: usize,
    pub seq_len: usize,
    /// Row-major `[rows, seq_len]`.
    pub inputs: Vec<u32>,
    /// Row-major `[rows, seq_len]`: `inputs` shifted by one token.
    pub targets: Vec<u32>,
    /// Row-major `[rows, seq_len]`: whether each target counts in the loss (false for tokens
    /// outside the trained spans of `--loss-on assistant` data). None: every target counts.
    pub loss_mask: Option<Vec<bool>>,
    /// Index (into [`MixtureLoader::source_names`]) of the source of each row.
    pub row_sources: Vec<u16>,
    /// The window of its source's stream each row holds: with `row_sources`, the row's sample
    /// id (window `w` is stream tokens `[w·seq_len, (w+1)·seq_len + 1)`).
    pub row_windows: Vec<u64>,
    /// Target tokens per source in this rank's rows.
    pub source_tokens: BTreeMap<String, u64>,
}

struct Source {
    name: String,
    weight: f64,
    stream: SourceStream,
}

/// Builds global batches; runs on the prefetch thread.
struct Producer {
    sources: Vec<Source>,
    seq_len: usize,
    seed: u64,
    global_rows: usize,
    rank: usize,
    world: usize,
    state: LoaderState,
}

impl Producer {
    fn next(&mut self) -> Result<(Batch, LoaderState)> {
        let n = self.sources.len();
        let weights: Vec<f64> = self.sources.iter().map(|s| s.weight).collect();
        let mut mix_rows: Vec<u64> = self
            .sources
            .iter()
            .map(|s| self.state.sources[&s.name].mix_rows)
            .collect();
        let mut windows: Vec<u64> = self
            .sources
            .iter()
            .map(|s| self.state.sources[&s.name].windows)
            .collect();
        let allocation = mixture::allocate(&weights, &mut mix_rows, self.global_rows);
        let row_windows: Vec<(u16, u64)> = allocation
            .iter()
            .map(|&s| {
                let w = windows[s as usize];
                windows[s as usize] += 1;
                (s, w)
            })
            .collect();
        let order = permutation(
            &mut rng_for(self.seed, &[ROWS_STREAM, self.state.step]),
            self.global_rows,
        );
        let local = self.global_rows / self.world;
        // (local row, source, window), read in stream order so each source is read forwards.
        let mut mine: Vec<(usize, u16, u64)> = (0..local)
            .map(|r| {
                let (s, w) = row_windows[order[self.rank * local + r] as usize];
                (r, s, w)
            })
            .collect();
        mine.sort_by_key(|&(_, s, w)| (s, w));

        let l = self.seq_len;
        let mut rows = RowsBuilder::new(local, l, self.sources.iter().any(|s| s.stream.masked()));
        let mut row_sources = vec![0u16; local];
        let mut local_windows = vec![0u64; local];
        let mut per_source = vec![0u64; n];
        for &(r, s, w) in &mine {
            let source = &mut self.sources[s as usize];
            rows.read(r, &mut source.stream, w)
                .with_context(|| format!("reading source {:?}", source.name))?;
            row_sources[r] = s;
            local_windows[r] = w;
            per_source[s as usize] += l as u64;
        }
        let (inputs, targets, loss_mask) = rows.finish();

        let batch = Batch {
            step: self.state.step,
            rows: local,
            seq_len: l,
            inputs,
            targets,
            loss_mask,
            row_sources,
            row_windows: local_windows,
            source_tokens: self
                .sources
                .iter()
                .zip(&per_source)
                .map(|(s, &t)| (s.name.clone(), t))
                .collect(),
        };
        self.state.step += 1;
        for (i, source) in self.sources.iter().enumerate() {
            self.state.sources.insert(
                source.name.clone(),
                SourceCursor {
                    windows: windows[i],
                    mix_rows: mix_rows[i],
                },
            );
        }
        Ok((batch, self.state.clone()))
    }
}

/// Fills the rows of a batch from windows of source streams: inputs, targets shifted by one, and
/// the targets' loss mask when any source has masks.
pub(crate) struct RowsBuilder {
    seq_len: usize,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    mask: Option<Vec<bool>>,
    window: Vec<u32>,
    window_mask: Vec<bool>,
}

impl RowsBuilder {
    pub(crate) fn new(rows: usize, seq_len: usize, masked: bool) -> Self {
        Self {
            seq_len,
            inputs: vec![0; rows * seq_len],
            targets: vec![0; rows * seq_len],
            mask: masked.then(|| vec![true; rows * seq_len]),
            window: vec![0; seq_len + 1],
            window_mask: vec![true; seq_len + 1],
        }
    }

    /// Row `row` := window `w` of `stream` (stream tokens `[w·L, w·L + L + 1)`).
    pub(crate) fn read(&mut self, row: usize, stream: &mut SourceStream, w: u64) -> Result<()> {
        let l = self.seq_len;
        let mask = stream.masked().then_some(&mut self.window_mask[..]);
        stream.read(w * l as u64, &mut self.window, mask)?;
        self.inputs[row * l..(row + 1) * l].copy_from_slice(&self.window[..l]);
        self.targets[row * l..(row + 1) * l].copy_from_slice(&self.window[1..]);
        if let Some(out) = &mut self.mask {
            let row_mask = &mut out[row * l..(row + 1) * l];
            if stream.masked() {
                row_mask.copy_from_slice(&self.window_mask[1..]);
            } else {
                row_mask.fill(true);
            }
        }
        Ok(())
    }

    pub(crate) fn finish(self) -> (Vec<u32>, Vec<u32>, Option<Vec<bool>>) {
        (self.inputs, self.targets, self.mask)
    }
}

pub struct SourceSummary {
    pub name: String,
    pub weight: f64,
    pub tokens: u64,
    pub shards: usize,
    pub validation_tokens: u64,
}

pub struct MixtureLoader {
    receiver: Option<Receiver<Result<(Batch, LoaderState)>>>,
    worker: Option<JoinHandle<()>>,
    state: LoaderState,
    summaries: Vec<SourceSummary>,
    validation_shards: BTreeMap<String, Vec<ResolvedShard>>,
    tokenizer: TokenizerInfo,
    config: DataConfig,
    rank: usize,
    world: usize,
}

impl MixtureLoader {
    /// Opens the sources of `config` for rank `rank` of `world`, producing `global_batch_sequences`
    /// sequences per step over all ranks. `resume` continues from a saved state; a state saved for
    /// different data is an error unless `allow_fingerprint_mismatch`.
    pub fn new(
        config: &DataConfig,
        rank: usize,
        world: usize,
        global_batch_sequences: usize,
        resume: Option<LoaderState>,
        allow_fingerprint_mismatch: bool,
    ) -> Result<Self> {
        config.validate()?;
        if world == 0 || rank >= world {
            bail!("rank {rank} is not valid for world size {world}");
        }
        if global_batch_sequences == 0 || !global_batch_sequences.is_multiple_of(world) {
            bail!(
                "the global batch ({global_batch_sequences} sequences) must be a positive multiple of the world size {world}"
            );
        }
        if global_batch_sequences > u32::MAX as usize {
            bail!("the global batch ({global_batch_sequences} sequences) is too large");
        }
        let mut check = TokenizerCheck::default();
        let mut resolved = Vec::new();
        let mut validation_shards = BTreeMap::new();
        for (name, source) in &config.sources {
            resolved.push(resolve_shards(name, &source.paths, &mut check)?);
            if !source.validation.is_empty() {
                validation_shards.insert(
                    name.clone(),
                    resolve_shards(
                        &format!("{name} (validation)"),
                        &source.validation,
                        &mut check,
                    )?,
                );
            }
        }
        let tokenizer = check
            .tokenizer()
            .expect("at least one source was resolved")
            .clone();
        if let Some(model_vocab) = config.model_vocab_size
            && tokenizer.vocab_size > model_vocab
        {
            bail!(
                "the data was tokenized with {} whose ids go up to {}, but model_vocab_size is {model_vocab}: token ids would be out of range; \
                 use a model with a vocabulary of at least {} or re-tokenize",
                tokenizer.describe(),
                tokenizer.vocab_size - 1,
                tokenizer.vocab_size
            );
        }
        let fingerprint = fingerprint(config, &resolved);
        let names: Vec<String> = config.sources.keys().cloned().collect();
        let state = match resume {
            None => LoaderState {
                version: STATE_VERSION,
                fingerprint: fingerprint.clone(),
                step: 0,
                sources: names
                    .iter()
                    .map(|n| (n.clone(), SourceCursor::default()))
                    .collect(),
            },
            Some(saved) => restore(saved, &fingerprint, &names, allow_fingerprint_mismatch)?,
        };

        let weights = config.normalised_weights();
        let mut summaries = Vec::new();
        let mut sources = Vec::new();
        for ((name, shards), weight) in names.iter().zip(resolved).zip(weights) {
            let stream = SourceStream::new(
                name,
                shards.clone(),
                config.seed,
                true,
                config.shuffle_blocks,
                tokenizer.vocab_size,
            );
            summaries.push(SourceSummary {
                name: name.clone(),
                weight,
                tokens: stream.total_tokens(),
                shards: shards.len(),
                validation_tokens: validation_shards
                    .get(name)
                    .map_or(0, |v: &Vec<ResolvedShard>| {
                        v.iter().map(|s| s.info.tokens).sum()
                    }),
            });
            sources.push(Source {
                name: name.clone(),
                weight,
                stream,
            });
        }
        let mut producer = Producer {
            sources,
            seq_len: config.seq_len,
            seed: config.seed,
            global_rows: global_batch_sequences,
            rank,
            world,
            state: state.clone(),
        };
        let (sender, receiver) = sync_channel(config.prefetch.max(1));
        let worker = std::thread::Builder::new()
            .name("zamba-data-prefetch".into())
            .spawn(move || prefetch(&mut producer, sender))
            .context("starting the data prefetch thread")?;
        Ok(Self {
            receiver: Some(receiver),
            worker: Some(worker),
            state,
            summaries,
            validation_shards,
            tokenizer,
            config: config.clone(),
            rank,
            world,
        })
    }

    /// This rank's part of the next global batch. Errors from reading (a corrupt shard, an
    /// out-of-vocabulary id) surface here; after one, the loader is finished.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let receiver = self
            .receiver
            .as_ref()
            .context("the data loader has stopped")?;
        match receiver.recv() {
            Ok(Ok((batch, state))) => {
                self.state = state;
                Ok(batch)
            }
            Ok(Err(e)) => {
                self.receiver = None;
                Err(e.context(format!(
                    "data loader failed preparing step {}",
                    self.state.step
                )))
            }
            Err(_) => {
                self.receiver = None;
                bail!("the data prefetch thread stopped unexpectedly")
            }
        }
    }

    /// State after the last batch returned by [`next_batch`](Self::next_batch); identical on every rank.
    pub fn state(&self) -> LoaderState {
        self.state.clone()
    }

    pub fn fingerprint(&self) -> &str {
        &self.state.fingerprint
    }

    /// The shared tokenizer of all sources (vocab size, special ids, hash).
    pub fn tokenizer(&self) -> &TokenizerInfo {
        &self.tokenizer
    }

    pub fn vocab_size(&self) -> u32 {
        self.tokenizer.vocab_size
    }

    /// Source names in the order used by [`Batch::row_sources`].
    pub fn source_names(&self) -> Vec<String> {
        self.summaries.iter().map(|s| s.name.clone()).collect()
    }

    pub fn sources(&self) -> &[SourceSummary] {
        &self.summaries
    }

    /// Completed passes over each source (fractional), from the current state.
    pub fn epochs(&self) -> BTreeMap<String, f64> {
        self.summaries
            .iter()
            .map(|s| {
                let windows = self.state.sources.get(&s.name).map_or(0, |c| c.windows);
                (
                    s.name.clone(),
                    (windows * self.config.seq_len as u64) as f64 / s.tokens as f64,
                )
            })
            .collect()
    }

    /// Sources that have a validation set.
    pub fn validation_sources(&self) -> Vec<String> {
        self.validation_shards.keys().cloned().collect()
    }

    /// One pass over `source`'s validation set, in file order, in batches of up to `rows`
    /// sequences; each rank gets the same number of windows (the remainder is dropped).
    pub fn validation(&self, source: &str, rows: usize) -> Result<ValidationBatches> {
        let shards = self.validation_shards.get(source).with_context(|| {
            format!(
                "source {source:?} has no validation set (sources with one: {})",
                self.validation_sources().join(", ")
            )
        })?;
        let index = self
            .summaries
            .iter()
            .position(|s| s.name == source)
            .expect("validation sources are sources");
        ValidationBatches::new(
            source,
            index as u16,
            shards.clone(),
            self.config.seq_len,
            rows,
            (self.rank, self.world),
            self.tokenizer.vocab_size,
        )
    }
}

impl Drop for MixtureLoader {
    fn drop(&mut self) {
        // Closing the channel makes the producer's next send fail, which ends the thread.
        self.receiver = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

fn prefetch(producer: &mut Producer, sender: SyncSender<Result<(Batch, LoaderState)>>) {
    loop {
        let item = producer.next();
        let failed = item.is_err();
        if sender.send(item).is_err() || failed {
            return;
        }
    }
}

fn restore(
    saved: LoaderState,
    fingerprint: &str,
    names: &[String],
    allow_mismatch: bool,
) -> Result<LoaderState> {
    if saved.version != STATE_VERSION {
        bail!(
            "loader state version {} is not supported (this build writes version {STATE_VERSION})",
            saved.version
        );
    }
    if saved.fingerprint == fingerprint {
        if names.iter().any(|n| !saved.sources.contains_key(n)) {
            bail!(
                "the loader state does not list every source of the config although the fingerprints match; the state is corrupt"
            );
        }
        return Ok(saved);
    }
    if !allow_mismatch {
        return Err(DataError::FingerprintMismatch {
            saved: saved.fingerprint,
            current: fingerprint.to_owned(),
        }
        .into());
    }
    // New data: each known source continues from its stream position; the mixture starts afresh.
    Ok(LoaderState {
        version: STATE_VERSION,
        fingerprint: fingerprint.to_owned(),
        step: saved.step,
        sources: names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    SourceCursor {
                        windows: saved.sources.get(n).map_or(0, |c| c.windows),
                        mix_rows: 0,
                    },
                )
            })
            .collect(),
    })
}

/// blake3 over everything that decides the token stream: sources, weights, shards (file, size,
/// hash, manifest fingerprint), seq_len, seed and shuffle granularity. Paths are excluded so the
/// data may move.
fn fingerprint(config: &DataConfig, resolved: &[Vec<ResolvedShard>]) -> String {
    // Normalised, so weights 1:1 and 2:2 (the same mixture) give the same fingerprint.
    let sources: Vec<serde_json::Value> = config
        .sources
        .keys()
        .zip(config.normalised_weights())
        .zip(resolved)
        .map(|((name, weight), shards)| {
            let shards: Vec<serde_json::Value> = shards
                .iter()
                .map(|s| {
                    serde_json::json!([
                        s.manifest_fingerprint,
                        s.info.file,
                        s.info.bytes,
                        s.info.blake3
                    ])
                })
                .collect();
            serde_json::json!({"name": name, "weight": weight, "shards": shards})
        })
        .collect();
    let value = serde_json::json!({
        "version": STATE_VERSION,
        "seq_len": config.seq_len,
        "seed": config.seed,
        "shuffle_blocks": config.shuffle_blocks,
        "sources": sources,
    });
    let hash = blake3::hash(value.to_string().as_bytes());
    hash.to_hex()[..32].to_string()
}
