//! `zamba-train sweep --config base.toml --sweep sweep.toml [--emit] [--jobs N] [--out DIR]`.
//!
//! The sweep file lists values per config key:
//! ```toml
//! [grid]                       # cartesian product
//! "optimizer.weight_decay" = [0.0, 0.1]
//! "schedule.peak_lr" = [1e-3, 3e-3]
//! [zip]                        # lists of equal length, taken together (one more grid axis)
//! "train.steps" = [100, 200]
//! "checkpoint.every" = [50, 100]
//! ```
//! Keys may also be written as plain dotted TOML keys (`optimizer.weight_decay = [...]`).
//! Each point is the base config plus its overrides, with `run.dir = OUT/<name>` and
//! `run.name = <base name>/<name>`, where `<name>` is built from the overrides
//! (`peak_lr=0.001,weight_decay=0.1`). Its resolved config goes to `OUT/configs/<name>.toml`
//! (outside the run dir, which belongs to the trainer). A point whose `<run.dir>/DONE` exists is
//! finished and skipped on a re-run. `OUT/summary.md` and `OUT/summary.csv` list every point.
//!
//! Files: `args` (the command line), `spec` (the sweep file), `naming` (point names), `plan`
//! (points and their configs), `execute` (running points), `outcome` (what a run directory says
//! about its run), `summary` (the table), `slurm` (`--emit`'s scripts).

mod args;
mod execute;
mod naming;
mod outcome;
mod plan;
mod slurm;
mod spec;
mod summary;

pub use args::SweepArgs;
pub use execute::{PointStatus, ProcessExecutor, RunExecutor, execute};
pub use naming::point_names;
pub use outcome::{RunOutcome, read_outcome};
pub use plan::{SweepPlan, SweepPoint, plan, sweep_dir};
pub use slurm::emit_scripts;
pub use spec::SweepSpec;
pub use summary::{SummaryRow, summary_csv, summary_markdown, summary_rows, write_summary};

use anyhow::{Result, bail};
use std::path::Path;

/// What a sweep invocation did.
#[derive(Clone, Debug)]
pub struct SweepReport {
    pub plan: SweepPlan,
    pub statuses: Vec<PointStatus>,
    pub summary_markdown: String,
}

/// The sweep with a given executor (tests use a fake one); `--emit` runs nothing.
pub fn run_with(
    args: &SweepArgs,
    executor: &dyn RunExecutor,
    exe_for_scripts: &Path,
) -> Result<SweepReport> {
    if args.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    let plan = plan(args)?;
    let results = if args.emit {
        let (sbatch, run_all) = emit_scripts(&plan, exe_for_scripts)?;
        eprintln!(
            "wrote {} configs in {}, {} and {}",
            plan.points.len(),
            plan.out_dir.join("configs").display(),
            sbatch.display(),
            run_all.display()
        );
        plan.points
            .iter()
            .map(|p| {
                let outcome = read_outcome(&p.run_dir);
                let status = if outcome.done {
                    PointStatus::AlreadyDone
                } else {
                    PointStatus::NotRun
                };
                (status, outcome)
            })
            .collect()
    } else {
        execute(&plan, executor, args.jobs)?
    };
    let summary_markdown = write_summary(&plan, &results)?;
    Ok(SweepReport {
        plan,
        statuses: results.into_iter().map(|(status, _)| status).collect(),
        summary_markdown,
    })
}

/// The `sweep` subcommand: runs (or emits) the sweep with child processes of this executable.
pub fn run(args: SweepArgs) -> Result<()> {
    let mut executor = ProcessExecutor::current()?;
    // Parallel runs would interleave their output on the terminal; each gets a log file instead.
    if args.jobs > 1 {
        executor.log_dir = Some(sweep_dir(&args)?.join("logs"));
    }
    let exe = executor.exe.clone();
    let report = run_with(&args, &executor, &exe)?;
    println!("{}", report.summary_markdown);
    println!(
        "summary: {} and {}",
        report.plan.out_dir.join("summary.md").display(),
        report.plan.out_dir.join("summary.csv").display()
    );
    let failed: Vec<&str> = report
        .plan
        .points
        .iter()
        .zip(&report.statuses)
        .filter(|(_, s)| matches!(s, PointStatus::Failed(_) | PointStatus::Incomplete))
        .map(|(p, _)| p.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} points did not finish: {}",
            failed.len(),
            report.plan.points.len(),
            failed.join(", ")
        );
    }
    Ok(())
}
