//! `zamba-train launch`: a torchrun-style launcher. It starts this node's ranks as copies of a
//! program with the rendezvous environment (no more than the node has GPUs or cores, unless
//! forced), prefixes their output with `[rank N]`, forwards SIGINT/SIGTERM to them, and fails
//! fast: when one rank fails, no more are started and the others get SIGTERM, then SIGKILL after
//! a grace period. Then, without restarts, the launcher exits non-zero naming the rank at fault;
//! with `--max-restarts N` it starts every rank again (they resume from the newest checkpoint),
//! up to N times. A multi-node job with restarts or with a range of nodes (`--nnodes MIN:MAX`)
//! is coordinated by the launchers themselves through a store on node 0 ([`elastic`]): all nodes
//! restart together, with the nodes that are left.

mod attempt;
mod elastic;
mod ranks;
mod supervise;

use std::ffi::OsString;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use crate::DistError;
use crate::rendezvous::{TOKEN_ENV, TOKEN_FILE_ENV};
use crate::token::{check_token, generate_token, read_token_file};
use supervise::SignalWatch;

/// Set in every rank's environment: how many times the launcher has restarted the job's ranks
/// (0 on the first start).
pub const RESTART_COUNT_ENV: &str = "ZAMBA_RESTART_COUNT";

/// `zamba-train launch` arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct LaunchArgs {
    /// Ranks to start on this node (one per GPU, or CPU ranks).
    #[arg(long)]
    pub nproc_per_node: usize,
    /// Nodes in the job: N, or MIN:MAX for an elastic job that runs (and restarts) on as many of
    /// up to MAX nodes as have come, at least MIN; start one launcher per node.
    #[arg(long, default_value = "1", value_parser = NodeRange::parse)]
    pub nnodes: NodeRange,
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
    /// Start every rank again, up to this many times, when one dies, fails or hangs; the ranks
    /// resume from the newest checkpoint (0: the job ends at the first lost rank).
    #[arg(long, default_value_t = 0)]
    pub max_restarts: u32,
    /// Multi-node jobs with restarts or a range of nodes: once MIN nodes have come to a (re)start,
    /// how many seconds to wait for more [default: --grace-s + 10, so that the nodes still
    /// stopping their ranks after a failure are not left out].
    #[arg(long)]
    pub rdzv_last_call_s: Option<f64>,
    /// Multi-node jobs with restarts or a range of nodes: how many seconds a (re)start waits for
    /// MIN nodes before the job fails.
    #[arg(long, default_value_t = 600.0)]
    pub rdzv_timeout_s: f64,
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

    /// Whether the launchers of the nodes coordinate (re)starts through node 0's store: a
    /// multi-node job with restarts or with a range of nodes.
    pub fn is_elastic(&self) -> bool {
        self.nnodes.max > 1 && (self.max_restarts > 0 || self.nnodes.min < self.nnodes.max)
    }
}

/// `--nnodes`: a number of nodes, or the range MIN:MAX of an elastic job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeRange {
    pub min: usize,
    pub max: usize,
}

impl NodeRange {
    pub fn fixed(nodes: usize) -> Self {
        Self {
            min: nodes,
            max: nodes,
        }
    }

    /// `N` or `MIN:MAX`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let number = |s: &str| {
            s.trim().parse::<usize>().map_err(|_| {
                format!("{text:?} is not a number of nodes: give N or MIN:MAX, e.g. 16 or 12:16")
            })
        };
        let range = match text.split_once(':') {
            Some((min, max)) => Self {
                min: number(min)?,
                max: number(max)?,
            },
            None => Self::fixed(number(text)?),
        };
        if range.min == 0 {
            return Err(format!("{text:?}: a job needs at least 1 node"));
        }
        if range.min > range.max {
            return Err(format!(
                "{text:?}: MIN ({}) is above MAX ({})",
                range.min, range.max
            ));
        }
        Ok(range)
    }
}

impl fmt::Display for NodeRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.min == self.max {
            true => write!(f, "{}", self.max),
            false => write!(f, "{}:{}", self.min, self.max),
        }
    }
}

/// What the launcher knows of the job its ranks run.
pub trait Job {
    /// Whether the job can run on `world` ranks: how it runs there (for the log), or why not.
    fn on_world(&self, world: usize) -> Result<String, String>;
    /// The ranks' arguments for a start on `world` ranks after `restarts` restarts.
    fn rank_args(&self, world: usize, restarts: u32) -> Vec<OsString>;
}

/// A job the launcher knows nothing of: the same arguments on any number of ranks.
pub struct OpaqueJob(pub Vec<OsString>);

impl Job for OpaqueJob {
    fn on_world(&self, _world: usize) -> Result<String, String> {
        Ok(String::new())
    }

