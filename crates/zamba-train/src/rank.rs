//! What one data-parallel rank knows about itself: its place in the group, its device and its
//! communicator. The same training loop runs with one of these per process (one per GPU) or per
//! thread (CPU tests and proxy runs).

use anyhow::{Result, bail};
use burn::tensor::{Device, Tensor};
use zamba_dist::{Communicator, ReduceOp};

pub struct RankContext {
    pub rank: usize,
    pub world_size: usize,
    /// Rank within the node (selects the GPU).
    pub local_rank: usize,
    /// The rank's device, with autodiff.
    pub device: Device,
    pub comm: Box<dyn Communicator>,
}

impl RankContext {
    /// Rank 0 writes metrics, logs and checkpoints.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The rank's device without autodiff (where communicated tensors live).
    pub fn compute_device(&self) -> Device {
        self.device.clone().without_autodiff()
    }

    /// Makes every rank fail if any rank's `result` is an error, so that no rank goes on (or waits
    /// in a collective) after another gave up. The failing rank returns its own error.
    pub fn agree<T>(&self, result: Result<T>, what: &str) -> Result<T> {
        let failed = f32::from(result.is_err());
        let flag = Tensor::<1>::from_floats([failed], &self.compute_device());
        let any = self
            .comm
            .all_reduce(flag, ReduceOp::Max)?
            .into_scalar::<f32>();
        match result {
            Err(e) => Err(e),
            Ok(_) if any > 0.0 => bail!("{what} failed on another rank (see its log)"),
            Ok(value) => Ok(value),
        }
    }
}
