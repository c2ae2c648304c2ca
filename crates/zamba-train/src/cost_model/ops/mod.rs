//! What each op class of one training step computes and moves through HBM, counted from the
//! config as `zamba_model::model` runs it: forward, the recomputed forward of every layer block
//! (with `"layers"` checkpointing), backward, and the AdamW update.
//!
//! Conventions. A tensor of `n` elements of type `T` read or written once moves `n · size(T)`
//! bytes; operands that stay in cache between kernels are not counted (every kernel starts from
//! HBM). Activations are in the compute type (`e` bytes: 2 in bf16, 4 in f32); the residual
//! stream, norm inputs, weight gradients, master weights and AdamW moments are f32.

use zamba_kernels::{ScanShape, scan_bytes, scan_flops};
use zamba_model::param_table::param_table;
use zamba_model::params::{ParamCounts, conv_flops_per_token, scan_flops_per_token};
use zamba_model::{ActivationCheckpointing, Precision};

mod gemm;

use gemm::{GEMMS, gemm, weight_casts};

use super::{Kernels, OpClass, Rate, Workload};
use crate::config::DistSection;

/// One op class's work in one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OpCost {
    pub class: OpClass,
    /// Its share of the model FLOPs (`FlopsPerToken::train` × tokens): forward + 2 × forward
    /// for the backward, no recomputation, attention without a causal discount.
    pub model_flops: f64,
    /// FLOPs the kernels execute: recomputed forwards included, attention's masked half skipped
    /// where the kernel skips it, the scan as `zamba_kernels::scan_flops` counts it. Memory-bound
    /// classes count none.
    pub flops: f64,
    /// Bytes read and written in HBM.
    pub bytes: f64,
    /// Kernel launches.
    pub launches: f64,
    /// Thread blocks of the op's kernels where they are too few to fill the card (`None`: enough).
    pub blocks: Option<f64>,
    /// The units its arithmetic runs on: its class's, unless its kernels use others.
    pub rate: Rate,
}

impl OpCost {
    fn new(class: OpClass) -> Self {
        Self {
            class,
            model_flops: 0.0,
            flops: 0.0,
            bytes: 0.0,
            launches: 0.0,
            blocks: None,
            rate: class.rate(),
        }
    }
}

/// Every op class's cost, in the order of the printed table; classes with no work are left out.
pub(super) fn count(w: &Workload, kernels: Kernels) -> Vec<OpCost> {
    let s = Shape::of(w);
    let mut ops: Vec<OpCost> = GEMMS.iter().map(|g| gemm(g, &s, kernels)).collect();
    ops.push(attention(&s, kernels));
    ops.extend(scan(&s, kernels));
    ops.push(conv(&s, kernels));
    ops.push(gelu_gate(&s));
    ops.push(norms(&s, kernels));
    ops.push(other_elementwise(&s, w, kernels));
    ops.push(weight_casts(&s, kernels));
    ops.push(cross_entropy(&s, kernels));
    let micro_batches = w.micro_batches as f64;
    for op in &mut ops {
        op.model_flops *= micro_batches;
        op.flops *= micro_batches;
        op.bytes *= micro_batches;
        op.launches *= micro_batches;
    }
    ops.push(gradient_accumulation(w, kernels));
    ops.push(optimizer(&s, w, kernels));
    ops.retain(|o| o.bytes > 0.0 || o.flops > 0.0 || o.model_flops > 0.0);
    ops
}

/// The dimensions every count uses, as `f64`.
struct Shape {
    /// Tokens of one micro-batch (`batch × seq_len`), batch and sequence length.
    t: f64,
    batch: usize,
    len: usize,
    d: f64,
    /// Mamba: `d_inner`, heads, head width, state, dt rank, conv taps.
    di: f64,
    h: f64,
    p: f64,
    n: f64,
    r: f64,
    k: f64,
    /// Attention width (q), key/value width, heads; MLP width; vocabulary.
    a: f64,
    kv: f64,
    heads: f64,
    i: f64,
    v: f64,
    layers: f64,
    /// Uses of the shared block (hybrid layers).
    uses: f64,
    /// Bytes of an activation element (the compute type).
    e: f64,
    /// Forwards of each layer block: 2 with recomputation.
    forwards: f64,
    /// Bytes of one bf16 cast of an f32 element (read 4, write 2); 0 in fp32, which casts nothing.
    cast: f64,
    config: zamba_model::ZambaConfig,
}

