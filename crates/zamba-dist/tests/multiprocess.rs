//! Real processes: ranks over TCP, a rank killed with SIGKILL, and the launcher (fail-fast,
//! output prefixes, signal forwarding). The test binary plays every part: started with
//! `--exact child_entry` and a role in the environment, that test becomes a rank or a launcher.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::FloatDType;
use common::*;
use zamba_dist::launch::{LaunchArgs, NodeCapacity, NodeRange, OpaqueJob, launch};
use zamba_dist::{Backend, DistError, DistOptions, Interrupt, ReduceOp, RendezvousInfo, init};

/// What a child process does (`ZAMBA_DIST_TEST_ROLE`).
const ROLE: &str = "ZAMBA_DIST_TEST_ROLE";
/// Number of ranks a launcher child starts.
const NPROC: &str = "ZAMBA_DIST_TEST_NPROC";

fn child_args() -> Vec<String> {
    ["--exact", "child_entry", "--nocapture", "--test-threads=1"]
        .map(String::from)
        .into()
}

/// Does nothing in a normal test run; in a child process, plays its role and exits.
#[test]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    // End the test harness's "test child_entry ... " line, so ours start on lines of their own.
    println!();
    let is_rank = std::env::var("RANK").is_ok();
    let code = if !is_rank {
        run_launcher()
    } else {
        match role.as_str() {
            "launcher-fail-fast" => fail_fast_rank(),
            "launcher-collectives" => collectives_rank(),
            "launcher-sigterm" => sigterm_rank(),
            "killed" => killed_scenario_rank(),
            "launcher-hang" => hang_rank(),
            "launcher-stubborn" => stubborn_rank(),
            "launcher-fingerprint" => fingerprint_rank(),
            "rendezvous-interrupt" => interrupted_rank(),
            other => panic!("unknown role {other}"),
        }
    };
    std::process::exit(code);
}

/// A shell script the launcher runs as its ranks instead of this binary (`sh -c SCRIPT`).
const SCRIPT: &str = "ZAMBA_DIST_TEST_SCRIPT";
/// Set: the launcher gets `--force`.
const FORCE: &str = "ZAMBA_DIST_TEST_FORCE";

fn run_launcher() -> i32 {
    let (program, rank_args) = match std::env::var(SCRIPT) {
        Ok(script) => ("/bin/sh".into(), vec!["-c".to_string(), script]),
        Err(_) => (std::env::current_exe().unwrap(), child_args()),
    };
    let args = LaunchArgs {
        nproc_per_node: std::env::var(NPROC).unwrap().parse().unwrap(),
        nnodes: NodeRange::fixed(1),
        node_rank: 0,
        master_addr: None,
        master_port: None,
        grace_s: 2.0,
        max_restarts: 0,
        rdzv_last_call_s: None,
        rdzv_timeout_s: 60.0,
        force: std::env::var_os(FORCE).is_some(),
        args: rank_args.into_iter().map(Into::into).collect(),
    };
    // The tests start more ranks than CI has cores: they mostly wait.
    let capacity = NodeCapacity {
        ranks: 8,
        what: "8 test slots".into(),
    };
    let job = OpaqueJob(args.args.clone());
    match launch(&args, &program, &capacity, &job) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

fn rank_from_env() -> usize {
    std::env::var("RANK").unwrap().parse().unwrap()
}

fn fail_fast_rank() -> i32 {
    let rank = rank_from_env();
    println!("hello from {rank}");
    eprintln!("err line {rank}");
    if rank == 1 {
        std::thread::sleep(Duration::from_millis(300));
        return 7;
    }
    std::thread::sleep(Duration::from_secs(60));
    0
}

fn collectives_rank() -> i32 {
    let info = RendezvousInfo::from_env().unwrap();
    let comm = init(&info, Backend::Tcp, &opts(20_000)).unwrap();
    exercise(&*comm);
    println!("rank {} done", info.rank);
    0
}

fn sigterm_rank() -> i32 {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone()).unwrap();
    println!("waiting");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("got SIGTERM, checkpointing");
    if stop.load(Ordering::SeqCst) { 0 } else { 9 }
}

fn killed_scenario_rank() -> i32 {
    let info = RendezvousInfo::from_env().unwrap();
    let comm = init(
        &info,
        Backend::Tcp,
        &DistOptions {
            timeout: Duration::from_secs(30),
            ..Default::default()
        },
    )
    .unwrap();
    comm.barrier().unwrap();
    if info.rank == 2 {
        println!("ready");
        std::thread::sleep(Duration::from_secs(60));
        return 0;
    }
    match comm.all_reduce(input(info.rank, 256, FloatDType::F32), ReduceOp::Sum) {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            3
        }
    }
}

