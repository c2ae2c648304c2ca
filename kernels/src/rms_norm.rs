//! RMSNorm over the last dimension as one fused op: `y = x / sqrt(mean(x²) + eps) · gamma`.
//!
//! Burn's `RmsNorm` is seven tensor ops forward and about a dozen backward, each a pass over the
//! activations (single-threaded on Flex). The fused forward makes one pass per row (rows in
//! parallel) and keeps its input and one `f32` per row; the backward makes one pass per row and
//! sums `d gamma` over a fixed partition of the rows (deterministic). On CubeCL devices, the same
//! passes as `#[cube]` kernels (`cube::rms_norm`).

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, DType, Dispatch, Flex, backend_extension};
use burn::tensor::{Shape, Tensor};
use rayon::prelude::*;

use crate::dtype::expect_same_dtype;
use crate::host::{as_f32, contiguous_f32, from_f32, output};
use crate::simd::{Isa, Lanes, simd_dispatch, simd_level};

/// Most blocks of rows the CubeCL RMSNorm cuts a call's rows into: each block is one cube, whose
/// `d gamma` sum over its rows is written (`f32 × width`) and then summed over the blocks in
/// order.
pub const RMS_NORM_CUBE_BLOCKS: usize = 1024;

/// `x / sqrt(mean(x²) + eps) · gamma` over the last dimension of `x` (`gamma`: `[width]`).
/// Fused on Flex devices and on CubeCL devices (features `cuda`, `cube-cpu`: any float dtype,
/// statistics in f32, one f32 per row kept for the backward); [`rms_norm_reference`] (Burn's
/// formulation) elsewhere.
///
/// # Panics
/// If `gamma`'s length is not `x`'s last dimension, or `eps` is negative or not finite.
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Tensor<D> {
    let _span = zamba_trace::span(zamba_trace::Category::Norm, "rms norm");
    check(&x, &gamma, eps);
    #[cfg(feature = "cube")]
    if crate::on_cube(&x.device()) {
        return crate::cube::ops::rms_norm(x, gamma, eps);
    }
    // Without elements there are no rows to reshape into (Burn's `reshape` reads a 0 as "keep
    // this dimension").
    if !crate::on_flex(&x.device()) || x.shape().num_elements() == 0 {
        return rms_norm_reference(x, gamma, eps);
    }
    let dims = x.dims();
    let width = dims[D - 1];
    let x = x.reshape([dims.iter().product::<usize>() / width, width]);
    let y = Tensor::<2>::from_dispatch(<Dispatch as RmsNormBackend>::rms_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        eps,
    ));
    y.reshape(dims)
}

/// `rms_norm(x + t, gamma, eps)`: the norm of a residual sum that nothing else reads (a hybrid
/// layer's `x + t` before its Mamba block). On CubeCL devices one fused op: the sum is formed in
/// registers and never written, the backward recomputes it and returns its gradient for both `x`
/// and `t`. Elsewhere the add, then [`rms_norm`].
///
/// # Panics
/// As [`rms_norm`], and if `x` and `t` differ in shape.
pub fn add_rms_norm<const D: usize>(
    x: Tensor<D>,
    t: Tensor<D>,
    gamma: Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    assert!(
        x.dims() == t.dims(),
        "add_rms_norm: x {:?} and t {:?} must have the same shape",
        x.dims(),
        t.dims()
    );
    expect_same_dtype("add_rms_norm", &[("x", x.dtype()), ("t", t.dtype())]);
    #[cfg(feature = "cube")]
    if crate::on_cube(&x.device()) {
        let _span = zamba_trace::span(zamba_trace::Category::Norm, "add + rms norm");
        check(&x, &gamma, eps);
        return crate::cube::ops::add_rms_norm(x, t, gamma, eps);
    }
    rms_norm(x + t, gamma, eps)
}

/// [`add_rms_norm`] with tensor ops; any backend.
pub fn add_rms_norm_reference<const D: usize>(
    x: Tensor<D>,
    t: Tensor<D>,
    gamma: Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    rms_norm_reference(x + t, gamma, eps)
}

