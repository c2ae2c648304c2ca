//! Data parallelism end to end on the CPU: ranks as threads and as processes (through
//! `zamba-train launch`) train like one rank on the same global batch; ZeRO-1 trains like plain
//! data parallelism and its checkpoints resume on other world sizes; a dead rank stops the job
//! with a message naming it; SIGTERM to the launcher checkpoints every rank at the same step.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{SCHEDULE, free_port, options, step_losses, weights, write_config};
use zamba_train::checkpoint::{self, TrainerState};
use zamba_train::metrics::DONE_FILE;
use zamba_train::train::{TrainOptions, train};

const BIN: &str = env!("CARGO_BIN_EXE_zamba-train");

/// A run of 6 steps: 8 sequences per step in micro-batches of 2, so 1, 2 and 4 ranks accumulate
/// 4, 2 and 1 micro-batches of the same rows.
fn run_config(tmp: &Path, name: &str, world: usize, zero: u8) -> TrainOptions {
    let config = write_config(tmp, name, &format!("{SCHEDULE}\n[train]\nsteps = 6\n"));
    let mut opts = options(config);
    opts.overrides = vec![
        "batch.micro_batch=2".into(),
        format!("runtime.world_size={world}"),
        format!("optimizer.zero={zero}"),
        "dist.timeout_s=60".into(),
    ];
    opts
}

fn losses(run_dir: &Path) -> Vec<f64> {
    step_losses(run_dir)
        .into_iter()
        .map(|(_, bits)| f64::from_bits(bits.unwrap()))
        .collect()
}

/// All weights of the newest checkpoint, flat.
fn final_weights(run_dir: &Path) -> Vec<f32> {
    let (_, dir) = checkpoint::list(run_dir).unwrap().pop().unwrap();
    weights(&dir)
}

fn trainer_state(run_dir: &Path) -> TrainerState {
    let (_, dir) = checkpoint::list(run_dir).unwrap().pop().unwrap();
    serde_json::from_str(&std::fs::read_to_string(dir.join("trainer.json")).unwrap()).unwrap()
}

/// Largest difference relative to the largest magnitude.
fn relative_gap(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    let gap = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) as f64;
    gap / scale
}

/// Float sums in another order: the tolerance of world N against world 1.
const LOSS_TOL: f64 = 1e-5;
const WEIGHT_TOL: f64 = 1e-5;

#[test]
fn two_and_four_thread_ranks_train_like_one_and_zero1_like_plain_data_parallelism() {
    let tmp = tempfile::tempdir().unwrap();
    train(&run_config(tmp.path(), "w1", 1, 0)).unwrap();
    let reference = losses(&tmp.path().join("w1"));
    let weights = final_weights(&tmp.path().join("w1"));
    for (world, zero) in [(2, 0), (4, 0), (2, 1), (4, 1)] {
        let name = format!("w{world}-zero{zero}");
        train(&run_config(tmp.path(), &name, world, zero)).unwrap();
        let dir = tmp.path().join(&name);
        let got = losses(&dir);
        assert_eq!(got.len(), reference.len());
        for (step, (a, b)) in reference.iter().zip(&got).enumerate() {
            assert!(
                (a - b).abs() / a < LOSS_TOL,
                "{name} step {step}: {b} vs world 1's {a}"
            );
        }
        let gap = relative_gap(&weights, &final_weights(&dir));
        let worst = reference
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs() / a)
            .fold(0.0, f64::max);
        eprintln!("{name}: losses within {worst:e}, final weights within {gap:e} of world 1's");
        assert!(
            gap < WEIGHT_TOL,
            "{name}: final weights differ by {gap:e} relative"
        );
        assert_eq!(
            trainer_state(&dir).loader,
            trainer_state(&tmp.path().join("w1")).loader
        );
    }
    // ZeRO-1 is plain data parallelism with the optimizer state divided: bit for bit.
    for world in [2, 4] {
        let plain = tmp.path().join(format!("w{world}-zero0"));
        let zero = tmp.path().join(format!("w{world}-zero1"));
        assert_eq!(step_losses(&plain), step_losses(&zero));
        assert_eq!(final_weights(&plain), final_weights(&zero));
    }
}

