//! Which ranks this process runs: one (a single-device run), one rank of a group started by
//! `zamba-train launch`, torchrun or SLURM, or every rank as a thread (CPU runs with
//! `runtime.world_size` > 1 and no launcher).

use anyhow::{Result, bail};
use zamba_dist::{Communicator, SingleRank};

use crate::config::RunConfig;

pub enum Ranks {
    Single,
}

impl Ranks {
    pub fn detect(config: &RunConfig) -> Result<Self> {
        if config.runtime.world_size != 1 {
            bail!(
                "runtime.world_size = {}: data-parallel training is not available yet; set runtime.world_size = 1",
                config.runtime.world_size
            );
        }
        Ok(Ranks::Single)
    }

    pub fn world_size(&self) -> usize {
        match self {
            Ranks::Single => 1,
        }
    }

    /// Runs `rank(communicator, local_rank)` for every rank of this process.
    pub fn run(
        self,
        _config: &RunConfig,
        rank: impl Fn(Box<dyn Communicator>, usize) -> Result<()> + Sync,
    ) -> Result<()> {
        match self {
            Ranks::Single => rank(Box::new(SingleRank), 0),
        }
    }
}
