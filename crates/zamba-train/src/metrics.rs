//! `<run.dir>/metrics.jsonl` and the run's `DONE` marker: the records the trainer writes, the
//! writer, and the reader that plots and sweeps use.
//!
//! One JSON object per line, appended by rank 0. Two kinds of lines:
//!
//! - **step line** ([`StepRecord`]), every `logging.every` optimizer steps, at the last step, and
//!   at every skipped step:
//!   `{"step": 41, "tokens": 172032, "loss": 3.214, "lr": 0.0003, "grad_norm": 0.83, "tokens_per_sec": 5120.4, …}`
//!   - `step`: 0-based index of the optimizer step just taken (the schedule's step: `lr` is `schedule.lr(step)`);
//!   - `tokens`: training tokens consumed by the run (all ranks) up to and including this step;
//!   - `loss`: mean training loss of the step's global batch; `grad_norm`: global gradient norm
//!     before clipping; either is `null` when non-finite (the update was skipped);
//!   - `tokens_per_sec`: global throughput of the step; `gflops`, `mfu` (against one device's
//!     peak, per rank), `skipped`, `world_size`.
//! - **eval line** ([`EvalRecord`]), one per evaluation:
//!   `{"eval": true, "step": 99, "tokens": 409600, "loss": {"web": 3.10, "instruct": 2.25}}`
//!   - `step` / `tokens`: as the step line of the last optimizer step before the evaluation;
//!   - `loss`: held-out mean loss per data source (`null` if non-finite).
//! - **checkpoint line** ([`CheckpointRecord`]), one per checkpoint, once it is sealed:
//!   `{"checkpoint": true, "step": 99, "async": true, "stall_s": 0.41, "wait_s": 0.0, "write_s": 12.3}`
//!   - `step`: as the step line of the last optimizer step the checkpoint holds;
//!   - `async`: whether it was written in the background (`checkpoint.async`);
//!   - `stall_s`: seconds the step loop spent on it — the whole write when not in the
//!     background; else copying the state to host memory, agreeing at step boundaries, and any
//!     wait for the writer (before the next checkpoint or at the end of the run);
//!   - `wait_s`: the part of `stall_s` spent waiting for the write to end (all of it when not
//!     in the background; else zero when the write ended while training went on);
//!   - `write_s`: seconds from its start to its seal.
//!
//! A line whose `step` is not above the previous line's means the run resumed from an earlier
//! checkpoint: the later lines replace the earlier ones from that step on. The writer also drops
//! such lines when it reopens the file for a resumed run, so the file reads as one run.
//!
//! With `logging.tensorboard`, the writer sends every record to the run's TensorBoard event file
//! too ([`crate::tensorboard`]): the step line's numbers as `train/<field>` scalars, an eval
//! line's as `eval/<source>/loss` and `eval/<source>/perplexity`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};

use crate::tensorboard::EventWriter;

/// File name of the metrics log inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Written into `run.dir` when the run has completed all its steps (sweeps skip such runs).
pub const DONE_FILE: &str = "DONE";

/// One training step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub tokens: u64,
    /// Required, `null` when non-finite.
    #[serde(deserialize_with = "Option::deserialize")]
    pub loss: Option<f64>,
    pub lr: f64,
    #[serde(default)]
    pub grad_norm: Option<f64>,
    #[serde(default)]
    pub tokens_per_sec: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    #[serde(default)]
    pub skipped: bool,
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

/// One evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub tokens: u64,
    /// Source name → held-out loss (`null` when non-finite).
    pub loss: BTreeMap<String, Option<f64>>,
}

/// The step-time cost of one checkpoint (see the module documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    #[serde(rename = "async")]
    pub asynchronous: bool,
    pub stall_s: f64,
    #[serde(default)]
    pub wait_s: f64,
    pub write_s: f64,
}

/// The line format of a checkpoint record: the record with `"checkpoint": true` first.
#[derive(Serialize)]
struct CheckpointLine<'a> {
    checkpoint: bool,
    #[serde(flatten)]
    record: &'a CheckpointRecord,
}

/// The line format of an eval record: the record with `"eval": true` first.
#[derive(Serialize)]
struct EvalLine<'a> {
    eval: bool,
    #[serde(flatten)]
    record: &'a EvalRecord,
}

/// The parsed metrics of one run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunMetrics {
    pub steps: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
    pub checkpoints: Vec<CheckpointRecord>,
}

impl RunMetrics {
    /// Loss of the last step line with a finite loss.
    pub fn final_train_loss(&self) -> Option<f64> {
        self.steps.iter().rev().find_map(|s| s.loss)
    }

