//! Data parallelism: the model's parameters laid out flat in buckets, gradients averaged over the
//! ranks one bucket at a time, and ZeRO-1 ownership of the optimizer state.
//!
//! Every float parameter gets a place in a *bucket*, in the model's visiting order: consecutive
//! parameters fill a bucket up to `dist.bucket_mb` (a larger parameter has a bucket of its own).
//! A bucket is padded to a multiple of the world size and cut into one equal *chunk* per rank;
//! rank `r` owns chunk `r` of every bucket, so ownership is balanced by element count.
//!
//! - [`Sharding::Replicated`] (plain data parallelism): each bucket's gradients are all-reduced;
//!   every rank keeps AdamW moments for every parameter and applies the same update.
//! - [`Sharding::Zero1`]: each bucket's gradients are reduce-scattered; a rank keeps moments only
//!   for the parameter ranges inside its chunks (*segments*), updates them, and the updated chunks
//!   are all-gathered into every rank's parameters.
//!
//! In both modes each rank also sums the squares of the gradient in its own chunks, so the global
//! norm is one all-reduce of per-rank partial sums — and it is bit-identical between the two
//! modes, as are the updates (AdamW is elementwise), so ZeRO-1 reproduces replicated training.

use std::collections::HashMap;
use std::ops::Range;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use zamba_dist::{Communicator, DistError, ReduceOp};
use zamba_trace::{Category, span, span_with};

use crate::optim::{AdamW, SegmentUpdate};

/// How optimizer state is spread over the ranks: `optimizer.zero`, the ZeRO stage, written as
/// its number (0 or 1) in a run config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sharding {
    /// Stage 0: every rank keeps the moments of every parameter.
    #[default]
    Replicated,
    /// Stage 1: each rank keeps the moments of the chunks it owns.
    Zero1,
}

impl Sharding {
    /// The ZeRO stage.
    pub fn stage(self) -> u8 {
        match self {
            Sharding::Replicated => 0,
            Sharding::Zero1 => 1,
        }
    }
}

impl serde::Serialize for Sharding {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.stage())
    }
}

impl<'de> serde::Deserialize<'de> for Sharding {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match i64::deserialize(d)? {
            0 => Ok(Sharding::Replicated),
            1 => Ok(Sharding::Zero1),
            other => Err(serde::de::Error::custom(format!(
                "ZeRO stage {other} is not supported; expected 0 (every rank keeps all AdamW moments) or 1 (ZeRO-1)"
            ))),
        }
    }
}

/// One float parameter of the model.
#[derive(Clone, Debug)]
pub struct ParamSlot {
    /// Module path, e.g. `layers.3.mamba.in_proj.weight`.
    pub path: String,
    pub id: ParamId,
    pub shape: Vec<usize>,
    pub numel: usize,
}

/// Consecutive parameters communicated as one flat buffer.
#[derive(Clone, Debug)]
struct Bucket {
    slots: Range<usize>,
    /// Offset of each parameter of `slots` in the flat buffer.
    offsets: Vec<usize>,
    /// Elements per rank; the padded buffer holds `chunk × world` elements.
    chunk: usize,
}

/// A contiguous range of one parameter's (flattened) elements whose optimizer state a rank holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub slot: usize,
    pub range: Range<usize>,
    bucket: usize,
}

/// The bucket layout and this rank's share of it.
pub struct DataParallel {
    slots: Vec<ParamSlot>,
    buckets: Vec<Bucket>,
    segments: Vec<Segment>,
    sharding: Sharding,
    rank: usize,
    world: usize,
}

