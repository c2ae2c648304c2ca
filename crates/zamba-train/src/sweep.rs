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

use crate::config::{ConfigError, RunConfig, closest};
use crate::metrics::{DONE_FILE, RunMetrics, is_done, metrics_path, read_metrics};
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

#[derive(Args, Debug, Clone)]
pub struct SweepArgs {
    /// The base run config.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The sweep file ([grid] and/or [zip] tables of "section.key" = [values]).
    #[arg(long, value_name = "FILE")]
    pub sweep: PathBuf,
    /// Only write the configs, a SLURM array script and run_all.sh; run nothing.
    #[arg(long)]
    pub emit: bool,
    /// Points trained at the same time (each a separate process).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Sweep directory [default: the base config's run.dir].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Override applied to every point before its own values (section.key=value).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// The parsed sweep file: keys in sorted order, each with its values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SweepSpec {
    pub grid: Vec<(String, Vec<toml::Value>)>,
    pub zip: Vec<(String, Vec<toml::Value>)>,
}

impl SweepSpec {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read sweep file {}", path.display()))?;
        Self::from_toml_str(&text).with_context(|| format!("sweep file {}", path.display()))
    }

    pub fn from_toml_str(text: &str) -> Result<Self> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| anyhow!("not valid TOML: {e}"))?;
        let mut spec = SweepSpec::default();
        for (section, value) in table {
            let target = match section.as_str() {
                "grid" => &mut spec.grid,
                "zip" => &mut spec.zip,
                other => {
                    let hint = closest(other, ["grid", "zip"])
                        .map(|s| format!("; did you mean `{s}`?"))
                        .unwrap_or_default();
                    bail!(
                        "unknown section `{other}`: a sweep file has only [grid] and [zip]{hint}"
                    );
                }
            };
            let toml::Value::Table(t) = value else {
                bail!("`{section}` must be a table of \"section.key\" = [values]")
            };
            flatten(&section, "", &t, target)?;
        }
        if spec.grid.is_empty() && spec.zip.is_empty() {
            bail!("no values to sweep: add a [grid] or [zip] table of \"section.key\" = [values]");
        }
        let mut seen = BTreeSet::new();
        for (key, values) in spec.grid.iter().chain(&spec.zip) {
            if !seen.insert(key.as_str()) {
                bail!("`{key}` is in both [grid] and [zip]; sweep each key once");
            }
            if !key.contains('.') {
                bail!("`{key}`: sweep keys are config keys like optimizer.weight_decay");
            }
            if key == "run.dir" || key == "run.name" {
                bail!(
                    "`{key}` is set by the sweep for each point; use --out to choose where runs go"
                );
            }
            if values.is_empty() {
                bail!("`{key}` has an empty list of values");
            }
        }
        if let Some((first, first_values)) = spec.zip.first() {
            for (key, values) in &spec.zip[1..] {
                if values.len() != first_values.len() {
                    bail!(
                        "[zip] lists must have equal lengths: `{first}` has {} values but `{key}` has {}",
                        first_values.len(),
                        values.len()
                    );
                }
            }
        }
        Ok(spec)
    }

    /// Every key the sweep sets, grid keys first.
    pub fn keys(&self) -> Vec<String> {
        self.grid
            .iter()
            .chain(&self.zip)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The points: the cartesian product of the grid axes and the zipped tuples (one axis),
    /// first key varying slowest. Each point lists (key, value) in [`keys`](Self::keys) order.
    pub fn points(&self) -> Vec<Vec<(String, toml::Value)>> {
        let mut axes: Vec<Vec<Vec<(String, toml::Value)>>> = self
            .grid
            .iter()
            .map(|(k, vs)| vs.iter().map(|v| vec![(k.clone(), v.clone())]).collect())
            .collect();
        if let Some((_, first)) = self.zip.first() {
            axes.push(
                (0..first.len())
                    .map(|i| {
                        self.zip
                            .iter()
                            .map(|(k, vs)| (k.clone(), vs[i].clone()))
                            .collect()
                    })
                    .collect(),
            );
        }
        let mut points: Vec<Vec<(String, toml::Value)>> = vec![Vec::new()];
        for axis in axes {
            points = points
                .into_iter()
                .flat_map(|p| {
                    axis.iter()
                        .map(move |choice| [p.clone(), choice.clone()].concat())
                })
                .collect();
        }
        points
    }
}