    /// Lowest held-out loss per source over all evaluations.
    pub fn best_eval_loss(&self) -> BTreeMap<String, f64> {
        let mut best = BTreeMap::new();
        for e in &self.evals {
            for (source, loss) in &e.loss {
                let Some(loss) = *loss else { continue };
                best.entry(source.clone())
                    .and_modify(|b: &mut f64| *b = b.min(loss))
                    .or_insert(loss);
            }
        }
        best
    }

    /// Tokens of the last step line.
    pub fn tokens(&self) -> Option<u64> {
        self.steps.last().map(|s| s.tokens)
    }

    pub fn last_step(&self) -> Option<u64> {
        self.steps.last().map(|s| s.step)
    }
}

/// The metrics file of a run directory (or the path itself if it is a file).
pub fn metrics_path(run: &Path) -> PathBuf {
    if run.is_file() {
        run.to_path_buf()
    } else {
        run.join(METRICS_FILE)
    }
}

/// Reads a metrics.jsonl. Errors name the file and the line; an unterminated last line (the
/// trainer may be writing it right now) is ignored.
pub fn read_metrics(path: &Path) -> Result<RunMetrics> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read metrics file {}", path.display()))?;
    parse_metrics(&text).map_err(|(line, msg)| anyhow!("{}:{line}: {msg}", path.display()))
}

/// Parses metrics.jsonl text; an error is (1-based line number, message).
pub fn parse_metrics(text: &str) -> Result<RunMetrics, (usize, String)> {
    let mut metrics = RunMetrics::default();
    let lines: Vec<&str> = text.split('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let number = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            // The last line without a newline may be half-written; anything else is corrupt.
            Err(_) if i + 1 == lines.len() => break,
            Err(e) => return Err((number, format!("not a JSON object: {e}"))),
        };
        match parse_line(value).map_err(|msg| (number, msg))? {
            Line::Step(record) => {
                metrics.steps.retain(|s| s.step < record.step);
                metrics.steps.push(record);
            }
            Line::Eval(record) => {
                metrics.evals.retain(|e| e.step < record.step);
                metrics.evals.push(record);
            }
            Line::Checkpoint(record) => {
                metrics.checkpoints.retain(|c| c.step < record.step);
                metrics.checkpoints.push(record);
            }
        }
    }
    Ok(metrics)
}

enum Line {
    Step(StepRecord),
    Eval(EvalRecord),
    Checkpoint(CheckpointRecord),
}

fn parse_line(mut value: serde_json::Value) -> Result<Line, String> {
    let obj = value.as_object_mut().ok_or("not a JSON object")?;
    match obj.remove("checkpoint") {
        None | Some(serde_json::Value::Bool(false)) => {}
        Some(serde_json::Value::Bool(true)) => {
            return serde_json::from_value(value).map(Line::Checkpoint).map_err(|e| {
                format!(
                    "checkpoint line: {e}; expected {{\"checkpoint\": true, \"step\": N, \"async\": bool, \"stall_s\": number, \"write_s\": number}}"
                )
            });
        }
        Some(other) => return Err(format!("`checkpoint` must be true or false, not {other}")),
    }
    match obj.remove("eval") {
        None | Some(serde_json::Value::Bool(false)) => serde_json::from_value(value)
            .map(Line::Step)
            .map_err(|e| {
                format!("step line: {e}; expected {{\"step\": N, \"tokens\": N, \"loss\": number or null, \"lr\": number, …}}")
            }),
        Some(serde_json::Value::Bool(true)) => serde_json::from_value(value)
            .map(Line::Eval)
            .map_err(|e| {
                format!(
                    "eval line: {e}; expected {{\"eval\": true, \"step\": N, \"tokens\": N, \"loss\": an object of source → loss}}"
                )
            }),
        Some(other) => Err(format!("`eval` must be true or false, not {other}")),
    }
}

/// Appends records to a run's metrics.jsonl, one line each (and to its TensorBoard event file,
/// see [`Self::with_tensorboard`]).
pub struct MetricsWriter {
    file: std::fs::File,
    path: PathBuf,
    every: u64,
    tensorboard: Option<EventWriter>,
}

