//! The collective operations a data-parallel trainer needs, on flat contiguous tensors.

use burn::tensor::Tensor;

use crate::DistError;

/// How values from all ranks are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the world size.
    Avg,
    Max,
}

/// One rank's handle on its process group.
///
/// Every rank must call the same collectives in the same order with tensors of the same length
/// and dtype (f32 or bf16). Tensors are flat (`Tensor<1>`) and live on the rank's device; the
/// result is on the same device, in the same dtype. Results are bit-identical on every rank.
/// A collective that cannot complete within the group's time-out fails with an error that names
/// the ranks at fault; it never hangs.
///
/// A communicator may be handed to another thread (a communication thread that reduces gradients
/// while the backward goes on), so it is `Sync`; the order of the collectives is still one
/// sequence per rank: while one thread makes calls, the others make none.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// Every rank receives the reduction of all ranks' `tensor`.
    fn all_reduce(&self, tensor: Tensor<1>, op: ReduceOp) -> Result<Tensor<1>, DistError>;

    /// `tensor`'s length must be a multiple of the world size; rank `r` receives chunk `r` (of
    /// `len / world_size` elements) of the reduction.
    fn reduce_scatter(&self, tensor: Tensor<1>, op: ReduceOp) -> Result<Tensor<1>, DistError>;

    /// Every rank passes a shard of the same length; every rank receives all shards
    /// concatenated in rank order.
    fn all_gather(&self, shard: Tensor<1>) -> Result<Tensor<1>, DistError>;

    /// Every rank receives `root`'s `tensor`.
    fn broadcast(&self, tensor: Tensor<1>, root: usize) -> Result<Tensor<1>, DistError>;

    /// Small host-side messages (a decision, a path): every rank receives `root`'s bytes; the
    /// other ranks pass `None`.
    fn broadcast_bytes(&self, bytes: Option<Vec<u8>>, root: usize) -> Result<Vec<u8>, DistError>;

    /// Returns once every rank has entered it.
    fn barrier(&self) -> Result<(), DistError>;
}
