//! A simulated slower interconnect: a communicator that, after each collective of another,
//! sleeps for the time the bytes this rank sends would take on a link of a given bandwidth.
//!
//! The bytes are those of the ring algorithms NCCL uses between nodes, per rank, for a buffer of
//! `n` bytes on `W` ranks: all-reduce `2(W−1)/W · n`, reduce-scatter and all-gather `(W−1)/W · n`
//! (`n` the whole buffer), broadcast `n`. Host-side messages (`broadcast_bytes`, `barrier`) are
//! not throttled. The sleep holds the calling thread, not a core, so on CPU ranks it stands for
//! time on the wire during which computation can go on — what overlapping communication with
//! the backward hides.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use burn::tensor::Tensor;

use crate::{Communicator, DistError, ReduceOp};

/// `inner`, as if every rank's link carried `gbps` Gbit/s.
pub struct ThrottledLink {
    inner: Box<dyn Communicator>,
    /// The link's bytes per second, as `f64` bits (settable while collectives run).
    bytes_per_second: AtomicU64,
    /// Nanoseconds slept so far.
    slept: AtomicU64,
    /// Bytes this rank put on the link so far.
    sent: AtomicU64,
}

impl ThrottledLink {
    /// # Panics
    /// If `gbps` is not a positive finite number (the caller checks user input).
    pub fn new(inner: Box<dyn Communicator>, gbps: f64) -> Self {
        assert!(
            gbps.is_finite() && gbps > 0.0,
            "a link's bandwidth must be positive, got {gbps} Gbit/s"
        );
        let link = Self {
            inner,
            bytes_per_second: AtomicU64::new(0),
            slept: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        };
        link.set_gbps(gbps);
        link
    }

    /// From the next collective on, the link carries `gbps` Gbit/s.
    ///
    /// # Panics
    /// If `gbps` is not a positive finite number.
    pub fn set_gbps(&self, gbps: f64) {
        assert!(
            gbps.is_finite() && gbps > 0.0,
            "a link's bandwidth must be positive, got {gbps} Gbit/s"
        );
        self.bytes_per_second
            .store((gbps * 1e9 / 8.0).to_bits(), Ordering::Relaxed);
    }

    /// The time all collectives so far spent on the simulated link.
    pub fn time_on_wire(&self) -> Duration {
        Duration::from_nanos(self.slept.load(Ordering::Relaxed))
    }

    /// The bytes this rank's collectives have put on the link so far.
    pub fn bytes_on_wire(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The bytes on the link of a collective that sends `(W−1)/W` of `tensor`'s bytes `times`
    /// times.
    fn transfer_bytes(&self, tensor: &Tensor<1>, times: f64) -> f64 {
        let world = self.inner.world_size() as f64;
        let bytes = (tensor.dims()[0] * tensor.dtype().size()) as f64;
        times * (world - 1.0) / world * bytes
    }

    fn transfer_time(&self, bytes: f64) -> Duration {
        let rate = f64::from_bits(self.bytes_per_second.load(Ordering::Relaxed));
        Duration::from_secs_f64(bytes / rate)
    }

    fn after(
        &self,
        result: Result<Tensor<1>, DistError>,
        bytes: f64,
    ) -> Result<Tensor<1>, DistError> {
        let result = result?;
        let wire = self.transfer_time(bytes);
        std::thread::sleep(wire);
        self.slept
            .fetch_add(wire.as_nanos() as u64, Ordering::Relaxed);
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(result)
    }
}

impl Communicator for ThrottledLink {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce(&self, tensor: Tensor<1>, op: ReduceOp) -> Result<Tensor<1>, DistError> {
        let bytes = self.transfer_bytes(&tensor, 2.0);
        self.after(self.inner.all_reduce(tensor, op), bytes)
    }
    fn reduce_scatter(&self, tensor: Tensor<1>, op: ReduceOp) -> Result<Tensor<1>, DistError> {
        let bytes = self.transfer_bytes(&tensor, 1.0);
        self.after(self.inner.reduce_scatter(tensor, op), bytes)
    }
    fn all_gather(&self, shard: Tensor<1>) -> Result<Tensor<1>, DistError> {
        // The gathered buffer is `world` shards; each rank sends all but its own.
        let bytes = self.transfer_bytes(&shard, self.inner.world_size() as f64);
        self.after(self.inner.all_gather(shard), bytes)
    }
    fn broadcast(&self, tensor: Tensor<1>, root: usize) -> Result<Tensor<1>, DistError> {
        // A pipelined ring broadcast sends the whole buffer once over every link.
        let world = self.inner.world_size() as f64;
        let bytes = self.transfer_bytes(&tensor, world / (world - 1.0).max(1.0));
        self.after(self.inner.broadcast(tensor, root), bytes)
    }
    fn broadcast_bytes(&self, bytes: Option<Vec<u8>>, root: usize) -> Result<Vec<u8>, DistError> {
        self.inner.broadcast_bytes(bytes, root)
    }
    fn barrier(&self) -> Result<(), DistError> {
        self.inner.barrier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DistOptions, thread_group};
    use burn::tensor::Device;

