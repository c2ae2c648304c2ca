//! The launcher's restarts with real processes: a failed rank makes every rank start again, up
//! to `--max-restarts` times, each restart logged with its cause; the launchers of several nodes
//! restart together, go on with the nodes left when one is lost, and leave out the nodes the
//! job cannot use. The ranks are shell scripts; the test binary plays the launchers (started
//! with `--exact launcher_entry` and its settings in the environment).

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{TEST_TOKEN, free_port};
use zamba_dist::launch::{Job, LaunchArgs, NodeCapacity, NodeRange, launch};

/// The ranks' shell script (`sh -c`); its presence makes this test binary a launcher.
const SCRIPT: &str = "ZAMBA_DIST_TEST_SCRIPT";
/// Launcher settings: `--nnodes`, `--node-rank`, `--master-port`, `--max-restarts`, and the
/// worlds the job accepts (comma-separated; unset: any).
const NNODES: &str = "ZAMBA_DIST_TEST_NNODES";
const NODE_RANK: &str = "ZAMBA_DIST_TEST_NODE_RANK";
const PORT: &str = "ZAMBA_DIST_TEST_PORT";
const MAX_RESTARTS: &str = "ZAMBA_DIST_TEST_MAX_RESTARTS";
const NPROC: &str = "ZAMBA_DIST_TEST_NPROC";
const WORLDS: &str = "ZAMBA_DIST_TEST_WORLDS";

/// A directory of its own under the system's temporary directory, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("zamba-dist-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A job that runs only on the worlds `WORLDS` lists.
struct ScriptJob {
    script: String,
    worlds: Option<Vec<usize>>,
}

impl Job for ScriptJob {
    fn on_world(&self, world: usize) -> Result<String, String> {
        match &self.worlds {
            Some(worlds) if !worlds.contains(&world) => {
                Err(format!("the job does not run on {world} ranks"))
            }
            _ => Ok(format!("{world} shell ranks")),
        }
    }

    fn rank_args(&self, _world: usize, _restarts: u32) -> Vec<OsString> {
        vec!["-c".into(), self.script.clone().into()]
    }
}

