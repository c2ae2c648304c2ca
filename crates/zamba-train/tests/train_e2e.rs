//! The trainer end to end on a tiny model and small synthetic data: the loss drops, a resumed run
//! continues bit-identically (also after a real SIGINT), an annealing run starts from exactly the
//! phase-1 weights.

mod common;

use std::path::Path;

use common::{SCHEDULE, copy_dir, options, step_losses, write_config};
use zamba_train::metrics::{DONE_FILE, metrics_path, read_metrics};
use zamba_train::train::train;

#[test]
fn loss_drops_and_resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = format!("{SCHEDULE}\n[train]\nsteps = 12\n");

    // Uninterrupted reference run.
    let full = write_config(tmp.path(), "full", &steps);
    train(&options(full)).unwrap();
    let full_dir = tmp.path().join("full");
    assert!(full_dir.join(DONE_FILE).exists());
    let reference = step_losses(&full_dir);
    assert_eq!(reference.len(), 12);
    let first = f64::from_bits(reference[0].1.unwrap());
    let last = f64::from_bits(reference[11].1.unwrap());
    assert!(last < first - 0.3, "loss did not drop: {first} → {last}");
    // On CPU without `runtime.peak_gflops`, MFU is relative to the peak measured at start, so
    // every step line has one (its size is a benchmark's business).
    let metrics = read_metrics(&metrics_path(&full_dir)).unwrap();
    for record in &metrics.steps {
        let mfu = record.mfu.expect("mfu on every CPU step line");
        assert!(
            mfu.is_finite() && mfu > 0.0,
            "step {}: mfu {mfu}",
            record.step
        );
    }

    // A run that "crashed" after step 6: its run dir holds the step-6 checkpoint and the metrics
    // written until the crash (including a step the checkpoint does not cover).
    let crashed = write_config(tmp.path(), "crashed", &steps);
    let crashed_dir = tmp.path().join("crashed");
    let ckpt = full_dir.join("checkpoints/step-00000006");
    copy_dir(&ckpt, &crashed_dir.join("checkpoints/step-00000006"));
    let text = std::fs::read_to_string(full_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let step_6 = lines
        .iter()
        .position(|l| l.starts_with("{\"step\":6,"))
        .expect("a step-6 line");
    let partial: Vec<String> = lines[..=step_6].iter().map(|l| l.to_string()).collect();
    std::fs::write(crashed_dir.join("metrics.jsonl"), partial.join("\n") + "\n").unwrap();

    train(&options(crashed)).unwrap();
    assert_eq!(
        step_losses(&crashed_dir),
        reference,
        "resumed losses differ from the uninterrupted run"
    );
}

#[test]
fn anneal_starts_from_exactly_the_phase1_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let phase1 = write_config(
        tmp.path(),
        "phase1",
        &format!("{SCHEDULE}\n[train]\nsteps = 3\n"),
    );
    train(&options(phase1)).unwrap();
    let ckpt = tmp.path().join("phase1/checkpoints/step-00000003");

    // Phase 2 from the phase-1 checkpoint, on a new mixture and a re-warm schedule. Its step 0
    // loss (before its first update) is the phase-1 model's loss on phase 2's first batch, so
    // a second phase-2 run initialised from the transformers export of the same weights must
    // report the same number.
    let anneal = |name: &str, from: &Path| {
        write_config(
            tmp.path(),
            name,
            &format!(
                r#"
[init]
from = "{}"
load_optimizer = false

[schedule]
kind = "anneal"
start_lr = 1e-4
peak_lr = 2e-3
warmup_steps = 2
final_lr = 1e-5
decay = "exponential"
half_life_steps = 1

[train]
steps = 4
"#,
                from.display()
            ),
        )
    };
    train(&options(anneal("anneal-ckpt", &ckpt))).unwrap();
    train(&options(anneal("anneal-hf", &ckpt.join("model")))).unwrap();
    let a = step_losses(&tmp.path().join("anneal-ckpt"));
    let b = step_losses(&tmp.path().join("anneal-hf"));
    assert_eq!(a[0].0, 0, "a new phase starts at step 0");
    assert_eq!(a, b);
    // And it is not a fresh model: a fresh init starts near ln(264) ≈ 5.58.
    let phase1_last = step_losses(&tmp.path().join("phase1"));
    let loss0 = f64::from_bits(a[0].1.unwrap());
    assert!(
        loss0 < f64::from_bits(phase1_last[0].1.unwrap()),
        "anneal step 0 loss {loss0} looks like a fresh model"
    );

    // Optimizer moments cannot come from a transformers directory.
    let bad = write_config(
        tmp.path(),
        "anneal-bad",
        &format!(
            "[init]\nfrom = \"{}\"\nload_optimizer = true\n{SCHEDULE}\n[train]\nsteps = 4\n",
            ckpt.join("model").display()
        ),
    );
    let err = format!("{:#}", train(&options(bad)).unwrap_err());
    assert!(err.contains("load_optimizer"), "{err}");
}

#[test]
fn sigint_checkpoints_and_the_rerun_matches_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = format!("{SCHEDULE}\n[train]\nsteps = 300\n");
    let reference_config = write_config(tmp.path(), "reference", &steps);
    train(&options(reference_config)).unwrap();
    let reference = step_losses(&tmp.path().join("reference"));

    let config = write_config(tmp.path(), "interrupted", &steps);
    let run_dir = tmp.path().join("interrupted");
    let launch = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_zamba-train"))
            .arg("--config")
            .arg(&config)
            .args(["--set", "checkpoint.every=1000"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = launch();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while std::fs::read_to_string(run_dir.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the run wrote no metrics"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(
        child.wait().unwrap().success(),
        "SIGINT must end the run with exit code 0"
    );
    assert!(
        !run_dir.join(DONE_FILE).exists(),
        "the run finished before the signal; the test needs more steps"
    );
    let saved = zamba_train::checkpoint::list(&run_dir).unwrap();
    assert_eq!(saved.len(), 1, "one checkpoint, written on SIGINT");
    assert!(saved[0].0 < 300);

    assert!(launch().wait().unwrap().success());
    assert!(run_dir.join(DONE_FILE).exists());
    assert_eq!(step_losses(&run_dir), reference);
}
