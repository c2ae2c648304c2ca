//! `zamba-train plot RUN_DIR... [--out FILE.png|.svg]`: train loss, held-out loss per source
//! and LR against training tokens for one or several runs; and the LR curve of a schedule.
//!
//! # `<run.dir>/metrics.jsonl`
//! One JSON object per line, appended by the trainer. Two kinds of lines:
//!
//! - **step line**, one per optimizer step (or every `logging.every` steps):
//!   `{"step": 41, "tokens": 172032, "loss": 3.214, "lr": 0.0003, "grad_norm": 0.83, "tokens_per_sec": 5120.4}`
//!   - `step`: 0-based index of the optimizer step just taken (the schedule's step: `lr` is `schedule.lr(step)`);
//!   - `tokens`: training tokens consumed by the run up to and including this step;
//!   - `loss`: mean training loss of the step; `grad_norm`: global gradient norm before clipping;
//!     either may be `null` when non-finite (the update was skipped);
//!   - `lr`: the LR used; `tokens_per_sec`: throughput of the step (`null` allowed);
//!   - any other fields (`mfu`, `skipped`, …) are allowed and ignored here.
//! - **eval line**, one per evaluation:
//!   `{"eval": true, "step": 99, "tokens": 409600, "loss": {"web": 3.10, "instruct": 2.25}}`
//!   - `step` / `tokens`: as the step line of the last optimizer step before the evaluation;
//!   - `loss`: held-out mean loss per data source (source name → number, `null` if non-finite).
//!
//! A step (or eval) whose `step` is not above the previous line's means the run resumed from an
//! earlier checkpoint: the later lines replace the earlier ones from that step on.

use crate::schedule::ScheduleConfig;
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

/// File name of the metrics log inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One training step line.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub tokens: u64,
    pub loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: Option<f64>,
    pub tokens_per_sec: Option<f64>,
}

/// One evaluation line.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalRecord {
    pub step: u64,
    pub tokens: u64,
    /// Source name → held-out loss (non-finite losses are left out).
    pub loss: BTreeMap<String, f64>,
}

/// The parsed metrics of one run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunMetrics {
    pub steps: Vec<StepRecord>,
    pub evals: Vec<EvalRecord>,
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
            for (source, &loss) in &e.loss {
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
        let obj = value
            .as_object()
            .ok_or((number, "not a JSON object".to_owned()))?;
        let uint = |key: &str| {
            obj.get(key)
                .and_then(serde_json::Value::as_u64)
                .ok_or((number, format!("missing or non-integer `{key}`")))
        };
        let step = uint("step")?;
        let tokens = uint("tokens")?;
        let is_eval = match obj.get("eval") {
            None | Some(serde_json::Value::Bool(false)) => false,
            Some(serde_json::Value::Bool(true)) => true,
            Some(other) => {
                return Err((number, format!("`eval` must be true or false, not {other}")));
            }
        };
        if is_eval {
            let losses = obj
                .get("loss")
                .and_then(serde_json::Value::as_object)
                .ok_or((
                    number,
                    "eval line needs `loss` as an object of source → loss, e.g. {\"web\": 3.1}"
                        .to_owned(),
                ))?;
            let mut loss = BTreeMap::new();
            for (source, v) in losses {
                match v {
                    serde_json::Value::Null => {}
                    v => {
                        let x = v.as_f64().ok_or((
                            number,
                            format!("eval loss of `{source}` is {v}, not a number"),
                        ))?;
                        loss.insert(source.clone(), x);
                    }
                }
            }
            metrics.evals.retain(|e| e.step < step);
            metrics.evals.push(EvalRecord { step, tokens, loss });
        } else {
            let opt_num = |key: &str| -> Result<Option<f64>, (usize, String)> {
                match obj.get(key) {
                    None | Some(serde_json::Value::Null) => Ok(None),
                    Some(v) => v
                        .as_f64()
                        .map(Some)
                        .ok_or((number, format!("`{key}` is {v}, not a number"))),
                }
            };
            if !obj.contains_key("loss") {
                return Err((
                    number,
                    "step line has no `loss` (use null for a skipped step)".into(),
                ));
            }
            let lr = opt_num("lr")?.ok_or((number, "step line has no numeric `lr`".to_owned()))?;
            let record = StepRecord {
                step,
                tokens,
                loss: opt_num("loss")?,
                lr,
                grad_norm: opt_num("grad_norm")?,
                tokens_per_sec: opt_num("tokens_per_sec")?,
            };
            metrics.steps.retain(|s| s.step < step);
            metrics.steps.push(record);
        }
    }
    Ok(metrics)
}

/// The metrics file of a run directory (or the path itself if it is a file).
pub fn metrics_path(run: &Path) -> PathBuf {
    if run.is_file() {
        run.to_path_buf()
    } else {
        run.join(METRICS_FILE)
    }
}

