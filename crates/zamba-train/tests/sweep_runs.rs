//! Sweeps: grid/zip expansion, per-point configs, skipping finished points, the summary, and
//! the emitted SLURM script — with a fake executor standing in for the trainer.

use anyhow::Result;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use zamba_train::config::RunConfig;
use zamba_train::sweep::{
    PointStatus, RunExecutor, SweepArgs, SweepPoint, SweepSpec, point_names, run_with,
};

const BASE: &str = r#"
[run]
name = "base"
dir = "runs/base"
[model]
preset = "zamba-tiny"
[data]
seq_len = 32
[data.sources.web]
paths = ["synthetic:web"]
validation = ["synthetic:web"]
weight = 1.0
[batch]
sequences = 4
micro_batch = 2
[schedule]
kind = "cosine"
peak_lr = 1e-3
warmup_steps = 2
[train]
steps = 10
[checkpoint]
every = 5
[eval]
every = 5
batches = 1
"#;

/// Writes a metrics.jsonl and DONE like a finished run, and records what it ran.
struct FakeTrainer {
    ran: Mutex<Vec<String>>,
    fail: Option<String>,
}

impl FakeTrainer {
    fn new() -> Self {
        Self {
            ran: Mutex::new(Vec::new()),
            fail: None,
        }
    }
}

impl RunExecutor for FakeTrainer {
    fn execute(&self, point: &SweepPoint) -> Result<()> {
        self.ran.lock().unwrap().push(point.name.clone());
        if self.fail.as_deref() == Some(point.name.as_str()) {
            anyhow::bail!("diverged");
        }
        let config = RunConfig::load(&point.config_path, &[])?;
        assert_eq!(config.run.dir, point.run_dir);
        std::fs::create_dir_all(&config.run.dir)?;
        let wd = config.optimizer.weight_decay;
        let lr = config.schedule.peak_lr();
        let mut text = String::new();
        for step in 0..config.train.steps {
            let tokens = (step + 1) * config.tokens_per_step();
            let loss = 4.0 - step as f64 * 0.1 + wd + lr * 100.0;
            text.push_str(&format!("{{\"step\":{step},\"tokens\":{tokens},\"loss\":{loss},\"lr\":{},\"grad_norm\":1.0,\"tokens_per_sec\":10.0}}\n", config.lr(step as usize)));
            if (step + 1) % 5 == 0 {
                text.push_str(&format!("{{\"eval\":true,\"step\":{step},\"tokens\":{tokens},\"loss\":{{\"web\":{}}}}}\n", loss + 0.5 - step as f64 * 0.01));
            }
        }
        std::fs::write(config.run.dir.join("metrics.jsonl"), text)?;
        std::fs::write(config.run.dir.join("DONE"), "")?;
        Ok(())
    }
}

fn setup(sweep: &str) -> (tempfile::TempDir, SweepArgs) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("base.toml"), BASE).unwrap();
    std::fs::write(dir.path().join("sweep.toml"), sweep).unwrap();
    let args = SweepArgs {
        config: dir.path().join("base.toml"),
        sweep: dir.path().join("sweep.toml"),
        emit: false,
        jobs: 1,
        out: Some(dir.path().join("sweep-out")),
        set: vec![],
    };
    (dir, args)
}

#[test]
fn grid_and_zip_expand_to_the_product() {
    let spec = SweepSpec::from_toml_str(
        "[grid]\n\"optimizer.weight_decay\" = [0.0, 0.1]\nschedule.peak_lr = [1e-3, 3e-3, 1e-2]\n[zip]\n\"train.steps\" = [10, 20]\n\"checkpoint.every\" = [5, 10]\n",
    )
    .unwrap();
    assert_eq!(
        spec.keys(),
        vec![
            "optimizer.weight_decay",
            "schedule.peak_lr",
            "checkpoint.every",
            "train.steps"
        ]
    );
    let points = spec.points();
    assert_eq!(points.len(), 2 * 3 * 2);
    // First key varies slowest; zipped keys move together.
    let show = |p: &Vec<(String, toml::Value)>| {
        p.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        show(&points[0]),
        "optimizer.weight_decay=0.0 schedule.peak_lr=0.001 checkpoint.every=5 train.steps=10"
    );
    assert_eq!(
        show(&points[1]),
        "optimizer.weight_decay=0.0 schedule.peak_lr=0.001 checkpoint.every=10 train.steps=20"
    );
    assert_eq!(
        show(&points[11]),
        "optimizer.weight_decay=0.1 schedule.peak_lr=0.01 checkpoint.every=10 train.steps=20"
    );
    let names = point_names(&spec.keys(), &points);
    assert_eq!(names[0], "weight_decay=0.0,peak_lr=0.001,every=5,steps=10");
    assert_eq!(
        names
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        names.len()
    );

    // Keys sharing a last segment get the shortest distinguishing suffix.
    let spec = SweepSpec::from_toml_str(
        "[grid]\n\"data.sources.web.weight\" = [1.0]\n\"data.sources.code.weight\" = [0.5]\n",
    )
    .unwrap();
    assert_eq!(
        point_names(&spec.keys(), &spec.points()),
        vec!["code.weight=0.5,web.weight=1.0"]
    );

    for (bad, needle) in [
        (
            "[zip]\n\"train.steps\" = [1, 2]\n\"checkpoint.every\" = [1]\n",
            "equal lengths",
        ),
        ("[grdi]\n\"train.steps\" = [1]\n", "did you mean `grid`"),
        ("[grid]\n\"train.steps\" = 3\n", "list of values"),
        ("[grid]\n\"run.dir\" = [\"a\"]\n", "--out"),
        ("[grid]\n\"train.steps\" = []\n", "empty"),
        ("", "no values"),
    ] {
        let e = format!("{:#}", SweepSpec::from_toml_str(bad).unwrap_err());
        assert!(e.contains(needle), "{bad:?}: {e}");
    }
}