/// Rank 1 hangs before the collective; rank 0 times out waiting for it and reports it.
fn hang_rank() -> i32 {
    let info = RendezvousInfo::from_env().unwrap();
    let comm = init(&info, Backend::Tcp, &opts(1_500)).unwrap();
    if info.rank == 1 {
        std::thread::sleep(Duration::from_secs(60));
        return 0;
    }
    match comm.all_reduce(input(info.rank, 16, FloatDType::F32), ReduceOp::Sum) {
        Ok(_) => 0,
        Err(e) => {
            zamba_dist::report_fault(&e);
            eprintln!("error: {e}");
            3
        }
    }
}

/// Ignores SIGTERM: only the launcher's SIGKILL ends it.
fn stubborn_rank() -> i32 {
    let ignored = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, ignored).unwrap();
    println!("waiting");
    std::thread::sleep(Duration::from_secs(60));
    0
}

/// Rank 1 brings another `data.seq_len` than rank 0.
fn fingerprint_rank() -> i32 {
    // The launcher sends SIGTERM to rank 0 once rank 1 has exited with the verdict; a trainer's
    // rank handles SIGTERM (zamba-train's `signals`) and so still reports it, and so does this one.
    signal_hook::flag::register(
        signal_hook::consts::SIGTERM,
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    let info = RendezvousInfo::from_env().unwrap();
    let mut opts = opts(30_000);
    opts.fingerprint.push("binary", "same");
    let seq_len = if info.rank == 1 { "128" } else { "64" };
    opts.fingerprint.push("data.seq_len", seq_len);
    opts.fingerprint
        .push("train.steps", if info.rank == 1 { "9" } else { "6" });
    match init(&info, Backend::Tcp, &opts) {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            3
        }
    }
}

/// Waits at the rendezvous for a rank that never comes, until SIGTERM.
fn interrupted_rank() -> i32 {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone()).unwrap();
    let info = RendezvousInfo::from_env().unwrap();
    let mut opts = opts(120_000);
    opts.interrupt =
        Interrupt::new(move || stop.load(Ordering::SeqCst).then(|| "SIGTERM".to_string()));
    println!("joining");
    match init(&info, Backend::Tcp, &opts) {
        Err(e @ DistError::Interrupted { .. }) => {
            eprintln!("error: {e}");
            4
        }
        Err(e) => {
            eprintln!("unexpected error: {e}");
            5
        }
        Ok(_) => 6,
    }
}

fn this_test_binary(role: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(child_args())
        .env(ROLE, role)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for a child with a deadline; kills it (and fails the test) if it overruns.
fn wait_bounded(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "child overran {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn sigterm(child: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_launcher_fails_fast_naming_the_rank_and_prefixes_output() {
    let start = Instant::now();
    let launcher = this_test_binary("launcher-fail-fast")
        .env(NPROC, "3")
        .spawn()
        .unwrap();
    let out = wait_bounded(launcher, Duration::from_secs(30));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "the others were not stopped promptly"
    );
    assert!(
        stderr.contains("launch: lost rank 1: it exited with status 7"),
        "{stderr}"
    );
    for rank in 0..3 {
        assert!(
            stdout.contains(&format!("[rank {rank}] hello from {rank}\n")),
            "{stdout}"
        );
        assert!(
            stderr.contains(&format!("[rank {rank}] err line {rank}\n")),
            "{stderr}"
        );
    }
    // Every line from a rank carries its prefix.
    for line in stdout.lines().filter(|l| l.contains("hello from")) {
        assert!(line.starts_with("[rank "), "{line}");
    }
}

#[test]
fn launched_ranks_run_every_collective_over_tcp() {
    let launcher = this_test_binary("launcher-collectives")
        .env(NPROC, "3")
        .spawn()
        .unwrap();
    let out = wait_bounded(launcher, Duration::from_secs(60));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for rank in 0..3 {
        assert!(
            stdout.contains(&format!("[rank {rank}] rank {rank} done")),
            "{stdout}"
        );
    }
}

#[test]
fn sigterm_to_the_launcher_reaches_every_rank() {
    let mut launcher = this_test_binary("launcher-sigterm")
        .env(NPROC, "2")
        .spawn()
        .unwrap();
    // Wait until both ranks are up, then SIGTERM the launcher only.
    let mut stdout = BufReader::new(launcher.stdout.take().unwrap());
    let mut seen = String::new();
    let mut waiting = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while waiting < 2 && Instant::now() < deadline {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
        waiting += line.contains("] waiting") as usize;
        seen.push_str(&line);
    }
    assert_eq!(waiting, 2, "{seen}");
    sigterm(&launcher);
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
        rest
    });
    let out = wait_bounded(launcher, Duration::from_secs(20));
    seen.push_str(&rest.join().unwrap());
    assert!(out.status.success(), "{seen}\n{}", text(&out.stderr));
    assert_eq!(
        seen.matches("got SIGTERM, checkpointing").count(),
        2,
        "{seen}"
    );
}

