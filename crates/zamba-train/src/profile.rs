//! `train.profile_steps = [first, last]`: the spans of those training steps (`zamba_trace`),
//! written per rank as Chrome-trace JSON, with their time split by op class.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::tensor::Device;
use zamba_trace::{Capture, Trace};

/// The folder of a run directory that traces go to.
pub const TRACES_DIR: &str = "traces";

/// Traces the configured steps of one rank.
pub struct StepProfiler {
    steps: Option<RangeInclusive<u64>>,
    rank: usize,
    /// The capture in progress and the step it started at.
    capture: Option<(u64, Capture)>,
}

impl StepProfiler {
    /// For a run (session) that starts at optimizer step `start`; says so on rank 0 when the
    /// steps to trace are already behind it.
    pub fn new(profile_steps: Option<[usize; 2]>, rank: usize, start: u64) -> Self {
        let steps = profile_steps.map(|[first, last]| first as u64..=last as u64);
        if let Some(steps) = &steps
            && start > *steps.end()
            && rank == 0
        {
            eprintln!(
                "train.profile_steps = [{}, {}]: the run resumes at step {start}, after them; nothing is traced",
                steps.start(),
                steps.end()
            );
        }
        Self {
            steps,
            rank,
            capture: None,
        }
    }

    /// Starts recording if `step` is one to trace (the first, or the first of a run resumed
    /// inside the range). While recording, `device` is synchronised at every span boundary.
    pub fn before_step(&mut self, step: u64, device: &Device) {
        let traced = self.steps.as_ref().is_some_and(|s| s.contains(&step));
        if traced && self.capture.is_none() {
            let track = format!("rank {} on {}", self.rank, device_name(device));
            let device = device.clone();
            // A failing device shows at the step's own next operation, with its error there.
            let sync = move || {
                let _ = device.sync();
            };
            self.capture = Some((step, Capture::start(track).with_sync(sync)));
        }
    }

    /// After `step` (checkpoint included): at the last step to trace, or when the run stops
    /// early (`stopping`), writes the trace to `run_dir/traces/` and returns its path and the
    /// trace.
    pub fn after_step(
        &mut self,
        step: u64,
        stopping: bool,
        run_dir: &Path,
    ) -> Result<Option<(PathBuf, Trace)>> {
        let last = self.steps.as_ref().map_or(0, |s| *s.end());
        if self.capture.is_none() || !(step >= last || stopping) {
            return Ok(None);
        }
        let (first, capture) = self.capture.take().expect("a capture in progress");
        let trace = capture.finish();
        let dir = run_dir.join(TRACES_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("steps-{first}-{step}.rank-{}.json", self.rank));
        trace
            .write_chrome(&path, self.rank as u32, &format!("rank {}", self.rank))
            .with_context(|| format!("writing the trace {}", path.display()))?;
        Ok(Some((path, trace)))
    }
}

/// The device as the trace's track names it, e.g. `Cuda(0)`.
fn device_name(device: &Device) -> String {
    format!("{:?}", device.clone().inner().as_dispatch())
}

/// What rank 0 prints after tracing: where the trace is and the mean time split of a step.
pub fn describe(path: &Path, trace: &Trace) -> String {
    let steps = trace.step_summaries();
    format!(
        "trace of {} step(s) written to {} (open it in ui.perfetto.dev or chrome://tracing); time by op class over those steps:\n{}",
        steps.len(),
        path.display(),
        trace.summary().table()
    )
}