/// `[grid]` keys may be quoted ("a.b") or TOML dotted keys (a.b → nested tables): both give "a.b".
fn flatten(
    section: &str,
    prefix: &str,
    table: &toml::Table,
    out: &mut Vec<(String, Vec<toml::Value>)>,
) -> Result<()> {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Array(values) => out.push((key, values.clone())),
            toml::Value::Table(t) => flatten(section, &key, t, out)?,
            other => bail!("[{section}] `{key}` must be a list of values, e.g. [{other}]"),
        }
    }
    Ok(())
}

/// One point of a sweep, ready to run.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepPoint {
    pub index: usize,
    /// Directory name built from the overrides.
    pub name: String,
    pub overrides: Vec<(String, toml::Value)>,
    /// The resolved config of this point.
    pub config_path: PathBuf,
    pub run_dir: PathBuf,
}

impl SweepPoint {
    pub fn is_done(&self) -> bool {
        is_done(&self.run_dir)
    }
}

/// All points of a sweep with their configs written.
#[derive(Clone, Debug)]
pub struct SweepPlan {
    pub out_dir: PathBuf,
    pub keys: Vec<String>,
    pub points: Vec<SweepPoint>,
}

/// Shell-safe text of an override value, for directory names.
fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-=+,".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// FNV-1a, to tell apart names that sanitizing or truncation made equal.
fn short_hash(text: &str) -> String {
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{:08x}", h as u32)
}

/// The shortest dotted suffix of each key that no other key shares (`weight` → `web.weight`).
fn short_keys(keys: &[String]) -> Vec<String> {
    keys.iter()
        .map(|key| {
            let segments: Vec<&str> = key.split('.').collect();
            (1..=segments.len())
                .map(|n| segments[segments.len() - n..].join("."))
                .find(|suffix| {
                    keys.iter()
                        .filter(|k| *k == key || k.ends_with(&format!(".{suffix}")) || *k == suffix)
                        .count()
                        == 1
                })
                .unwrap_or_else(|| key.clone())
        })
        .collect()
}

