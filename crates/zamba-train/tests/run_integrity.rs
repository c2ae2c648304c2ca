//! Run integrity: one trainer per run directory, checkpoints verified against their manifests
//! (fallback to the newest good one, bit-identical continuation), and a checkpoint that cannot be
//! written (a full disk) stopping the run with earlier checkpoints intact.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{SCHEDULE, copy_dir, options, step_losses, write_config};
use zamba_train::checkpoint;
use zamba_train::metrics::DONE_FILE;
use zamba_train::train::train;

const BIN: &str = env!("CARGO_BIN_EXE_zamba-train");

fn step_lines(run_dir: &Path) -> usize {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .map_or(0, |t| t.lines().filter(|l| !l.contains("\"eval\"")).count())
}

#[test]
fn a_second_trainer_on_the_same_run_dir_is_refused_and_the_first_is_undisturbed() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        "busy",
        &format!("{SCHEDULE}\n[train]\nsteps = 2000\n"),
    );
    let run_dir = tmp.path().join("busy");
    let start = || {
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(["--set", "checkpoint.every=1000", "--set", "eval.every=0"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = start();
    let deadline = Instant::now() + Duration::from_secs(300);
    while step_lines(&run_dir) < 2 {
        assert!(Instant::now() < deadline, "the first run wrote no metrics");
        std::thread::sleep(Duration::from_millis(5));
    }
    let config_before = std::fs::read(run_dir.join("config.toml")).unwrap();
    let second = start().wait_with_output().unwrap();
    let message = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second trainer must fail");
    assert!(
        message.contains("in use by another trainer")
            && message.contains(&format!("pid {}", first.id())),
        "{message}"
    );
    assert_eq!(
        std::fs::read(run_dir.join("config.toml")).unwrap(),
        config_before
    );

    let killed = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert!(
        first.wait().unwrap().success(),
        "SIGTERM ends the first run with exit code 0"
    );
    let losses = step_losses(&run_dir);
    let steps: Vec<u64> = losses.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        steps,
        (0..steps.len() as u64).collect::<Vec<_>>(),
        "one line per step, in order"
    );
    let saved = checkpoint::list(&run_dir).unwrap();
    assert_eq!(saved.len(), 1);
    assert_eq!(
        saved[0].0,
        steps.len() as u64,
        "the SIGTERM checkpoint is at the last step"
    );
    checkpoint::verify(&saved[0].1).unwrap();
}

/// Flips one byte in the middle of `path`.
fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_corrupt_newest_checkpoint_is_skipped_and_the_continuation_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = format!("{SCHEDULE}\n[train]\nsteps = 9\n");
    let full = write_config(tmp.path(), "full", &steps);
    train(&options(full)).unwrap();
    let full_dir = tmp.path().join("full");
    let reference = step_losses(&full_dir);

    // A run that crashed after step 6, whose step-6 checkpoint then rotted.
    let crashed = write_config(tmp.path(), "crashed", &steps);
    let crashed_dir = tmp.path().join("crashed");
    for step in ["step-00000003", "step-00000006"] {
        copy_dir(
            &full_dir.join("checkpoints").join(step),
            &crashed_dir.join("checkpoints").join(step),
        );
    }
    let newest = crashed_dir.join("checkpoints/step-00000006");
    flip_byte(&newest.join("model/model.safetensors"));
    let err = format!("{:#}", checkpoint::verify(&newest).unwrap_err());
    assert!(
        err.contains("model/model.safetensors") && err.contains("contents changed"),
        "{err}"
    );

    // --resume of the bad checkpoint is refused; `[init] from` it too.
    let mut explicit = options(crashed.clone());
    explicit.resume = Some(newest.clone());
    let err = format!("{:#}", train(&explicit).unwrap_err());
    assert!(
        err.contains("refusing to resume") && err.contains("model.safetensors"),
        "{err}"
    );
    let init = write_config(
        tmp.path(),
        "init-bad",
        &format!("[init]\nfrom = \"{}\"\n{steps}", newest.display()),
    );
    let err = format!("{:#}", train(&options(init)).unwrap_err());
    assert!(err.contains("refusing to initialise"), "{err}");

    // Without --resume the trainer falls back to step 3 and continues exactly as the reference.
    train(&options(crashed)).unwrap();
    assert!(crashed_dir.join(DONE_FILE).exists());
    assert_eq!(
        step_losses(&crashed_dir),
        reference[3..],
        "steps 3.. rerun from the step-3 checkpoint"
    );

    // A truncated optimizer part is named too.
    let part = newest.join("optimizer/part-00000-of-00001.safetensors");
    let file = std::fs::OpenOptions::new().write(true).open(&part).unwrap();
    file.set_len(100).unwrap();
    let out = Command::new(BIN)
        .args(["checkpoint", "verify"])
        .arg(&newest)
        .arg(full_dir.join("checkpoints/step-00000009"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        text.contains("optimizer/part-00000-of-00001.safetensors: 100 bytes"),
        "{text}"
    );
    assert!(
        text.contains("ok      ") && text.contains("step-00000009"),
        "{text}"
    );
}

#[test]
fn a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_earlier_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        "full-disk",
        &format!("{SCHEDULE}\n[train]\nsteps = 6\n"),
    );
    train(&options(config.clone())).unwrap();
    let run_dir = tmp.path().join("full-disk");
    std::fs::remove_file(run_dir.join(DONE_FILE)).unwrap();

    // Resume for three more steps with a 64 KiB limit on file size (RLIMIT_FSIZE, as a full disk
    // would: writes fail), so the step-9 checkpoint's files cannot be written.
    let out = common::train_on_a_full_disk(&config, &["train.steps=9"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("step-00000009.tmp")
            && stderr.contains("earlier checkpoints")
            && stderr.contains("intact"),
        "{stderr}"
    );
    let checkpoints = run_dir.join("checkpoints");
    assert!(
        !checkpoints.join("step-00000009.tmp").exists(),
        "the partial checkpoint is removed"
    );
    let steps: Vec<u64> = checkpoint::list(&run_dir)
        .unwrap()
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(steps, vec![3, 6]);
    checkpoint::verify(&checkpoints.join("step-00000006")).unwrap();
    assert!(!run_dir.join(DONE_FILE).exists());
}

