//! Data-parallel communication for zamba-train: a small [`Communicator`] trait over flat Burn
//! tensors, implemented by ranks as threads of one process ([`thread_group`]), by processes
//! over TCP, and by NCCL on CUDA devices; the rendezvous that lets ranks find each other
//! ([`RendezvousInfo`], [`init`]); and the launcher ([`launch`]).

mod auth;
mod collective;
mod comm;
mod cpu;
mod error;
mod fault;
mod fingerprint;
// The heartbeats name the culprits of NCCL time-outs; tested on CPU, used with `cuda`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod heartbeat;
mod host;
mod init;
mod interrupt;
pub mod launch;
#[cfg(feature = "cuda")]
mod nccl;
mod nodelist;
mod options;
mod rendezvous;
mod single;
pub mod store;
mod tcp;
mod thread;
mod throttle;
mod token;
mod wire;

pub use comm::{Communicator, ReduceOp};
pub use error::DistError;
pub use fault::{FAULT_LINES_ENV, FaultReport, report_fault};
pub use fingerprint::{Difference, Fingerprint};
pub use init::{Backend, init};
pub use interrupt::Interrupt;
#[cfg(feature = "cuda")]
pub use nccl::{NcclCommunicator, connect_nccl, cuda_device_memory};
pub use nodelist::expand_nodelist;
pub use options::DistOptions;
pub use rendezvous::{
    Launcher, RendezvousInfo, TOKEN_ENV, TOKEN_FILE_ENV, TokenSource, resolve_token,
};
pub use single::SingleRank;
pub use tcp::TcpCommunicator;
pub use thread::{ThreadCommunicator, thread_group};
pub use throttle::ThrottledLink;
pub use token::{check_token, create_token_file, generate_token, read_token_file};

/// Total memory of CUDA device `index` in bytes: `None` in a build without `cuda`.
#[cfg(not(feature = "cuda"))]
pub fn cuda_device_memory(_index: usize) -> Option<u64> {
    None
}
