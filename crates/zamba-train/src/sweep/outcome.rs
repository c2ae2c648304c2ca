//! What a point's run directory says about its run. Everything the sweep learns from a run
//! directory is read here.

use crate::plot::{RunMetrics, metrics_path, read_metrics};
use crate::train::DONE_FILE;
use std::path::Path;

/// The state of one run, as its directory shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOutcome {
    /// The trainer finished all the run's steps (it wrote `DONE`).
    pub done: bool,
    /// The run's metrics.jsonl (empty when there is none yet), or why it could not be read.
    pub metrics: Result<RunMetrics, String>,
}

/// Reads the outcome of the run in `run_dir` (which need not exist yet).
pub fn read_outcome(run_dir: &Path) -> RunOutcome {
    let path = metrics_path(run_dir);
    let metrics = if path.exists() {
        read_metrics(&path).map_err(|e| format!("{e:#}"))
    } else {
        Ok(RunMetrics::default())
    };
    RunOutcome {
        done: run_dir.join(DONE_FILE).exists(),
        metrics,
    }
}
