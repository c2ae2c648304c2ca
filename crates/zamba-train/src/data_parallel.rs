//! Data parallelism: the model's parameters laid out flat in buckets, gradients averaged over the
//! ranks one bucket at a time, and ZeRO-1 ownership of the optimizer state — a Megatron-style
//! distributed optimizer.
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
//!
//! What each rank stores per parameter is decided here ([`StateBytes`]): the *working*
//! parameters the forward and backward use are bf16 under `runtime.precision = "bf16"` and f32
//! otherwise; gradients are summed over micro-batches in f32; with bf16 working parameters the
//! optimizer updates f32 *master weights* — optimizer state like the moments, so held only for the
//! rank's segments under ZeRO-1 — and the updated values are cast to bf16 before they are
//! all-gathered. Gradients travel in `dist.grad_reduce_dtype` ([`ReduceDtype`]) and are read
//! back into f32 on their owner. With f32 working parameters there are no master weights: the
//! parameters are the master, and every step is the same arithmetic as without this layer.

use std::collections::HashMap;
use std::ops::Range;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, Tensor};
use zamba_dist::{Communicator, DistError, ReduceOp};
use zamba_model::Precision;
use zamba_trace::{Category, span, span_with};

use crate::optim::{AdamW, Master, SegmentUpdate};

/// How optimizer state is spread over the ranks: `optimizer.zero`, the ZeRO stage, written as
/// its number (0 or 1) in a run config.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sharding {
    /// Stage 0: every rank keeps the optimizer state (moments, master weights) of every
    /// parameter.
    #[default]
    Replicated,
    /// Stage 1: each rank keeps the optimizer state of the chunks it owns.
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
                "ZeRO stage {other} is not supported; expected 0 (every rank keeps all optimizer state) or 1 (ZeRO-1: the optimizer state divided over the ranks)"
            ))),
        }
    }
}

/// The float type gradients travel in between ranks: `dist.grad_reduce_dtype`. Either way
/// they are summed over micro-batches in f32 before, and read back into f32 on their owner
/// after; `Bf16` halves the bytes on the wire at the cost of one bf16 rounding of each rank's
/// contribution and of the reduced value (the CPU communicators add in f32; NCCL adds in bf16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReduceDtype {
    #[default]
    F32,
    Bf16,
}

impl ReduceDtype {
    pub fn dtype(self) -> DType {
        match self {
            ReduceDtype::F32 => DType::F32,
            ReduceDtype::Bf16 => DType::BF16,
        }
    }
}

impl std::fmt::Display for ReduceDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReduceDtype::F32 => "f32",
            ReduceDtype::Bf16 => "bf16",
        })
    }
}

/// The float type of the working parameters (those the forward and backward read) in
/// `precision`.
pub fn working_dtype(precision: Precision) -> DType {
    match precision {
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
    }
}

/// Gradients are summed over micro-batches, reduced and applied in this type.
pub(crate) const GRAD_DTYPE: DType = DType::F32;

/// Whether the optimizer keeps f32 master weights apart from the working parameters: exactly
/// when those are not f32 (the updates of bf16 weights would round away).
fn keeps_master(working: DType) -> bool {
    working != DType::F32
}

/// The training state one rank holds per parameter, in bytes, as [`DataParallel`] and
/// [`AdamW`] lay it out; `--dry-run`'s estimate and `bench model --world`'s check multiply it out
/// ([`StateBytes::times`]). Activations and communication buffers come on top.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StateBytes {
    /// The working parameters: bf16 under `precision = "bf16"`, else f32; on every rank.
    pub params: f64,
    /// The gradients summed over micro-batches (f32), on every rank.
    pub grads: f64,
    /// f32 master weights (with bf16 working parameters only); divided over the ranks under
    /// ZeRO-1.
    pub master: f64,
    /// AdamW's two f32 moments; divided over the ranks under ZeRO-1.
    pub moments: f64,
}