    fn rank_args(&self, _world: usize, _restarts: u32) -> Vec<OsString> {
        self.0.clone()
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
/// Longest `--grace-s` and rendezvous wait: a day.
const MAX_WAIT_S: f64 = 86_400.0;

/// Launches `args.nproc_per_node` copies of the running executable.
pub fn run(args: &LaunchArgs, capacity: &NodeCapacity, job: &dyn Job) -> Result<(), DistError> {
    let program = std::env::current_exe()
        .map_err(|e| DistError::io("launch: finding the zamba-train executable", e))?;
    launch(args, &program, capacity, job)
}

/// Launches `args.nproc_per_node` copies of `program` with `job`'s arguments, waits for all,
/// restarts them all up to `--max-restarts` times when one fails, and fails naming the rank at
/// fault. Spawning stops as soon as a rank has failed or a signal came.
pub fn launch(
    args: &LaunchArgs,
    program: &Path,
    capacity: &NodeCapacity,
    job: &dyn Job,
) -> Result<(), DistError> {
    let settings = Settings::new(args, capacity)?;
    // Registered before any child exists, so no signal is missed or kills the launcher.
    let mut signals = SignalWatch::install()?;
    attempt::run(&settings, program, job, &mut signals)
}

/// The launch's arguments, checked, and what every attempt shares.
struct Settings {
    nproc: usize,
    nodes: NodeRange,
    node_rank: usize,
    master_addr: String,
    /// `None`: a free port of 127.0.0.1, chosen afresh for every attempt (one node).
    master_port: Option<u16>,
    token: String,
    rayon_threads: Option<usize>,
    grace: Duration,
    max_restarts: u32,
    /// How the launchers of an elastic job meet; `None` for a job of fixed size without restarts
    /// across nodes.
    elastic: Option<ElasticSettings>,
}

/// The launchers' rendezvous of an elastic job.
struct ElasticSettings {
    last_call: Duration,
    timeout: Duration,
}

impl Settings {
    fn new(args: &LaunchArgs, capacity: &NodeCapacity) -> Result<Self, DistError> {
        let invalid = |msg: String| Err(DistError::Invalid(format!("launch: {msg}")));
        if args.nproc_per_node == 0 {
            return invalid("--nproc-per-node must be at least 1".into());
        }
        args.check_capacity(capacity)?;
        if args
            .nnodes
            .max
            .checked_mul(args.nproc_per_node)
            .is_none_or(|world| world > MAX_WORLD)
        {
            return invalid(format!(
                "--nnodes {} × --nproc-per-node {} is more than {MAX_WORLD} ranks",
                args.nnodes.max, args.nproc_per_node
            ));
        }
        let last_call = args.rdzv_last_call_s.unwrap_or(args.grace_s + 10.0);
        for (flag, value) in [
            ("--grace-s", args.grace_s),
            ("--rdzv-last-call-s", last_call),
            ("--rdzv-timeout-s", args.rdzv_timeout_s),
        ] {
            if !(0.0..=MAX_WAIT_S).contains(&value) {
                return invalid(format!(
                    "{flag} {value} must be between 0 and {MAX_WAIT_S} seconds"
                ));
            }
        }
        if args.node_rank >= args.nnodes.max {
            return invalid(format!(
                "--node-rank {} must be below --nnodes {}",
                args.node_rank, args.nnodes.max
            ));
        }
        let multi_node = args.nnodes.max > 1;
        let master_addr = match (&args.master_addr, multi_node) {
            (Some(addr), _) => addr.clone(),
            (None, false) => "127.0.0.1".into(),
            (None, true) => {
                return invalid(
                    "--master-addr (node 0's address) is required with --nnodes > 1".into(),
                );
            }
        };
        let master_port = args.master_port.filter(|&p| p != 0);
        if multi_node && master_port.is_none() {
            return invalid(
                "--master-port is required with --nnodes > 1 (the same on every node)".into(),
            );
        }
        let token = job_token(multi_node)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let rayon_threads = std::env::var_os("RAYON_NUM_THREADS")
            .is_none()
            .then(|| (cores / args.nproc_per_node).max(1));
        Ok(Self {
            nproc: args.nproc_per_node,
            nodes: args.nnodes,
            node_rank: args.node_rank,
            master_addr,
            master_port,
            token,
            rayon_threads,
            grace: Duration::from_secs_f64(args.grace_s),
            max_restarts: args.max_restarts,
            elastic: args.is_elastic().then(|| ElasticSettings {
                last_call: Duration::from_secs_f64(last_call),
                timeout: Duration::from_secs_f64(args.rdzv_timeout_s),
            }),
        })
    }
}

/// A free TCP port on `addr`, for a rendezvous store.
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
