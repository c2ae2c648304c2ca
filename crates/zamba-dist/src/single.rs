//! The communicator of a run with one rank: every collective is the identity.

use burn::tensor::Tensor;

use crate::{Communicator, DistError, ReduceOp};

pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce(&self, tensor: Tensor<1>, _op: ReduceOp) -> Result<Tensor<1>, DistError> {
        Ok(tensor)
    }

    fn reduce_scatter(&self, tensor: Tensor<1>, _op: ReduceOp) -> Result<Tensor<1>, DistError> {
        Ok(tensor)
    }

    fn all_gather(&self, shard: Tensor<1>) -> Result<Tensor<1>, DistError> {
        Ok(shard)
    }

    fn broadcast(&self, tensor: Tensor<1>, _root: usize) -> Result<Tensor<1>, DistError> {
        Ok(tensor)
    }

    fn broadcast_bytes(&self, bytes: Option<Vec<u8>>, _root: usize) -> Result<Vec<u8>, DistError> {
        bytes.ok_or_else(|| DistError::Invalid("broadcast_bytes: the root passed no bytes".into()))
    }

    fn barrier(&self) -> Result<(), DistError> {
        Ok(())
    }
}
