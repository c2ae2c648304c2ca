//! Per-head products `W[h] · x[b, h]` (Zamba's multi-head Mamba: `x_proj` and `dt_proj` have
//! one weight matrix per head) as direct GEMMs on Flex, forward and backward.
//!
//! As a broadcast batched matmul in Burn, the backward transposes `x` into a contiguous copy and
//! sums a `[B, H, M, K]` weight gradient over the batch. Here every product reads its operands in
//! place (the `dt` rows of `x_proj`'s output are a strided slice) and the weight gradient
//! accumulates over the batch inside the GEMM.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Shape, Tensor};
use rayon::prelude::*;

use crate::dtype::expect_same_dtype;
use crate::host::{from_f32, zeros};
use crate::strided::{
    Dst, Mat, SharedMut, Threads, dense_strides_like, gemm_into, product_with_grads, written,
};

/// `w[h] · x[b, h]` for every batch `b` and head `h`: `w` `[H, M, K]`, `x` `[B, H, K, N]` →
/// `[B, H, M, N]`. Direct GEMMs on Flex devices for `f32` operands; [`per_head_matmul_reference`]
/// elsewhere.
///
/// # Panics
/// If the head counts or the inner dimensions disagree.
pub fn per_head_matmul(w: Tensor<3>, x: Tensor<4>) -> Tensor<4> {
    let _span = zamba_trace::span_with(zamba_trace::Category::Gemm, || {
        format!("per-head {:?}·{:?}", w.dims(), x.dims())
    });
    check(&w, &x);
    #[cfg(feature = "cube")]
    if crate::on_cube(&x.device()) {
        return crate::cube::ops::per_head_matmul(w, x);
    }
    match fused(&w, &x) {
        true => fused_op(w, x, false),
        false => per_head_matmul_reference(w, x),
    }
}

/// [`per_head_matmul`] with each product transposed, written in that layout: `[B, H, N, M]`,
/// contiguous (the time-major `B`/`C` the selective scan reads).
pub fn per_head_matmul_transposed(w: Tensor<3>, x: Tensor<4>) -> Tensor<4> {
    let _span = zamba_trace::span_with(zamba_trace::Category::Gemm, || {
        format!("per-head {:?}·{:?}", w.dims(), x.dims())
    });
    check(&w, &x);
    #[cfg(feature = "cube")]
    if crate::on_cube(&x.device()) {
        return crate::cube::ops::per_head_matmul_transposed(w, x);
    }
    match fused(&w, &x) {
        true => fused_op(w, x, true).swap_dims(2, 3),
        false => per_head_matmul_reference(w, x).swap_dims(2, 3),
    }
}

fn fused(w: &Tensor<3>, x: &Tensor<4>) -> bool {
    crate::on_flex(&x.device()) && x.dtype() == DType::F32 && w.dtype() == DType::F32
}

/// `[B, H, M, N]`; with `transposed`, strides `[H·M·N, M·N, 1, M]`.
fn fused_op(w: Tensor<3>, x: Tensor<4>, transposed: bool) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as HeadsBackend>::per_head_matmul(
        w.into_dispatch(),
        x.into_dispatch(),
        transposed,
    ))
}

/// [`per_head_matmul`] as a broadcast batched matmul; any backend.
pub fn per_head_matmul_reference(w: Tensor<3>, x: Tensor<4>) -> Tensor<4> {
    check(&w, &x);
    w.unsqueeze::<4>().matmul(x)
}

fn check(w: &Tensor<3>, x: &Tensor<4>) {
    expect_same_dtype("per_head_matmul", &[("w", w.dtype()), ("x", x.dtype())]);
    let ([h, _, k], [_, xh, xk, _]) = (w.dims(), x.dims());
    assert!(
        h == xh && k == xk,
        "per_head_matmul: w {:?} and x {:?} — expected w [H, M, K] and x [B, H, K, N]",
        w.dims(),
        x.dims()
    );
}

#[backend_extension(Flex, Autodiff)]
pub(crate) trait HeadsBackend: Backend {
    /// `[B, H, M, N]`; with `transposed`, strides `[H·M·N, M·N, 1, M]`.
    fn per_head_matmul(
        w: FloatTensor<Self>,
        x: FloatTensor<Self>,
        transposed: bool,
    ) -> FloatTensor<Self>;
}

/// Head `h` of `w` (`[M, K]`).
fn weight(w: &FlexTensor, h: usize) -> Mat {
    Mat::of(w, &[h, 0, 0], 1, 2)
}

/// Head `h` of batch `b` of a `[B, H, R, C]` tensor (`[R, C]`).
fn part(t: &FlexTensor, b: usize, h: usize) -> Mat {
    Mat::of(t, &[b, h, 0, 0], 2, 3)
}

