//! Causal softmax attention as one fused op on Flex, forward and backward (on CubeCL devices,
//! the flash-style op of `cube::attention`).
//!
//! Burn's attention on Flex is its generic fallback: a batched `Q·Kᵀ` over the whole `T × T`
//! square, a mask, a softmax of several single-threaded element-wise passes, then `P·V`, with
//! every intermediate a new zero-filled tensor. Here each (batch, head) is one task (tasks in
//! parallel): the scores are computed only for the causal part, in blocks of [`BLOCK`] query rows
//! (block `r0..r1` needs keys `0..r1`), each row's softmax is one vectorised pass, and `P·V` is
//! written straight into the `[B, L, H, hd]` output that the output projection reads. The
//! backward keeps `P` (`B·H·T²` floats, as Burn's does) and follows the standard softmax-attention
//! gradient, block by block:
//!
//! ```text
//! dV = Pᵀ·dO    dP = dO·Vᵀ    dS = P ⊙ (dP − rowsum(P ⊙ dP))·scale    dQ = dS·K    dK = dSᵀ·Q
//! ```
//!
//! Grouped-query attention reads each key/value head for its group of query heads in place (no
//! repeated copies); the gradients of a key/value head are summed over its group in a fixed order.

use std::mem::MaybeUninit;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Shape, Tensor};
use rayon::prelude::*;

use crate::cross_entropy::{log_sum_exp, softmax_times};
use crate::dtype::expect_same_dtype;
use crate::host::unwritten;
use crate::simd::{Isa, Lanes, simd_dispatch, simd_level};
use crate::strided::{Dst, Mat, SharedMut, Threads, gemm_into, written};

/// Query rows per block: a block's scores cover keys `0..end of block`.
const BLOCK: usize = 64;

/// Causal softmax attention, `softmax(scale · Q·Kᵀ + causal mask) · V`, per batch and head.
///
/// `q`: `[B, L, H, hd]`; `k`, `v`: `[B, L, H_kv, hd]` with `H` a multiple of `H_kv` (query head
/// `h` reads key/value head `h / (H / H_kv)`). Returns `[B, L, H, hd]`. This is the layout of the
/// projections' outputs reshaped, so neither the inputs nor the output need a transposed copy.
/// Fused on Flex devices for `f32` inputs (keeping the probabilities for the backward); on
/// CubeCL devices (features `cuda`, `cube-cpu`) fused flash-style for any float dtype (keeping
/// one f32 statistic per query row: memory linear in `L`); [`causal_attention_reference`]
/// elsewhere.
///
/// # Panics
/// If the shapes disagree (the message names them).
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f64) -> Tensor<4> {
    let _span = zamba_trace::span(zamba_trace::Category::Attention, "attention");
    check(&q, &k, &v);
    #[cfg(feature = "cube")]
    if crate::on_cube(&q.device()) {
        return crate::cube::ops::causal_attention(q, k, v, scale);
    }
    let fused = crate::on_flex(&q.device()) && [&q, &k, &v].iter().all(|t| t.dtype() == DType::F32);
    if !fused {
        return causal_attention_reference(q, k, v, scale);
    }
    Tensor::from_dispatch(<Dispatch as AttentionBackend>::causal_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        scale as f32,
    ))
}

/// Which kernels [`causal_attention`] runs on `device` for inputs of `dtype` with head dimension
/// `head_dim`, where `device` is a CubeCL device: the tile kernels (tensor cores where the device
/// has them for `dtype`) or the row kernels; `None` elsewhere.
#[cfg(feature = "cube")]
pub fn cube_attention_kernels(
    device: &burn::tensor::Device,
    dtype: DType,
    head_dim: usize,
) -> Option<&'static str> {
    match device.as_dispatch() {
        burn::backend::DispatchDevice::Cube(cube) => Some(crate::cube::ops::attention_kernels_on(
            cube, dtype, head_dim,
        )),
        _ => None,
    }
}

