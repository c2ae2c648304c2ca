//! The trainer's TensorBoard event files, read back by TensorBoard's own reader (the `tensorboard`
//! Python package's `EventMultiplexer`, as `tensorboard --logdir` loads runs): every metric of
//! metrics.jsonl at its step, eval loss and perplexity per source, the config as text; a run
//! resumed from a checkpoint older than its last logged step shows each step once, with the
//! resumed session's values; an anneal run in its own directory is a run of its own.
//!
//! Needs python3 with the reader: `scripts/prepare-test-python.sh` (run by `.ci/run`).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::{SCHEDULE, options, write_config};
use serde_json::Value;
use zamba_train::checkpoint;
use zamba_train::metrics::{DONE_FILE, RunMetrics, StepRecord, read_metrics};
use zamba_train::train::train;

const ANNEAL_SCHEDULE: &str = "[schedule]\nkind = \"constant\"\nlr = 5e-4\nwarmup_steps = 0\n";

/// Every run under the root given as the argument: its scalars and text tensors.
const READER: &str = r#"
import json, sys
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing import event_multiplexer as em

mux = em.EventMultiplexer(size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
mux.AddRunsFromDirectory(sys.argv[1])
mux.Reload()
runs = {}
for run in sorted(mux.Runs()):
    acc = mux.GetAccumulator(run)
    tags = acc.Tags()
    runs[run] = {
        "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
        "texts": {
            t: [[e.step, [s.decode() for s in e.tensor_proto.string_val]] for e in acc.Tensors(t)]
            for t in tags["tensors"]
        },
    }
print(json.dumps(runs))
"#;

/// Runs TensorBoard's reader over `root`: run name → its data.
fn tensorboard_runs(root: &Path) -> BTreeMap<String, Value> {
    let python = std::env::var("ZAMBA_TEST_PYTHON")
        .or_else(|_| std::env::var("PYTHON"))
        .unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args(["-c", READER])
        .arg(root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "TensorBoard's reader failed ({python}); install it with scripts/prepare-test-python.sh:\n{stderr}"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `(step, value)` of a scalar tag.
fn series(run: &Value, tag: &str) -> Vec<(u64, f64)> {
    run["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no scalar {tag}; tags: {:?}", run["scalars"]))
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

/// TensorBoard keeps scalars as f32: equal as f32 (the JSON between adds a last-bit error to
/// the f64 it prints).
fn assert_f32_eq(tb: &[(u64, f64)], expected: &[(u64, f64)], what: &str) {
    let as_f32 = |points: &[(u64, f64)]| -> Vec<(u64, f32)> {
        points.iter().map(|&(s, v)| (s, v as f32)).collect()
    };
    assert_eq!(as_f32(tb), as_f32(expected), "{what}");
}

/// A number of a step line, as a float.
type Field = fn(&StepRecord) -> f64;

fn lr_by_step(metrics: &RunMetrics) -> Vec<(u64, f64)> {
    metrics.steps.iter().map(|s| (s.step, s.lr)).collect()
}

#[test]
fn event_files_hold_the_metrics_once_per_step_across_a_resume_and_runs_sit_side_by_side() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let config = write_config(root, "phase1", &format!("{SCHEDULE}\n[train]\nsteps = 4\n"));
    let mut opts = options(config);
    // A given peak: no GEMM peak measured at each start (mfu is still logged).
    opts.overrides = vec![
        "checkpoint.every=2".into(),
        "eval.every=2".into(),
        "runtime.peak_gflops=100".into(),
    ];
    train(&opts).unwrap();
    let phase1 = root.join("phase1");
    let first_session = read_metrics(&phase1.join("metrics.jsonl")).unwrap();

    // As if killed after logging steps 2 and 3 but before their checkpoint: the run resumes from
    // step 2, here with another peak LR so that the resumed session's values differ.
    let (_, last) = checkpoint::list(&phase1).unwrap().pop().unwrap();
    std::fs::remove_dir_all(last).unwrap();
    std::fs::remove_file(phase1.join(DONE_FILE)).unwrap();
    opts.overrides.push("schedule.peak_lr=2e-3".into());
    opts.overrides.push("schedule.min_lr=1e-4".into());
    train(&opts).unwrap();
    let metrics = read_metrics(&phase1.join("metrics.jsonl")).unwrap();
    let (old, new) = (lr_by_step(&first_session), lr_by_step(&metrics));
    assert_eq!(old[..2], new[..2]);
    assert!(
        old[2].1 != new[2].1 && old[3].1 != new[3].1,
        "{old:?} vs {new:?}"
    );

    // A phase-2 run from phase 1's weights, in its own run directory.
    let anneal_init = format!(
        "[init]\nfrom = \"{}\"\n",
        checkpoint::list(&phase1)
            .unwrap()
            .pop()
            .unwrap()
            .1
            .display()
    );
    let anneal = write_config(
        root,
        "anneal",
        &format!("{ANNEAL_SCHEDULE}\n[train]\nsteps = 2\n{anneal_init}"),
    );
    let mut anneal = options(anneal);
    anneal.overrides = vec!["runtime.peak_gflops=100".into()];
    train(&anneal).unwrap();

    let runs = tensorboard_runs(root);
    let names: Vec<&str> = runs.keys().map(String::as_str).collect();
    assert_eq!(names, ["anneal/tensorboard", "phase1/tensorboard"]);
    let run = &runs["phase1/tensorboard"];

    // Each step once, with the resumed session's values.
    assert_f32_eq(&series(run, "train/lr"), &new, "train/lr");
    let losses: Vec<(u64, f64)> = metrics
        .steps
        .iter()
        .map(|s| (s.step, s.loss.unwrap()))
        .collect();
    assert_f32_eq(&series(run, "train/loss"), &losses, "train/loss");
    let fields: [(&str, Field); 7] = [
        ("tokens", |s| s.tokens as f64),
        ("grad_norm", |s| s.grad_norm.unwrap()),
        ("tokens_per_sec", |s| s.tokens_per_sec.unwrap()),
        ("mfu", |s| s.mfu.unwrap()),
        ("gflops", |s| s.gflops.unwrap()),
        ("skipped", |s| f64::from(u8::from(s.skipped))),
        ("world_size", |s| s.world_size as f64),
    ];
    for (field, value) in fields {
        let expected: Vec<(u64, f64)> = metrics.steps.iter().map(|s| (s.step, value(s))).collect();
        assert_f32_eq(&series(run, &format!("train/{field}")), &expected, field);
    }

    // Evaluations after steps 1 and 3 (the second from the resumed session), per source.
    let eval: Vec<(u64, f64)> = metrics
        .evals
        .iter()
        .map(|e| (e.step, e.loss["web"].unwrap()))
        .collect();
    assert_eq!(eval.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 3]);
    assert_f32_eq(&series(run, "eval/web/loss"), &eval, "eval loss");
    let perplexity: Vec<(u64, f64)> = eval.iter().map(|&(s, l)| (s, l.exp())).collect();
    let tb = series(run, "eval/web/perplexity");
    assert_eq!(tb.len(), 2);
    for ((s, p), (es, ep)) in tb.iter().zip(&perplexity) {
        assert_eq!(s, es);
        assert!(
            (p - ep).abs() <= 1e-6 * ep,
            "perplexity {p} vs exp(loss) {ep}"
        );
    }

    // The resolved config as text, once per session, at the step it started from.
    let texts = run["texts"]["config"].as_array().unwrap();
    let steps: Vec<u64> = texts.iter().map(|t| t[0].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 2]);
    let resumed = texts[1][1][0].as_str().unwrap();
    assert!(resumed.contains("    peak_lr = 0.002"), "{resumed}");
    assert!(
        texts[0][1][0]
            .as_str()
            .unwrap()
            .contains("    peak_lr = 0.005")
    );

    let anneal = &runs["anneal/tensorboard"];
    let steps: Vec<u64> = series(anneal, "train/loss").iter().map(|p| p.0).collect();
    assert_eq!(steps, [0, 1]);
}

#[test]
fn tensorboard_false_writes_no_event_files() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        "quiet",
        &format!("{SCHEDULE}\n[train]\nsteps = 3\n"),
    );
    let mut opts = options(config);
    opts.overrides = vec![
        "logging.tensorboard=false".into(),
        "eval.every=0".into(),
        "runtime.peak_gflops=100".into(),
    ];
    train(&opts).unwrap();
    let run = tmp.path().join("quiet");
    assert!(run.join("metrics.jsonl").exists());
    assert!(!run.join("tensorboard").exists());
}
