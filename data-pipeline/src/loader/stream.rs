//! One source as an endless token stream: epoch after epoch of its documents, each epoch in a fresh
//! seeded order, concatenated (every document ends with EOS). Any stream offset maps to data
//! through the manifests alone, so a position is just a number.
//!
//! Shuffling is hierarchical to keep memory bounded: the row groups of all shards are permuted per
//! epoch, cut into groups of `shuffle_blocks` row groups, and the documents inside a group are
//! permuted again. Only the groups being read are held in memory.

use super::config::ResolvedShard;
use crate::rng::{name_id, permutation, rng_for};
use crate::shard::ShardReader;
use anyhow::{Result, bail};
use std::collections::VecDeque;

const LAYOUT_STREAM: u64 = 0x4c41_594f;
const DOCS_STREAM: u64 = 0x444f_4353;
/// Groups kept decoded: a window may straddle two groups.
const GROUP_CACHE: usize = 2;

struct Block {
    shard: usize,
    row_group: usize,
    tokens: u64,
}

struct EpochLayout {
    epoch: u64,
    /// Block ids in this epoch's order.
    order: Vec<u32>,
    /// Stream offset (within the epoch) where each group starts; one extra entry for the end.
    group_starts: Vec<u64>,
}

struct LoadedGroup {
    epoch: u64,
    group: usize,
    tokens: Vec<u32>,
    /// One loss-mask value per token; empty when the stream has no masks.
    mask: Vec<bool>,
}

pub struct SourceStream {
    pub name: String,
    name_id: u64,
    seed: u64,
    shuffle: bool,
    group_blocks: usize,
    vocab_limit: u32,
    /// Whether any shard carries a loss mask (then every read yields one).
    masked: bool,
    shards: Vec<ResolvedShard>,
    readers: Vec<Option<ShardReader>>,
    blocks: Vec<Block>,
    total_tokens: u64,
    layouts: VecDeque<EpochLayout>,
    groups: VecDeque<LoadedGroup>,
    scratch_lens: Vec<u32>,
}

impl SourceStream {
    /// `shuffle = false` gives the shards' file order (used for validation).
    pub fn new(
        name: &str,
        shards: Vec<ResolvedShard>,
        seed: u64,
        shuffle: bool,
        group_blocks: usize,
        vocab_limit: u32,
    ) -> Self {
        let mut blocks = Vec::new();
        for (shard, s) in shards.iter().enumerate() {
            for (row_group, rg) in s.info.row_groups.iter().enumerate() {
                if rg.tokens > 0 {
                    blocks.push(Block {
                        shard,
                        row_group,
                        tokens: rg.tokens,
                    });
                }
            }
        }
        let total_tokens = blocks.iter().map(|b| b.tokens).sum();
        let masked = shards.iter().any(|s| s.has_loss_mask);
        Self {
            masked,
            name: name.to_owned(),
            name_id: name_id(name),
            seed,
            shuffle,
            group_blocks: if shuffle { group_blocks.max(1) } else { 1 },
            vocab_limit,
            readers: shards.iter().map(|_| None).collect(),
            shards,
            blocks,
            total_tokens,
            layouts: VecDeque::new(),
            groups: VecDeque::new(),
            scratch_lens: Vec::new(),
        }
    }

    pub fn total_tokens(&self) -> u64 {
        self.total_tokens
    }

    /// Whether reads yield a loss mask (some shard of the source has one).
    pub fn masked(&self) -> bool {
        self.masked
    }

    /// Fills `out` with the stream's tokens starting at `offset` (wrapping into later epochs),
    /// and `mask` (same length) with their loss mask when the stream is [`masked`](Self::masked).
    pub fn read(
        &mut self,
        offset: u64,
        out: &mut [u32],
        mut mask: Option<&mut [bool]>,
    ) -> Result<()> {
        let mut pos = offset;
        let mut filled = 0;
        while filled < out.len() {
            let epoch = pos / self.total_tokens;
            let within = pos % self.total_tokens;
            let layout = self.layout(epoch);
            let group = self.layouts[layout]
                .group_starts
                .partition_point(|&start| start <= within)
                - 1;
            let group_start = self.layouts[layout].group_starts[group];
            let loaded = self.group(layout, group)?;
            let tokens = &self.groups[loaded].tokens;
            let from = (within - group_start) as usize;
            let n = (out.len() - filled).min(tokens.len() - from);
            out[filled..filled + n].copy_from_slice(&tokens[from..from + n]);
            if let Some(mask) = mask.as_deref_mut() {
                let group_mask = &self.groups[loaded].mask;
                assert!(self.masked, "a mask was asked of a stream without masks");
                mask[filled..filled + n].copy_from_slice(&group_mask[from..from + n]);
            }
            filled += n;
            pos += n as u64;
        }
        Ok(())
    }