/// [`causal_attention`] with Burn's `attention` (key/value heads repeated for grouped queries);
/// any backend.
pub fn causal_attention_reference(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f64,
) -> Tensor<4> {
    check(&q, &k, &v);
    let groups = q.dims()[2] / k.dims()[2];
    let [q, k, v] = [q, k, v].map(|t| t.swap_dims(1, 2)); // [B, heads, L, hd]
    let [k, v] = [k, v].map(|t| repeat_kv(t, groups));
    let options = AttentionModuleOptions {
        scale: Some(scale),
        softcap: None,
        is_causal: true,
    };
    attention(q, k, v, None, None, options).swap_dims(1, 2)
}

/// `[B, kv, L, hd]` → `[B, kv·groups, L, hd]`, each kv head repeated `groups` times in a row.
fn repeat_kv(t: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return t;
    }
    let [b, kv, l, hd] = t.dims();
    t.unsqueeze_dim::<5>(2)
        .expand([b, kv, groups, l, hd])
        .reshape([b, kv * groups, l, hd])
}

fn check(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) {
    expect_same_dtype(
        "causal_attention",
        &[("q", q.dtype()), ("k", k.dtype()), ("v", v.dtype())],
    );
    let [b, l, h, hd] = q.dims();
    let kv = k.dims()[2];
    assert!(
        k.dims() == v.dims() && k.dims() == [b, l, kv, hd] && kv > 0 && h % kv == 0 && h > 0,
        "causal_attention: q {:?}, k {:?}, v {:?} — expected q [B, L, H, hd] and k, v \
         [B, L, H_kv, hd] with H a positive multiple of H_kv",
        q.dims(),
        k.dims(),
        v.dims()
    );
}

#[backend_extension(Flex, Autodiff)]
pub(crate) trait AttentionBackend: Backend {
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self>;
}

/// Sizes of one call: batch, sequence, query heads, key/value heads, head dimension.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    len: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Dims {
    fn of(q: &FlexTensor, k: &FlexTensor) -> Dims {
        let [batch, len, heads, head_dim] = q.layout().shape().dims::<4>();
        let kv_heads = k.layout().shape()[2];
        // What `check` ensured: every key/value head has a group of query heads, whose tasks
        // write its gradients.
        assert!(kv_heads > 0 && heads % kv_heads == 0 && heads > 0);
        Dims {
            batch,
            len,
            heads,
            kv_heads,
            head_dim,
        }
    }

    /// Row blocks `(start, end)` of the sequence.
    fn blocks(self) -> impl Iterator<Item = (usize, usize)> {
        (0..self.len)
            .step_by(BLOCK)
            .map(move |r0| (r0, (r0 + BLOCK).min(self.len)))
    }

    fn shape(self, heads: usize) -> Shape {
        Shape::from(vec![self.batch, self.len, heads, self.head_dim])
    }
}

/// The `[L, hd]` matrix of (batch `b`, head `h`) of a `[B, L, heads, hd]` tensor.
fn head(t: &FlexTensor, b: usize, h: usize) -> Mat {
    Mat::of(t, &[b, 0, h, 0], 1, 3)
}

/// The `[L, hd]` destination of (batch `b`, head `h`) in a contiguous `[B, L, heads, hd]` buffer.
fn head_dst(buf: SharedMut, d: Dims, heads: usize, b: usize, h: usize) -> Dst {
    let row = heads * d.head_dim;
    Dst::rows_of(buf.ptr(), row).at(b * d.len, h * d.head_dim)
}

/// The row-major `len × len` matrix at `ptr`.
fn square(ptr: *const f32, len: usize) -> Mat {
    Mat {
        ptr,
        rows: len,
        cols: len,
        rs: len as isize,
        cs: 1,
    }
}

fn contiguous(shape: Shape) -> Vec<isize> {
    Layout::contiguous(shape).strides().to_vec()
}

/// The probabilities `P` the forward keeps for the backward, `[B, H, L, L]`: in each `L × L` slab,
/// row `i` of the block `r0..r1` holds columns `0..r1` (the softmax up to the diagonal, zeros
/// after it). The columns after `r1` are never computed: they are never written (uninitialised
/// memory), and never read.
struct Probs {
    data: Box<[MaybeUninit<f32>]>,
    len: usize,
}