impl StateBytes {
    /// Bytes per parameter on one rank of `world`.
    pub fn per_param(precision: Precision, sharding: Sharding, world: usize) -> Self {
        let shards = match sharding {
            Sharding::Replicated => 1.0,
            Sharding::Zero1 => world as f64,
        };
        let working = working_dtype(precision);
        let f32_bytes = DType::F32.size() as f64;
        Self {
            params: working.size() as f64,
            grads: GRAD_DTYPE.size() as f64,
            master: match keeps_master(working) {
                true => f32_bytes / shards,
                false => 0.0,
            },
            moments: 2.0 * f32_bytes / shards,
        }
    }

    /// The bytes of `num_params` parameters.
    pub fn times(self, num_params: u64) -> Self {
        let n = num_params as f64;
        Self {
            params: self.params * n,
            grads: self.grads * n,
            master: self.master * n,
            moments: self.moments * n,
        }
    }

    /// Master weights and moments: what `optimizer.zero = 1` divides over the ranks.
    pub fn optimizer_state(&self) -> f64 {
        self.master + self.moments
    }

    pub fn total(&self) -> f64 {
        self.params + self.grads + self.optimizer_state()
    }
}

/// The parameters of each bucket when parameters of `numels` elements (in visiting order) fill
/// buckets of up to `capacity` elements; a larger parameter has a bucket of its own.
pub fn bucket_slots(numels: &[usize], capacity: usize) -> Vec<Range<usize>> {
    let mut buckets = Vec::new();
    let mut start = 0;
    while start < numels.len() {
        let (mut end, mut len) = (start, 0);
        while end < numels.len() && (end == start || len + numels[end] <= capacity) {
            len += numels[end];
            end += 1;
        }
        buckets.push(start..end);
        start = end;
    }
    buckets
}

/// Elements per bucket of `dist.bucket_mb` MiB: the bucket size is counted in f32 gradients.
pub fn bucket_capacity(bucket_bytes: usize) -> usize {
    (bucket_bytes / GRAD_DTYPE.size()).max(1)
}

