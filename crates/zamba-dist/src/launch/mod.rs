//! `zamba-train launch`: a torchrun-style launcher. It starts this node's ranks as copies of a
//! program with the rendezvous environment (no more than the node has GPUs or cores, unless
//! forced), prefixes their output with `[rank N]`, forwards SIGINT/SIGTERM to them, and fails
//! fast: when one rank fails, no more are started, the others get SIGTERM, then SIGKILL after a
//! grace period, and the launcher exits non-zero naming the rank at fault.

mod supervise;

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::DistError;
use crate::fault::FAULT_LINES_ENV;
use crate::rendezvous::{TOKEN_ENV, TOKEN_FILE_ENV};
use crate::token::{check_token, generate_token, read_token_file};
use supervise::{Faults, Output, Rank, Supervisor, forward_lines};

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
    /// Seconds the ranks get to exit after SIGTERM (sent when one rank failed, or forwarded from
    /// the launcher's own SIGINT/SIGTERM) before SIGKILL; must cover writing a checkpoint.
    #[arg(long, default_value_t = 30.0)]
    pub grace_s: f64,
    /// Start --nproc-per-node ranks even where that is more than this node's GPUs (or, for CPU
    /// ranks, its cores).
    #[arg(long)]
    pub force: bool,
    /// Each rank's command-line arguments (after `--`), e.g. `-- --config run.toml`.
    #[arg(last = true, required = true)]
    pub args: Vec<OsString>,
}

impl LaunchArgs {
    /// Refuses more ranks on this node than it has GPUs or cores, unless `--force`.
    pub fn check_capacity(&self, capacity: &NodeCapacity) -> Result<(), DistError> {
        if self.nproc_per_node <= capacity.ranks || self.force {
            return Ok(());
        }
        Err(DistError::Invalid(format!(
            "launch: --nproc-per-node {} is more than this node has: {} (one rank each); start at most {} \
             rank(s) here, or pass --force to start them anyway",
            self.nproc_per_node, capacity.what, capacity.ranks
        )))
    }
}

/// How many ranks this node can run: one per GPU, or one per CPU core for CPU ranks.
#[derive(Clone, Debug)]
pub struct NodeCapacity {
    pub ranks: usize,
    /// What limits it, for messages: "8 GPUs", "2 CPU cores".
    pub what: String,
}

impl NodeCapacity {
    /// One CPU rank per core.
    pub fn cpu_cores() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            ranks: cores,
            what: format!("{cores} CPU core(s)"),
        }
    }

    /// One rank per visible NVIDIA GPU from index `first` on (`CUDA_VISIBLE_DEVICES` if set,
    /// else the `/dev/nvidiaN` devices).
    pub fn gpus(first: usize) -> Self {
        let visible = visible_gpus();
        Self {
            ranks: visible.saturating_sub(first),
            what: match first {
                0 => format!("{visible} visible GPU(s)"),
                _ => format!("{visible} visible GPU(s), from cuda:{first} on"),
            },
        }
    }
}

fn visible_gpus() -> usize {
    if let Ok(list) = std::env::var("CUDA_VISIBLE_DEVICES") {
        let entries: Vec<&str> = list.split(',').map(str::trim).collect();
        // CUDA stops at the first invalid entry ("-1", "NoDevFiles").
        return entries
            .iter()
            .take_while(|e| !e.is_empty() && !e.starts_with('-') && *e != &"NoDevFiles")
            .count();
    }
    std::fs::read_dir("/dev").map_or(0, |dir| {
        dir.filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.strip_prefix("nvidia")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
            .count()
    })
}

/// Most ranks in a job (ranks travel as 32-bit numbers; this is far below).
const MAX_WORLD: usize = 1 << 20;
/// Longest `--grace-s`: a day.
const MAX_GRACE_S: f64 = 86_400.0;

/// Launches `args.nproc_per_node` copies of the running executable.
pub fn run(args: &LaunchArgs, capacity: &NodeCapacity) -> Result<(), DistError> {
    let program = std::env::current_exe()
        .map_err(|e| DistError::io("launch: finding the zamba-train executable", e))?;
    launch(args, &program, capacity)
}

/// Launches `args.nproc_per_node` copies of `program` with `args.args`, waits for all, and
/// fails naming the rank at fault. Spawning stops as soon as a rank has failed or a signal
/// came.
pub fn launch(args: &LaunchArgs, program: &Path, capacity: &NodeCapacity) -> Result<(), DistError> {
    let plan = Plan::new(args, capacity)?;
    // Registered before any child exists, so no signal is missed or kills the launcher.
    let signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| DistError::io("launch: installing the SIGINT/SIGTERM handler", e))?;
    let grace = Duration::from_secs_f64(args.grace_s);
    let mut supervisor = Supervisor::new(signals, grace);
    let (done_tx, done_rx) = mpsc::channel();
    for local in 0..args.nproc_per_node {
        if supervisor.poll() {
            break;
        }
        match plan.spawn(program, &args.args, local, &done_tx, &supervisor.faults) {
            Ok(rank) => supervisor.ranks.push(rank),
            Err(e) => {
                supervisor.abandon(e);
                break;
            }
        }
    }
    drop(done_tx);
    if supervisor.ranks.len() == args.nproc_per_node && !supervisor.stopping() {
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
    }
    supervisor.wait_all();
    // Output threads end when the ranks' pipes close; wait a moment for their last lines (a
    // rank's fault report among them).
    let flush_deadline = Instant::now() + Duration::from_secs(2);
    for _ in 0..2 * supervisor.ranks.len() {
        let left = flush_deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    supervisor.outcome()
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
    fn new(args: &LaunchArgs, capacity: &NodeCapacity) -> Result<Self, DistError> {
        let invalid = |msg: String| Err(DistError::Invalid(format!("launch: {msg}")));
        if args.nproc_per_node == 0 || args.nnodes == 0 {
            return invalid("--nproc-per-node and --nnodes must be at least 1".into());
        }
        args.check_capacity(capacity)?;
        let world = match args.nnodes.checked_mul(args.nproc_per_node) {
            Some(world) if world <= MAX_WORLD => world,
            _ => {
                return invalid(format!(
                    "--nnodes {} × --nproc-per-node {} is more than {MAX_WORLD} ranks",
                    args.nnodes, args.nproc_per_node
                ));
            }
        };
        if !(0.0..=MAX_GRACE_S).contains(&args.grace_s) {
            return invalid(format!(
                "--grace-s {} must be between 0 and {MAX_GRACE_S} seconds",
                args.grace_s
            ));
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
            world,
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
        faults: &Faults,
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
            .env(FAULT_LINES_ENV, "1")
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
        // SAFETY: between fork and exec the closure only makes async-signal-safe system calls
        // (prctl, getppid) and allocates nothing: its errors are plain errno values.
        unsafe {
            command.pre_exec(move || {
                // Die with the launcher, even if it is SIGKILLed.
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                if nix::unistd::getppid() != launcher {
                    // The launcher exited before this child armed its death signal.
                    return Err(nix::errno::Errno::ESRCH.into());
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
        for (pipe, to_stderr) in [
            (
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
                false,
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
                true,
            ),
        ] {
            let out = Output {
                rank,
                to_stderr,
                faults: faults.clone(),
                done: done.clone(),
            };
            forward_lines(pipe, out);
        }
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
