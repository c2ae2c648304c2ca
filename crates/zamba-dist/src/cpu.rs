//! The [`Communicator`](crate::Communicator) methods of the host-side communicators (threads,
//! TCP): each copies its tensor to the host, exchanges it, and builds the result on the
//! tensor's device.

use burn::tensor::Tensor;

use crate::collective::{Call, Kind};
use crate::host::{Dtype, Payload};
use crate::{DistError, ReduceOp};

/// A rank of a host-side group: sends its call and input, receives its share of the result.
pub(crate) trait HostExchange {
    fn exchange(&self, call: Call, input: Payload) -> Result<Payload, DistError>;
}

fn tensor_call(kind: Kind, tensor: &Tensor<1>, name: &str) -> Result<Call, DistError> {
    Ok(Call {
        kind,
        dtype: Some(Dtype::of(tensor, name)?),
        len: tensor.dims()[0],
    })
}

fn round_trip(
    group: &impl HostExchange,
    kind: Kind,
    tensor: Tensor<1>,
    send: bool,
) -> Result<Tensor<1>, DistError> {
    let call = tensor_call(kind, &tensor, kind_name(kind))?;
    let device = tensor.device();
    let input = if send {
        Payload::from_tensor(tensor, call.name())?
    } else {
        Payload::Empty
    };
    group
        .exchange(call, input)?
        .into_tensor(&device, call.name())
}

fn kind_name(kind: Kind) -> &'static str {
    Call {
        kind,
        dtype: None,
        len: 0,
    }
    .name()
}

pub(crate) fn all_reduce(
    group: &impl HostExchange,
    tensor: Tensor<1>,
    op: ReduceOp,
) -> Result<Tensor<1>, DistError> {
    round_trip(group, Kind::AllReduce(op), tensor, true)
}

pub(crate) fn reduce_scatter(
    group: &impl HostExchange,
    tensor: Tensor<1>,
    op: ReduceOp,
) -> Result<Tensor<1>, DistError> {
    round_trip(group, Kind::ReduceScatter(op), tensor, true)
}

pub(crate) fn all_gather(
    group: &impl HostExchange,
    shard: Tensor<1>,
) -> Result<Tensor<1>, DistError> {
    round_trip(group, Kind::AllGather, shard, true)
}

pub(crate) fn broadcast(
    group: &impl HostExchange,
    rank: usize,
    tensor: Tensor<1>,
    root: usize,
) -> Result<Tensor<1>, DistError> {
    round_trip(group, Kind::Broadcast { root }, tensor, rank == root)
}

pub(crate) fn broadcast_bytes(
    group: &impl HostExchange,
    rank: usize,
    bytes: Option<Vec<u8>>,
    root: usize,
) -> Result<Vec<u8>, DistError> {
    let kind = Kind::BroadcastBytes { root };
    let (input, len) = match (rank == root, bytes) {
        (true, Some(b)) => {
            let len = b.len();
            (Payload::Bytes(b), len)
        }
        (true, None) => {
            return Err(DistError::Invalid(format!(
                "broadcast_bytes: rank {rank} is the root and must pass Some(bytes)"
            )));
        }
        (false, _) => (Payload::Empty, 0),
    };
    let call = Call {
        kind,
        dtype: None,
        len,
    };
    match group.exchange(call, input)? {
        Payload::Bytes(b) => Ok(b),
        other => Err(DistError::Invalid(format!(
            "broadcast_bytes: internal error: received {}",
            other.describe()
        ))),
    }
}

pub(crate) fn barrier(group: &impl HostExchange) -> Result<(), DistError> {
    let call = Call {
        kind: Kind::Barrier,
        dtype: None,
        len: 0,
    };
    group.exchange(call, Payload::Empty).map(|_| ())
}

/// Implements [`Communicator`](crate::Communicator) for a [`HostExchange`] type with `rank` and
/// `world` fields.
macro_rules! host_communicator {
    ($ty:ty) => {
        impl $crate::Communicator for $ty {
            fn rank(&self) -> usize {
                self.rank
            }
            fn world_size(&self) -> usize {
                self.world
            }
            fn all_reduce(
                &self,
                tensor: burn::tensor::Tensor<1>,
                op: $crate::ReduceOp,
            ) -> Result<burn::tensor::Tensor<1>, $crate::DistError> {
                $crate::cpu::all_reduce(self, tensor, op)
            }
            fn reduce_scatter(
                &self,
                tensor: burn::tensor::Tensor<1>,
                op: $crate::ReduceOp,
            ) -> Result<burn::tensor::Tensor<1>, $crate::DistError> {
                $crate::cpu::reduce_scatter(self, tensor, op)
            }
            fn all_gather(
                &self,
                shard: burn::tensor::Tensor<1>,
            ) -> Result<burn::tensor::Tensor<1>, $crate::DistError> {
                $crate::cpu::all_gather(self, shard)
            }
            fn broadcast(
                &self,
                tensor: burn::tensor::Tensor<1>,
                root: usize,
            ) -> Result<burn::tensor::Tensor<1>, $crate::DistError> {
                $crate::cpu::broadcast(self, self.rank, tensor, root)
            }
            fn broadcast_bytes(
                &self,
                bytes: Option<Vec<u8>>,
                root: usize,
            ) -> Result<Vec<u8>, $crate::DistError> {
                $crate::cpu::broadcast_bytes(self, self.rank, bytes, root)
            }
            fn barrier(&self) -> Result<(), $crate::DistError> {
                $crate::cpu::barrier(self)
            }
        }
    };
}
pub(crate) use host_communicator;