impl std::fmt::Debug for Probs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probs")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Probs {
    /// The `L × L` slab of (batch, head) `slab` (`b · H + h`), for GEMMs that read only the
    /// written columns of its rows.
    fn slab(&self, slab: usize) -> Mat {
        let area = self.len * self.len;
        square(
            self.data[slab * area..(slab + 1) * area].as_ptr().cast(),
            self.len,
        )
    }

    /// Columns `0..=i` of row `i` of slab `slab`.
    fn row(&self, slab: usize, i: usize) -> &[f32] {
        let start = (slab * self.len + i) * self.len;
        let written = &self.data[start..start + i + 1];
        // SAFETY: the forward wrote columns `0..r1 > i` of every row `i` (see `Probs`).
        unsafe { written.assume_init_ref() }
    }
}

/// The output, and with `keep_probs` the probabilities `P` (see [`Probs`]).
fn forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    scale: f32,
    keep_probs: bool,
) -> (FlexTensor, Option<Probs>) {
    let d = Dims::of(q, k);
    let square = d.len * d.len;
    let group = d.heads / d.kv_heads;
    let mut probs = keep_probs.then(|| unwritten(d.batch * d.heads * square));
    let fill = |out| {
        let out = SharedMut(out);
        // One task per (batch, head): it writes its head of the output and its `L × L` slab
        // of `P` (its own, or scratch when `P` is not kept).
        let attend = |task: usize, p: &mut [MaybeUninit<f32>]| {
            let (b, h) = (task / d.heads, task % d.heads);
            let heads = [head(q, b, h), head(k, b, h / group), head(v, b, h / group)];
            let dst = head_dst(out, d, d.heads, b, h);
            // SAFETY: the heads are views of q, k, v, which outlive the call; `dst` is head
            // (b, h) of the output buffer, which only this task writes.
            unsafe { attend_head(d, scale, heads, p, dst) };
        };
        match probs.as_mut() {
            // (`L = 0`: no slabs, and nothing to attend.)
            Some(probs) => probs
                .par_chunks_mut(square.max(1))
                .enumerate()
                .for_each(|(task, p)| attend(task, p)),
            None => (0..d.batch * d.heads)
                .into_par_iter()
                .for_each(|task| attend(task, &mut unwritten(square))),
        }
    };
    // SAFETY: the tasks write every (batch, head) of the output (`attend_head` writes all rows).
    let out = unsafe { written(d.shape(d.heads), contiguous(d.shape(d.heads)), fill) };
    (out, probs.map(|data| Probs { data, len: d.len }))
}

/// One (batch, head): the scores and softmax into its `L × L` slab `p` as [`Probs`] describes,
/// and `P·V` into all `L` rows of `dst`.
///
/// # Safety
/// `qm`, `km`, `vm` are valid for reads of their `[L, hd]` elements; `dst` is valid for writes
/// of `[L, hd]` elements that nothing else accesses during the call.
unsafe fn attend_head(
    d: Dims,
    scale: f32,
    [qm, km, vm]: [Mat; 3],
    p: &mut [MaybeUninit<f32>],
    dst: Dst,
) {
    assert_eq!(p.len(), d.len * d.len, "one L × L slab");
    for (r0, r1) in d.blocks() {
        // SAFETY: writes rows r0..r1, columns 0..r1 of the slab `p` (`L × L`, borrowed mutably);
        // reads the caller's q and k heads.
        unsafe {
            gemm_into(
                Dst::rows_of(p.as_mut_ptr().cast(), d.len).at(r0, 0),
                qm.rows(r0, r1),
                km.rows(0, r1).t(),
                scale,
                false,
                Threads::Caller,
            );
        }
        for i in r0..r1 {
            let row = &mut p[i * d.len..i * d.len + r1];
            // SAFETY: the GEMM above wrote columns 0..r1 of row i.
            let row = unsafe { row.assume_init_mut() };
            let lse = log_sum_exp(&row[..=i]);
            softmax_times(&mut row[..=i], lse, 1.0);
            row[i + 1..].fill(0.0);
        }
        let p_rows = square(p.as_ptr().cast(), d.len);
        // SAFETY: reads rows r0..r1, columns 0..r1 of the slab (written above) and the caller's v
        // head; writes rows r0..r1 of `dst` (the caller's promise).
        unsafe {
            gemm_into(
                dst.at(r0, 0),
                p_rows.rows(r0, r1).cols(0, r1),
                vm.rows(0, r1),
                1.0,
                false,
                Threads::Caller,
            );
        }
    }
}