#[test]
fn a_zero1_checkpoint_resumes_on_one_and_on_four_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    train(&run_config(tmp.path(), "w2", 2, 1)).unwrap();
    let full = tmp.path().join("w2");
    let reference = losses(&full);
    let step3 = full.join("checkpoints/step-00000003");
    assert!(
        step3
            .join("optimizer/part-00001-of-00002.safetensors")
            .exists()
    );
    for (world, zero) in [(1, 0), (4, 1)] {
        let name = format!("resumed-w{world}");
        let mut opts = run_config(tmp.path(), &name, world, zero);
        opts.resume = Some(step3.clone());
        train(&opts).unwrap();
        let dir = tmp.path().join(&name);
        let got = losses(&dir);
        assert_eq!(got.len(), 3, "steps 3, 4, 5");
        for (i, (a, b)) in reference[3..].iter().zip(&got).enumerate() {
            assert!(
                (a - b).abs() / a < LOSS_TOL,
                "{name} step {}: {b} vs {a}",
                i + 3
            );
        }
        // The same global batches: the loader is where the uninterrupted run's is.
        assert_eq!(trainer_state(&dir).loader, trainer_state(&full).loader);
        let gap = relative_gap(&final_weights(&full), &final_weights(&dir));
        assert!(gap < WEIGHT_TOL, "{name}: {gap:e}");
    }
}

fn wait_for_steps(run_dir: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::read_to_string(run_dir.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
        < n
    {
        assert!(
            Instant::now() < deadline,
            "{} wrote no metrics",
            run_dir.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `zamba-train launch --nproc-per-node 2 -- --config CONFIG ARGS…`
fn launch(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["launch", "--nproc-per-node", "2", "--"])
        .arg("--config")
        .arg(config);
    for a in args {
        cmd.args(["--set", a]);
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

#[test]
fn launched_processes_train_like_thread_ranks_and_sigterm_checkpoints_every_rank_at_one_step() {
    let tmp = tempfile::tempdir().unwrap();
    // Two processes on 6 steps against two threads: the same arithmetic up to float reordering.
    let threads = run_config(tmp.path(), "threads", 2, 0);
    train(&threads).unwrap();
    let config = write_config(
        tmp.path(),
        "procs",
        &format!("{SCHEDULE}\n[train]\nsteps = 6\n"),
    );
    let out = launch(&config, &["batch.micro_batch=2", "dist.timeout_s=60"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, b) = (
        losses(&tmp.path().join("threads")),
        losses(&tmp.path().join("procs")),
    );
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() / x < LOSS_TOL, "step {step}: {y} vs {x}");
    }
    let gap = relative_gap(
        &final_weights(&tmp.path().join("threads")),
        &final_weights(&tmp.path().join("procs")),
    );
    assert!(gap < WEIGHT_TOL, "{gap:e}");

    // SIGTERM to the launcher: every rank checkpoints at the same step and exits 0; the rerun
    // continues exactly as an uninterrupted launch.
    let long = format!("{SCHEDULE}\n[train]\nsteps = 150\n");
    let settings = [
        "batch.micro_batch=2",
        "checkpoint.every=1000",
        "eval.every=0",
        "optimizer.zero=1",
    ];
    let reference = write_config(tmp.path(), "reference", &long);
    assert!(launch(&reference, &settings).status().unwrap().success());
    let interrupted = write_config(tmp.path(), "interrupted", &long);
    let run_dir = tmp.path().join("interrupted");
    let child = launch(&interrupted, &settings).spawn().unwrap();
    wait_for_steps(&run_dir, 3);
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !run_dir.join(DONE_FILE).exists(),
        "the run ended before the signal; give it more steps"
    );
    let saved = checkpoint::list(&run_dir).unwrap();
    assert_eq!(saved.len(), 1, "one checkpoint, written on SIGTERM");
    for part in 0..2 {
        let path = saved[0]
            .1
            .join(format!("optimizer/part-{part:05}-of-00002.safetensors"));
        assert!(path.exists(), "rank {part} wrote its ZeRO-1 moments");
    }
    assert!(launch(&interrupted, &settings).status().unwrap().success());
    assert_eq!(
        step_losses(&run_dir),
        step_losses(&tmp.path().join("reference"))
    );
}

#[test]
fn a_killed_rank_stops_the_others_with_a_message_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        "doomed",
        &format!("{SCHEDULE}\n[train]\nsteps = 5000\n"),
    );
    let port = free_port().to_string();
    let rank = |r: usize| {
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args([
                "--set",
                "batch.micro_batch=2",
                "--set",
                // A killed rank's connection breaks at once; the time-out only has to cover the
                // start (data generated by rank 0 while rank 1 waits) on a loaded machine.
                "dist.timeout_s=60",
                "--set",
                "eval.every=0",
            ])
            .env("RANK", r.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("WORLD_SIZE", "2")
            .env("LOCAL_WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .env("ZAMBA_DIST_TOKEN", "0123456789abcdef0123456789abcdef")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let survivor = rank(0);
    let mut victim = rank(1);
    wait_for_steps(&tmp.path().join("doomed"), 2);
    victim.kill().unwrap();
    let _ = victim.wait();
    let started = Instant::now();
    let out = survivor.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains("rank 1") || stderr.contains("rank(s) [1]"),
        "{stderr}"
    );
}