/// Bytes the reduction of one bucket of `elements` holds at once beyond the state, on a rank of
/// `world`: its f32 gradients gathered into one flat buffer, and with other ranks that buffer in
/// the transport type and the collective's result (at most a bucket in the transport type). The
/// largest bucket sets the figure; the all-gather of updated parameters needs less.
pub fn communication_bytes(elements: usize, transport: ReduceDtype, world: usize) -> f64 {
    let transported = match world {
        1 => 0,
        _ => 2 * transport.dtype().size(),
    };
    elements as f64 * (GRAD_DTYPE.size() + transported) as f64
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

/// The bucket layout, this rank's share of it, and the types the state is kept and moved in.
pub struct DataParallel {
    slots: Vec<ParamSlot>,
    buckets: Vec<Bucket>,
    segments: Vec<Segment>,
    /// Elements per bucket (f32 gradients).
    capacity: usize,
    sharding: Sharding,
    /// The working parameters' type (see [`working_dtype`]).
    working: DType,
    transport: ReduceDtype,
    rank: usize,
    world: usize,
}

impl DataParallel {
    /// Lays out `model`'s parameters for rank `rank` of `world` in buckets of up to
    /// `bucket_bytes` of f32, for f32 working parameters and f32 transport (see
    /// [`with_precision`](Self::with_precision), [`with_transport`](Self::with_transport)).
    pub fn new<M: Module>(
        model: &M,
        bucket_bytes: usize,
        sharding: Sharding,
        rank: usize,
        world: usize,
    ) -> Self {
        let mut dp = Self {
            slots: param_slots(model),
            buckets: Vec::new(),
            segments: Vec::new(),
            capacity: bucket_capacity(bucket_bytes),
            sharding,
            working: DType::F32,
            transport: ReduceDtype::F32,
            rank,
            world,
        };
        dp.lay_out();
        dp
    }

    /// Parameters in buckets in their order, and this rank's segments of them.
    fn lay_out(&mut self) {
        let numels: Vec<usize> = self.slots.iter().map(|s| s.numel).collect();
        self.buckets = bucket_slots(&numels, self.capacity)
            .into_iter()
            .map(|range| {
                let offsets = numels[range.clone()]
                    .iter()
                    .scan(0, |len, &n| {
                        *len += n;
                        Some(*len - n)
                    })
                    .collect();
                let len: usize = numels[range.clone()].iter().sum();
                Bucket {
                    slots: range,
                    offsets,
                    chunk: len.div_ceil(self.world),
                }
            })
            .collect();
        self.segments = self.optimizer_segments();
    }

    /// Buckets filled in the order the backward finishes gradients: the parameters of `first`
    /// (in its order), then the others in the model's visiting order. Reduced in bucket order,
    /// the first buckets can go while the backward still computes the later ones' gradients.
    pub fn with_reduction_order(mut self, first: &[ParamId]) -> Self {
        let rank: HashMap<ParamId, usize> =
            first.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        // A stable sort: the others keep their visiting order, after every listed one.
        self.slots
            .sort_by_key(|slot| rank.get(&slot.id).copied().unwrap_or(first.len()));
        self.lay_out();
        self
    }

    /// Working parameters in `precision`'s type: bf16 ones with f32 master weights under
    /// `"bf16"` (see [`prepare`](Self::prepare)).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.working = working_dtype(precision);
        self
    }

    /// Gradients travel between ranks in `transport`.
    pub fn with_transport(mut self, transport: ReduceDtype) -> Self {
        self.transport = transport;
        self
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

    /// Whether the optimizer updates f32 master weights (bf16 working parameters).
    pub fn keeps_master(&self) -> bool {
        keeps_master(self.working)
    }

    /// A micro-batch's gradients (in the working parameters' type) in the type they are summed
    /// in over micro-batches, f32; unchanged when they already are.
    pub fn accumulation_type(&self, mut grads: GradientsParams) -> GradientsParams {
        if self.working == GRAD_DTYPE {
            return grads;
        }
        for slot in &self.slots {
            cast_grad(&mut grads, slot, GRAD_DTYPE);
        }
        grads
    }

    /// One parameter's flattened micro-batch gradient in the type gradients are summed in, as
    /// [`accumulation_type`](Self::accumulation_type) makes it.
    pub fn flat_accumulation_type(&self, grad: Tensor<1>) -> Tensor<1> {
        match self.working == GRAD_DTYPE {
            true => grad,
            false => grad.cast(GRAD_DTYPE),
        }
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
        let mut reduced = Vec::with_capacity(self.buckets.len());
        for b in 0..self.buckets.len() {
            let parts = self
                .bucket_params(b)
                .map(|s| take_flat(&mut grads, &self.slots[s]));
            reduced.push(self.reduce_bucket(b, parts.collect(), comm, device)?);
        }
        Ok(self.reduced_segments(reduced, device))
    }

    /// How many buckets the parameters fill.
    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// The indices (in [`slots`](Self::slots)) of bucket `b`'s parameters.
    pub fn bucket_params(&self, b: usize) -> Range<usize> {
        self.buckets[b].slots.clone()
    }

    /// Bucket `b` averaged over the ranks, from this rank's f32 gradients of its parameters
    /// (`None`: no gradient, zeros): the whole bucket, or under ZeRO-1 this rank's chunk of it.
    pub fn reduce_bucket(
        &self,
        b: usize,
        parts: Vec<Option<Tensor<1>>>,
        comm: &dyn Communicator,
        device: &Device,
    ) -> Result<Tensor<1>, DistError> {
        let _bucket = span_with(Category::Gradients, || self.bucket_name(b));
        let bucket = &self.buckets[b];
        let parts = bucket
            .slots
            .clone()
            .zip(parts)
            .map(|(s, part)| part.unwrap_or_else(|| Tensor::zeros([self.slots[s].numel], device)))
            .collect();
        let flat = self.padded(bucket, parts, device);
        Ok(match self.sharding {
            // One rank's gradients are their own average: no round trip through the
            // communicator (a copy out and back of every gradient).
            _ if self.world == 1 => flat,
            Sharding::Replicated => {
                let full = span(Category::Communication, "all-reduce")
                    .run(|| comm.all_reduce(to(flat, self.transport.dtype()), ReduceOp::Avg))?;
                to(full, GRAD_DTYPE)
            }
            Sharding::Zero1 => {
                let _comm = span(Category::Communication, "reduce-scatter");
                let chunk = comm.reduce_scatter(to(flat, self.transport.dtype()), ReduceOp::Avg)?;
                to(chunk, GRAD_DTYPE)
            }
        })
    }

    /// The gradient of each of [`segments`](Self::segments) out of every bucket's
    /// [`reduce_bucket`](Self::reduce_bucket) result, and this rank's partial sum of squares
    /// (over its chunks, in bucket order; summed over ranks it is the squared global norm),
    /// shape `[1]`.
    pub fn reduced_segments(
        &self,
        reduced: Vec<Tensor<1>>,
        device: &Device,
    ) -> (Vec<Tensor<1>>, Tensor<1>) {
        assert_eq!(reduced.len(), self.buckets.len(), "one result per bucket");
        let mut segment_grads = Vec::with_capacity(self.segments.len());
        let mut sum_squares = Tensor::<1>::zeros([1], device);
        let mut segments = self.segments.iter().peekable();
        for (b, (bucket, result)) in self.buckets.iter().zip(reduced).enumerate() {
            let (chunk, full) = match self.sharding {
                _ if self.world == 1 => (result.clone(), Some(result)),
                Sharding::Replicated => (result.clone().slice(self.owned(bucket)), Some(result)),
                Sharding::Zero1 => (result, None),
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
        (segment_grads, sum_squares)
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

    /// Writes the updated values of this rank's segments (in the working type) into the model:
    /// directly when every rank holds every parameter, by all-gathering each bucket's chunks
    /// under ZeRO-1.
    pub fn apply<M: Module>(
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
                        let padding = bucket.chunk - filled;
                        parts.push(Tensor::zeros([padding], (device, self.working)));
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

    /// One optimizer step: [`optimize`](Self::optimize), then [`apply`](Self::apply).
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
        let updated = self.optimize(&model, optimizer, grads, lr, grad_scale);
        span(Category::Optimizer, "apply updated parameters")
            .run(|| self.apply(model, updated, comm, device))
    }

    /// AdamW on this rank's segments with their averaged `grads` (from
    /// [`reduce_gradients`](Self::reduce_gradients)) scaled by `grad_scale` (the clipping
    /// factor): the segments' new values in the working type. With master weights AdamW
    /// updates those, and the working values are their bf16 rounding.
    pub fn optimize<M: Module>(
        &self,
        model: &M,
        optimizer: &mut AdamW,
        grads: Vec<Tensor<1>>,
        lr: f64,
        grad_scale: f64,
    ) -> Vec<Tensor<1>> {
        let values = match self.keeps_master() {
            true => self.take_master(optimizer),
            false => self.segment_values(model),
        };
        let segments = self
            .segments
            .iter()
            .zip(values)
            .zip(grads)
            .map(|((segment, value), grad)| SegmentUpdate {
                path: self.path(segment),
                range: segment.range.clone(),
                value,
                grad,
            })
            .collect();
        let adamw = span(Category::Optimizer, "adamw");
        match self.keeps_master() {
            true => {
                let updated = adamw
                    .run(|| optimizer.update_with_working(segments, lr, grad_scale, self.working));
                self.keep_master(optimizer, updated)
            }
            false => adamw.run(|| optimizer.update(segments, lr, grad_scale)),
        }
    }

    /// Whether [`apply`](Self::apply) communicates (all-gathers the updated chunks).
    pub fn gathers_updates(&self) -> bool {
        self.sharding == Sharding::Zero1 && self.world > 1
    }

    /// This rank's master weights, in segment order, taken out of `optimizer`.
    fn take_master(&self, optimizer: &mut AdamW) -> Vec<Tensor<1>> {
        self.segments
            .iter()
            .map(|s| {
                let path = self.path(s);
                let master = optimizer.master.remove(path);
                let master = master
                    .unwrap_or_else(|| panic!("no master weights for {path}: prepare() sets them"));
                assert_eq!(
                    master.range, s.range,
                    "master weights of {path} cover other elements"
                );
                master.value
            })
            .collect()
    }

    /// Stores master weights in `optimizer`; returns the working-type roundings paired with them
    /// (after an update, written by it: see [`AdamW::update_with_working`]).
    fn keep_master(
        &self,
        optimizer: &mut AdamW,
        updated: Vec<(Tensor<1>, Tensor<1>)>,
    ) -> Vec<Tensor<1>> {
        self.segments
            .iter()
            .zip(updated)
            .map(|(s, (value, working))| {
                let master = Master {
                    range: s.range.clone(),
                    value,
                };
                optimizer.master.insert(self.path(s).to_owned(), master);
                working
            })
            .collect()
    }

    /// Readies a rank for its first step: rank 0's parameters on every rank, then the working
    /// parameters in their type. With master weights: this rank's segments of them come from
    /// `optimizer` where a checkpoint brought them, else from the (f32) parameters, and the
    /// working parameters are their rounding. Without: master weights a checkpoint of a bf16
    /// run brought become the parameters (they are more precise than its working weights).
    pub fn prepare<M: Module>(
        &self,
        model: M,
        optimizer: &mut AdamW,
        comm: &dyn Communicator,
        device: &Device,
    ) -> Result<M, DistError> {
        let model = self.broadcast_parameters(model, comm, device)?;
        if !self.keeps_master() {
            if optimizer.master.is_empty() {
                return Ok(model);
            }
            let master = self.take_master(optimizer);
            return self.apply(model, master, comm, device);
        }
        if optimizer.master.is_empty() {
            for (segment, value) in self.segments.iter().zip(self.segment_values(&model)) {
                let master = Master {
                    range: segment.range.clone(),
                    value: own_buffer(value),
                };
                optimizer
                    .master
                    .insert(self.path(segment).to_owned(), master);
            }
        }
        let master = self.take_master(optimizer);
        let rounded = master
            .into_iter()
            .map(|value| {
                let working = to(value.clone(), self.working);
                (value, working)
            })
            .collect();
        let working = self.keep_master(optimizer, rounded);
        self.apply(model, working, comm, device)
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
            let dtype = parts[0].dtype();
            parts.push(Tensor::zeros([padded - len], (device, dtype)));
        }
        Tensor::cat(parts, 0)
    }

    /// Each parameter of `bucket` out of its flat buffer `full`, in a buffer of its own.
    fn split_into(&self, bucket: &Bucket, full: Tensor<1>, out: &mut HashMap<ParamId, Tensor<1>>) {
        for (s, &offset) in bucket.slots.clone().zip(&bucket.offsets) {
            let slot = &self.slots[s];
            let value = full.clone().slice(offset..offset + slot.numel);
            out.insert(slot.id, own_buffer(value));
        }
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

/// The values of `t` (a slice of a larger tensor) in a buffer of their own. A slice shares its
/// base's buffer: kept as a parameter or as master weights it would keep all of the base alive,
/// and an in-place update of it (the fused AdamW on the CPU) would first copy all of the base.
fn own_buffer(t: Tensor<1>) -> Tensor<1> {
    // An operation's output is a new buffer of the slice's size; multiplying by 1 is exact.
    t.mul_scalar(1.0)
}

/// `t` in `dtype` (unchanged if it already is).
pub(crate) fn to(t: Tensor<1>, dtype: DType) -> Tensor<1> {
    match t.dtype() == dtype {
        true => t,
        false => t.cast(dtype),
    }
}

/// Casts a parameter's gradient in `grads` to `dtype`, in place (nothing if it has none).
fn cast_grad(grads: &mut GradientsParams, slot: &ParamSlot, dtype: DType) {
    fn cast<const D: usize>(grads: &mut GradientsParams, id: ParamId, dtype: DType) {
        if let Some(g) = grads.remove::<D>(id) {
            grads.register::<D>(id, g.cast(dtype));
        }
    }
    match slot.shape.len() {
        1 => cast::<1>(grads, slot.id, dtype),
        2 => cast::<2>(grads, slot.id, dtype),
        3 => cast::<3>(grads, slot.id, dtype),
        4 => cast::<4>(grads, slot.id, dtype),
        rank => panic!(
            "parameters of rank {rank} are not supported ({})",
            slot.path
        ),
    }
}

/// Removes a parameter's gradient from `grads`, flattened (`None` if it has none).
pub(crate) fn take_flat(grads: &mut GradientsParams, slot: &ParamSlot) -> Option<Tensor<1>> {
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