simd_dispatch!(fn softmax_backward_row(p: &[f32], dp: &mut [f32], scale: f32)
    = softmax_backward_row_generic, level = simd_level());

/// `dp ← p ⊙ (dp − Σ p ⊙ dp) · scale` over one row.
#[inline(always)]
fn softmax_backward_row_generic<V: Lanes>(isa: Isa<V>, p: &[f32], dp: &mut [f32], scale: f32) {
    let split = p.len() - p.len() % V::WIDTH;
    let mut dot = isa.splat(0.0);
    for i in (0..split).step_by(V::WIDTH) {
        dot = isa.load(&p[i..]).mul_add(isa.load(&dp[i..]), dot);
    }
    let dot = (split..p.len()).fold(dot.sum(), |s, i| s + p[i] * dp[i]);
    let (dot_v, scale_v) = (isa.splat(dot), isa.splat(scale));
    for i in (0..split).step_by(V::WIDTH) {
        (isa.load(&p[i..]) * (isa.load(&dp[i..]) - dot_v) * scale_v).store(&mut dp[i..]);
    }
    for i in split..p.len() {
        dp[i] = p[i] * (dp[i] - dot) * scale;
    }
}

/// `(dq, dk, dv)` from the kept probabilities and the output gradient.
fn backward(
    inputs: &[FlexTensor; 3],
    probs: &Probs,
    dout: &FlexTensor,
    scale: f32,
) -> [FlexTensor; 3] {
    let d = Dims::of(&inputs[0], &inputs[1]);
    let (q_shape, kv_shape) = (d.shape(d.heads), d.shape(d.kv_heads));
    let [mut dk, mut dv] = [(); 2].map(|_| unwritten(kv_shape.num_elements()));
    let (dk_ptr, dv_ptr) = (
        SharedMut(dk.as_mut_ptr().cast()),
        SharedMut(dv.as_mut_ptr().cast()),
    );
    let fill = |dq| {
        let grads = HeadGrads {
            inputs,
            dout,
            probs,
            scale,
            d,
            dst: [SharedMut(dq), dk_ptr, dv_ptr],
        };
        // One task per (batch, key/value head): it owns that head's dK, dV and its group's dQ.
        (0..d.batch * d.kv_heads).into_par_iter().for_each(|task| {
            // SAFETY: the buffers hold every head; each task writes only its own heads.
            unsafe { grads.run(task / d.kv_heads, task % d.kv_heads) }
        });
    };
    // SAFETY: every query head is in the group of one key/value head, whose task writes all of it.
    let dq = unsafe { written(q_shape.clone(), contiguous(q_shape), fill) };
    let wrap = |data: Box<[MaybeUninit<f32>]>| {
        // SAFETY: the tasks wrote every (batch, key/value head) of dK and dV in full.
        let data = unsafe { data.assume_init() }.into_vec();
        FlexTensor::new(
            burn::backend::Bytes::from_elems(data),
            Layout::contiguous(kv_shape.clone()),
            DType::F32,
        )
    };
    [dq, wrap(dk), wrap(dv)]
}

/// The backward's operands, and its destinations: contiguous `[B, L, heads, hd]` buffers of dQ,
/// dK and dV.
struct HeadGrads<'a> {
    inputs: &'a [FlexTensor; 3],
    dout: &'a FlexTensor,
    probs: &'a Probs,
    scale: f32,
    d: Dims,
    dst: [SharedMut; 3],
}