impl Shape {
    fn of(w: &Workload) -> Self {
        let c = w.config;
        let bf16 = w.precision == Precision::Bf16;
        Self {
            t: (w.batch * w.seq_len) as f64,
            batch: w.batch,
            len: w.seq_len,
            d: c.hidden_size as f64,
            di: c.d_inner() as f64,
            h: c.n_mamba_heads as f64,
            p: c.mamba_head_dim() as f64,
            n: c.mamba_d_state as f64,
            r: c.dt_rank() as f64,
            k: c.mamba_d_conv as f64,
            a: c.attention_hidden_size() as f64,
            kv: (c.num_key_value_heads * c.attention_head_dim()) as f64,
            heads: c.num_attention_heads as f64,
            i: c.intermediate_size as f64,
            v: c.vocab_size as f64,
            layers: c.num_hidden_layers as f64,
            uses: c.hybrid_layers().len() as f64,
            e: if bf16 { 2.0 } else { 4.0 },
            forwards: match w.checkpointing {
                ActivationCheckpointing::None => 1.0,
                ActivationCheckpointing::Layers => 2.0,
            },
            cast: if bf16 { 6.0 } else { 0.0 },
            config: c.clone(),
        }
    }
}

/// Causal attention over each use of the shared block: flash-style kernels (inputs read and the
/// output written once, an f32 log-sum-exp per row and head, masked blocks skipped). Planned: on
/// tensor cores, the backward recomputing the scores once (5 products against the forward's 2).
/// Current (kernels/src/cube/attention): one launch forward and two backward, each of which
/// recomputes the scores (7 products; the key-side pass reads `q`, `dO` and the row statistics
/// again); bf16 with a head dimension a multiple of 16 runs the tile kernels (tensor cores),
/// f32 or another head dimension the row kernels (scalar f32 products on the CUDA cores).
fn attention(s: &Shape, kernels: Kernels) -> OpCost {
    let full_forward = 4.0 * s.t * s.len as f64 * s.a * s.uses;
    let causal = (s.len as f64 + 1.0) / (2.0 * s.len as f64);
    let (q, kv, lse) = (s.t * s.a * s.e, s.t * s.kv * s.e, s.t * s.heads * 4.0);
    // Forward: read q, k, v, write o. Backward: read q, k, v, o, dO; write dq, dk, dv.
    let forward_io = 2.0 * q + 2.0 * kv;
    let backward_io = 3.0 * q + 2.0 * kv + q + 2.0 * kv;
    let forwards = s.forwards * (forward_io + lse);
    let tiles = s.e == 2.0 && s.config.attention_head_dim() % 16 == 0;
    let (backward_products, backward_bytes, backward_launches, rate) = match kernels {
        Kernels::Planned => (2.5, backward_io + lse, 3.0, Rate::Attention),
        Kernels::Current => (
            3.5,
            backward_io + 2.0 * q + 3.0 * lse,
            2.0,
            if tiles { Rate::Attention } else { Rate::Vector },
        ),
    };
    OpCost {
        model_flops: 3.0 * full_forward,
        flops: (s.forwards + backward_products) * full_forward * causal,
        bytes: s.uses * (forwards + backward_bytes),
        launches: s.uses * (s.forwards + backward_launches),
        rate,
        ..OpCost::new(OpClass::Attention)
    }
}

