//! Which ranks this process runs: one (a single-device run), one rank of a job started by
//! `zamba-train launch`, torchrun or SLURM (one process per GPU), or — on the CPU, with
//! `runtime.world_size` > 1 and no launcher — every rank as a thread of this process.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use zamba_dist::{
    Backend, Communicator, DistError, DistOptions, Interrupt, RendezvousInfo, SingleRank,
    report_fault,
};

use crate::config::{Device, RunConfig};
use crate::signals::StopSignal;

pub enum Ranks {
    Single,
    /// Every rank a thread of this process, communicating through shared memory.
    Threads(usize),
    /// This process is one rank of a launched job.
    Launched(RendezvousInfo),
}

impl Ranks {
    /// From the launcher's environment (torchrun or SLURM variables), else `runtime.world_size`.
    pub fn detect(config: &RunConfig) -> Result<Self> {
        let info = RendezvousInfo::from_env()?;
        let configured = config.runtime.world_size;
        if info.is_distributed() {
            if configured != 1 && configured != info.world_size {
                bail!(
                    "runtime.world_size = {configured}, but the launcher started {} ranks; set runtime.world_size to {} \
                     (or leave it at 1 to follow the launcher)",
                    info.world_size,
                    info.world_size
                );
            }
            return Ok(Ranks::Launched(info));
        }
        match (configured, config.runtime.device) {
            (1, _) => Ok(Ranks::Single),
            (world, Device::Cpu) => Ok(Ranks::Threads(world)),
            (world, device) => bail!(
                "runtime.world_size = {world} on {device}: start one process per GPU, e.g. \
                 `zamba-train launch --nproc-per-node {world} -- --config …` (or torchrun / srun; see docs/distributed.md)"
            ),
        }
    }

    /// Ranks on this host, which share its memory when they run on the CPU.
    pub fn on_this_host(&self) -> usize {
        match self {
            Ranks::Single => 1,
            Ranks::Threads(world) => *world,
            Ranks::Launched(info) => info.local_world_size,
        }
    }

    pub fn world_size(&self) -> usize {
        match self {
            Ranks::Single => 1,
            Ranks::Threads(world) => *world,
            Ranks::Launched(info) => info.world_size,
        }
    }

    /// Runs `rank(communicator, local_rank)` for every rank of this process.
    pub fn run(
        self,
        config: &RunConfig,
        stop: &'static StopSignal,
        rank: impl Fn(Box<dyn Communicator>, usize) -> Result<()> + Sync,
    ) -> Result<()> {
        let opts = DistOptions {
            timeout: Duration::from_secs_f64(config.dist.timeout_s),
            interrupt: Interrupt::new(move || stop.abort_reason()),
            ..Default::default()
        };
        match self {
            Ranks::Single => rank(Box::new(SingleRank), 0),
            Ranks::Threads(world) => {
                let comms = zamba_dist::thread_group(world, &opts);
                let results: Vec<Result<()>> = std::thread::scope(|scope| {
                    let rank = &rank;
                    let handles: Vec<_> = comms
                        .into_iter()
                        .enumerate()
                        .map(|(r, comm)| {
                            std::thread::Builder::new()
                                .name(format!("rank-{r}"))
                                .spawn_scoped(scope, move || rank(comm, 0))
                                .map_err(|e| anyhow!("starting the thread of rank {r}: {e}"))
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| {
                            h?.join()
                                .unwrap_or_else(|_| Err(anyhow!("the rank's thread panicked")))
                        })
                        .collect()
                });
                combine(results)
            }
            Ranks::Launched(info) => {
                let backend = match config.runtime.device {
                    Device::Cpu | Device::CubeCpu => Backend::Tcp,
                    Device::Cuda(first) => Backend::Nccl {
                        device_index: first + info.local_rank,
                    },
                };
                let opts = DistOptions {
                    fingerprint: crate::fingerprint::of(config)?,
                    ..opts
                };
                let comm = zamba_dist::init(&info, backend, &opts).inspect_err(report_fault)?;
                rank(comm, info.local_rank).inspect_err(|e| {
                    if let Some(dist) = e.chain().find_map(|c| c.downcast_ref::<DistError>()) {
                        report_fault(dist);
                    }
                })
            }
        }
    }
}

/// One error for the thread ranks: each distinct message once, with the ranks that reported it.
fn combine(results: Vec<Result<()>>) -> Result<()> {
    let mut messages: Vec<(String, Vec<usize>)> = Vec::new();
    for (r, result) in results.into_iter().enumerate() {
        if let Err(e) = result {
            let text = format!("{e:#}");
            match messages.iter_mut().find(|(m, _)| *m == text) {
                Some((_, ranks)) => ranks.push(r),
                None => messages.push((text, vec![r])),
            }
        }
    }
    match messages.as_slice() {
        [] => Ok(()),
        [(text, _)] => Err(anyhow!("{text}")),
        _ => Err(anyhow!(
            "{}",
            messages
                .iter()
                .map(|(text, ranks)| format!("rank(s) {ranks:?}: {text}"))
                .collect::<Vec<_>>()
                .join("\n")
        )),
    }
}