impl HeadGrads<'_> {
    /// dK and dV of key/value head `g` of batch `b`, and dQ of the query heads of its group, all
    /// written in full: block by block, the standard softmax-attention gradient.
    ///
    /// # Safety
    /// `dst` are valid for writes of whole buffers, and nothing else accesses the heads this call
    /// writes while it runs.
    unsafe fn run(&self, b: usize, g: usize) {
        let (d, [q, k, v]) = (self.d, self.inputs);
        let group = d.heads / d.kv_heads;
        let [dq, dk, dv] = self.dst;
        let (km, vm) = (head(k, b, g), head(v, b, g));
        let dk_dst = head_dst(dk, d, d.kv_heads, b, g);
        let dv_dst = head_dst(dv, d, d.kv_heads, b, g);
        let mut ds = vec![0f32; d.len * d.len];
        for (n, h) in (g * group..(g + 1) * group).enumerate() {
            let accumulate = n > 0;
            let (qm, dom, slab) = (head(q, b, h), head(self.dout, b, h), b * d.heads + h);
            let pm = self.probs.slab(slab);
            // SAFETY (all GEMMs below): the destinations are this task's own heads of dQ, dK, dV
            // (the caller's promise) and its scratch `ds`; the operands are views of the inputs,
            // and ranges of `P` and `ds` written before.
            for (c0, c1) in d.blocks() {
                // dV[c0..c1] (+)= P[c0..L, c0..c1]ᵀ · dO[c0..L]
                let p_block = pm.rows(c0, d.len).cols(c0, c1).t();
                let (dst, dom) = (dv_dst.at(c0, 0), dom.rows(c0, d.len));
                unsafe { gemm_into(dst, p_block, dom, 1.0, accumulate, Threads::Caller) };
            }
            for (r0, r1) in d.blocks() {
                // dP[r0..r1, 0..r1] = dO[r0..r1] · V[0..r1]ᵀ, then dS in place.
                let dst = Dst::rows_of(ds.as_mut_ptr(), d.len).at(r0, 0);
                let (dom, vm) = (dom.rows(r0, r1), vm.rows(0, r1).t());
                unsafe { gemm_into(dst, dom, vm, 1.0, false, Threads::Caller) };
                for i in r0..r1 {
                    let row = &mut ds[i * d.len..i * d.len + r1];
                    softmax_backward_row(self.probs.row(slab, i), &mut row[..=i], self.scale);
                    row[i + 1..].fill(0.0);
                }
                // dQ[r0..r1] = dS[r0..r1, 0..r1] · K[0..r1]
                let ds_block = square(ds.as_ptr(), d.len).rows(r0, r1).cols(0, r1);
                let dst = head_dst(dq, d, d.heads, b, h).at(r0, 0);
                unsafe { gemm_into(dst, ds_block, km.rows(0, r1), 1.0, false, Threads::Caller) };
            }
            let dsm = square(ds.as_ptr(), d.len);
            for (c0, c1) in d.blocks() {
                // dK[c0..c1] (+)= dS[c0..L, c0..c1]ᵀ · Q[c0..L]
                let ds_block = dsm.rows(c0, d.len).cols(c0, c1).t();
                let (dst, qm) = (dk_dst.at(c0, 0), qm.rows(c0, d.len));
                unsafe { gemm_into(dst, ds_block, qm, 1.0, accumulate, Threads::Caller) };
            }
        }
    }
}

impl AttentionBackend for Flex {
    fn causal_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, scale: f32) -> FlexTensor {
        forward(&q, &k, &v, scale, false).0
    }
}

#[derive(Clone, Debug)]
struct AttentionState {
    /// `q`, `k`, `v` as they came (views, not copies).
    inputs: [FlexTensor; 3],
    probs: Arc<Probs>,
    scale: f32,
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let _span = zamba_trace::span(zamba_trace::Category::Attention, "attention backward");
        let dout = grads.consume::<Flex>(&ops.node);
        let AttentionState {
            inputs,
            probs,
            scale,
        } = ops.state;
        let computed = backward(&inputs, &probs, &dout, scale);
        for (parent, grad) in ops.parents.into_iter().zip(computed) {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

impl<C: CheckpointStrategy> AttentionBackend for Autodiff<Flex, C> {
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        let [(q, gq), (k, gk), (v, gv)] = [q, k, v].map(|t| t.into_parts());
        match AttentionBackward
            .prepare::<C>([gq, gk, gv])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, probs) = forward(&q, &k, &v, scale, true);
                let probs = Arc::new(probs.expect("a forward asked for probabilities keeps them"));
                prep.finish(
                    AttentionState {
                        inputs: [q, k, v],
                        probs,
                        scale,
                    },
                    out,
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(&q, &k, &v, scale, false).0),
        }
    }
}