impl MetricsWriter {
    /// Opens `run_dir`'s metrics file for a run that starts at optimizer step `resume_step`:
    /// lines of steps at or after it (written after the checkpoint by an interrupted run) are
    /// dropped first. Step lines are then written every `every` steps (see [`Self::step`]).
    pub fn open(run_dir: &Path, resume_step: u64, every: usize) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        let file = open_from_step(&path, resume_step)?;
        Ok(Self {
            file,
            path,
            every: every.max(1) as u64,
            tensorboard: None,
        })
    }

    /// Also writes every record to a new TensorBoard event file in `run_dir` for the session
    /// that starts at `start_step`, which begins with `config` (the resolved run config, TOML) as
    /// the text `config` at that step.
    pub fn with_tensorboard(
        mut self,
        run_dir: &Path,
        start_step: u64,
        config: &str,
    ) -> Result<Self> {
        let mut events = EventWriter::create(run_dir, start_step)?;
        // Indented: a Markdown code block, so that the Text dashboard keeps the TOML's lines.
        let block: String = config.lines().map(|line| format!("    {line}\n")).collect();
        events.text(start_step, "config", &block)?;
        self.tensorboard = Some(events);
        Ok(self)
    }

    /// Writes the record of a step if it is due: every `logging.every`-th step, the run's last
    /// step (`last`), and every skipped step.
    pub fn step(&mut self, record: &StepRecord, last: bool) -> Result<()> {
        if !((record.step + 1).is_multiple_of(self.every) || last || record.skipped) {
            return Ok(());
        }
        self.write(&serde_json::to_string(record)?)?;
        match &mut self.tensorboard {
            Some(events) => events.scalars(record.step, &step_scalars(record)),
            None => Ok(()),
        }
    }

    pub fn eval(&mut self, record: &EvalRecord) -> Result<()> {
        let line = serde_json::to_string(&EvalLine { eval: true, record })?;
        self.write(&line)?;
        match &mut self.tensorboard {
            Some(events) => events.scalars(record.step, &eval_scalars(record)),
            None => Ok(()),
        }
    }

    pub fn checkpoint(&mut self, record: &CheckpointRecord) -> Result<()> {
        let line = serde_json::to_string(&CheckpointLine {
            checkpoint: true,
            record,
        })?;
        self.write(&line)?;
        match &mut self.tensorboard {
            Some(events) => events.scalars(
                record.step,
                &[
                    ("checkpoint/stall_s".to_string(), record.stall_s),
                    ("checkpoint/wait_s".to_string(), record.wait_s),
                    ("checkpoint/write_s".to_string(), record.write_s),
                ],
            ),
            None => Ok(()),
        }
    }

    fn write(&mut self, line: &str) -> Result<()> {
        writeln!(self.file, "{line}").with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Opens the JSON-lines file `path` for appending by a run that starts at optimizer step
/// `resume_step`, after dropping its lines of steps at or after it (written after the checkpoint
/// by an interrupted run).
pub(crate) fn open_from_step(path: &Path, resume_step: u64) -> Result<std::fs::File> {
    if path.exists() {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s < resume_step)
            })
            .collect();
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        std::fs::write(path, body).with_context(|| format!("rewriting {}", path.display()))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// The numbers of a step line as TensorBoard scalars, `train/<field>` (absent values left out).
fn step_scalars(record: &StepRecord) -> Vec<(String, f64)> {
    let StepRecord {
        step: _,
        tokens,
        loss,
        lr,
        grad_norm,
        tokens_per_sec,
        gflops,
        mfu,
        skipped,
        world_size,
    } = record;
    let fields = [
        ("tokens", Some(*tokens as f64)),
        ("loss", *loss),
        ("lr", Some(*lr)),
        ("grad_norm", *grad_norm),
        ("tokens_per_sec", *tokens_per_sec),
        ("gflops", *gflops),
        ("mfu", *mfu),
        ("skipped", Some(f64::from(u8::from(*skipped)))),
        ("world_size", Some(*world_size as f64)),
    ];
    fields
        .into_iter()
        .filter_map(|(name, value)| Some((format!("train/{name}"), value?)))
        .collect()
}

/// An eval line as TensorBoard scalars: `eval/<source>/loss` and `eval/<source>/perplexity`.
fn eval_scalars(record: &EvalRecord) -> Vec<(String, f64)> {
    record
        .loss
        .iter()
        .filter_map(|(source, loss)| Some((source, (*loss)?)))
        .flat_map(|(source, loss)| {
            [
                (format!("eval/{source}/loss"), loss),
                (format!("eval/{source}/perplexity"), loss.exp()),
            ]
        })
        .collect()
}

/// Marks `run_dir` as finished after `steps` steps.
pub fn mark_done(run_dir: &Path, steps: u64) -> Result<()> {
    let path = run_dir.join(DONE_FILE);
    std::fs::write(&path, format!("{steps}\n"))
        .with_context(|| format!("writing {}", path.display()))
}

/// Whether the run in `run_dir` has completed all its steps.
pub fn is_done(run_dir: &Path) -> bool {
    run_dir.join(DONE_FILE).exists()
}