    /// `rank` run by each of two thread ranks on a 1 Gbit/s link; their results in rank order.
    fn on_two_links<T: Send>(rank: impl Fn(&ThrottledLink, &Device) -> T + Sync) -> Vec<T> {
        let device = Device::flex();
        let comms = thread_group(2, &DistOptions::default());
        std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let (device, rank) = (&device, &rank);
                    s.spawn(move || rank(&ThrottledLink::new(comm, 1.0), device))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn a_throttled_group_computes_what_the_group_does() {
        // 1 Gbit/s: 4000 bytes on the wire, 32 µs of sleep.
        let results = on_two_links(|link, device| {
            let rank = link.rank() as f32;
            let x = Tensor::<1>::ones([1000], device).mul_scalar(rank + 1.0);
            let sum = link.all_reduce(x, ReduceOp::Sum).unwrap();
            sum.into_data().try_into_vec_as::<f32>().unwrap()
        });
        for values in results {
            assert!(values.iter().all(|&v| v == 3.0));
        }
    }

    #[test]
    fn the_wire_time_follows_the_ring_algorithms_bytes() {
        let device = Device::flex();
        let mut comms = thread_group(4, &DistOptions::default());
        // 8 kbit/s = 1000 bytes/s.
        let link = ThrottledLink::new(comms.remove(0), 8e-6);
        let seconds = |tensor, times| {
            link.transfer_time(link.transfer_bytes(tensor, times))
                .as_secs_f64()
        };
        // 3/4 of the buffer per pass on 4 ranks: 300 of 400 bytes f32, 150 of 200 bf16.
        let f32s = Tensor::<1>::zeros([100], &device);
        assert!((seconds(&f32s, 1.0) - 0.3).abs() < 1e-9);
        assert!((seconds(&f32s, 2.0) - 0.6).abs() < 1e-9);
        let bf16s = f32s.clone().cast(burn::tensor::DType::BF16);
        assert!((seconds(&bf16s, 1.0) - 0.15).abs() < 1e-9);
        // A new rate applies to what follows.
        link.set_gbps(16e-6);
        assert!((seconds(&f32s, 2.0) - 0.3).abs() < 1e-9);
    }

    #[test]
    fn the_link_counts_the_bytes_it_carried() {
        let sent = on_two_links(|link, device| {
            // 1000 f32: all-reduce 2 · 1/2 · 4000 bytes, all-gather of 500: 2 · 1/2 · 2000.
            let x = Tensor::<1>::ones([1000], device);
            link.all_reduce(x.clone(), ReduceOp::Sum).unwrap();
            link.all_gather(x.slice([0..500])).unwrap();
            link.bytes_on_wire()
        });
        assert_eq!(sent, vec![6000, 6000]);
    }
}
