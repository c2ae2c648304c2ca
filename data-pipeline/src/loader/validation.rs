//! Evaluation batches over a held-out set: sequential windows in file order, no shuffling.

use super::config::ResolvedShard;
use super::stream::SourceStream;
use super::{Batch, RowsBuilder};
use anyhow::{Result, bail};
use std::collections::BTreeMap;

pub struct ValidationBatches {
    name: String,
    source_index: u16,
    stream: SourceStream,
    seq_len: usize,
    rows: usize,
    rank: u64,
    world: u64,
    /// Windows this rank reads: global windows `rank + world·k` for k < per_rank.
    per_rank: u64,
    next: u64,
    batch_index: u64,
}

impl ValidationBatches {
    pub(crate) fn new(
        name: &str,
        source_index: u16,
        shards: Vec<ResolvedShard>,
        seq_len: usize,
        rows: usize,
        (rank, world): (usize, usize),
        vocab_limit: u32,
    ) -> Result<Self> {
        if rows == 0 {
            bail!("validation batches need at least one row");
        }
        let stream = SourceStream::new(name, shards, 0, false, 1, vocab_limit);
        let total_windows = stream.total_tokens().saturating_sub(1) / seq_len as u64;
        Ok(Self {
            name: name.to_owned(),
            source_index,
            stream,
            seq_len,
            rows,
            rank: rank as u64,
            world: world as u64,
            per_rank: total_windows / world as u64,
            next: 0,
            batch_index: 0,
        })
    }

    /// Windows of `seq_len` targets this rank will see in the pass.
    pub fn windows(&self) -> u64 {
        self.per_rank
    }

    /// Stops the pass after this rank's first `windows` windows. With `windows` =
    /// ⌈(n − rank) / world⌉ the ranks together read exactly the first `n` windows of the set,
    /// whatever the world size.
    pub fn limit_windows(mut self, windows: u64) -> Self {
        self.per_rank = self.per_rank.min(windows);
        self
    }

    fn read_batch(&mut self) -> Result<Batch> {
        let rows = (self.per_rank - self.next).min(self.rows as u64) as usize;
        let l = self.seq_len;
        let mut builder = RowsBuilder::new(rows, l, self.stream.masked());
        let row_windows: Vec<u64> = (0..rows as u64)
            .map(|r| self.rank + self.world * (self.next + r))
            .collect();
        for (r, &window) in row_windows.iter().enumerate() {
            builder.read(r, &mut self.stream, window)?;
        }
        let (inputs, targets, loss_mask) = builder.finish();
        self.next += rows as u64;
        let batch = Batch {
            step: self.batch_index,
            rows,
            seq_len: l,
            inputs,
            targets,
            loss_mask,
            row_sources: vec![self.source_index; rows],
            row_windows,
            source_tokens: BTreeMap::from([(self.name.clone(), (rows * l) as u64)]),
        };
        self.batch_index += 1;
        Ok(batch)
    }
}

impl Iterator for ValidationBatches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.per_rank {
            return None;
        }
        let batch = self.read_batch();
        if batch.is_err() {
            self.next = self.per_rank;
        }
        Some(batch)
    }
}
