//! What one data-parallel rank knows about itself: its place in the group, its device and its
//! communicator. The same training loop runs with one of these per process (one per GPU) or per
//! thread (CPU tests and proxy runs).

use anyhow::{Result, anyhow, bail};
use burn::tensor::{Device, Tensor, TensorData};
use zamba_dist::{Communicator, ReduceOp};

use crate::checkpoint::manifest::Entry;

/// A present flag, a u64 size and a 32-byte hash.
const DIGEST_BYTES: usize = 1 + 8 + 32;

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

    /// How many ranks raise each of `flags` (one all-reduce).
    pub fn count<const N: usize>(&self, flags: [bool; N]) -> Result<[usize; N]> {
        let local = flags.map(f32::from);
        let sums = self
            .comm
            .all_reduce(
                Tensor::<1>::from_floats(local, &self.compute_device()),
                ReduceOp::Sum,
            )?
            .into_data()
            .try_into_vec_as::<f32>()
            .map_err(|e| anyhow!("counted flags: {e:?}"))?;
        Ok(std::array::from_fn(|i| sums[i].round() as usize))
    }

    /// Every rank's `bytes` (the same length on every rank), in rank order: one all-gather,
    /// each byte an exact small float.
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let floats: Vec<f32> = bytes.iter().map(|&b| f32::from(b)).collect();
        let local = Tensor::<1>::from_data(
            TensorData::new(floats, [bytes.len()]),
            &self.compute_device(),
        );
        let all = self
            .comm
            .all_gather(local)?
            .into_data()
            .try_into_vec_as::<f32>()
            .map_err(|e| anyhow!("gathered bytes: {e:?}"))?;
        Ok(all
            .chunks_exact(bytes.len().max(1))
            .map(|rank| rank.iter().map(|&x| x as u8).collect())
            .collect())
    }

    /// Every rank's file digest (size and blake3), in rank order. Ranks without a file pass
    /// `None`.
    pub fn gather_digests(&self, mine: Option<&Entry>) -> Result<Vec<Option<Entry>>> {
        let mut bytes = [0u8; DIGEST_BYTES];
        if let Some(entry) = mine {
            bytes[0] = 1;
            bytes[1..9].copy_from_slice(&entry.bytes.to_le_bytes());
            let hash = blake3::Hash::from_hex(&entry.blake3)
                .map_err(|e| anyhow!("a blake3 digest that is not one ({e})"))?;
            bytes[9..].copy_from_slice(hash.as_bytes());
        }
        Ok(self
            .all_gather_bytes(&bytes)?
            .into_iter()
            .map(|bytes| {
                (bytes[0] == 1).then(|| {
                    let size = u64::from_le_bytes(bytes[1..9].try_into().expect("8 bytes"));
                    let hash: [u8; 32] = bytes[9..].try_into().expect("32 bytes");
                    Entry {
                        bytes: size,
                        blake3: blake3::Hash::from_bytes(hash).to_hex().to_string(),
                    }
                })
            })
            .collect())
    }
}