impl DataParallel {
    /// Lays out `model`'s parameters for rank `rank` of `world` in buckets of up to
    /// `bucket_bytes` of f32.
    pub fn new<M: Module>(
        model: &M,
        bucket_bytes: usize,
        sharding: Sharding,
        rank: usize,
        world: usize,
    ) -> Self {
        let slots = param_slots(model);
        let capacity = (bucket_bytes / 4).max(1);
        let mut buckets = Vec::new();
        let mut start = 0;
        while start < slots.len() {
            let (mut end, mut len, mut offsets) = (start, 0, Vec::new());
            while end < slots.len() && (end == start || len + slots[end].numel <= capacity) {
                offsets.push(len);
                len += slots[end].numel;
                end += 1;
            }
            buckets.push(Bucket {
                slots: start..end,
                offsets,
                chunk: len.div_ceil(world),
            });
            start = end;
        }
        let mut dp = Self {
            slots,
            buckets,
            segments: Vec::new(),
            sharding,
            rank,
            world,
        };
        dp.segments = dp.optimizer_segments();
        dp
    }

    /// The parameter ranges whose optimizer state this rank holds, in bucket order.
    fn optimizer_segments(&self) -> Vec<Segment> {
        let mut segments = Vec::new();
        for (b, bucket) in self.buckets.iter().enumerate() {
            let owned = self.owned(bucket);
            for (slot, &offset) in bucket.slots.clone().zip(&bucket.offsets) {
                let whole = offset..offset + self.slots[slot].numel;
                let range = match self.sharding {
                    Sharding::Replicated => whole,
                    Sharding::Zero1 => whole.start.max(owned.start)..whole.end.min(owned.end),
                };
                if !range.is_empty() {
                    segments.push(Segment {
                        slot,
                        range: range.start - offset..range.end - offset,
                        bucket: b,
                    });
                }
            }
        }
        segments
    }

    /// This rank's chunk of `bucket`, as a range of the padded flat buffer.
    fn owned(&self, bucket: &Bucket) -> Range<usize> {
        bucket.chunk * self.rank..bucket.chunk * (self.rank + 1)
    }