/// [`rms_norm`] with tensor ops, as Burn's `RmsNorm` computes it; any backend.
pub fn rms_norm_reference<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Tensor<D> {
    check(&x, &gamma, eps);
    let rms = (x.clone().square().mean_dim(D - 1) + eps).sqrt();
    (x / rms) * gamma.unsqueeze()
}

fn check<const D: usize>(x: &Tensor<D>, gamma: &Tensor<1>, eps: f64) {
    expect_same_dtype("rms_norm", &[("x", x.dtype()), ("gamma", gamma.dtype())]);
    assert!(
        gamma.dims()[0] == x.dims()[D - 1],
        "rms_norm: gamma has {} elements but x's last dimension is {} (x {:?})",
        gamma.dims()[0],
        x.dims()[D - 1],
        x.dims()
    );
    assert!(
        eps >= 0.0 && eps.is_finite(),
        "rms_norm: eps must be finite and >= 0, got {eps}"
    );
}

#[backend_extension(Flex, Autodiff)]
pub(crate) trait RmsNormBackend: Backend {
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;
}

/// `y` and the per-row `rms`.
fn forward(x: &[f32], gamma: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    let mut y = output(x.len());
    let mut rms = output(x.len() / width);
    y.par_chunks_mut(width)
        .zip(rms.par_iter_mut())
        .zip(x.par_chunks(width))
        .for_each(|((y, rms), x)| *rms = forward_row(x, gamma, eps, y));
    (y, rms)
}

simd_dispatch!(fn forward_row(x: &[f32], gamma: &[f32], eps: f32, y: &mut [f32]) -> f32
    = forward_row_generic, level = simd_level());

#[inline(always)]
fn forward_row_generic<V: Lanes>(
    isa: Isa<V>,
    x: &[f32],
    gamma: &[f32],
    eps: f32,
    y: &mut [f32],
) -> f32 {
    let split = x.len() - x.len() % V::WIDTH;
    let mut squares = isa.splat(0.0);
    for i in (0..split).step_by(V::WIDTH) {
        let v = isa.load(&x[i..]);
        squares = v.mul_add(v, squares);
    }
    let squares = x[split..].iter().fold(squares.sum(), |s, v| s + v * v);
    let rms = (squares / x.len() as f32 + eps).sqrt();
    let rms_v = isa.splat(rms);
    for i in (0..split).step_by(V::WIDTH) {
        (isa.load(&x[i..]) / rms_v * isa.load(&gamma[i..])).store(&mut y[i..]);
    }
    for i in split..x.len() {
        y[i] = x[i] / rms * gamma[i];
    }
    rms
}

/// Rows per task of the backward: `d gamma` is summed per task, then over tasks in order.
const ROWS_PER_TASK: usize = 64;

/// `(dx, d gamma)` for the output gradient `dy`:
/// `dx = (dy·γ - x̂ · mean(dy·γ·x̂)) / rms`, `dγ = Σ_rows dy · x̂`, with `x̂ = x / rms`.
fn backward(x: &[f32], gamma: &[f32], rms: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    let piece = ROWS_PER_TASK * width;
    let mut dx = output(x.len());
    let tasks = rms.len().div_ceil(ROWS_PER_TASK);
    let mut dgamma_parts = vec![0f32; tasks * width];
    dx.par_chunks_mut(piece)
        .zip(dgamma_parts.par_chunks_mut(width))
        .zip(x.par_chunks(piece).zip(dy.par_chunks(piece)))
        .zip(rms.par_chunks(ROWS_PER_TASK))
        .for_each(|(((dx, dgamma), (x, dy)), rms)| {
            for (((dx, x), dy), &rms) in dx
                .chunks_mut(width)
                .zip(x.chunks(width))
                .zip(dy.chunks(width))
                .zip(rms)
            {
                backward_row(x, gamma, rms, dy, dx, dgamma);
            }
        });
    let mut dgamma = vec![0f32; width];
    for part in dgamma_parts.chunks(width) {
        for (acc, g) in dgamma.iter_mut().zip(part) {
            *acc += g;
        }
    }
    (dx, dgamma)
}

