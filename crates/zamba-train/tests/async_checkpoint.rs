//! Checkpoints written in the background (`checkpoint.async`): a process killed in the middle of
//! a write leaves the previous checkpoint the newest and the resumed run bit-identical to one
//! that was never interrupted; a write that fails stops the run with an error; a signal waits
//! for the pending write and for its own checkpoint; every checkpoint's cost is in the metrics.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use safetensors::SafeTensors;

use common::{SCHEDULE, options, step_losses, write_config};
use zamba_train::checkpoint;
use zamba_train::metrics::{DONE_FILE, read_metrics};
use zamba_train::train::train;

const BIN: &str = env!("CARGO_BIN_EXE_zamba-train");
const ASYNC: &str = "checkpoint.async=true";

fn steps_config(dir: &Path, name: &str, steps: usize) -> std::path::PathBuf {
    write_config(
        dir,
        name,
        &format!("{SCHEDULE}\n[train]\nsteps = {steps}\n"),
    )
}

fn checkpoint_steps(run_dir: &Path) -> Vec<u64> {
    checkpoint::list(run_dir)
        .unwrap()
        .iter()
        .map(|(s, _)| *s)
        .collect()
}

fn model_bytes(run_dir: &Path, step: u64) -> Vec<u8> {
    let dir = run_dir.join(format!("checkpoints/step-{step:08}"));
    std::fs::read(dir.join("model/model.safetensors")).unwrap()
}

#[test]
fn a_kill_during_a_background_write_keeps_the_previous_checkpoint_and_resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    // The reference: written while the step loop waits (the CPU default).
    train(&options(steps_config(tmp.path(), "reference", 9))).unwrap();
    let reference_dir = tmp.path().join("reference");
    let reference = step_losses(&reference_dir);

    // Killed (SIGKILL) by its writer thread once the step-6 checkpoint's files are on disk and
    // before it is sealed, while the step loop trains on.
    let config = steps_config(tmp.path(), "killed", 9);
    let run_dir = tmp.path().join("killed");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["--set", ASYNC])
        .env("ZAMBA_INJECT_FAULT", "kill-writing:rank=0:step=6")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("kills itself while the checkpoint of step 6"),
        "{stderr}"
    );
    assert!(
        run_dir
            .join("checkpoints/step-00000006.tmp/trainer.json")
            .exists(),
        "the step-6 write was under way"
    );
    assert_eq!(checkpoint_steps(&run_dir), vec![3]);
    checkpoint::verify(&run_dir.join("checkpoints/step-00000003")).unwrap();

    // Resumed in the background too: from step 3, as if never interrupted.
    let mut resume = options(config);
    resume.overrides = vec![ASYNC.into()];
    train(&resume).unwrap();
    assert_eq!(step_losses(&run_dir), reference);
    assert_eq!(checkpoint_steps(&run_dir), vec![3, 6, 9]);
    for step in [6, 9] {
        checkpoint::verify(&run_dir.join(format!("checkpoints/step-{step:08}"))).unwrap();
        assert_eq!(
            model_bytes(&run_dir, step),
            model_bytes(&reference_dir, step),
            "step {step}"
        );
    }
    assert!(checkpoint::incomplete(&run_dir).unwrap().is_empty());

    // Each checkpoint's cost: the reference waited for whole writes; the killed and the
    // resumed run wrote in the background (the last checkpoint is waited for either way).
    let cost = |dir: &Path| {
        read_metrics(&dir.join("metrics.jsonl"))
            .unwrap()
            .checkpoints
    };
    let summary = |dir: &Path| {
        cost(dir)
            .iter()
            .map(|c| (c.step, c.asynchronous))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        summary(&reference_dir),
        vec![(2, false), (5, false), (8, false)]
    );
    assert_eq!(summary(&run_dir), vec![(2, true), (5, true), (8, true)]);
    for c in cost(&reference_dir).iter().chain(&cost(&run_dir)) {
        assert!(c.stall_s > 0.0 && c.stall_s <= c.write_s, "{c:?}");
        assert!(c.wait_s <= c.stall_s, "{c:?}");
        if !c.asynchronous {
            assert_eq!((c.stall_s, c.wait_s), (c.write_s, c.write_s), "{c:?}");
        }
    }
}