    pub fn slots(&self) -> &[ParamSlot] {
        &self.slots
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn sharding(&self) -> Sharding {
        self.sharding
    }

    /// Module path of a segment's parameter.
    pub fn path(&self, segment: &Segment) -> &str {
        &self.slots[segment.slot].path
    }

    /// Averages the ranks' summed local gradients, one collective per bucket. Returns the
    /// gradient of each of [`segments`](Self::segments) and this rank's partial sum of squares
    /// (over its chunks; summed over ranks it is the squared global norm), shape `[1]`.
    pub fn reduce_gradients(
        &self,
        mut grads: GradientsParams,
        comm: &dyn Communicator,
        device: &Device,
    ) -> Result<(Vec<Tensor<1>>, Tensor<1>), DistError> {
        let mut segment_grads = Vec::with_capacity(self.segments.len());
        let mut sum_squares = Tensor::<1>::zeros([1], device);
        let mut segments = self.segments.iter().peekable();
        for (b, bucket) in self.buckets.iter().enumerate() {
            let _bucket = span_with(Category::Gradients, || self.bucket_name(b));
            let parts = bucket
                .slots
                .clone()
                .map(|s| {
                    let slot = &self.slots[s];
                    take_flat(&mut grads, slot)
                        .unwrap_or_else(|| Tensor::zeros([slot.numel], device))
                })
                .collect();
            let flat = self.padded(bucket, parts, device);
            let (chunk, full) = match self.sharding {
                // One rank's gradients are their own average: no round trip through the
                // communicator (a copy out and back of every gradient).
                _ if self.world == 1 => (flat.clone(), Some(flat)),
                Sharding::Replicated => {
                    let full = span(Category::Communication, "all-reduce")
                        .run(|| comm.all_reduce(flat, ReduceOp::Avg))?;
                    (full.clone().slice(self.owned(bucket)), Some(full))
                }
                Sharding::Zero1 => {
                    let _comm = span(Category::Communication, "reduce-scatter");
                    (comm.reduce_scatter(flat, ReduceOp::Avg)?, None)
                }
            };
            sum_squares = sum_squares + chunk.clone().square().sum();
            let chunk_start = self.owned(bucket).start;
            while let Some(segment) = segments.next_if(|s| s.bucket == b) {
                let offset = bucket.offsets[segment.slot - bucket.slots.start];
                let range = segment.range.start + offset..segment.range.end + offset;
                segment_grads.push(match &full {
                    Some(full) => full.clone().slice(range),
                    None => chunk
                        .clone()
                        .slice(range.start - chunk_start..range.end - chunk_start),
                });
            }
        }
        Ok((segment_grads, sum_squares))
    }

    /// Current values of each of [`segments`](Self::segments), flat, without autodiff.
    fn segment_values<M: Module>(&self, model: &M) -> Vec<Tensor<1>> {
        let mut values = flat_values(model);
        self.segments
            .iter()
            .map(|s| {
                let slot = &self.slots[s.slot];
                let flat = values.remove(&slot.id).expect("a parameter of the layout");
                if s.range.len() == slot.numel {
                    flat
                } else {
                    values.insert(slot.id, flat.clone());
                    flat.slice(s.range.clone())
                }
            })
            .collect()
    }

    /// Writes the updated values of this rank's segments into the model: directly when every
    /// rank holds every parameter, by all-gathering each bucket's chunks under ZeRO-1.
    fn apply<M: Module>(
        &self,
        model: M,
        updated: Vec<Tensor<1>>,
        comm: &dyn Communicator,
        device: &Device,
    ) -> Result<M, DistError> {
        assert_eq!(updated.len(), self.segments.len(), "one value per segment");
        let mut new_values = HashMap::new();
        match self.sharding {
            Sharding::Replicated => {
                for (segment, value) in self.segments.iter().zip(updated) {
                    new_values.insert(self.slots[segment.slot].id, value);
                }
            }
            Sharding::Zero1 => {
                let mut updated = self.segments.iter().zip(updated).peekable();
                for (b, bucket) in self.buckets.iter().enumerate() {
                    let mut parts = Vec::new();
                    while let Some((_, value)) = updated.next_if(|(s, _)| s.bucket == b) {
                        parts.push(value);
                    }
                    let filled: usize = parts.iter().map(|p| p.dims()[0]).sum();
                    if filled < bucket.chunk {
                        parts.push(Tensor::zeros([bucket.chunk - filled], device));
                    }
                    let _bucket = span_with(Category::Communication, || {
                        format!("all-gather of {}", self.bucket_name(b))
                    });
                    let full = comm.all_gather(Tensor::cat(parts, 0))?;
                    self.split_into(bucket, full, &mut new_values);
                }
            }
        }
        Ok(set_values(model, new_values))
    }

    /// One optimizer step: AdamW on this rank's segments with their averaged `grads` (from
    /// [`reduce_gradients`](Self::reduce_gradients)) scaled by `grad_scale` (the clipping
    /// factor), then the new values into every rank's parameters.
    #[allow(clippy::too_many_arguments)]
    pub fn update<M: Module>(
        &self,
        model: M,
        optimizer: &mut AdamW,
        grads: Vec<Tensor<1>>,
        lr: f64,
        grad_scale: f64,
        comm: &dyn Communicator,
        device: &Device,
    ) -> Result<M, DistError> {
        let segments = self
            .segments
            .iter()
            .zip(self.segment_values(&model))
            .zip(grads)
            .map(|((segment, value), grad)| SegmentUpdate {
                path: self.path(segment),
                range: segment.range.clone(),
                value,
                grad,
            })
            .collect();
        let updated =
            span(Category::Optimizer, "adamw").run(|| optimizer.update(segments, lr, grad_scale));
        let _apply = span(Category::Optimizer, "apply updated parameters");
        self.apply(model, updated, comm, device)
    }

    /// Makes every rank's parameters equal to rank 0's, one broadcast per bucket.
    pub fn broadcast_parameters<M: Module>(
        &self,
        model: M,
        comm: &dyn Communicator,
        device: &Device,
    ) -> Result<M, DistError> {
        if self.world == 1 {
            return Ok(model);
        }
        let mut values = flat_values(&model);
        let mut new_values = HashMap::new();
        for bucket in &self.buckets {
            let parts = bucket
                .slots
                .clone()
                .map(|s| values.remove(&self.slots[s].id).expect("a parameter"))
                .collect();
            let full = comm.broadcast(self.padded(bucket, parts, device), 0)?;
            self.split_into(bucket, full, &mut new_values);
        }
        Ok(set_values(model, new_values))
    }

    /// A bucket as a trace names it: index, parameters and size.
    fn bucket_name(&self, b: usize) -> String {
        let bucket = &self.buckets[b];
        let mb = (bucket.chunk * self.world * 4) as f64 / (1 << 20) as f64;
        format!(
            "bucket {b} ({} parameters, {mb:.1} MiB)",
            bucket.slots.len()
        )
    }

    /// The bucket's flat buffer: `parts` concatenated and zero-padded to `chunk × world`.
    fn padded(&self, bucket: &Bucket, mut parts: Vec<Tensor<1>>, device: &Device) -> Tensor<1> {
        let len: usize = parts.iter().map(|p| p.dims()[0]).sum();
        let padded = bucket.chunk * self.world;
        if padded > len {
            parts.push(Tensor::zeros([padded - len], device));
        }
        Tensor::cat(parts, 0)
    }

    fn split_into(&self, bucket: &Bucket, full: Tensor<1>, out: &mut HashMap<ParamId, Tensor<1>>) {
        for (s, &offset) in bucket.slots.clone().zip(&bucket.offsets) {
            let slot = &self.slots[s];
            out.insert(slot.id, full.clone().slice(offset..offset + slot.numel));
        }
    }
}

/// Bytes of training state each rank holds, all f32: parameters, the accumulated gradients and
/// AdamW's two moments (divided over the ranks under ZeRO-1). Activations come on top.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StateMemory {
    pub params: f64,
    pub grads: f64,
    pub moments: f64,
}