simd_dispatch!(fn backward_row(
    x: &[f32], gamma: &[f32], rms: f32, dy: &[f32], dx: &mut [f32], dgamma: &mut [f32])
    = backward_row_generic, level = simd_level());

#[inline(always)]
fn backward_row_generic<V: Lanes>(
    isa: Isa<V>,
    x: &[f32],
    gamma: &[f32],
    rms: f32,
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
) {
    let width = x.len();
    let split = width - width % V::WIDTH;
    let inv = 1.0 / rms;
    let inv_v = isa.splat(inv);
    // dot = Σ dy·γ·x̂, and dγ += dy·x̂.
    let mut dot = isa.splat(0.0);
    for i in (0..split).step_by(V::WIDTH) {
        let (xh, g) = (isa.load(&x[i..]) * inv_v, isa.load(&dy[i..]));
        dot = (g * isa.load(&gamma[i..])).mul_add(xh, dot);
        g.mul_add(xh, isa.load(&dgamma[i..]))
            .store(&mut dgamma[i..]);
    }
    let mut dot = dot.sum();
    for i in split..width {
        let xh = x[i] * inv;
        dot += dy[i] * gamma[i] * xh;
        dgamma[i] += dy[i] * xh;
    }
    let mean = dot / width as f32;
    let mean_v = isa.splat(mean);
    for i in (0..split).step_by(V::WIDTH) {
        let xh = isa.load(&x[i..]) * inv_v;
        let g = isa.load(&dy[i..]) * isa.load(&gamma[i..]);
        ((g - xh * mean_v) * inv_v).store(&mut dx[i..]);
    }
    for i in split..width {
        dx[i] = (dy[i] * gamma[i] - x[i] * inv * mean) * inv;
    }
}

impl RmsNormBackend for Flex {
    fn rms_norm(x: FlexTensor, gamma: FlexTensor, eps: f64) -> FlexTensor {
        let (dtype, shape) = (x.dtype(), x.layout().shape().clone());
        let [x, gamma] = [x, gamma].map(contiguous_f32);
        let (y, _) = forward(as_f32(&x), as_f32(&gamma), eps as f32);
        from_f32(y, shape, dtype)
    }
}

#[derive(Clone, Debug)]
struct RmsNormState {
    /// `x` and `gamma` as contiguous `f32`.
    inputs: [FlexTensor; 2],
    dtypes: [DType; 2],
    rms: Arc<Vec<f32>>,
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    type State = RmsNormState;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let _span = zamba_trace::span(zamba_trace::Category::Norm, "rms norm backward");
        let dy = contiguous_f32(grads.consume::<Flex>(&ops.node));
        let RmsNormState {
            inputs,
            dtypes,
            rms,
        } = ops.state;
        let [x, gamma] = &inputs;
        let (dx, dgamma) = backward(as_f32(x), as_f32(gamma), &rms, as_f32(&dy));
        for ((parent, grad), (input, dtype)) in ops
            .parents
            .into_iter()
            .zip([dx, dgamma])
            .zip(inputs.iter().zip(dtypes))
        {
            if let Some(node) = parent {
                let shape: Shape = input.layout().shape().clone();
                grads.register::<Flex>(node.id, from_f32(grad, shape, dtype));
            }
        }
    }
}

impl<C: CheckpointStrategy> RmsNormBackend for Autodiff<Flex, C> {
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let [(x, gx), (gamma, gg)] = [x, gamma].map(|t| t.into_parts());
        let dtypes = [x.dtype(), gamma.dtype()];
        let shape = x.layout().shape().clone();
        let inputs = [x, gamma].map(contiguous_f32);
        let (y, rms) = forward(as_f32(&inputs[0]), as_f32(&inputs[1]), eps as f32);
        let y = from_f32(y, shape, dtypes[0]);
        match RmsNormBackward
            .prepare::<C>([gx, gg])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                RmsNormState {
                    inputs,
                    dtypes,
                    rms: Arc::new(rms),
                },
                y,
            ),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}
