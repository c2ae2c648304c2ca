//! `zamba-train plot RUN_DIR... [--out FILE.png|.svg]`: train loss, held-out loss per source
//! and LR against training tokens for one or several runs; and the LR curve of a schedule.
//!
//! The input is each run's metrics.jsonl (see [`crate::metrics`]).

use crate::metrics::{RunMetrics, metrics_path, read_metrics};
use crate::schedule::ScheduleConfig;
use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

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
    let (lo, hi) = range_of(runs.iter().flat_map(|(_, m)| {
        m.evals
            .iter()
            .flat_map(|e| e.loss.values().flatten().copied())
    }));
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
                .filter_map(|e| {
                    e.loss
                        .get(source)
                        .copied()
                        .flatten()
                        .map(|l| (e.tokens as f64, l))
                })
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