/// Does nothing in a normal test run; in a child process, is a launcher and exits.
#[test]
fn launcher_entry() {
    let Ok(script) = std::env::var(SCRIPT) else {
        return;
    };
    println!();
    let var = |name: &str| std::env::var(name).ok();
    let nnodes = NodeRange::parse(&var(NNODES).unwrap_or("1".into())).unwrap();
    let args = LaunchArgs {
        nproc_per_node: var(NPROC).map_or(1, |n| n.parse().unwrap()),
        nnodes,
        node_rank: var(NODE_RANK).map_or(0, |n| n.parse().unwrap()),
        master_addr: Some("127.0.0.1".into()),
        master_port: var(PORT).map(|p| p.parse().unwrap()),
        grace_s: 2.0,
        max_restarts: var(MAX_RESTARTS).map_or(0, |n| n.parse().unwrap()),
        // Long enough for the other launcher of a test to come; only a lost node waits it out.
        rdzv_last_call_s: Some(5.0),
        rdzv_timeout_s: 60.0,
        force: true,
        args: Vec::new(),
    };
    let job = ScriptJob {
        script,
        worlds: var(WORLDS).map(|w| w.split(',').map(|n| n.parse().unwrap()).collect()),
    };
    let capacity = NodeCapacity {
        ranks: 8,
        what: "8 test slots".into(),
    };
    let code = match launch(&args, Path::new("/bin/sh"), &capacity, &job) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// A launcher running `script` as its ranks, with `settings` (name, value) in its environment.
fn launcher(script: &str, settings: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "launcher_entry",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(SCRIPT, script)
    .env("ZAMBA_DIST_TOKEN", TEST_TOKEN)
    .env_remove("RANK")
    .env_remove("WORLD_SIZE")
    .env_remove("ZAMBA_RESTART_COUNT");
    for (name, value) in settings {
        cmd.env(name, value);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The output of `child`, which must exit within `limit`.
fn finish(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The lines the ranks appended to `log`, sorted.
fn starts(log: &Path) -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// The lines of `starts` of rank `rank`.
fn ranks_starts(starts: &[String], rank: &str) -> Vec<String> {
    starts
        .iter()
        .filter(|l| l.split(' ').next() == Some(rank))
        .cloned()
        .collect()
}

/// Each rank appends `RANK WORLD_SIZE ZAMBA_RESTART_COUNT` to `log`.
fn record(log: &Path) -> String {
    format!(
        "echo \"$RANK $WORLD_SIZE $ZAMBA_RESTART_COUNT\" >> '{}'; ",
        log.display()
    )
}

#[test]
fn a_failed_rank_restarts_every_rank_and_the_job_completes() {
    let tmp = TempDir::new("restart-once");
    let log = tmp.path().join("starts");
    // Rank 1 fails on the first start; rank 0 would run long, and is stopped.
    let script = format!(
        "{}if [ $ZAMBA_RESTART_COUNT = 0 ]; then if [ $RANK = 1 ]; then exit 7; fi; exec sleep 60; fi",
        record(&log)
    );
    let settings = [(NPROC, "2".into()), (MAX_RESTARTS, "2".into())];
    let out = finish(launcher(&script, &settings), Duration::from_secs(60));
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("[launch] restart 1 of 2: lost rank 1: it exited with status 7"),
        "{text}"
    );
    assert!(!text.contains("restart 2 of 2"), "{text}");
    // Rank 0 may be stopped before its first line: only rank 1's starts are certain.
    let lines = starts(&log);
    assert_eq!(ranks_starts(&lines, "1"), ["1 2 0", "1 2 1"]);
    assert!(lines.contains(&"0 2 1".to_string()), "{lines:?}");
}

#[test]
fn restarts_are_bounded_and_the_failure_says_every_cause() {
    let tmp = TempDir::new("restart-bounded");
    let log = tmp.path().join("starts");
    let script = format!(
        "{}if [ $RANK = 1 ]; then exit 3; fi; exec sleep 60",
        record(&log)
    );
    let settings = [(NPROC, "2".into()), (MAX_RESTARTS, "2".into())];
    let out = finish(launcher(&script, &settings), Duration::from_secs(60));
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for k in 1..=2 {
        assert!(
            text.contains(&format!("[launch] restart {k} of 2: lost rank 1")),
            "{text}"
        );
    }
    assert!(
        text.contains(
            "error: launch: giving up after 2 restart(s) (--max-restarts 2): lost rank 1: it exited with status 3"
        ) && text.contains("restart 2 after: lost rank 1"),
        "{text}"
    );
    assert_eq!(
        ranks_starts(&starts(&log), "1"),
        ["1 2 0", "1 2 1", "1 2 2"],
        "three starts"
    );
}

/// Two launchers on this host play two nodes of one rank each (`--nnodes 1:2`).
fn node(script: &str, node_rank: usize, port: u16, extra: &[(&str, String)]) -> Child {
    let mut settings = vec![
        (NNODES, "1:2".to_string()),
        (NODE_RANK, node_rank.to_string()),
        (PORT, port.to_string()),
        (MAX_RESTARTS, "1".into()),
    ];
    settings.extend(extra.iter().cloned());
    launcher(script, &settings)
}

#[test]
fn the_nodes_restart_together_and_go_on_with_the_nodes_left() {
    let tmp = TempDir::new("node-lost");
    let log = tmp.path().join("starts");
    let pid = |rank: usize| tmp.path().join(format!("pid-{rank}")).display().to_string();
    // First start: each rank writes its pid; rank 0 fails as soon as rank 1's process is gone
    // (as a collective would); rank 1 runs until its node is lost.
    // A process is gone once it is a zombie (its reaper may be slow) or has been reaped.
    let alive = "alive() { [ -e /proc/$1 ] && ! grep -q ') Z' /proc/$1/stat; }; ";
    let script = format!(
        "{alive}{}echo $$ > {}-$RANK; if [ $ZAMBA_RESTART_COUNT = 0 ]; then \
           if [ $RANK = 0 ]; then while [ ! -s {p1} ] || alive $(cat {p1}); do sleep 0.05; done; exit 5; fi; \
           exec sleep 60; fi",
        record(&log),
        tmp.path().join("pid").display(),
        p1 = pid(1),
    );
    let port = free_port();
    let node0 = node(&script, 0, port, &[]);
    let mut node1 = node(&script, 1, port, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !Path::new(&pid(1)).exists() {
        assert!(Instant::now() < deadline, "node 1's rank never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The node is lost: its launcher, and with it its rank (the parent-death signal).
    node1.kill().unwrap();
    let _ = node1.wait();
    let out = finish(node0, Duration::from_secs(60));
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("[launch] restart 1 of 1: lost rank 0: it exited with status 5"),
        "{text}"
    );
    assert!(
        text.contains("[launch] attempt 1: node(s) [0] of --nnodes 1:2, 1 ranks"),
        "{text}"
    );
    assert_eq!(starts(&log), ["0 1 1", "0 2 0", "1 2 0"]);
}

#[test]
fn a_node_the_job_cannot_use_stands_by_and_a_failure_on_another_node_restarts_all() {
    let tmp = TempDir::new("standby");
    let log = tmp.path().join("starts");
    // Node 1's rank fails on the first start; every node starts again.
    let script = format!(
        "{}if [ $ZAMBA_RESTART_COUNT = 0 ]; then if [ $RANK = 1 ]; then exit 9; fi; exec sleep 60; fi",
        record(&log)
    );
    let port = free_port();
    let both = [node(&script, 0, port, &[]), node(&script, 1, port, &[])];
    for (n, child) in both.into_iter().enumerate() {
        let out = finish(child, Duration::from_secs(60));
        let text = stderr(&out);
        assert!(out.status.success(), "node {n}: {text}");
        assert!(
            text.contains("[launch] restart 1 of 1: lost rank 1: it exited with status 9"),
            "node {n}: {text}"
        );
    }
    let lines = starts(&log);
    assert_eq!(ranks_starts(&lines, "1"), ["1 2 0", "1 2 1"]);
    assert!(lines.contains(&"0 2 1".to_string()), "{lines:?}");

    // A job that runs on 1 rank only: node 1 stands by while node 0 runs it, and both end.
    let log = tmp.path().join("standby");
    let script = record(&log);
    let port = free_port();
    let worlds = [(WORLDS, "1".to_string())];
    let both = [
        node(&script, 0, port, &worlds),
        node(&script, 1, port, &worlds),
    ];
    let outs: Vec<Output> = both
        .into_iter()
        .map(|c| finish(c, Duration::from_secs(60)))
        .collect();
    for (n, out) in outs.iter().enumerate() {
        assert!(out.status.success(), "node {n}: {}", stderr(out));
    }
    assert!(
        stderr(&outs[0]).contains(
            "node(s) [1] stand by: with 2 node(s) (2 ranks), the job does not run on 2 ranks"
        ),
        "{}",
        stderr(&outs[0])
    );
    assert!(
        stderr(&outs[1]).contains("node 1 stands by in attempt 0"),
        "{}",
        stderr(&outs[1])
    );
    assert_eq!(starts(&log), ["0 1 0"]);
}
