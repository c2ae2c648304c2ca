//! A data-parallel run that cannot go silently wrong, with real processes: ranks of different
//! jobs, or on run directories that are not shared, stop at the start naming why; a signal ends
//! every wait within seconds; the launcher refuses what cannot run before starting any rank.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{SCHEDULE, finish, free_port, stderr, write_config};

const BIN: &str = env!("CARGO_BIN_EXE_zamba-train");
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// Rank `rank` of a world of 2, started by hand (as under SLURM), with `--set` overrides.
fn rank(config: &Path, rank: usize, port: u16, sets: &[&str]) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(config);
    for set in ["batch.micro_batch=2", "eval.every=0"].iter().chain(sets) {
        cmd.args(["--set", set]);
    }
    cmd.env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("LOCAL_WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("ZAMBA_DIST_TOKEN", TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
}

fn config(tmp: &Path, name: &str, steps: usize) -> PathBuf {
    write_config(
        tmp,
        name,
        &format!("{SCHEDULE}\n[train]\nsteps = {steps}\n"),
    )
}

#[test]
fn ranks_with_different_configs_stop_at_the_rendezvous_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let config = config(tmp.path(), "mixed", 6);
    let port = free_port();
    let first = rank(&config, 0, port, &[]);
    let second = rank(&config, 1, port, &["data.seq_len=32"]);
    for (r, child) in [first, second].into_iter().enumerate() {
        let out = finish(child, Duration::from_secs(120));
        let text = stderr(&out);
        assert!(!out.status.success(), "rank {r}: {text}");
        assert!(
            text.contains("the ranks do not run the same job: data.seq_len is \"32\" on rank 1 but \"64\" on rank 0"),
            "rank {r}: {text}"
        );
    }
    let run_dir = tmp.path().join("mixed");
    assert!(
        !run_dir.join("config.toml").exists(),
        "a refused run writes no config.toml"
    );
}

#[test]
fn ranks_on_run_directories_that_are_not_shared_stop_at_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let config = config(tmp.path(), "scattered", 6);
    let port = free_port();
    // As with node-local scratch: the same config, another directory on each "node".
    let dirs = [tmp.path().join("node0/run"), tmp.path().join("node1/run")];
    let set = |d: &Path| format!("run.dir={}", d.display());
    let children = [
        rank(&config, 0, port, &[&set(&dirs[0])]),
        rank(&config, 1, port, &[&set(&dirs[1])]),
    ];
    for (r, child) in children.into_iter().enumerate() {
        let out = finish(child, Duration::from_secs(120));
        let text = stderr(&out);
        assert!(!out.status.success(), "rank {r}: {text}");
        assert!(
            text.contains("is not one directory shared by every rank: rank(s) [1] cannot read"),
            "rank {r}: {text}"
        );
    }
    for dir in &dirs {
        assert!(!dir.join("checkpoints").exists(), "{}", dir.display());
    }
}

#[test]
fn sigterm_during_the_rendezvous_ends_it_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let config = config(tmp.path(), "alone", 6);
    // Rank 1 never comes; the rendezvous would wait 120 s.
    let lonely = rank(&config, 0, free_port(), &["dist.timeout_s=120"]);
    std::thread::sleep(Duration::from_secs(2));
    signal(&lonely, nix::sys::signal::Signal::SIGTERM);
    let out = finish(lonely, Duration::from_secs(60));
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("interrupted (SIGTERM)") && text.contains("rendezvous"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn sigterm_while_waiting_for_a_hung_rank_ends_the_wait_after_the_grace() {
    let tmp = tempfile::tempdir().unwrap();
    let config = config(tmp.path(), "hung", 5000);
    let port = free_port();
    let sets = [
        "dist.timeout_s=300",
        "dist.signal_grace_s=1",
        "checkpoint.every=0",
    ];
    let waiting = rank(&config, 0, port, &sets);
    let hung = rank(&config, 1, port, &sets);
    let metrics = tmp.path().join("hung/metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 2 {
        assert!(Instant::now() < deadline, "the run wrote no metrics");
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(&hung, nix::sys::signal::Signal::SIGSTOP);
    signal(&waiting, nix::sys::signal::Signal::SIGTERM);
    // Far below the collective time-out of 300 s.
    let out = finish(waiting, Duration::from_secs(90));
    let text = stderr(&out);
    signal(&hung, nix::sys::signal::Signal::SIGKILL);
    drop(finish(hung, Duration::from_secs(30)));
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("interrupted (SIGTERM") && text.contains("the other ranks did not come"),
        "{text}"
    );
    assert!(text.contains("rerun the same command to resume"), "{text}");
}

#[test]
fn launch_refuses_more_cpu_ranks_than_cores_and_a_config_that_cannot_run() {
    let tmp = tempfile::tempdir().unwrap();
    let config = config(tmp.path(), "launched", 6);
    let launch = |nproc: &str, force: &[&str]| {
        Command::new(BIN)
            .args(["launch", "--nproc-per-node", nproc])
            .args(force)
            .args(["--", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = launch("1000000", &[]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("--nproc-per-node 1000000 is more than this node has")
            && text.contains("CPU core(s)")
            && text.contains("--force"),
        "{text}"
    );
    assert!(!text.contains("[rank "), "no rank was started: {text}");
    // 8 sequences in micro-batches of 4 cannot be split over 3 ranks: said once, before any rank.
    let out = launch("3", &["--force"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("with 3 ranks") && text.contains("runtime.world_size (3)"),
        "{text}"
    );
    assert!(!text.contains("[rank "), "no rank was started: {text}");
}