/// A finished run of 6 steps (checkpoints at 3 and 6) in `tmp/name`; its config.
fn finished_run(tmp: &Path, name: &str) -> std::path::PathBuf {
    let config = write_config(tmp, name, &format!("{SCHEDULE}\n[train]\nsteps = 6\n"));
    train(&options(config.clone())).unwrap();
    config
}

/// `zamba-train --config CONFIG --set …`: (success, stderr).
fn run_binary(config: &Path, sets: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(config);
    for set in sets {
        cmd.args(["--set", set]);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Rewrites one entry of a checkpoint's manifest (`None`: removes it; a new name: adds it).
fn edit_manifest(checkpoint: &Path, name: &str, entry: Option<serde_json::Value>) {
    let path = checkpoint.join("MANIFEST.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let files = manifest["files"].as_object_mut().unwrap();
    match entry {
        Some(entry) => files.insert(name.to_string(), entry),
        None => files.remove(name),
    };
    std::fs::write(&path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
}

#[test]
fn manifests_cannot_reach_outside_their_checkpoint_and_unlisted_parts_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let config = finished_run(tmp.path(), "contained");
    let run_dir = tmp.path().join("contained");
    let newest = run_dir.join("checkpoints/step-00000006");
    let failure = |dir: &Path| format!("{:#}", checkpoint::verify(dir).unwrap_err());

    // A path that does not exist is named as missing, not as an interrupted write.
    let e = failure(&run_dir.join("checkpoints/step-00000042"));
    assert!(e.contains("no such checkpoint directory"), "{e}");

    // Paths outside the checkpoint, and links, are refused without being read.
    let passwd = serde_json::json!({"bytes": 1, "blake3": "00"});
    for outside in ["../../../../../../etc/passwd", "/etc/passwd"] {
        let probe = tmp.path().join("probe");
        common::copy_dir(&newest, &probe);
        edit_manifest(&probe, outside, Some(passwd.clone()));
        let e = failure(&probe);
        assert!(
            e.contains(&format!("{outside}: not a path inside the checkpoint")),
            "{e}"
        );
        std::fs::remove_dir_all(&probe).unwrap();
    }
    let probe = tmp.path().join("probe");
    common::copy_dir(&newest, &probe);
    std::os::unix::fs::symlink("/dev/zero", probe.join("model/zeros")).unwrap();
    edit_manifest(
        &probe,
        "model/zeros",
        Some(serde_json::json!({"bytes": 0, "blake3": "00"})),
    );
    let e = failure(&probe);
    assert!(
        e.contains("model/zeros: ") && e.contains("is not a regular file"),
        "{e}"
    );
    std::fs::remove_dir_all(&probe).unwrap();

    // An optimizer part that the manifest does not list fails `verify`, so the trainer falls
    // back to the previous checkpoint and says why.
    let extra = newest.join("optimizer/part-00001-of-00002.safetensors");
    std::fs::copy(
        newest.join("optimizer/part-00000-of-00001.safetensors"),
        &extra,
    )
    .unwrap();
    let e = failure(&newest);
    assert!(
        e.contains("optimizer/part-00001-of-00002.safetensors: not in the manifest"),
        "{e}"
    );
    std::fs::remove_file(run_dir.join(DONE_FILE)).unwrap();
    let (ok, text) = run_binary(&config, &["train.steps=7"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("skipping")
            && text.contains("step-00000006")
            && text.contains("not in the manifest"),
        "{text}"
    );
    assert!(
        text.contains("resuming from") && text.contains("step-00000003"),
        "{text}"
    );
}

#[test]
fn a_finished_run_says_so_and_a_refused_run_leaves_the_run_directory_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let config = finished_run(tmp.path(), "finished");
    let run_dir = tmp.path().join("finished");
    let metrics = std::fs::read(run_dir.join("metrics.jsonl")).unwrap();

    let (ok, text) = run_binary(&config, &[]);
    assert!(ok, "{text}");
    assert!(
        text.contains("is already finished") && text.contains("step 6 of 6"),
        "{text}"
    );
    assert!(!text.contains("NaN"), "{text}");
    assert_eq!(
        std::fs::read(run_dir.join("metrics.jsonl")).unwrap(),
        metrics
    );

    // An interrupted write is skipped, saying so.
    let partial = run_dir.join("checkpoints/step-00000009");
    common::copy_dir(&run_dir.join("checkpoints/step-00000006"), &partial);
    std::fs::remove_file(partial.join("COMPLETE")).unwrap();

    // Another architecture: every checkpoint is refused, naming the key and both values, and
    // the run's config.toml is not replaced by the refused one.
    let saved_config = std::fs::read(run_dir.join("config.toml")).unwrap();
    let (ok, text) = run_binary(&config, &["train.steps=9", "model.num_attention_heads=4"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("step-00000009: no completion marker"),
        "{text}"
    );
    assert!(
        text.contains("model.num_attention_heads is 2 there but 4 in the config"),
        "{text}"
    );
    assert!(text.contains("no checkpoint in"), "{text}");
    assert_eq!(
        std::fs::read(run_dir.join("config.toml")).unwrap(),
        saved_config
    );
}