#[test]
fn runs_points_skips_finished_ones_and_summarizes() {
    let (_dir, args) = setup(
        "[grid]\n\"optimizer.weight_decay\" = [0.0, 0.1]\n\"schedule.peak_lr\" = [1e-3, 2e-3]\n",
    );
    let fake = FakeTrainer::new();
    let report = run_with(&args, &fake, Path::new("/usr/bin/zamba-train")).unwrap();
    assert_eq!(report.statuses, vec![PointStatus::Done; 4]);
    assert_eq!(fake.ran.lock().unwrap().len(), 4);
    let out = args.out.clone().unwrap();
    for p in &report.plan.points {
        assert!(p.run_dir.starts_with(&out) && p.run_dir.join("DONE").exists());
        // Each point has its own resolved config with its overrides, run.dir and run.name.
        let c = RunConfig::load(&p.config_path, &[]).unwrap();
        assert_eq!(c.run.dir, p.run_dir);
        assert_eq!(c.run.name, format!("base/{}", p.name));
        assert_eq!(
            c.optimizer.weight_decay,
            p.overrides[0].1.as_float().unwrap()
        );
    }
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.starts_with("| point | optimizer.weight_decay | schedule.peak_lr | final train loss | best eval loss web | last step | tokens | status |"), "{md}");
    // wd 0.1, lr 2e-3: final loss 4.0 - 0.9 + 0.1 + 0.2 = 3.4; best eval = eval at step 9: 3.4 + 0.5 - 0.09 = 3.81; tokens 10 × 128.
    assert!(
        md.contains(
            "| weight_decay=0.1,peak_lr=0.002 | 0.1 | 0.002 | 3.4000 | 3.8100 | 9 | 1280 | done |"
        ),
        "{md}"
    );
    let csv = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5);
    assert!(csv.lines().next().unwrap().starts_with(
        "point,optimizer.weight_decay,schedule.peak_lr,final train loss,best eval loss web"
    ));
    assert!(
        csv.contains("\"weight_decay=0.0,peak_lr=0.001\",0.0,0.001,3.2000,"),
        "{csv}"
    );

    // A re-run skips the finished points; an unfinished one (DONE removed) runs again.
    let redo = &report.plan.points[2];
    std::fs::remove_file(redo.run_dir.join("DONE")).unwrap();
    let fake = FakeTrainer::new();
    let report = run_with(&args, &fake, Path::new("/usr/bin/zamba-train")).unwrap();
    assert_eq!(*fake.ran.lock().unwrap(), vec![redo.name.clone()]);
    assert_eq!(
        report
            .statuses
            .iter()
            .filter(|s| **s == PointStatus::AlreadyDone)
            .count(),
        3
    );
    assert!(report.summary_markdown.contains("done (skipped)"));

    // A point whose run directory another trainer holds is not started a second time.
    let busy = &report.plan.points[1];
    std::fs::remove_file(busy.run_dir.join("DONE")).unwrap();
    let lock = zamba_train::run_lock::RunLock::acquire(&busy.run_dir).unwrap();
    let fake = FakeTrainer::new();
    let report = run_with(&args, &fake, Path::new("/usr/bin/zamba-train")).unwrap();
    assert!(fake.ran.lock().unwrap().is_empty());
    assert!(
        matches!(&report.statuses[1], PointStatus::RunningElsewhere(who) if who.contains(&format!("pid {}", std::process::id()))),
        "{:?}",
        report.statuses[1]
    );
    assert!(report.summary_markdown.contains("running elsewhere"));
    drop(lock);
}

#[test]
fn parallel_jobs_and_failures_are_reported() {
    let (_dir, mut args) = setup(
        "[zip]\n\"train.steps\" = [10, 20, 30]\n\"optimizer.weight_decay\" = [0.0, 0.05, 0.1]\n",
    );
    args.jobs = 3;
    let mut fake = FakeTrainer::new();
    fake.fail = Some("weight_decay=0.05,steps=20".into());
    let report = run_with(&args, &fake, Path::new("zamba-train")).unwrap();
    let names: Vec<&str> = report.plan.points.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "weight_decay=0.0,steps=10",
            "weight_decay=0.05,steps=20",
            "weight_decay=0.1,steps=30"
        ]
    );
    assert_eq!(report.statuses[0], PointStatus::Done);
    assert_eq!(report.statuses[1], PointStatus::Failed("diverged".into()));
    assert_eq!(report.statuses[2], PointStatus::Done);
    assert!(report.summary_markdown.contains("failed: diverged"));
}