#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    /// Run directories (each with a metrics.jsonl), or metrics.jsonl files.
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// Output image, .png or .svg [default: RUN_DIR/plot.png for one run, ./runs-plot.png for several].
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// The `plot` subcommand.
pub fn run(args: PlotArgs) -> Result<()> {
    let out = match &args.out {
        Some(out) => out.clone(),
        None if args.runs.len() == 1 && args.runs[0].is_dir() => args.runs[0].join("plot.png"),
        None => PathBuf::from("runs-plot.png"),
    };
    plot_runs(&args.runs, &out)?;
    println!("wrote {}", out.display());
    Ok(())
}

enum Format {
    Png,
    Svg,
}

fn format_of(out: &Path) -> Result<Format> {
    match out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("png") => Ok(Format::Png),
        Some("svg") => Ok(Format::Svg),
        _ => bail!(
            "{}: unsupported image type; use a .png or .svg file name",
            out.display()
        ),
    }
}

/// Plotters draws text with a font registered at run time; DejaVu Sans is embedded so plots
/// look the same on every machine.
fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // DejaVu is a valid TrueType font, so registration cannot fail; a plot without text would still be drawn.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

fn prepare_output(out: &Path) -> Result<Format> {
    let format = format_of(out)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    register_fonts();
    Ok(format)
}

/// Draws train loss, eval loss per source and LR against tokens for the runs in `dirs`.
pub fn plot_runs(dirs: &[PathBuf], out: &Path) -> Result<()> {
    if dirs.is_empty() {
        bail!("no run directories given");
    }
    let mut runs = Vec::new();
    for dir in dirs {
        let path = metrics_path(dir);
        let metrics = read_metrics(&path)?;
        if metrics.steps.is_empty() && metrics.evals.is_empty() {
            bail!(
                "{}: no metrics yet (the file has no step or eval lines)",
                path.display()
            );
        }
        runs.push((run_label(dir, dirs), metrics));
    }
    let format = prepare_output(out)?;
    let size = (1200, 1500);
    let result = match format {
        Format::Png => draw_runs(BitMapBackend::new(out, size).into_drawing_area(), &runs),
        Format::Svg => draw_runs(SVGBackend::new(out, size).into_drawing_area(), &runs),
    };
    result.with_context(|| format!("drawing {}", out.display()))
}

/// A short, unique label per run: the directory name, or the whole path when names repeat.
fn run_label(dir: &Path, all: &[PathBuf]) -> String {
    let dir = if dir.is_file() {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string())
    };
    let mine = name(dir);
    let clashes = all
        .iter()
        .filter(|d| {
            name(if d.is_file() {
                d.parent().unwrap_or(d)
            } else {
                d
            }) == mine
        })
        .count()
        > 1;
    if clashes {
        dir.display().to_string()
    } else {
        mine
    }
}

fn run_color(i: usize) -> RGBColor {
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    COLORS[i % COLORS.len()]
}

/// (min, max) of the values with a small margin; a flat or empty series still gets a range.
fn range_of(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        0.05 * (hi - lo)
    } else {
        0.05 * lo.abs().max(1e-12)
    };
    (lo - pad, hi + pad)
}

fn tokens_label(x: &f64) -> String {
    crate::config::human_count(*x)
}

type DrawResult = Result<()>;

fn plot_err<E: std::error::Error + Send + Sync + 'static>(
    e: DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow!("{e}")
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// One line per run, in the run's color, with the legend box.
fn draw_run_lines<'a, DB: DrawingBackend + 'a>(
    chart: &mut Chart<'a, DB>,
    runs: &[(String, RunMetrics)],
    points: impl Fn(&RunMetrics) -> Vec<(f64, f64)>,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    for (i, (label, m)) in runs.iter().enumerate() {
        let color = run_color(i);
        chart
            .draw_series(LineSeries::new(points(m), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    draw_legend(chart)
}

/// A panel of the runs plot: training tokens on x.
fn token_panel<'a, DB: DrawingBackend + 'a>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
    y_desc: &str,
    y_label: Option<&dyn Fn(&f64) -> String>,
) -> Result<Chart<'a, DB>>
where
    DB::ErrorType: 'static,
{
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)
        .map_err(plot_err)?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc("tokens")
        .y_desc(y_desc)
        .x_label_formatter(&tokens_label);
    if let Some(format) = y_label {
        mesh.y_label_formatter(format);
    }
    mesh.draw().map_err(plot_err)?;
    Ok(chart)
}

fn draw_legend<'a, DB: DrawingBackend + 'a>(chart: &mut Chart<'a, DB>) -> DrawResult
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)
}

