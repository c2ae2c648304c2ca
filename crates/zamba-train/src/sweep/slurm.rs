//! `--emit`: a SLURM array script and a run-everything shell script for the planned points.

use super::naming::sanitize;
use super::plan::SweepPlan;
use crate::metrics::DONE_FILE;
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Single-quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Writes `OUT/sweep.sbatch` (a SLURM array job, one task per point, selected by
/// `SLURM_ARRAY_TASK_ID`) and `OUT/run_all.sh` (every point in turn); both skip finished points
/// and run `exe --config <point config>`.
pub fn emit_scripts(plan: &SweepPlan, exe: &Path) -> Result<(PathBuf, PathBuf)> {
    let n = plan.points.len();
    let exe = shell_quote(&exe.to_string_lossy());
    let logs = plan.out_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let job_name = plan
        .out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sweep".into());
    let mut s = String::new();
    let _ = writeln!(s, "#!/bin/bash");
    let _ = writeln!(s, "#SBATCH --job-name={}", sanitize(&job_name));
    let _ = writeln!(s, "#SBATCH --array=0-{}", n.saturating_sub(1));
    let _ = writeln!(s, "#SBATCH --output={}/%A_%a.out", logs.display());
    let _ = writeln!(
        s,
        "# Add your site's lines here (partition, --gres=gpu:N, --time, --cpus-per-task)."
    );
    let _ = writeln!(
        s,
        "# Sweep of {n} points written by `zamba-train sweep --emit`; submit with: sbatch {}",
        plan.out_dir.join("sweep.sbatch").display()
    );
    let _ = writeln!(s, "set -euo pipefail");
    let _ = writeln!(s, "EXE=${{ZAMBA_TRAIN:-{exe}}}");
    let _ = writeln!(
        s,
        "case \"${{SLURM_ARRAY_TASK_ID:?submit this script with sbatch}}\" in"
    );
    for p in &plan.points {
        let _ = writeln!(
            s,
            "  {}) CONFIG={}; RUN_DIR={} ;;",
            p.index,
            shell_quote(&p.config_path.to_string_lossy()),
            shell_quote(&p.run_dir.to_string_lossy())
        );
    }
    let _ = writeln!(
        s,
        "  *) echo \"no sweep point $SLURM_ARRAY_TASK_ID (0-{})\" >&2; exit 1 ;;",
        n.saturating_sub(1)
    );
    let _ = writeln!(s, "esac");
    let _ = writeln!(
        s,
        "if [ -e \"$RUN_DIR/{DONE_FILE}\" ]; then echo \"$RUN_DIR is done\"; exit 0; fi"
    );
    let _ = writeln!(s, "exec \"$EXE\" --config \"$CONFIG\"");
    let sbatch = plan.out_dir.join("sweep.sbatch");
    write_script(&sbatch, &s)?;

    let mut r = String::new();
    let _ = writeln!(r, "#!/bin/bash");
    let _ = writeln!(
        r,
        "# Runs the {n} points of this sweep one after another; finished points are skipped."
    );
    let _ = writeln!(r, "set -u");
    let _ = writeln!(r, "EXE=${{ZAMBA_TRAIN:-{exe}}}");
    let _ = writeln!(r, "failed=0");
    let _ = writeln!(r, "run() {{");
    let _ = writeln!(
        r,
        "  if [ -e \"$2/{DONE_FILE}\" ]; then echo \"skip $2 (done)\"; return; fi"
    );
    let _ = writeln!(
        r,
        "  \"$EXE\" --config \"$1\" || {{ echo \"FAILED: $1\" >&2; failed=1; }}"
    );
    let _ = writeln!(r, "}}");
    for p in &plan.points {
        let _ = writeln!(
            r,
            "run {} {}",
            shell_quote(&p.config_path.to_string_lossy()),
            shell_quote(&p.run_dir.to_string_lossy())
        );
    }
    let _ = writeln!(r, "exit $failed");
    let run_all = plan.out_dir.join("run_all.sh");
    write_script(&run_all, &r)?;
    Ok((sbatch, run_all))
}

fn write_script(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", path.display()))?;
    }
    Ok(())
}
