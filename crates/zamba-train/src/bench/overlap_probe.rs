//! `bench allreduce --overlap-probe`: whether a collective issued from a second thread finishes
//! while the compute this thread queued before it is still running — what the trainer's
//! communication thread relies on to hide a bucket's reduction behind the rest of the backward
//! (docs/distributed.md). On CUDA each thread has its own stream: the collective must wait for
//! its tensor's producer only, not for everything queued on the device. CPU ops run eagerly (the
//! products are done before the collective is issued), so there the probe checks the value only.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use burn::tensor::{DType, Device, Distribution, Tensor};
use zamba_dist::{Communicator, ReduceOp};

/// Products queued before the collective, and their side: about half a second of GEMM on an
/// H100; small on a CPU, where the timing says nothing.
fn compute_shape(on_gpu: bool) -> (usize, usize) {
    match on_gpu {
        true => (8192, 64),
        false => (128, 4),
    }
}

/// What the probe saw on one rank.
pub(super) struct OverlapProbe {
    /// From the start of the queued compute to the collective's return.
    pub collective: Duration,
    /// From the start of the queued compute to its end (the device synchronised).
    pub compute: Duration,
    /// Whether the timing can show overlap at all (a device with asynchronous queues).
    pub meaningful: bool,
}

impl OverlapProbe {
    /// The collective returned in the first half of the compute queued before it.
    pub fn overlapped(&self) -> bool {
        self.collective.as_secs_f64() < 0.5 * self.compute.as_secs_f64()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "collective_ms": self.collective.as_secs_f64() * 1e3,
            "compute_ms": self.compute.as_secs_f64() * 1e3,
            "meaningful": self.meaningful,
            "overlapped": self.meaningful && self.overlapped(),
        })
    }
}

/// Queues a tensor's producer, then a chain of products, then all-reduces that tensor from a
/// second thread: its value must be the sum over ranks, and (where the timing means something)
/// it must return before the products are done. `on_gpu`: the device queues work asynchronously.
pub(super) fn run(comm: &dyn Communicator, device: &Device, on_gpu: bool) -> Result<OverlapProbe> {
    let (side, products) = compute_shape(on_gpu);
    let operand = Tensor::<2>::random([side, side], Distribution::Default, device);
    let identity = Tensor::<2>::eye(side, device);
    // One product and collective first, so that neither autotuning nor NCCL's set-up is timed.
    let _ = operand.clone().matmul(identity.clone());
    comm.all_reduce(Tensor::<1>::ones([1024], device), ReduceOp::Sum)?;
    device
        .sync()
        .map_err(|e| anyhow::anyhow!("device error: {e:?}"))?;

    let start = Instant::now();
    let twos = Tensor::<1>::ones([1 << 20], device) * 2.0;
    let mut chain = operand;
    for _ in 0..products {
        chain = chain.matmul(identity.clone());
    }
    let (reduced, collective) = std::thread::scope(|s| {
        s.spawn(|| {
            comm.all_reduce(twos, ReduceOp::Sum)
                .map(|t| (t, start.elapsed()))
        })
        .join()
        .expect("overlap probe thread")
    })?;
    std::hint::black_box(chain);
    device
        .sync()
        .map_err(|e| anyhow::anyhow!("device error: {e:?}"))?;
    let compute = start.elapsed();

    let want = 2.0 * comm.world_size() as f32;
    let values = reduced
        .cast(DType::F32)
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("overlap probe: reading the result back: {e:?}"))?;
    if let Some((i, got)) = values.iter().enumerate().find(|(_, v)| **v != want) {
        bail!(
            "overlap probe: the all-reduce from a second thread gave {got} at element {i}, expected {want} \
             (it did not wait for its tensor's producer)"
        );
    }
    Ok(OverlapProbe {
        collective,
        compute,
        meaningful: on_gpu,
    })
}
