//! A job that survives a lost rank, with CPU ranks as processes over TCP: a rank killed mid-run
//! makes `zamba-train launch --max-restarts` start every rank again from the newest checkpoint,
//! and the run ends with an uninterrupted run's losses, bit for bit, having trained on every
//! sample exactly once; a lost node's run goes on with fewer ranks and the same global batch;
//! restarts run out with a clear error; the SLURM script's restart loop does the same with srun.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{SCHEDULE, finish, free_port, stderr, step_losses, write_config};
use zamba_train::checkpoint::{self, TrainerState};
use zamba_train::metrics::read_metrics;
use zamba_train::samples::{self, SampleRecord};

const BIN: &str = env!("CARGO_BIN_EXE_zamba-train");
const STEPS: u64 = 12;
/// Sequences per step (common's config): 2 ranks accumulate 2 micro-batches of 2, 1 rank 4.
const GLOBAL: u64 = 8;
/// Float sums in another order: the tolerance of world 1 against world 2.
const LOSS_TOL: f64 = 1e-5;

/// The run's settings: checkpoints every 3 steps, sample ids on, no evaluation.
const SETTINGS: [&str; 5] = [
    "batch.micro_batch=2",
    "checkpoint.every=3",
    "eval.every=0",
    "logging.sample_ids=true",
    "dist.timeout_s=60",
];

fn config(tmp: &Path, name: &str) -> PathBuf {
    write_config(
        tmp,
        name,
        &format!("{SCHEDULE}\n[train]\nsteps = {STEPS}\n"),
    )
}

/// `zamba-train launch LAUNCH_ARGS… -- --config CONFIG --set …`
fn launch(config: &Path, launch_args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("launch")
        .args(launch_args)
        .arg("--")
        .arg("--config")
        .arg(config);
    for set in SETTINGS {
        cmd.args(["--set", set]);
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

fn trainer_state(run_dir: &Path) -> TrainerState {
    let (_, dir) = checkpoint::list(run_dir).unwrap().pop().unwrap();
    checkpoint::read_state(&dir).unwrap()
}

/// Every step once, in order, and every sample of the run exactly once: the source's stream
/// from its first window on, none skipped.
fn assert_each_sample_once(records: &[SampleRecord]) {
    let steps: Vec<u64> = records.iter().map(|r| r.step).collect();
    assert_eq!(steps, (0..STEPS).collect::<Vec<_>>());
    let mut seen = BTreeSet::new();
    for record in records {
        assert_eq!(record.samples.len() as u64, GLOBAL, "step {}", record.step);
        for (source, window) in &record.samples {
            assert_eq!(source, "web");
            assert!(
                seen.insert(*window),
                "window {window} again at step {}",
                record.step
            );
        }
    }
    assert_eq!(seen, (0..STEPS * GLOBAL).collect::<BTreeSet<_>>());
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

#[test]
fn a_lost_rank_or_node_is_restarted_and_the_run_ends_as_if_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference");
    let out = finish(
        launch(&config(tmp.path(), "reference"), &["--nproc-per-node", "2"])
            .spawn()
            .unwrap(),
        Duration::from_secs(600),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let reference_samples = samples::read(&reference).unwrap();
    assert_each_sample_once(&reference_samples);

    // Rank 1 is killed before step 5, on the first start only: the restart resumes both ranks
    // from the checkpoint after step 2 and trains steps 3 and 4 again.
    let killed = tmp.path().join("killed");
    let mut cmd = launch(
        &config(tmp.path(), "killed"),
        &["--nproc-per-node", "2", "--max-restarts", "2"],
    );
    cmd.env("ZAMBA_INJECT_FAULT", "kill:rank=1:step=5");
    let out = finish(cmd.spawn().unwrap(), Duration::from_secs(600));
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    // Rank 1's death, or rank 0's failure that blames it, whichever the launcher saw first.
    assert!(
        text.contains("[launch] restart 1 of 2: lost rank 1"),
        "{text}"
    );
    assert!(!text.contains("restart 2 of 2"), "{text}");
    assert_eq!(step_losses(&killed), step_losses(&reference));
    assert_eq!(samples::read(&killed).unwrap(), reference_samples);
    assert_eq!(
        trainer_state(&killed).loader,
        trainer_state(&reference).loader
    );

    // A node is lost: two launchers of one rank each play two nodes; node 1's launcher is
    // killed (its rank with it). Node 0 goes on alone: 4 micro-batches instead of 2, the same
    // global batch and samples, the same losses up to float order.
    let shrunk = tmp.path().join("shrunk");
    let shrunk_config = config(tmp.path(), "shrunk");
    let port = free_port().to_string();
    let node = |rank: &str| {
        let mut cmd = launch(
            &shrunk_config,
            &[
                "--nnodes",
                "1:2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                rank,
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                &port,
                "--max-restarts",
                "1",
                "--rdzv-last-call-s",
                "5",
                "--grace-s",
                "10",
            ],
        );
        cmd.env("ZAMBA_DIST_TOKEN", "0123456789abcdef0123456789abcdef");
        cmd.spawn().unwrap()
    };
    let node0 = node("0");
    let mut node1 = node("1");
    wait_for_steps(&shrunk, 4);
    node1.kill().unwrap();
    let _ = node1.wait();
    let out = finish(node0, Duration::from_secs(600));
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("[launch] restart 1 of 1: lost rank 1") && text.contains(
            "[launch] attempt 1: node(s) [0] of --nnodes 1:2, 1 ranks: the global batch of 8 sequences as 4 \
             micro-batch(es) of 2 per rank"
        ),
        "{text}"
    );
    let metrics = read_metrics(&shrunk.join("metrics.jsonl")).unwrap();
    let reference_metrics = read_metrics(&reference.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.steps.len(), reference_metrics.steps.len());
    let worlds: BTreeSet<usize> = metrics.steps.iter().map(|s| s.world_size).collect();
    assert_eq!(
        worlds,
        BTreeSet::from([1, 2]),
        "steps on 2 ranks, then on 1"
    );
    for (ours, theirs) in metrics.steps.iter().zip(&reference_metrics.steps) {
        assert_eq!(ours.tokens, theirs.tokens, "step {}", ours.step);
        let (a, b) = (ours.loss.unwrap(), theirs.loss.unwrap());
        assert!(
            (a - b).abs() / b < LOSS_TOL,
            "step {} on {} rank(s): {a} vs {b}",
            ours.step,
            ours.world_size
        );
    }
    assert_eq!(samples::read(&shrunk).unwrap(), reference_samples);
    assert_eq!(
        trainer_state(&shrunk).loader,
        trainer_state(&reference).loader
    );
}

#[test]
fn restarts_run_out_with_an_error_naming_every_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = launch(
        &config(tmp.path(), "doomed"),
        &["--nproc-per-node", "2", "--max-restarts", "1"],
    );
    cmd.env("ZAMBA_INJECT_FAULT", "exit:rank=1:step=1:restarts=any");
    let out = finish(cmd.spawn().unwrap(), Duration::from_secs(600));
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("[launch] restart 1 of 1: lost rank 1"),
        "{text}"
    );
    assert!(
        text.contains(
            "error: launch: giving up after 1 restart(s) (--max-restarts 1): lost rank 1"
        ) && text.contains("Earlier failures: restart 1 after: lost rank 1"),
        "{text}"
    );
    assert_eq!(
        text.matches("ZAMBA_INJECT_FAULT: rank 1 fails before step 1")
            .count(),
        2,
        "{text}"
    );
}