/// Directory names for the points, unique and at most ~110 characters.
pub fn point_names(keys: &[String], points: &[Vec<(String, toml::Value)>]) -> Vec<String> {
    let short = short_keys(keys);
    let short_of: BTreeMap<&str, &str> = keys
        .iter()
        .map(String::as_str)
        .zip(short.iter().map(String::as_str))
        .collect();
    let full: Vec<String> = points
        .iter()
        .map(|p| {
            p.iter()
                .map(|(k, v)| {
                    format!(
                        "{}={}",
                        short_of.get(k.as_str()).copied().unwrap_or(k.as_str()),
                        value_text(v)
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let mut names: Vec<String> = full
        .iter()
        .map(|f| {
            let s = sanitize(f);
            if s.len() > 100 {
                format!("{}-{}", &s[..100], short_hash(f))
            } else {
                s
            }
        })
        .collect();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for n in &names {
        *counts.entry(n.clone()).or_default() += 1;
    }
    for (n, f) in names.iter_mut().zip(&full) {
        if counts[n.as_str()] > 1 {
            *n = format!("{n}-{}", short_hash(f));
        }
    }
    names
}

/// Quotes a TOML value as a `--set` argument value.
fn override_arg(key: &str, v: &toml::Value) -> String {
    format!("{key}={v}")
}

/// The sweep directory: `--out`, or the base config's `run.dir`.
pub fn sweep_dir(args: &SweepArgs) -> Result<PathBuf> {
    let base = RunConfig::load(&args.config, &args.set).map_err(anyhow::Error::new)?;
    out_dir_of(args, &base)
}

fn out_dir_of(args: &SweepArgs, base: &RunConfig) -> Result<PathBuf> {
    let dir = args.out.clone().unwrap_or_else(|| base.run.dir.clone());
    std::path::absolute(&dir)
        .with_context(|| format!("resolving the sweep directory {}", dir.display()))
}

/// Expands the sweep, checks every point's config, and writes `OUT/configs/<name>.toml`.
pub fn plan(args: &SweepArgs) -> Result<SweepPlan> {
    let spec = SweepSpec::load(&args.sweep)?;
    let base = RunConfig::load(&args.config, &args.set).map_err(anyhow::Error::new)?;
    let out_dir = out_dir_of(args, &base)?;
    let keys = spec.keys();
    let raw_points = spec.points();
    let names = point_names(&keys, &raw_points);
    let configs_dir = out_dir.join("configs");
    std::fs::create_dir_all(&configs_dir)
        .with_context(|| format!("creating {}", configs_dir.display()))?;
    let mut points = Vec::with_capacity(raw_points.len());
    for (index, (overrides, name)) in raw_points.into_iter().zip(names).enumerate() {
        let run_dir = out_dir.join(&name);
        let mut sets = args.set.clone();
        sets.extend(overrides.iter().map(|(k, v)| override_arg(k, v)));
        sets.push(override_arg(
            "run.dir",
            &toml::Value::String(run_dir.to_string_lossy().into_owned()),
        ));
        sets.push(override_arg(
            "run.name",
            &toml::Value::String(format!("{}/{name}", base.run.name)),
        ));
        let config = RunConfig::load(&args.config, &sets)
            .map_err(|e: ConfigError| anyhow!("sweep point {index} ({name}): {e}"))?;
        let config_path = configs_dir.join(format!("{name}.toml"));
        let text = config.to_toml_string().map_err(anyhow::Error::new)?;
        std::fs::write(&config_path, text)
            .with_context(|| format!("writing {}", config_path.display()))?;
        points.push(SweepPoint {
            index,
            name,
            overrides,
            config_path,
            run_dir,
        });
    }
    Ok(SweepPlan {
        out_dir,
        keys,
        points,
    })
}

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
            PointStatus::Done => "done".into(),
            PointStatus::Incomplete => "incomplete".into(),
            PointStatus::Failed(e) => format!("failed: {e}"),
            PointStatus::NotRun => "not run".into(),
        }
    }
}

/// Runs the unfinished points, `jobs` at a time, and returns each point's status (in order).
pub fn execute(plan: &SweepPlan, executor: &dyn RunExecutor, jobs: usize) -> Vec<PointStatus> {
    let n = plan.points.len();
    let statuses: Mutex<Vec<Option<PointStatus>>> = Mutex::new(vec![None; n]);
    let next = AtomicUsize::new(0);
    let worker = || {
        loop {
            let i = next.fetch_add(1, Ordering::SeqCst);
            let Some(point) = plan.points.get(i) else {
                break;
            };
            let status = if point.is_done() {
                eprintln!("[{}/{n}] {}: already done, skipped", i + 1, point.name);
                PointStatus::AlreadyDone
            } else {
                eprintln!("[{}/{n}] {}: starting", i + 1, point.name);
                let start = Instant::now();
                let status = match executor.execute(point) {
                    Ok(()) if point.is_done() => PointStatus::Done,
                    Ok(()) => PointStatus::Incomplete,
                    Err(e) => PointStatus::Failed(format!("{e:#}")),
                };
                eprintln!(
                    "[{}/{n}] {}: {} after {:.1}s",
                    i + 1,
                    point.name,
                    status.label(),
                    start.elapsed().as_secs_f64()
                );
                status
            };
            if let Ok(mut s) = statuses.lock() {
                s[i] = Some(status);
            }
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, n.max(1)) {
            scope.spawn(worker);
        }
    });
    let statuses = statuses.into_inner().unwrap_or_else(|e| e.into_inner());
    statuses
        .into_iter()
        .map(|s| s.unwrap_or(PointStatus::Failed("the worker thread died".into())))
        .collect()
}

/// One row of the summary table.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryRow {
    pub name: String,
    pub overrides: Vec<(String, toml::Value)>,
    pub status: PointStatus,
    pub final_train_loss: Option<f64>,
    pub best_eval_loss: BTreeMap<String, f64>,
    pub tokens: Option<u64>,
    pub last_step: Option<u64>,
    /// Why the metrics could not be read, if they exist but are broken.
    pub metrics_error: Option<String>,
}