#[test]
fn a_killed_rank_is_named_by_the_other_processes() {
    let port = free_port();
    let world = 3;
    let mut children: Vec<Child> = (0..world)
        .map(|rank| {
            let mut cmd = this_test_binary("killed");
            cmd.env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("ZAMBA_DIST_TOKEN", TEST_TOKEN);
            cmd.spawn().unwrap()
        })
        .collect();
    let mut victim = children.pop().unwrap();
    let mut lines = BufReader::new(victim.stdout.take().unwrap()).lines();
    let ready = lines.any(|l| l.map(|l| l.contains("ready")).unwrap_or(false));
    assert!(ready, "rank 2 never got past the barrier");
    let killed_at = Instant::now();
    victim.kill().unwrap();
    victim.wait().unwrap();
    for (rank, child) in children.into_iter().enumerate() {
        let out = wait_bounded(child, Duration::from_secs(25));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "rank {rank}: {stderr}");
        assert!(stderr.contains("lost rank 2"), "rank {rank}: {stderr}");
    }
    assert!(killed_at.elapsed() < Duration::from_secs(20));
}

#[test]
fn the_launcher_blames_the_hung_rank_not_the_one_that_noticed() {
    let launcher = this_test_binary("launcher-hang")
        .env(NPROC, "2")
        .spawn()
        .unwrap();
    let out = wait_bounded(launcher, Duration::from_secs(60));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("launch: lost rank 1: rank 0 gave up on it"),
        "{stderr}"
    );
    assert!(stderr.contains("waiting for rank(s) [1]"), "{stderr}");
    assert!(
        !stderr.contains("zamba-dist fault:"),
        "the report is not copied: {stderr}"
    );
}

#[test]
fn the_launcher_escalates_to_sigkill_after_the_grace_period() {
    let mut launcher = this_test_binary("launcher-stubborn")
        .env(NPROC, "2")
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(launcher.stdout.take().unwrap());
    let mut waiting = 0;
    while waiting < 2 {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "a rank did not start"
        );
        waiting += line.contains("] waiting") as usize;
    }
    sigterm(&launcher);
    let out = wait_bounded(launcher, Duration::from_secs(30));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("after the signal: SIGKILL"), "{stderr}");
    assert!(
        stderr.contains("stopped by SIGTERM; not every rank exited cleanly")
            && stderr.contains("killed by signal 9 (SIGKILL)"),
        "{stderr}"
    );
}

#[test]
fn ranks_of_different_jobs_stop_at_the_rendezvous_naming_the_difference() {
    let launcher = this_test_binary("launcher-fingerprint")
        .env(NPROC, "2")
        .spawn()
        .unwrap();
    let out = wait_bounded(launcher, Duration::from_secs(60));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for rank in 0..2 {
        let line = format!(
            "[rank {rank}] error: the ranks do not run the same job: data.seq_len is \"128\" on rank 1 but \"64\" on rank 0"
        );
        assert!(stderr.contains(&line), "{stderr}");
    }
}

#[test]
fn a_signal_ends_the_wait_at_the_rendezvous() {
    let mut rank = this_test_binary("rendezvous-interrupt");
    rank.env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "0")
        .env("LOCAL_WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", free_port().to_string())
        .env("ZAMBA_DIST_TOKEN", TEST_TOKEN);
    let mut child = rank.spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("joining") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "the rank did not start"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    sigterm(&child);
    // Far below the rendezvous time-out of 120 s.
    let out = wait_bounded(child, Duration::from_secs(20));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("interrupted (SIGTERM)"), "{stderr}");
}

#[test]
fn the_launcher_refuses_more_ranks_than_the_node_has() {
    let launcher = this_test_binary("launcher-collectives")
        .env(NPROC, "9")
        .spawn()
        .unwrap();
    let out = wait_bounded(launcher, Duration::from_secs(20));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--nproc-per-node 9 is more than this node has: 8 test slots")
            && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(!stdout.contains("[rank "), "no rank was started: {stdout}");
}

#[test]
fn the_launcher_stops_spawning_once_a_rank_failed() {
    let tmp = std::env::temp_dir().join(format!("zamba-dist-spawned-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let nproc = 1000;
    let launcher = this_test_binary("launcher-shell")
        .env(NPROC, nproc.to_string())
        .env(FORCE, "1")
        .env(SCRIPT, format!("echo $RANK >> '{}'; exit 1", tmp.display()))
        .spawn()
        .unwrap();
    let out = wait_bounded(launcher, Duration::from_secs(120));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("exited with status 1"), "{stderr}");
    let started = std::fs::read_to_string(&tmp).unwrap().lines().count();
    let _ = std::fs::remove_file(&tmp);
    assert!(started < nproc, "all {nproc} ranks were started");
}
