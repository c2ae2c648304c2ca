//! `zamba-train launch`: a torchrun-style launcher. It starts this node's ranks as copies of a
//! program with the rendezvous environment, prefixes their output with `[rank N]`, forwards
//! SIGINT/SIGTERM to them, and fails fast: when one rank fails, the others get SIGTERM, then
//! SIGKILL after a grace period, and the launcher exits non-zero naming the rank.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::DistError;
use crate::rendezvous::{TOKEN_ENV, TOKEN_FILE_ENV};
use crate::token::{check_token, generate_token, read_token_file};

/// `zamba-train launch` arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct LaunchArgs {
    /// Ranks to start on this node (one per GPU, or CPU ranks).
    #[arg(long)]
    pub nproc_per_node: usize,
    /// Nodes in the job; start one launcher per node.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0 .. nnodes-1 (node 0 hosts rank 0 and the rendezvous store).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, reachable from every node [default on one node: 127.0.0.1].
    #[arg(long)]
    pub master_addr: Option<String>,
    /// Port of the rendezvous store on node 0 [default on one node: a free port].
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Seconds the remaining ranks get to exit after SIGTERM, once one has failed, before SIGKILL.
    #[arg(long, default_value_t = 30.0)]
    pub grace_s: f64,
    /// Each rank's command-line arguments (after `--`), e.g. `-- --config run.toml`.
    #[arg(last = true, required = true)]
    pub args: Vec<OsString>,
}

/// Launches `args.nproc_per_node` copies of the running executable.
pub fn run(args: &LaunchArgs) -> Result<(), DistError> {
    let program = std::env::current_exe()
        .map_err(|e| DistError::io("launch: finding the zamba-train executable", e))?;
    launch(args, &program)
}

/// Launches `args.nproc_per_node` copies of `program` with `args.args`, waits for all, and
/// fails naming the first rank that failed.
pub fn launch(args: &LaunchArgs, program: &Path) -> Result<(), DistError> {
    let plan = Plan::new(args)?;
    // Registered before any child exists, so no signal is missed or kills the launcher.
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| DistError::io("launch: installing the SIGINT/SIGTERM handler", e))?;
    let (done_tx, done_rx) = mpsc::channel();
    let mut ranks = Vec::new();
    for local in 0..args.nproc_per_node {
        match plan.spawn(program, &args.args, local, &done_tx) {
            Ok(rank) => ranks.push(rank),
            Err(e) => {
                terminate(&mut ranks, Signal::SIGKILL);
                wait_all(&mut ranks);
                return Err(e);
            }
        }
    }
    drop(done_tx);
    eprintln!(
        "[launch] started ranks {}..{} of {} (node {} of {}), rendezvous at {}:{}",
        plan.first_rank,
        plan.first_rank + args.nproc_per_node - 1,
        plan.world,
        args.node_rank,
        args.nnodes,
        plan.master_addr,
        plan.master_port
    );
    let outcome = supervise(
        &mut ranks,
        &mut signals,
        Duration::from_secs_f64(args.grace_s.max(0.0)),
    );
    // Output threads end when the ranks' pipes close; wait a moment for their last lines.
    let flush_deadline = Instant::now() + Duration::from_secs(2);
    for _ in 0..2 * ranks.len() {
        let left = flush_deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    outcome
}

/// What every rank of this node gets.
struct Plan {
    world: usize,
    first_rank: usize,
    local_world: usize,
    master_addr: String,
    master_port: u16,
    token: String,
    rayon_threads: Option<usize>,
}

impl Plan {
    fn new(args: &LaunchArgs) -> Result<Self, DistError> {
        let invalid = |msg: String| Err(DistError::Invalid(format!("launch: {msg}")));
        if args.nproc_per_node == 0 || args.nnodes == 0 {
            return invalid("--nproc-per-node and --nnodes must be at least 1".into());
        }
        if args.node_rank >= args.nnodes {
            return invalid(format!(
                "--node-rank {} must be below --nnodes {}",
                args.node_rank, args.nnodes
            ));
        }
        let multi_node = args.nnodes > 1;
        let master_addr = match (&args.master_addr, multi_node) {
            (Some(addr), _) => addr.clone(),
            (None, false) => "127.0.0.1".into(),
            (None, true) => {
                return invalid(
                    "--master-addr (node 0's address) is required with --nnodes > 1".into(),
                );
            }
        };
        let master_port = match (args.master_port.filter(|&p| p != 0), multi_node) {
            (Some(port), _) => port,
            (None, false) => free_port(&master_addr)?,
            (None, true) => {
                return invalid(
                    "--master-port is required with --nnodes > 1 (the same on every node)".into(),
                );
            }
        };
        let token = job_token(multi_node)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let rayon_threads = std::env::var_os("RAYON_NUM_THREADS")
            .is_none()
            .then(|| (cores / args.nproc_per_node).max(1));
        Ok(Self {
            world: args.nnodes * args.nproc_per_node,
            first_rank: args.node_rank * args.nproc_per_node,
            local_world: args.nproc_per_node,
            master_addr,
            master_port,
            token,
            rayon_threads,
        })
    }