    fn layout(&mut self, epoch: u64) -> usize {
        if let Some(i) = self.layouts.iter().position(|l| l.epoch == epoch) {
            return i;
        }
        let order: Vec<u32> = if self.shuffle {
            permutation(
                &mut rng_for(self.seed, &[self.name_id, LAYOUT_STREAM, epoch]),
                self.blocks.len(),
            )
        } else {
            (0..self.blocks.len() as u32).collect()
        };
        let mut group_starts = vec![0u64];
        for chunk in order.chunks(self.group_blocks) {
            let tokens: u64 = chunk.iter().map(|&b| self.blocks[b as usize].tokens).sum();
            group_starts.push(group_starts.last().expect("non-empty") + tokens);
        }
        if self.layouts.len() == 2 {
            self.layouts.pop_back();
        }
        self.layouts.push_front(EpochLayout {
            epoch,
            order,
            group_starts,
        });
        0
    }

    fn group(&mut self, layout: usize, group: usize) -> Result<usize> {
        let epoch = self.layouts[layout].epoch;
        if let Some(i) = self
            .groups
            .iter()
            .position(|g| g.epoch == epoch && g.group == group)
        {
            return Ok(i);
        }
        let block_ids: Vec<u32> = self.layouts[layout]
            .order
            .chunks(self.group_blocks)
            .nth(group)
            .expect("group in range")
            .to_vec();
        let mut tokens = Vec::new();
        let mut mask = Vec::new();
        let mut lens = std::mem::take(&mut self.scratch_lens);
        lens.clear();
        for &b in &block_ids {
            let block = &self.blocks[b as usize];
            let (shard, row_group, expected) = (block.shard, block.row_group, block.tokens);
            if self.readers[shard].is_none() {
                self.readers[shard] = Some(ShardReader::open(&self.shards[shard].path)?);
            }
            let reader = self.readers[shard].as_ref().expect("opened above");
            let before = tokens.len();
            let group_mask = self.masked.then_some(&mut mask);
            reader.read_row_group(
                row_group,
                self.vocab_limit,
                &mut tokens,
                &mut lens,
                group_mask,
            )?;
            let got = (tokens.len() - before) as u64;
            if got != expected {
                bail!(
                    "source {:?}: {} row group {row_group} has {got} tokens but its manifest says {expected}; the shard changed after tokenization",
                    self.name,
                    reader.path().display()
                );
            }
        }
        let (tokens, mask) = if self.shuffle {
            let order = self.document_order(lens.len(), epoch, group);
            (
                permute_documents(&tokens, &lens, &order),
                permute_documents(&mask, &lens, &order),
            )
        } else {
            (tokens, mask)
        };
        self.scratch_lens = lens;
        if self.groups.len() == GROUP_CACHE {
            self.groups.pop_back();
        }
        self.groups.push_front(LoadedGroup {
            epoch,
            group,
            tokens,
            mask,
        });
        Ok(0)
    }

    fn document_order(&self, docs: usize, epoch: u64, group: usize) -> Vec<u32> {
        permutation(
            &mut rng_for(self.seed, &[self.name_id, DOCS_STREAM, epoch, group as u64]),
            docs,
        )
    }
}

/// The documents of `values` (lengths `lens`, concatenated) in `order`; an empty `values` (no
/// mask) stays empty.
fn permute_documents<T: Copy>(values: &[T], lens: &[u32], order: &[u32]) -> Vec<T> {
    if values.is_empty() {
        return Vec::new();
    }
    let mut starts = Vec::with_capacity(lens.len());
    let mut at = 0usize;
    for &len in lens {
        starts.push(at);
        at += len as usize;
    }
    let mut out = Vec::with_capacity(values.len());
    for &d in order {
        let (start, len) = (starts[d as usize], lens[d as usize] as usize);
        out.extend_from_slice(&values[start..start + len]);
    }
    out
}