impl StateMemory {
    pub fn per_rank(num_params: u64, world: usize, sharding: Sharding) -> Self {
        let n = num_params as f64;
        let shards = match sharding {
            Sharding::Replicated => 1.0,
            Sharding::Zero1 => world as f64,
        };
        Self {
            params: 4.0 * n,
            grads: 4.0 * n,
            moments: 8.0 * n / shards,
        }
    }

    pub fn total(&self) -> f64 {
        self.params + self.grads + self.moments
    }
}

/// Every float parameter of `model` with its module path, in visiting order.
pub fn param_slots<M: Module>(model: &M) -> Vec<ParamSlot> {
    struct Slots {
        path: Vec<String>,
        slots: Vec<ParamSlot>,
    }
    impl ModuleVisitor for Slots {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let shape = param.val().dims().to_vec();
            self.slots.push(ParamSlot {
                path: self.path.join("."),
                id: param.id,
                numel: shape.iter().product(),
                shape,
            });
        }
    }
    let mut visitor = Slots {
        path: Vec::new(),
        slots: Vec::new(),
    };
    model.visit(&mut visitor);
    visitor.slots
}

/// Each parameter's value, flattened and without autodiff.
fn flat_values<M: Module>(model: &M) -> HashMap<ParamId, Tensor<1>> {
    struct Values(HashMap<ParamId, Tensor<1>>);
    impl ModuleVisitor for Values {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val().inner();
            let numel = value.shape().num_elements();
            self.0.insert(param.id, value.reshape([numel]));
        }
    }
    let mut visitor = Values(HashMap::new());
    model.visit(&mut visitor);
    visitor.0
}

