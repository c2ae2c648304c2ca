//! Running the points: each in a child process of the trainer, `--jobs` at a time.

use super::outcome::{RunOutcome, read_outcome};
use super::plan::{SweepPlan, SweepPoint};
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use std::path::PathBuf;
use std::time::Instant;

/// Runs one point to completion (the trainer writes `<run.dir>/DONE` at the end).
pub trait RunExecutor: Sync {
    fn execute(&self, point: &SweepPoint) -> Result<()>;
}

/// Trains a point in a child process: `EXE [ARGS…] --config <resolved.toml>`, so runs are
/// isolated (memory, threads, crashes) and several can run at once.
#[derive(Clone, Debug)]
pub struct ProcessExecutor {
    pub exe: PathBuf,
    /// Arguments before `--config` (e.g. a subcommand).
    pub args: Vec<String>,
    /// Send each run's output to `<log_dir>/<name>.log` instead of this terminal.
    pub log_dir: Option<PathBuf>,
}

impl ProcessExecutor {
    /// This executable, with output to the terminal.
    pub fn current() -> Result<Self> {
        Ok(Self {
            exe: std::env::current_exe().context("finding the zamba-train executable")?,
            args: Vec::new(),
            log_dir: None,
        })
    }
}

impl RunExecutor for ProcessExecutor {
    fn execute(&self, point: &SweepPoint) -> Result<()> {
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.args(&self.args).arg("--config").arg(&point.config_path);
        let log = match &self.log_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let path = dir.join(format!("{}.log", point.name));
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                cmd.stdout(file.try_clone()?).stderr(file);
                Some(path)
            }
            None => None,
        };
        let status = cmd
            .status()
            .with_context(|| format!("starting {}", self.exe.display()))?;
        if !status.success() {
            let see = log
                .map(|p| format!("; see {}", p.display()))
                .unwrap_or_default();
            bail!("the run exited with {status}{see}");
        }
        Ok(())
    }
}

/// What happened to a point.
#[derive(Clone, Debug, PartialEq)]
pub enum PointStatus {
    /// Finished in an earlier invocation; not run again.
    AlreadyDone,
    /// Another trainer is running it right now (it holds the run directory's lock); not started twice.
    RunningElsewhere(String),
    /// Ran now and finished.
    Done,
    /// Ran now, exited cleanly, but left no DONE marker (e.g. stopped by a signal).
    Incomplete,
    Failed(String),
    /// Not run (`--emit`).
    NotRun,
}

impl PointStatus {
    pub fn label(&self) -> String {
        match self {
            PointStatus::AlreadyDone => "done (skipped)".into(),
            PointStatus::RunningElsewhere(who) => format!("running elsewhere ({who}), skipped"),
            PointStatus::Done => "done".into(),
            PointStatus::Incomplete => "incomplete".into(),
            PointStatus::Failed(e) => format!("failed: {e}"),
            PointStatus::NotRun => "not run".into(),
        }
    }
}

/// Runs the unfinished points, `jobs` at a time, and returns each point's status and outcome
/// (in plan order).
pub fn execute(
    plan: &SweepPlan,
    executor: &dyn RunExecutor,
    jobs: usize,
) -> Result<Vec<(PointStatus, RunOutcome)>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(jobs.clamp(1, plan.points.len().max(1)))
        .thread_name(|i| format!("sweep-job-{i}"))
        .build()
        .context("starting the sweep's job threads")?;
    // One point per task, so an idle thread can always take the next waiting point.
    Ok(pool.install(|| {
        plan.points
            .par_iter()
            .with_max_len(1)
            .map(|point| run_point(point, plan.points.len(), executor))
            .collect()
    }))
}

fn run_point(
    point: &SweepPoint,
    total: usize,
    executor: &dyn RunExecutor,
) -> (PointStatus, RunOutcome) {
    let label = format!("[{}/{total}] {}", point.index + 1, point.name);
    let before = read_outcome(&point.run_dir);
    if before.done {
        eprintln!("{label}: already done, skipped");
        return (PointStatus::AlreadyDone, before);
    }
    if let Some(holder) = &before.locked {
        eprintln!(
            "{label}: running elsewhere ({}), skipped",
            holder.describe()
        );
        return (PointStatus::RunningElsewhere(holder.describe()), before);
    }
    eprintln!("{label}: starting");
    let start = Instant::now();
    let result = executor.execute(point);
    let after = read_outcome(&point.run_dir);
    let status = match result {
        Ok(()) if after.done => PointStatus::Done,
        Ok(()) => PointStatus::Incomplete,
        Err(e) => PointStatus::Failed(format!("{e:#}")),
    };
    eprintln!(
        "{label}: {} after {:.1}s",
        status.label(),
        start.elapsed().as_secs_f64()
    );
    (status, after)
}