/// Builds the rows from each point's metrics.jsonl (missing metrics leave the cells empty).
pub fn summary_rows(plan: &SweepPlan, statuses: &[PointStatus]) -> Vec<SummaryRow> {
    plan.points
        .iter()
        .zip(statuses)
        .map(|(p, status)| {
            let path = metrics_path(&p.run_dir);
            let (metrics, metrics_error) = if path.exists() {
                match read_metrics(&path) {
                    Ok(m) => (m, None),
                    Err(e) => (RunMetrics::default(), Some(format!("{e:#}"))),
                }
            } else {
                (RunMetrics::default(), None)
            };
            SummaryRow {
                name: p.name.clone(),
                overrides: p.overrides.clone(),
                status: status.clone(),
                final_train_loss: metrics.final_train_loss(),
                best_eval_loss: metrics.best_eval_loss(),
                tokens: metrics.tokens(),
                last_step: metrics.last_step(),
                metrics_error,
            }
        })
        .collect()
}

fn table(keys: &[String], rows: &[SummaryRow]) -> (Vec<String>, Vec<Vec<String>>) {
    let sources: BTreeSet<String> = rows
        .iter()
        .flat_map(|r| r.best_eval_loss.keys().cloned())
        .collect();
    let mut header = vec!["point".to_owned()];
    header.extend(keys.iter().cloned());
    header.extend(["final train loss".to_owned()]);
    header.extend(sources.iter().map(|s| format!("best eval loss {s}")));
    header.extend([
        "last step".to_owned(),
        "tokens".to_owned(),
        "status".to_owned(),
    ]);
    let fmt_loss = |l: Option<f64>| l.map(|l| format!("{l:.4}")).unwrap_or_default();
    let body = rows
        .iter()
        .map(|r| {
            let mut row = vec![r.name.clone()];
            row.extend(keys.iter().map(|k| {
                r.overrides
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| value_text(v))
                    .unwrap_or_default()
            }));
            row.push(fmt_loss(r.final_train_loss));
            row.extend(
                sources
                    .iter()
                    .map(|s| fmt_loss(r.best_eval_loss.get(s).copied())),
            );
            row.push(r.last_step.map(|s| s.to_string()).unwrap_or_default());
            row.push(r.tokens.map(|t| t.to_string()).unwrap_or_default());
            let mut status = r.status.label();
            if let Some(e) = &r.metrics_error {
                status.push_str(&format!(" (metrics unreadable: {e})"));
            }
            row.push(status);
            row
        })
        .collect();
    (header, body)
}

pub fn summary_markdown(keys: &[String], rows: &[SummaryRow]) -> String {
    let (header, body) = table(keys, rows);
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| {} |",
        header
            .iter()
            .map(|h| cell(h))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(
        out,
        "|{}",
        header.iter().map(|_| "---|").collect::<String>()
    );
    for row in body {
        let _ = writeln!(
            out,
            "| {} |",
            row.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | ")
        );
    }
    out
}

pub fn summary_csv(keys: &[String], rows: &[SummaryRow]) -> String {
    let (header, body) = table(keys, rows);
    let field = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_owned()
        }
    };
    let line = |r: &[String]| r.iter().map(|c| field(c)).collect::<Vec<_>>().join(",") + "\n";
    let mut out = line(&header);
    for row in body {
        out.push_str(&line(&row));
    }
    out
}

/// Writes `OUT/summary.md` and `OUT/summary.csv`; returns the markdown.
pub fn write_summary(plan: &SweepPlan, statuses: &[PointStatus]) -> Result<String> {
    let rows = summary_rows(plan, statuses);
    let md = summary_markdown(&plan.keys, &rows);
    for (file, text) in [
        ("summary.md", &md),
        ("summary.csv", &summary_csv(&plan.keys, &rows)),
    ] {
        let path = plan.out_dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(md)
}

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
    let statuses = if args.emit {
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
                if p.is_done() {
                    PointStatus::AlreadyDone
                } else {
                    PointStatus::NotRun
                }
            })
            .collect()
    } else {
        execute(&plan, executor, args.jobs)
    };
    let summary_markdown = write_summary(&plan, &statuses)?;
    Ok(SweepReport {
        plan,
        statuses,
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