fn draw_runs<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    runs: &[(String, RunMetrics)],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((3, 1));
    let max_tokens = runs
        .iter()
        .flat_map(|(_, m)| {
            m.steps
                .iter()
                .map(|s| s.tokens)
                .chain(m.evals.iter().map(|e| e.tokens))
        })
        .max()
        .unwrap_or(1);
    let x_range = 0.0..(max_tokens.max(1) as f64 * 1.02);

    // Train loss.
    let (lo, hi) = range_of(
        runs.iter()
            .flat_map(|(_, m)| m.steps.iter().filter_map(|s| s.loss)),
    );
    let mut chart = token_panel(
        &panels[0],
        "train loss",
        x_range.clone(),
        lo..hi,
        "loss",
        None,
    )?;
    draw_run_lines(&mut chart, runs, |m| {
        m.steps
            .iter()
            .filter_map(|s| s.loss.map(|l| (s.tokens as f64, l)))
            .collect()
    })?;

    // Held-out loss per source: one color per run, one marker per source.
    let sources: Vec<String> = {
        let mut s: Vec<String> = runs
            .iter()
            .flat_map(|(_, m)| m.evals.iter().flat_map(|e| e.loss.keys().cloned()))
            .collect();
        s.sort();
        s.dedup();
        s
    };
    let (lo, hi) = range_of(
        runs.iter()
            .flat_map(|(_, m)| m.evals.iter().flat_map(|e| e.loss.values().copied())),
    );
    // Headroom above the curves for the legend (one row per run and source).
    let hi = hi + (hi - lo) * (0.08 * (runs.len() * sources.len()) as f64).min(0.6);
    let mut chart = token_panel(
        &panels[1],
        "held-out loss per source",
        x_range.clone(),
        lo..hi,
        "loss",
        None,
    )?;
    if sources.is_empty() {
        panels[1]
            .draw(&Text::new(
                "no evaluations yet",
                (520, 240),
                ("sans-serif", 20),
            ))
            .map_err(plot_err)?;
    }
    for (i, (label, m)) in runs.iter().enumerate() {
        let color = run_color(i);
        for (k, source) in sources.iter().enumerate() {
            let points: Vec<(f64, f64)> = m
                .evals
                .iter()
                .filter_map(|e| e.loss.get(source).map(|&l| (e.tokens as f64, l)))
                .collect();
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(plot_err)?;
            let name = format!("{label} · {source}");
            // One marker shape per source (the color says which run).
            match k % 3 {
                0 => {
                    chart
                        .draw_series(points.iter().map(|&p| Circle::new(p, 5, color.filled())))
                        .map_err(plot_err)?
                        .label(name)
                        .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
                }
                1 => {
                    chart
                        .draw_series(
                            points
                                .iter()
                                .map(|&p| TriangleMarker::new(p, 6, color.filled())),
                        )
                        .map_err(plot_err)?
                        .label(name)
                        .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, color.filled()));
                }
                _ => {
                    chart
                        .draw_series(
                            points
                                .iter()
                                .map(|&p| Cross::new(p, 5, color.stroke_width(2))),
                        )
                        .map_err(plot_err)?
                        .label(name)
                        .legend(move |(x, y)| Cross::new((x + 10, y), 5, color.stroke_width(2)));
                }
            }
        }
    }
    if !sources.is_empty() {
        draw_legend(&mut chart)?;
    }

    // Learning rate.
    let (_, hi) = range_of(runs.iter().flat_map(|(_, m)| m.steps.iter().map(|s| s.lr)));
    let lr_label = |y: &f64| format!("{y:.1e}");
    let mut chart = token_panel(
        &panels[2],
        "learning rate",
        x_range,
        0.0..hi.max(1e-12),
        "lr",
        Some(&lr_label),
    )?;
    draw_run_lines(&mut chart, runs, |m| {
        m.steps.iter().map(|s| (s.tokens as f64, s.lr)).collect()
    })?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Draws the LR of every step (sampled to at most ~2000 points, always including the first,
/// peak and last steps) of `schedule` over `total_steps` steps.
pub fn plot_schedule(schedule: &ScheduleConfig, total_steps: usize, out: &Path) -> Result<()> {
    if total_steps == 0 {
        bail!("cannot plot a schedule of 0 steps");
    }
    let format = prepare_output(out)?;
    let size = (1000, 500);
    let result = match format {
        Format::Png => draw_schedule(
            BitMapBackend::new(out, size).into_drawing_area(),
            schedule,
            total_steps,
        ),
        Format::Svg => draw_schedule(
            SVGBackend::new(out, size).into_drawing_area(),
            schedule,
            total_steps,
        ),
    };
    result.with_context(|| format!("drawing {}", out.display()))
}

fn draw_schedule<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    schedule: &ScheduleConfig,
    total: usize,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let stride = total.div_ceil(2000).max(1);
    let mut steps: Vec<usize> = (0..total).step_by(stride).collect();
    steps.extend([schedule.peak_step().min(total - 1), total - 1]);
    steps.sort_unstable();
    steps.dedup();
    let points: Vec<(f64, f64)> = steps
        .iter()
        .map(|&s| (s as f64, schedule.lr(s, total)))
        .collect();
    let (_, hi) = range_of(points.iter().map(|p| p.1));
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("LR schedule: {} over {total} steps", schedule.kind()),
            ("sans-serif", 24),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..(total as f64), 0.0..hi.max(1e-12))
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc("lr")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.1e}"))
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(LineSeries::new(points, run_color(0).stroke_width(2)))
        .map_err(plot_err)?;
    let peak = schedule.peak_step().min(total - 1);
    chart
        .draw_series(std::iter::once(Circle::new(
            (peak as f64, schedule.lr(peak, total)),
            5,
            run_color(3).filled(),
        )))
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}