#[test]
fn two_ranks_with_sharded_optimizer_state_write_in_the_background_what_they_write_waiting() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = format!(
        "{SCHEDULE}\n[train]\nsteps = 4\n[runtime]\nworld_size = 2\n[optimizer]\nzero = 1\n"
    );
    let mut runs = Vec::new();
    for (name, asynchronous) in [("waiting", false), ("background", true)] {
        let mut opts = options(write_config(tmp.path(), name, &extra));
        opts.overrides = vec![format!("checkpoint.async={asynchronous}")];
        train(&opts).unwrap();
        runs.push(tmp.path().join(name));
    }
    assert_eq!(step_losses(&runs[0]), step_losses(&runs[1]));
    for run in &runs {
        assert_eq!(checkpoint_steps(run), vec![3, 4]);
        assert!(checkpoint::incomplete(run).unwrap().is_empty());
    }
    // The same contents: the model and trainer state (rank 0) byte for byte, each rank's
    // optimizer part tensor for tensor (the order of a safetensors header's metadata entries is
    // not fixed).
    for step in [3, 4] {
        let dir = |run: &Path| {
            let dir = run.join(format!("checkpoints/step-{step:08}"));
            checkpoint::verify(&dir).unwrap();
            dir
        };
        let (waiting, background) = (dir(&runs[0]), dir(&runs[1]));
        for file in ["model/model.safetensors", "trainer.json"] {
            let read = |dir: &Path| std::fs::read(dir.join(file)).unwrap();
            assert!(read(&waiting) == read(&background), "step {step}: {file}");
        }
        for rank in 0..2 {
            let file = format!("optimizer/part-0000{rank}-of-00002.safetensors");
            assert_eq!(
                part_contents(&waiting.join(&file)),
                part_contents(&background.join(&file)),
                "step {step}: {file}"
            );
        }
    }
}

/// An optimizer part's metadata and tensors (name → bytes).
fn part_contents(path: &Path) -> (BTreeMap<String, String>, BTreeMap<String, Vec<u8>>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = metadata
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let tensors = SafeTensors::deserialize(&bytes)
        .unwrap()
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().to_vec()))
        .collect();
    (metadata, tensors)
}

#[test]
fn a_background_write_that_fails_stops_the_run_and_keeps_the_earlier_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let config = steps_config(tmp.path(), "full-disk", 6);
    train(&options(config.clone())).unwrap();
    let run_dir = tmp.path().join("full-disk");
    std::fs::remove_file(run_dir.join(DONE_FILE)).unwrap();

    // Resumed to step 12 with a 64 KiB limit on file size (RLIMIT_FSIZE, as a full disk would:
    // writes fail): the step-9 checkpoint, written in the background, fails, and the run stops
    // at a step boundary after it with an error instead of training on.
    let out = common::train_on_a_full_disk(&config, &["train.steps=12", ASYNC]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the checkpoint after step 8 failed")
            && stderr.contains("step-00000009.tmp")
            && stderr.contains("intact"),
        "{stderr}"
    );
    assert!(checkpoint::incomplete(&run_dir).unwrap().is_empty());
    assert_eq!(checkpoint_steps(&run_dir), vec![3, 6]);
    checkpoint::verify(&run_dir.join("checkpoints/step-00000006")).unwrap();
    let last = read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .last_step();
    assert!(last < Some(11), "the run went on to {last:?}");
}

#[test]
fn a_signal_waits_for_the_pending_write_and_checkpoints_the_step_it_stopped_at() {
    let tmp = tempfile::tempdir().unwrap();
    let config = steps_config(tmp.path(), "signalled", 2000);
    let run_dir = tmp.path().join("signalled");
    // A checkpoint after every step: one is almost always being written.
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["--set", ASYNC, "--set", "checkpoint.every=1"])
        .args([
            "--set",
            "eval.every=0",
            "--set",
            "checkpoint.keep_last=1000",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while step_losses_or_empty(&run_dir) < 3 {
        assert!(Instant::now() < deadline, "the run wrote no metrics");
        std::thread::sleep(Duration::from_millis(5));
    }
    let signalled = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("checkpoint written"), "{stderr}");

    // Every checkpoint from the first to the step the signal stopped at is sealed and
    // verifies; none is left half-written.
    assert!(checkpoint::incomplete(&run_dir).unwrap().is_empty());
    let steps = checkpoint_steps(&run_dir);
    let trained = read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .last_step()
        .unwrap();
    assert_eq!(steps, (1..=trained + 1).collect::<Vec<_>>());
    for step in steps {
        checkpoint::verify(&run_dir.join(format!("checkpoints/step-{step:08}"))).unwrap();
    }
    assert!(!run_dir.join(DONE_FILE).exists());
}

/// Step lines written so far (the last may be half-written).
fn step_losses_or_empty(run_dir: &Path) -> usize {
    std::fs::read_to_string(run_dir.join("metrics.jsonl")).map_or(0, |t| {
        t.lines().filter(|l| l.starts_with("{\"step\"")).count()
    })
}