/// The selective scan of every layer: FLOPs and bytes from the kernels' own accounting
/// (`zamba_kernels::scan_flops`, `scan_bytes`), in chunks of `scan_chunk` steps; the model FLOPs
/// split 1 : 2 between forward and backward as `FlopsPerToken` counts them.
fn scan(s: &Shape, kernels: Kernels) -> [OpCost; 2] {
    let c = &s.config;
    let (b, di, n) = (s.batch, c.d_inner(), c.mamba_d_state);
    let shape = ScanShape {
        batch: b,
        channels: di,
        groups: c.n_mamba_heads,
        len: s.len,
        state: n,
    };
    let (mut flops_f, mut flops_b) = scan_flops(shape);
    let chunk = scan_chunk(kernels, n);
    let (bytes_f, mut bytes_b) = scan_bytes(shape, chunk, s.e as usize);
    let model = s.layers * scan_flops_per_token(c) * s.t;
    // Today's kernels (kernels/src/scan/cube): the forward runs a cube per (batch, channel)
    // lane, its units along time (`B·D` cubes: enough). The backward runs a cube per 16
    // consecutive channels of a group, 32 units along time each (`B·D / 16` cubes of 512), and
    // each cube writes its own f32 partial of dB and dC (`[B·G, cubes per group, L, N]`), read
    // back by their sums.
    let groups = c.n_mamba_heads;
    let cubes_per_group = (di / groups).div_ceil(CURRENT_BACKWARD_CHANNELS);
    let (forward_blocks, backward_blocks) = match kernels {
        Kernels::Planned => (None, None),
        Kernels::Current => {
            // The forward first composes each unit's steps into one map per state (`Δ·A`, its
            // `exp`, the decay product, the input: 6 FLOPs per state element), then walks them
            // again as `scan_flops` counts. The backward composes the same maps to recompute the
            // states and the adjoint's reverse-time maps (`Δ·A`, its `exp`, the decay product,
            // `dy·C`, the add and the product: 6 more).
            flops_f += 6 * (b * di * s.len * n) as u64;
            flops_b += 12 * (b * di * s.len * n) as u64;
            let partials = (b * groups * cubes_per_group * s.len * n) as u64;
            bytes_b += 2 * 2 * 4 * partials;
            let backward_cubes = b * groups * cubes_per_group;
            (Some((b * di) as f64), Some(backward_cubes as f64))
        }
    };
    let backward_kernels = match kernels {
        Kernels::Planned => 1.0,
        Kernels::Current => 4.0, // the scan, then three reductions of dB, dC and the parameters
    };
    let layer = |class, model_flops, flops: u64, bytes: u64, forwards, kernels, blocks| OpCost {
        model_flops,
        flops: s.layers * forwards * flops as f64,
        bytes: s.layers * forwards * bytes as f64,
        launches: s.layers * forwards * kernels,
        blocks,
        ..OpCost::new(class)
    };
    [
        layer(
            OpClass::ScanForward,
            model,
            flops_f,
            bytes_f,
            s.forwards,
            1.0,
            forward_blocks,
        ),
        layer(
            OpClass::ScanBackward,
            2.0 * model,
            flops_b,
            bytes_b,
            1.0,
            backward_kernels,
            backward_blocks,
        ),
    ]
}

/// Channels per cube of today's Cube backward on a GPU (kernels/src/scan/cube:
/// `MAX_BACKWARD_ROWS`).
const CURRENT_BACKWARD_CHANNELS: usize = 16;

/// Steps per checkpointed state: mamba-ssm's 2048-step chunks (planned); the Cube kernel's
/// (current).
fn scan_chunk(kernels: Kernels, state: usize) -> usize {
    match kernels {
        Kernels::Planned => 2048,
        Kernels::Current => zamba_kernels::cube_scan_chunk(state),
    }
}

/// The depthwise causal conv + SiLU of every layer on `[B, D, L]`: one pass forward (read x,
/// write the output), one backward (read x and the output gradient, write dx), then the sum of
/// the weight and bias gradients. Current (kernels/src/cube/conv): the planned passes, the
/// backward also writing `K + 1` f32 sums per chunk of steps (read back by the sum) and
/// recomputing each pre-activation `K + 1` times.
fn conv(s: &Shape, kernels: Kernels) -> OpCost {
    let c = &s.config;
    let forward_flops = s.layers * conv_flops_per_token(c) * s.t;
    let volume = s.t * s.di * s.e;
    let (partial_bytes, backward_forwards) = match kernels {
        Kernels::Planned => (0.0, 2.0),
        Kernels::Current => {
            let chunks =
                s.batch as f64 * s.di * s.len.div_ceil(zamba_kernels::CONV_CUBE_CHUNK) as f64;
            (2.0 * 4.0 * (s.k + 1.0) * chunks, s.k + 3.0)
        }
    };
    OpCost {
        model_flops: 3.0 * forward_flops,
        flops: (s.forwards + backward_forwards) * forward_flops,
        bytes: s.layers * ((s.forwards * 2.0 + 3.0) * volume + partial_bytes),
        launches: s.layers * (s.forwards + 2.0),
        ..OpCost::new(OpClass::CausalConv)
    }
}

