//! The summary table of a sweep (`summary.md`, `summary.csv`): overrides, losses, status.

use super::execute::PointStatus;
use super::naming::value_text;
use super::outcome::RunOutcome;
use super::plan::SweepPlan;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

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

/// Builds the rows from each point's status and outcome (missing metrics leave the cells empty).
pub fn summary_rows(plan: &SweepPlan, results: &[(PointStatus, RunOutcome)]) -> Vec<SummaryRow> {
    plan.points
        .iter()
        .zip(results)
        .map(|(p, (status, outcome))| {
            let (metrics, metrics_error) = match &outcome.metrics {
                Ok(m) => (Some(m), None),
                Err(e) => (None, Some(e.clone())),
            };
            SummaryRow {
                name: p.name.clone(),
                overrides: p.overrides.clone(),
                status: status.clone(),
                final_train_loss: metrics.and_then(|m| m.final_train_loss()),
                best_eval_loss: metrics.map(|m| m.best_eval_loss()).unwrap_or_default(),
                tokens: metrics.and_then(|m| m.tokens()),
                last_step: metrics.and_then(|m| m.last_step()),
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
pub fn write_summary(plan: &SweepPlan, results: &[(PointStatus, RunOutcome)]) -> Result<String> {
    let rows = summary_rows(plan, results);
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
