//! What a point's run directory says about its run. Everything the sweep learns from a run
//! directory is read here.

use crate::metrics::{RunMetrics, is_done, metrics_path, read_metrics};
use crate::run_lock::{Holder, live_holder};
use std::path::Path;

/// The state of one run, as its directory shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOutcome {
    /// The trainer finished all the run's steps (it wrote `DONE`).
    pub done: bool,
    /// A trainer is running in the directory right now (it holds the run's lock).
    pub locked: Option<Holder>,
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
        done: is_done(run_dir),
        locked: live_holder(run_dir),
        metrics,
    }
}
