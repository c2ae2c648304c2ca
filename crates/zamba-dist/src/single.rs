//! The communicator of a world of one: every collective is the identity, nothing is sent.

use burn::tensor::Tensor;

use crate::host::Dtype;
use crate::{Communicator, DistError, ReduceOp};

/// Rank 0 of a world of 1.
#[derive(Debug, Default)]
pub struct SingleRank;

fn check_root(root: usize, op: &str) -> Result<(), DistError> {
    if root == 0 {
        Ok(())
    } else {
        Err(DistError::Invalid(format!(
            "{op}: root {root} is not a rank of a world of 1"
        )))
    }
}

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce(&self, tensor: Tensor<1>, _op: ReduceOp) -> Result<Tensor<1>, DistError> {
        Dtype::of(&tensor, "all_reduce")?;
        Ok(tensor)
    }
    fn reduce_scatter(&self, tensor: Tensor<1>, _op: ReduceOp) -> Result<Tensor<1>, DistError> {
        Dtype::of(&tensor, "reduce_scatter")?;
        Ok(tensor)
    }
    fn all_gather(&self, shard: Tensor<1>) -> Result<Tensor<1>, DistError> {
        Dtype::of(&shard, "all_gather")?;
        Ok(shard)
    }
    fn broadcast(&self, tensor: Tensor<1>, root: usize) -> Result<Tensor<1>, DistError> {
        check_root(root, "broadcast")?;
        Dtype::of(&tensor, "broadcast")?;
        Ok(tensor)
    }
    fn broadcast_bytes(&self, bytes: Option<Vec<u8>>, root: usize) -> Result<Vec<u8>, DistError> {
        check_root(root, "broadcast_bytes")?;
        bytes.ok_or_else(|| {
            DistError::Invalid(
                "broadcast_bytes: rank 0 is the root and must pass Some(bytes)".into(),
            )
        })
    }
    fn barrier(&self) -> Result<(), DistError> {
        Ok(())
    }
}