/// `gelu(gate) · up` of each use of the shared MLP on `[T, I]`, in both kernel sets one fused
/// kernel each way (kernels/src/cube/gelu): the forward reads gate and up and writes the product;
/// the backward reads both and the output gradient, writes two gradients.
fn gelu_gate(s: &Shape) -> OpCost {
    let volume = s.t * s.i * s.e;
    OpCost {
        bytes: s.uses * (s.forwards * 3.0 + 5.0) * volume,
        launches: s.uses * (s.forwards + 1.0),
        ..OpCost::new(OpClass::GeluGate)
    }
}

/// Every RMSNorm: one per layer and the final one (width d), two per use of the shared block
/// (widths 2d and d). Planned: a layer's norm fused with the residual add before it (forward: read
/// the residual and the branch, write the new residual and the normalised output; backward: read
/// the input, the output gradient and the residual gradient, write the residual's and the
/// branch's gradients), one kernel forward, two backward (dx, then dγ's sum). Current
/// (kernels/src/cube/rms_norm): on f32 input and output, one kernel forward (read x, write y and
/// one f32 per row), two backward (read x, dy and the row statistics, write dx and each block of
/// rows' dγ; then the sum over the blocks); a hybrid layer's norm also reads the shared block's
/// `t` and normalises `x + t` (never written) both ways, the layer's residual add stays apart.
fn norms(s: &Shape, kernels: Kernels) -> OpCost {
    let (e, td) = (s.e, s.t * s.d);
    let instances = s.layers + 2.0 * s.uses;
    let (bytes, launches) = match kernels {
        Kernels::Planned => {
            let layer = |forwards: f64| forwards * (8.0 + 2.0 * e) + 12.0 + 2.0 * e;
            // [x, x0] (f32) in, u out, at width 2d; then the attention block's output.
            let shared_input = 2.0 * (s.forwards * (4.0 + e) + 8.0 + e);
            let pre_ff = s.forwards * 2.0 * e + 3.0 * e;
            let per_use = shared_input + pre_ff;
            let bytes = td * (s.layers * layer(s.forwards) + layer(1.0) + s.uses * per_use);
            (bytes, instances * (s.forwards + 2.0) + 3.0)
        }
        Kernels::Current => {
            // Per width d: x read and y written per forward; x, dy read and dx written backward;
            // the blocks' dγ sums written and read once.
            let blocks = s.t.min(zamba_kernels::RMS_NORM_CUBE_BLOCKS as f64);
            let pass = |forwards: f64| (forwards * 8.0 + 12.0) * td + 8.0 * blocks * s.d;
            // One f32 per row: written by each forward, read by the backward.
            let stats = |forwards: f64| (forwards + 1.0) * 4.0 * s.t;
            // Widths in units of d: layers d, shared input 2d, pre-ff d; the final norm runs once.
            let widths = s.layers + 3.0 * s.uses;
            // A hybrid layer's `t`, read by each forward and the backward.
            let addend = s.uses * (s.forwards + 1.0) * 4.0 * td;
            let bytes = widths * pass(s.forwards)
                + pass(1.0)
                + instances * stats(s.forwards)
                + stats(1.0)
                + addend;
            (bytes, instances * (s.forwards + 2.0) + 3.0)
        }
    };
    OpCost {
        bytes,
        launches,
        ..OpCost::new(OpClass::RmsNorm)
    }
}

