//! Joining the job: the communicator the trainer uses, after the rendezvous.

use crate::rendezvous::{Rendezvous, RendezvousInfo};
use crate::tcp::TcpCommunicator;
use crate::{Communicator, DistError, DistOptions, SingleRank};

/// Which communicator a multi-process job uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Processes over TCP (CPU ranks).
    Tcp,
    /// NCCL on CUDA device `device_index` (the rank's GPU; by convention its local rank).
    /// Needs a build with the `cuda` feature.
    Nccl { device_index: usize },
}

/// The communicator for this process: a [`SingleRank`] for a world of one (no sockets, no
/// token), else the chosen backend, after every rank has met at the rendezvous store and the
/// ranks' fingerprints (`opts.fingerprint`) were found equal.
pub fn init(
    info: &RendezvousInfo,
    backend: Backend,
    opts: &DistOptions,
) -> Result<Box<dyn Communicator>, DistError> {
    if !info.is_distributed() {
        return Ok(Box::new(SingleRank));
    }
    let mut rendezvous = Rendezvous::join(info, opts)?;
    match backend {
        Backend::Tcp => {
            let comm = TcpCommunicator::connect(&mut rendezvous, &info.master_addr, opts.timeout)?;
            // Every rank has joined the TCP group: the store is no longer needed.
            Ok(Box::new(comm))
        }
        #[cfg(feature = "cuda")]
        Backend::Nccl { device_index } => Ok(Box::new(crate::nccl::NcclCommunicator::new(
            rendezvous,
            device_index,
            opts.timeout,
        )?)),
        #[cfg(not(feature = "cuda"))]
        Backend::Nccl { .. } => Err(DistError::Invalid(
            "the NCCL backend needs a zamba-train built with `--features cuda`".into(),
        )),
    }
}
