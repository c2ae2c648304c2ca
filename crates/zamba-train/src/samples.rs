//! `<run.dir>/samples.jsonl`, written with `logging.sample_ids = true`: which samples each
//! optimizer step trained on, for checking a run's data order — that a resumed or restarted run
//! (on any number of ranks) neither repeats nor skips a sample. A sample is a window of one
//! source's token stream, named by the source and the window's index in it; a step's samples are
//! in the order of its global batch's rows (rank 0's rows first):
//!
//! `{"step": 3, "samples": [["web", 24], ["web", 31], ["code", 7], …]}`
//!
//! Every rank sends its rows' ids to the others (one small all-gather per step; nothing when the
//! key is off) and rank 0 writes the line. As with metrics.jsonl, a resumed run first drops the
//! lines of steps at or after its start, so the file reads as one run.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use zamba_data::Batch;

use crate::metrics::open_from_step;
use crate::rank::RankContext;

pub const SAMPLES_FILE: &str = "samples.jsonl";

/// One line of samples.jsonl.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleRecord {
    pub step: u64,
    /// (source, window) of each row of the global batch.
    pub samples: Vec<(String, u64)>,
}

/// Rank 0's writer of samples.jsonl.
pub struct SampleLog {
    file: std::fs::File,
    path: PathBuf,
}

/// A row's id on the wire: its source's index (u16) and window (u64), little-endian.
const ROW_BYTES: usize = 2 + 8;

impl SampleLog {
    /// Opens `run_dir`'s samples.jsonl for a run that starts at optimizer step `resume_step`.
    pub fn open(run_dir: &Path, resume_step: u64) -> Result<Self> {
        let path = run_dir.join(SAMPLES_FILE);
        let file = open_from_step(&path, resume_step)?;
        Ok(Self { file, path })
    }

    pub fn write(&mut self, record: &SampleRecord) -> Result<()> {
        let line = serde_json::to_string(record)?;
        writeln!(self.file, "{line}").with_context(|| format!("writing {}", self.path.display()))
    }
}

/// The ids of every row of the global batch whose rows on this rank are `batch`, in row order
/// (every rank takes part); `sources`: the loader's source names.
pub fn gather(ctx: &RankContext, batch: &Batch, sources: &[String]) -> Result<Vec<(String, u64)>> {
    let mut bytes = Vec::with_capacity(batch.rows * ROW_BYTES);
    for (source, window) in batch.row_sources.iter().zip(&batch.row_windows) {
        bytes.extend_from_slice(&source.to_le_bytes());
        bytes.extend_from_slice(&window.to_le_bytes());
    }
    let mut ids = Vec::new();
    for rank in ctx.all_gather_bytes(&bytes)? {
        for row in rank.chunks_exact(ROW_BYTES) {
            let source = u16::from_le_bytes([row[0], row[1]]) as usize;
            let window = u64::from_le_bytes(row[2..].try_into().expect("8 bytes"));
            let Some(name) = sources.get(source) else {
                bail!(
                    "a rank sent a sample of source #{source}, but there are {} sources",
                    sources.len()
                );
            };
            ids.push((name.clone(), window));
        }
    }
    Ok(ids)
}

/// The records of a run's samples.jsonl, in file order.
pub fn read(run_dir: &Path) -> Result<Vec<SampleRecord>> {
    let path = run_dir.join(SAMPLES_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a samples record", path.display(), i + 1))
        })
        .collect()
}