    fn spawn(
        &self,
        program: &Path,
        args: &[OsString],
        local: usize,
        done: &mpsc::Sender<()>,
    ) -> Result<Rank, DistError> {
        let rank = self.first_rank + local;
        let mut command = Command::new(program);
        command
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", self.world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", self.local_world.to_string())
            .env("MASTER_ADDR", &self.master_addr)
            .env("MASTER_PORT", self.master_port.to_string())
            .env(TOKEN_ENV, &self.token)
            .env_remove(TOKEN_FILE_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches the launcher only, which
            // forwards it once.
            .process_group(0);
        if let Some(threads) = self.rayon_threads {
            command.env("RAYON_NUM_THREADS", threads.to_string());
        }
        let launcher = nix::unistd::getpid();
        // SAFETY: the closure only makes async-signal-safe system calls (prctl, getppid).
        unsafe {
            command.pre_exec(move || {
                // Die with the launcher, even if it is SIGKILLed.
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                if nix::unistd::getppid() != launcher {
                    return Err(std::io::Error::other("the launcher exited"));
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            DistError::io(
                format!("launch: starting rank {rank} ({})", program.display()),
                e,
            )
        })?;
        let prefix = format!("[rank {rank}] ");
        forward_lines(child.stdout.take(), prefix.clone(), false, done.clone());
        forward_lines(child.stderr.take(), prefix, true, done.clone());
        Ok(Rank {
            rank,
            child,
            status: None,
        })
    }
}

/// A free TCP port on `addr`, for the rendezvous store (single node).
fn free_port(addr: &str) -> Result<u16, DistError> {
    let listener = std::net::TcpListener::bind((addr, 0))
        .map_err(|e| DistError::io(format!("launch: finding a free port on {addr}"), e))?;
    let port = listener
        .local_addr()
        .map_err(|e| DistError::io("launch: finding a free port", e))?
        .port();
    Ok(port)
}

/// The job's token: `ZAMBA_DIST_TOKEN`, else the file `ZAMBA_DIST_TOKEN_FILE` names, else (one
/// node only) a fresh one.
fn job_token(multi_node: bool) -> Result<String, DistError> {
    if let Some(token) = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()) {
        check_token(&token, TOKEN_ENV)?;
        return Ok(token);
    }
    if let Some(path) = std::env::var_os(TOKEN_FILE_ENV).filter(|p| !p.is_empty()) {
        let path = Path::new(&path);
        if !path.exists() {
            return Err(DistError::Invalid(format!(
                "launch: {TOKEN_FILE_ENV}={} does not exist; create it on a filesystem every node reads, e.g. \
                 `(umask 077; openssl rand -hex 32 > {})`",
                path.display(),
                path.display()
            )));
        }
        return read_token_file(path, Duration::ZERO);
    }
    if multi_node {
        return Err(DistError::Invalid(format!(
            "launch: a multi-node job needs the same secret on every node: set {TOKEN_ENV} (e.g. `export {TOKEN_ENV}=$(openssl rand -hex 32)`), \
             or {TOKEN_FILE_ENV} to a file readable only by you (mode 0600) holding it"
        )));
    }
    generate_token()
}

/// Copies a rank's output to ours, line by line, each line prefixed.
fn forward_lines(
    pipe: Option<impl Read + Send + 'static>,
    prefix: String,
    to_stderr: bool,
    done: mpsc::Sender<()>,
) {
    let Some(pipe) = pipe else { return };
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if line.last() != Some(&b'\n') {
                line.push(b'\n');
            }
            let mut out: Box<dyn Write> = if to_stderr {
                Box::new(std::io::stderr().lock())
            } else {
                Box::new(std::io::stdout().lock())
            };
            let _ = out.write_all(prefix.as_bytes());
            let _ = out.write_all(&line);
            let _ = out.flush();
        }
        let _ = done.send(());
    });
}

struct Rank {
    rank: usize,
    child: Child,
    /// Set once the process has exited and been reaped.
    status: Option<ExitStatus>,
}

impl Rank {
    fn signal(&self, signal: Signal) {
        // Only processes not yet reaped: their pid cannot have been reused.
        if self.status.is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
        }
    }
}

fn terminate(ranks: &mut [Rank], signal: Signal) {
    for rank in ranks.iter() {
        rank.signal(signal);
    }
}

fn wait_all(ranks: &mut [Rank]) {
    for rank in ranks.iter_mut() {
        if rank.status.is_none() {
            rank.status = rank.child.wait().ok();
        }
    }
}

fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => {
            let name = Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("?");
            format!("was killed by signal {sig} ({name})")
        }
        _ => format!("ended with {status}"),
    }
}

/// Waits for every rank; forwards signals; on the first failure stops the rest.
fn supervise(ranks: &mut [Rank], signals: &mut Signals, grace: Duration) -> Result<(), DistError> {
    let mut failure: Option<(usize, String)> = None;
    let mut kill_at: Option<Instant> = None;
    let mut stop_others = false;
    loop {
        for signal in signals.pending() {
            let signal = Signal::try_from(signal).unwrap_or(Signal::SIGTERM);
            eprintln!(
                "[launch] received {}, forwarding it to the ranks",
                signal.as_str()
            );
            terminate(ranks, signal);
        }
        for rank in ranks.iter_mut().filter(|r| r.status.is_none()) {
            let Ok(Some(status)) = rank.child.try_wait() else {
                continue;
            };
            rank.status = Some(status);
            if !status.success() && failure.is_none() {
                let what = describe(&status);
                eprintln!(
                    "[launch] rank {} (pid {}) {what}; stopping the other ranks",
                    rank.rank,
                    rank.child.id()
                );
                failure = Some((rank.rank, what));
                kill_at = Some(Instant::now() + grace);
                stop_others = true;
            }
        }
        if stop_others {
            terminate(ranks, Signal::SIGTERM);
            stop_others = false;
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            eprintln!("[launch] ranks still running {grace:?} after SIGTERM: SIGKILL");
            terminate(ranks, Signal::SIGKILL);
            kill_at = None;
        }
        if ranks.iter().all(|r| r.status.is_some()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match failure {
        None => Ok(()),
        Some((rank, what)) => Err(DistError::PeerLost {
            op: "launch".into(),
            rank,
            detail: format!("it {what}; the other ranks were stopped"),
        }),
    }
}