/// What no other class covers. Planned: the embedding lookup and its gradient (a dense f32
/// gradient of the table, zeroed, rows added), and the gradient sums where the residual stream
/// and the embeddings feed the shared block. Current: also every cast between f32 and bf16 of
/// activations, the residual adds, `[x, x0]`'s concatenation and the padding mask.
fn other_elementwise(s: &Shape, w: &Workload, kernels: Kernels) -> OpCost {
    let (td, c) = (s.t * s.d, s.cast);
    let embedding = td * 8.0 + s.v * s.d * 4.0 + td * 12.0;
    let shared_grad_sums = s.uses * 2.0 * 12.0 * td;
    let (bytes, launches) = match kernels {
        Kernels::Planned => (embedding + shared_grad_sums, 3.0 + 2.0 * s.uses),
        Kernels::Current => {
            let casts = if c > 0.0 { 1.0 } else { 0.0 };
            let pad = if w.config.pad_token_id.is_some() {
                1.0
            } else {
                0.0
            };
            // Forward: the norm's output to bf16, the block's output to f32, the residual add;
            // backward: the same casts, the sum of the residual's two gradients.
            let layer = s.forwards * (2.0 * c + 12.0) + 2.0 * c + 12.0;
            let layer_kernels = (s.forwards + 1.0) * (1.0 + 2.0 * casts);
            // Hybrid layers: x's third gradient (from [x, x0]); `x + t` is the norm's.
            let hybrid = 12.0;
            // Per use, forward: [x, x0] (16), u cast by each of q, k, v (width 2d: 6c), the
            // attention block's output to f32, h cast by gate and up, t to f32 (4c). Backward: the
            // same casts, u's gradient summed over q, k, v (2 sums at width 2d: 48), h's over gate
            // and up (12), the slices of [x, x0]'s gradient (16), x0's gradient sum (12).
            let shared = s.forwards * (16.0 + 10.0 * c) + 10.0 * c + 48.0 + 12.0 + 16.0 + 12.0;
            let shared_kernels = s.forwards * (1.0 + 7.0 * casts) + 7.0 * casts + 6.0;
            // The final norm's output to bf16 and its gradient back (the loss reads the logits
            // in the compute type).
            let head = 2.0 * c * td;
            let bytes = embedding
                + pad * 2.0 * 12.0 * td
                + td * (s.layers * layer + s.uses * (hybrid + shared))
                + head;
            let launches = 3.0
                + 3.0 * pad
                + s.layers * layer_kernels
                + s.uses * (1.0 + shared_kernels)
                + 2.0 * casts;
            (bytes, launches)
        }
    };
    OpCost {
        bytes,
        launches,
        ..OpCost::new(OpClass::OtherElementwise)
    }
}

/// The loss over `[T, V]` logits. Planned: a chunked kernel reading the logits (in the compute
/// type) in the forward, reading them again and writing their gradient in the backward. Current
/// (kernels/src/cube/cross_entropy): the same two passes, plus the per-row statistics (one f32
/// log-sum-exp and one row loss, the i32 targets) and one small launch for the mean.
fn cross_entropy(s: &Shape, kernels: Kernels) -> OpCost {
    let logits = s.t * s.v;
    let (bytes, launches) = match kernels {
        Kernels::Planned => (3.0 * logits * s.e, 2.0),
        Kernels::Current => {
            // Per row: the forward reads the target, writes lse and the row loss (12); the mean
            // reads the row loss and the target (8); the backward the target and lse (8).
            let per_row = 12.0 + 8.0 + 8.0;
            (3.0 * logits * s.e + per_row * s.t, 3.0)
        }
    };
    OpCost {
        bytes,
        launches,
        ..OpCost::new(OpClass::CrossEntropy)
    }
}

/// Micro-batches after the first add their weight gradients to the f32 sums. Planned: each GEMM
/// accumulates in place (one more f32 read of the gradient); current: an add per parameter tensor
/// (two f32 reads, one write).
fn gradient_accumulation(w: &Workload, kernels: Kernels) -> OpCost {
    let params = ParamCounts::of(w.config).total() as f64;
    let extra = w.micro_batches.saturating_sub(1) as f64;
    let (bytes, launches) = match kernels {
        Kernels::Planned => (4.0 * params, 0.0),
        Kernels::Current => (12.0 * params, param_table(w.config).len() as f64),
    };
    OpCost {
        bytes: extra * bytes,
        launches: extra * launches,
        ..OpCost::new(OpClass::GradientAccumulation)
    }
}

/// AdamW over every parameter: one pass reading the f32 master, gradient and moments, writing
/// master and moments (and the bf16 working copy in bf16). Planned: one launch per gradient
/// bucket. Current (kernels/src/cube/adamw): one launch per parameter tensor (the optimizer keeps
/// its state per parameter, a ZeRO-1 rank per segment of one).
fn optimizer(s: &Shape, w: &Workload, kernels: Kernels) -> OpCost {
    let params = ParamCounts::of(w.config).total() as f64;
    let bf16_copy = if s.cast > 0.0 { 2.0 } else { 0.0 };
    let launches = match kernels {
        Kernels::Planned => {
            let bucket = DistSection::default().bucket_mb * (1 << 20) as f64;
            (4.0 * params / bucket).ceil()
        }
        Kernels::Current => param_table(w.config).len() as f64,
    };
    OpCost {
        bytes: (28.0 + bf16_copy) * params,
        launches,
        ..OpCost::new(OpClass::Optimizer)
    }
}
