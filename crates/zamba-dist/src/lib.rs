//! Data-parallel communication for zamba-train: a small [`Communicator`] trait over flat Burn
//! tensors, implemented by ranks as threads of one process, by processes over TCP, and by NCCL
//! on CUDA devices; the rendezvous that lets ranks find each other; and the launcher.

mod comm;
mod error;
mod single;

pub use comm::{Communicator, ReduceOp};
pub use error::DistError;
pub use single::SingleRank;