/// Stand-ins for srun, scontrol and zamba-train in `dir`: srun logs each call with its
/// restart count and exits with the next status of `codes`; scontrol says `nodes_left`;
/// zamba-train's dry run refuses a world of 6 ranks.
fn fake_slurm(dir: &Path, codes: &[u8], nodes_left: usize) {
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&path, perms).unwrap();
    };
    let codes: Vec<String> = codes.iter().map(u8::to_string).collect();
    std::fs::write(dir.join("codes"), codes.join("\n") + "\n").unwrap();
    write(
        "srun",
        format!(
            "#!/bin/sh\necho \"$ZAMBA_RESTART_COUNT $*\" >> {d}/calls\nn=$(wc -l < {d}/calls)\n\
             exit $(sed -n \"${{n}}p\" {d}/codes)\n",
            d = dir.display()
        ),
    );
    write(
        "scontrol",
        format!("#!/bin/sh\necho \"JobId=42 JobName=zamba-7b NumNodes={nodes_left} NumCPUs=8\"\n"),
    );
    write(
        "zamba-train",
        "#!/bin/sh\ncase \"$*\" in *runtime.world_size=6\\ *) exit 1;; esac\nexit 0\n".into(),
    );
}

fn sbatch(dir: &Path) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/slurm/zamba-7b.sbatch");
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap());
    Command::new("bash")
        .arg(script)
        .arg("run.toml")
        .current_dir(dir)
        .env("PATH", path)
        .env("ZAMBA_TRAIN", dir.join("zamba-train"))
        .env("TOKEN_DIR", dir.join("tokens"))
        .env("SLURM_JOB_ID", "42")
        .env("SLURM_JOB_NUM_NODES", "4")
        .env("SLURM_NTASKS_PER_NODE", "2")
        .env("MAX_RESTARTS", "2")
        .env("MIN_NODES", "2")
        .env_remove("SLURM_RESTART_COUNT")
        .output()
        .unwrap()
}

fn srun_calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_slurm_script_reruns_srun_on_the_nodes_left_and_within_bounds() {
    // One failure, after which 3 nodes are left; 3 × 2 ranks cannot keep the batch: 2 nodes.
    let tmp = tempfile::tempdir().unwrap();
    fake_slurm(tmp.path(), &[1, 0], 3);
    let out = sbatch(tmp.path());
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    let calls = srun_calls(tmp.path());
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        calls[0].starts_with("0 --kill-on-bad-exit=1 --cpu-bind=cores --nodes=4 --ntasks=8 ")
            && calls[0].ends_with("--config run.toml"),
        "{calls:?}"
    );
    assert!(
        calls[1].starts_with("1 --kill-on-bad-exit=1 --cpu-bind=cores --nodes=2 --ntasks=4 ")
            && calls[1].ends_with("--set runtime.world_size=4"),
        "{calls:?}"
    );
    assert!(
        text.contains("restart 1 of 2 on 2 node(s): srun exited with status 1 on 4 node(s)"),
        "{text}"
    );

    // Failing every time: two restarts, then the script gives up with srun's status.
    let tmp = tempfile::tempdir().unwrap();
    fake_slurm(tmp.path(), &[3, 3, 3, 0], 4);
    let out = sbatch(tmp.path());
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert_eq!(srun_calls(tmp.path()).len(), 3);
    assert!(
        text.contains(
            "giving up after 2 restart(s) (MAX_RESTARTS=2): srun exited with status 3 on 4 node(s)"
        ),
        "{text}"
    );
}