/// A `[B, H, R, C]` destination with `strides`, at (batch `b`, head `h`).
fn part_dst(buf: SharedMut, strides: &[isize], b: usize, h: usize) -> Dst {
    Dst {
        ptr: buf
            .ptr()
            .wrapping_offset(b as isize * strides[0] + h as isize * strides[1]),
        rs: strides[2],
        cs: strides[3],
    }
}

/// `f(b, h)` for every (batch, head) pair, in parallel.
fn for_each_part(batch: usize, heads: usize, f: impl Fn(usize, usize) + Sync) {
    (0..batch * heads)
        .into_par_iter()
        .for_each(|task| f(task / heads, task % heads));
}

fn forward(w: &FlexTensor, x: &FlexTensor, transposed: bool) -> FlexTensor {
    let [b, h, _, n] = x.layout().shape().dims::<4>();
    let m = w.layout().shape()[1];
    let shape = Shape::from(vec![b, h, m, n]);
    let strides = match transposed {
        true => vec![(h * m * n) as isize, (m * n) as isize, 1, m as isize],
        false => Layout::contiguous(shape.clone()).strides().to_vec(),
    };
    let fill = |out| {
        let out = SharedMut(out);
        // SAFETY: each task writes its own (batch, head) matrix of the output.
        for_each_part(b, h, |bi, hi| unsafe {
            let dst = part_dst(out, &strides, bi, hi);
            gemm_into(
                dst,
                weight(w, hi),
                part(x, bi, hi),
                1.0,
                false,
                Threads::Caller,
            )
        })
    };
    // SAFETY: the (batch, head) matrices cover the output.
    unsafe { written(shape, strides.clone(), fill) }
}

/// `dx[b, h] = w[h]ᵀ · dy[b, h]`, in the memory order of `x` where that is dense.
fn grad_x(w: &FlexTensor, x: &FlexTensor, dy: &FlexTensor) -> FlexTensor {
    let [b, h, _, _] = x.layout().shape().dims::<4>();
    let strides = dense_strides_like(x.layout());
    let fill = |dx| {
        let dx = SharedMut(dx);
        // SAFETY: each task writes its own (batch, head) matrix of dx.
        for_each_part(b, h, |bi, hi| unsafe {
            let dst = part_dst(dx, &strides, bi, hi);
            gemm_into(
                dst,
                weight(w, hi).t(),
                part(dy, bi, hi),
                1.0,
                false,
                Threads::Caller,
            )
        })
    };
    // SAFETY: the (batch, head) matrices cover dx (its strides are dense).
    unsafe { written(x.layout().shape().clone(), strides.clone(), fill) }
}

/// `dw[h] = Σ_b dy[b, h] · x[b, h]ᵀ`, in the memory order of `w` where that is dense.
fn grad_w(w: &FlexTensor, x: &FlexTensor, dy: &FlexTensor) -> FlexTensor {
    let [b, h, _, _] = x.layout().shape().dims::<4>();
    if b == 0 {
        // A sum of no products.
        let shape = w.layout().shape().clone();
        return from_f32(zeros(shape.num_elements()), shape, DType::F32);
    }
    let strides = dense_strides_like(w.layout());
    let fill = |dw| {
        let dw = SharedMut(dw);
        (0..h).into_par_iter().for_each(|hi| {
            let dst = Dst {
                ptr: dw.ptr().wrapping_offset(hi as isize * strides[0]),
                rs: strides[1],
                cs: strides[2],
            };
            for bi in 0..b {
                let (dyp, xp) = (part(dy, bi, hi), part(x, bi, hi).t());
                // SAFETY: each task owns head hi of dw; its first GEMM writes all of it, the
                // rest add.
                unsafe { gemm_into(dst, dyp, xp, 1.0, bi > 0, Threads::Caller) }
            }
        })
    };
    // SAFETY: every head's first GEMM writes all of that head (dw's strides are dense).
    unsafe { written(w.layout().shape().clone(), strides.clone(), fill) }
}

impl HeadsBackend for Flex {
    fn per_head_matmul(w: FlexTensor, x: FlexTensor, transposed: bool) -> FlexTensor {
        forward(&w, &x, transposed)
    }
}

impl<C: CheckpointStrategy> HeadsBackend for Autodiff<Flex, C> {
    fn per_head_matmul(
        w: FloatTensor<Self>,
        x: FloatTensor<Self>,
        transposed: bool,
    ) -> FloatTensor<Self> {
        let forward = |w: &FlexTensor, x: &FlexTensor| forward(w, x, transposed);
        product_with_grads::<C>(w, x, forward, [grad_w, grad_x])
    }
}