/// Replaces the parameters named in `values` (flat, without autodiff) and keeps their ids.
fn set_values<M: Module>(model: M, values: HashMap<ParamId, Tensor<1>>) -> M {
    struct Setter(HashMap<ParamId, Tensor<1>>);
    impl ModuleMapper for Setter {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some(flat) = self.0.remove(&param.id) else {
                return param;
            };
            let (id, old, mapper) = param.consume();
            let mut value = Tensor::from_inner(flat.reshape(old.shape()));
            if old.is_require_grad() {
                value = value.require_grad();
            }
            Param::from_mapped_value(id, value, mapper)
        }
    }
    model.map(&mut Setter(values))
}

/// Removes a parameter's gradient from `grads`, flattened (`None` if it has none).
fn take_flat(grads: &mut GradientsParams, slot: &ParamSlot) -> Option<Tensor<1>> {
    let n = [slot.numel];
    match slot.shape.len() {
        1 => grads.remove::<1>(slot.id).map(|g| g.inner()),
        2 => grads.remove::<2>(slot.id).map(|g| g.inner().reshape(n)),
        3 => grads.remove::<3>(slot.id).map(|g| g.inner().reshape(n)),
        4 => grads.remove::<4>(slot.id).map(|g| g.inner().reshape(n)),
        rank => panic!(
            "parameters of rank {rank} are not supported ({})",
            slot.path
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::Linear;

    #[derive(Module, Debug)]
    struct Toy {
        a: Linear,
        b: Param<Tensor<1>>,
        c: Param<Tensor<2>>,
    }

    fn toy(device: &Device) -> Toy {
        let param = |n: usize| Tensor::<1>::ones([n], device);
        Toy {
            a: Linear {
                weight: Param::from_tensor(param(12).reshape([3, 4])),
                bias: None,
            },
            b: Param::from_tensor(param(5)),
            c: Param::from_tensor(param(7).reshape([7, 1])),
        }
    }

    #[test]
    fn buckets_fill_up_to_capacity_and_chunks_cover_them_once() {
        let device = Device::flex();
        let model = toy(&device);
        // 17 floats per bucket: [a (12), b (5)], [c (7)].
        for world in 1..=5 {
            let owners: Vec<DataParallel> = (0..world)
                .map(|r| DataParallel::new(&model, 17 * 4, Sharding::Zero1, r, world))
                .collect();
            assert_eq!(owners[0].buckets.len(), 2);
            assert_eq!(owners[0].buckets[0].slots, 0..2);
            // Every element of every parameter is owned by exactly one rank.
            let mut seen: HashMap<usize, Vec<bool>> = HashMap::new();
            for dp in &owners {
                for s in dp.segments() {
                    let cover = seen
                        .entry(s.slot)
                        .or_insert_with(|| vec![false; dp.slots[s.slot].numel]);
                    for i in s.range.clone() {
                        assert!(!cover[i], "element {i} of slot {} owned twice", s.slot);
                        cover[i] = true;
                    }
                }
            }
            assert_eq!(seen.len(), 3, "world {world}");
            assert!(seen.values().all(|c| c.iter().all(|&x| x)), "world {world}");
            // Balanced: shares differ by the padding only (less than `world` elements per bucket).
            let per_rank: Vec<usize> = owners
                .iter()
                .map(|dp| dp.segments().iter().map(|s| s.range.len()).sum())
                .collect();
            let max = per_rank.iter().max().unwrap();
            let min = per_rank.iter().min().unwrap();
            assert!(max - min < 2 * world.max(2), "world {world}: {per_rank:?}");
        }
    }

    #[test]
    fn a_parameter_larger_than_a_bucket_gets_its_own() {
        let model = toy(&Device::flex());
        let dp = DataParallel::new(&model, 4, Sharding::Replicated, 0, 1);
        let slots: Vec<_> = dp.buckets.iter().map(|b| b.slots.clone()).collect();
        assert_eq!(slots, vec![0..1, 1..2, 2..3]);
        assert_eq!(dp.segments().len(), 3);
        assert!(
            dp.segments()
                .iter()
                .all(|s| s.range.len() == dp.slots[s.slot].numel)
        );
    }
}