#[test]
fn bad_points_are_config_errors_before_anything_runs() {
    let (_dir, args) = setup("[grid]\n\"optimizer.beta3\" = [0.9]\n");
    let fake = FakeTrainer::new();
    let e = format!(
        "{:#}",
        run_with(&args, &fake, Path::new("zamba-train")).unwrap_err()
    );
    assert!(
        e.contains("optimizer.beta3") && e.contains("did you mean `optimizer.beta2`"),
        "{e}"
    );
    assert!(fake.ran.lock().unwrap().is_empty());
    let (_dir, args) = setup("[grid]\n\"batch.micro_batch\" = [2, 3]\n");
    let e = format!(
        "{:#}",
        run_with(&args, &fake, Path::new("zamba-train")).unwrap_err()
    );
    assert!(
        e.contains("micro_batch=3") && e.contains("batch.sequences"),
        "{e}"
    );
    assert!(fake.ran.lock().unwrap().is_empty());
}

#[test]
fn emit_writes_configs_and_a_slurm_array_script() {
    let (_dir, mut args) = setup("[grid]\n\"schedule.peak_lr\" = [1e-3, 2e-3, 4e-3]\n");
    args.emit = true;
    let fake = FakeTrainer::new();
    let exe = PathBuf::from("/opt/zamba/bin/zamba-train");
    let report = run_with(&args, &fake, &exe).unwrap();
    assert!(fake.ran.lock().unwrap().is_empty(), "--emit runs nothing");
    assert_eq!(report.statuses, vec![PointStatus::NotRun; 3]);
    let out = args.out.clone().unwrap();
    let sbatch = std::fs::read_to_string(out.join("sweep.sbatch")).unwrap();
    assert!(sbatch.starts_with("#!/bin/bash\n"));
    assert!(sbatch.contains("#SBATCH --array=0-2\n"), "{sbatch}");
    assert!(sbatch.contains("SLURM_ARRAY_TASK_ID"));
    assert!(sbatch.contains("'/opt/zamba/bin/zamba-train'"));
    for p in &report.plan.points {
        assert!(p.config_path.exists());
        let case = format!(
            "  {}) CONFIG='{}'; RUN_DIR='{}' ;;",
            p.index,
            p.config_path.display(),
            p.run_dir.display()
        );
        assert!(sbatch.contains(&case), "missing {case:?} in\n{sbatch}");
    }
    assert!(sbatch.contains("/DONE\" ]; then"));
    let run_all = std::fs::read_to_string(out.join("run_all.sh")).unwrap();
    assert_eq!(
        run_all.lines().filter(|l| l.starts_with("run '")).count(),
        3
    );

    // The emitted script selects the right config per array task.
    if Path::new("/bin/bash").exists() {
        let point = &report.plan.points[1];
        let script = sbatch.replace("exec \"$EXE\" --config \"$CONFIG\"", "echo \"$CONFIG\"");
        let output = std::process::Command::new("/bin/bash")
            .arg("-c")
            .arg(&script)
            .env("SLURM_ARRAY_TASK_ID", "1")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            point.config_path.display().to_string()
        );
    }
}

/// Records how many points run at once; each point waits until a second one has started, so a
/// pool that ran points one by one would time out instead of passing.
struct ConcurrencyProbe {
    active: Mutex<usize>,
    most: Mutex<usize>,
    arrived: std::sync::Condvar,
    inner: FakeTrainer,
}

impl RunExecutor for ConcurrencyProbe {
    fn execute(&self, point: &SweepPoint) -> Result<()> {
        {
            let mut active = self.active.lock().unwrap();
            *active += 1;
            {
                let mut most = self.most.lock().unwrap();
                *most = (*most).max(*active);
            }
            self.arrived.notify_all();
            let (_guard, timeout) = self
                .arrived
                .wait_timeout_while(active, std::time::Duration::from_secs(20), |_| {
                    *self.most.lock().unwrap() < 2
                })
                .unwrap();
            assert!(
                !timeout.timed_out(),
                "no second point ran alongside {}",
                point.name
            );
        }
        let result = self.inner.execute(point);
        *self.active.lock().unwrap() -= 1;
        result
    }
}

#[test]
fn jobs_bounds_how_many_points_run_at_once() {
    let (_dir, mut args) = setup("[grid]\n\"train.steps\" = [10, 11, 12, 13, 14, 15]\n");
    args.jobs = 2;
    let probe = ConcurrencyProbe {
        active: Mutex::new(0),
        most: Mutex::new(0),
        arrived: std::sync::Condvar::new(),
        inner: FakeTrainer::new(),
    };
    let report = run_with(&args, &probe, Path::new("zamba-train")).unwrap();
    assert_eq!(report.statuses, vec![PointStatus::Done; 6]);
    assert_eq!(
        *probe.most.lock().unwrap(),
        2,
        "--jobs 2 runs exactly two points at a time"
    );
}
