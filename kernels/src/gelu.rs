//! The shared MLP's gate, `gelu(gate) · up` with the exact (erf) GELU, as one fused op.
//!
//! As tensor ops on Flex this is libm's scalar `erf` over every element, then a product, and in
//! the backward GELU's derivative (another `erf` and `exp` per element) and two more products,
//! each pass single-threaded. Fused: one vectorised, multi-threaded pass each way; the backward
//! recomputes `erf` from the kept inputs rather than keeping `gelu(gate)`. On CubeCL devices, the
//! same passes as `#[cube]` kernels (`cube::gelu`).

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, DType, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;
use burn::tensor::activation::gelu;
use rayon::prelude::*;

use crate::dtype::expect_same_dtype;
use crate::host::{as_f32, contiguous_f32, from_f32, output};
use crate::simd::{Isa, Lanes, exp_approx, simd_dispatch, simd_level};

/// `gelu(gate) · up`, `gelu(x) = x/2 · (1 + erf(x/√2))`. Fused on Flex devices and on CubeCL
/// devices (features `cuda`, `cube-cpu`: any float dtype, f32 arithmetic);
/// [`gelu_mul_reference`] elsewhere.
///
/// # Panics
/// If the shapes differ.
pub fn gelu_mul<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    let _span = zamba_trace::span(zamba_trace::Category::Elementwise, "gelu · up");
    check(&gate, &up);
    #[cfg(feature = "cube")]
    if crate::on_cube(&gate.device()) {
        return crate::cube::ops::gelu_mul(gate, up);
    }
    if !crate::on_flex(&gate.device()) {
        return gelu_mul_reference(gate, up);
    }
    Tensor::from_dispatch(<Dispatch as GeluMulBackend>::gelu_mul(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// [`gelu_mul`] with Burn's `gelu` and a product; any backend.
pub fn gelu_mul_reference<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    check(&gate, &up);
    gelu(gate) * up
}

fn check<const D: usize>(gate: &Tensor<D>, up: &Tensor<D>) {
    expect_same_dtype("gelu_mul", &[("gate", gate.dtype()), ("up", up.dtype())]);
    assert!(
        gate.dims() == up.dims(),
        "gelu_mul: gate {:?} and up {:?} must have the same shape",
        gate.dims(),
        up.dims()
    );
}

#[backend_extension(Flex, Autodiff)]
pub(crate) trait GeluMulBackend: Backend {
    fn gelu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Elements per task.
const PIECE: usize = 1 << 14;

/// `erf(x)`, Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7; below 5e-7 in f32, tested) with
/// `exp` from [`exp_approx`]; odd in `x`.
#[inline(always)]
fn erf<V: Lanes>(x: V) -> V {
    let isa = x.isa();
    let zero = isa.splat(0.0);
    let a = x.max(zero - x);
    let t = isa.splat(1.0) / a.mul_add(isa.splat(0.327_591_1), isa.splat(1.0));
    let mut p = isa.splat(1.061_405_4);
    p = p.mul_add(t, isa.splat(-1.453_152));
    p = p.mul_add(t, isa.splat(1.421_413_8));
    p = p.mul_add(t, isa.splat(-0.284_496_74));
    p = p.mul_add(t, isa.splat(0.254_829_6));
    let e = isa.splat(1.0) - p * t * exp_approx(zero - a * a);
    V::select_lt(x, zero, zero - e, e)
}

/// `(gelu(g), gelu'(g))`.
#[inline(always)]
fn gelu_and_grad<V: Lanes>(g: V) -> (V, V) {
    let isa = g.isa();
    let half = isa.splat(0.5);
    let cdf = half * (isa.splat(1.0) + erf(g * isa.splat(std::f32::consts::FRAC_1_SQRT_2)));
    // φ(g) = exp(-g²/2) / √(2π)
    let pdf = exp_approx(isa.splat(0.0) - half * g * g) * isa.splat(0.398_942_3);
    (g * cdf, g.mul_add(pdf, cdf))
}

simd_dispatch!(fn forward_piece(gate: &[f32], up: &[f32], out: &mut [f32])
    = forward_piece_generic, level = simd_level());

#[inline(always)]
fn forward_piece_generic<V: Lanes>(isa: Isa<V>, gate: &[f32], up: &[f32], out: &mut [f32]) {
    let split = gate.len() - gate.len() % V::WIDTH;
    for i in (0..split).step_by(V::WIDTH) {
        (gelu_and_grad(isa.load(&gate[i..])).0 * isa.load(&up[i..])).store(&mut out[i..]);
    }
    for i in split..gate.len() {
        out[i] = gelu_and_grad(gate[i]).0 * up[i];
    }
}

simd_dispatch!(fn backward_piece(gate: &[f32], up: &[f32], dout: &[f32], dgate: &mut [f32], dup: &mut [f32])
    = backward_piece_generic, level = simd_level());

#[inline(always)]
fn backward_piece_generic<V: Lanes>(
    isa: Isa<V>,
    gate: &[f32],
    up: &[f32],
    dout: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
) {
    let split = gate.len() - gate.len() % V::WIDTH;
    for i in (0..split).step_by(V::WIDTH) {
        let (value, slope) = gelu_and_grad(isa.load(&gate[i..]));
        let d = isa.load(&dout[i..]);
        (d * isa.load(&up[i..]) * slope).store(&mut dgate[i..]);
        (d * value).store(&mut dup[i..]);
    }
    for i in split..gate.len() {
        let (value, slope) = gelu_and_grad(gate[i]);
        dgate[i] = dout[i] * up[i] * slope;
        dup[i] = dout[i] * value;
    }
}

fn forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = output(gate.len());
    out.par_chunks_mut(PIECE)
        .zip(gate.par_chunks(PIECE).zip(up.par_chunks(PIECE)))
        .for_each(|(out, (gate, up))| forward_piece(gate, up, out));
    out
}

fn backward(gate: &[f32], up: &[f32], dout: &[f32]) -> [Vec<f32>; 2] {
    let (mut dgate, mut dup) = (output(gate.len()), output(gate.len()));
    dgate
        .par_chunks_mut(PIECE)
        .zip(dup.par_chunks_mut(PIECE))
        .zip(gate.par_chunks(PIECE).zip(up.par_chunks(PIECE)))
        .zip(dout.par_chunks(PIECE))
        .for_each(|(((dgate, dup), (gate, up)), dout)| backward_piece(gate, up, dout, dgate, dup));
    [dgate, dup]
}

/// `gate` and `up` as contiguous `f32`, the product in `gate`'s dtype.
fn run(gate: FlexTensor, up: FlexTensor) -> ([FlexTensor; 2], FlexTensor) {
    let (dtype, shape) = (gate.dtype(), gate.layout().shape().clone());
    let inputs = [gate, up].map(contiguous_f32);
    let out = forward(as_f32(&inputs[0]), as_f32(&inputs[1]));
    (inputs, from_f32(out, shape, dtype))
}

impl GeluMulBackend for Flex {
    fn gelu_mul(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        run(gate, up).1
    }
}

#[derive(Debug)]
struct GeluMulBackward;

impl Backward<Flex, 2> for GeluMulBackward {
    /// `gate` and `up` as contiguous `f32`, and the dtypes they came in.
    type State = ([FlexTensor; 2], [DType; 2]);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let _span = zamba_trace::span(zamba_trace::Category::Elementwise, "gelu · up backward");
        let dout = contiguous_f32(grads.consume::<Flex>(&ops.node));
        let (inputs, dtypes) = ops.state;
        let computed = backward(as_f32(&inputs[0]), as_f32(&inputs[1]), as_f32(&dout));
        for ((parent, grad), dtype) in ops.parents.into_iter().zip(computed).zip(dtypes) {
            if let Some(node) = parent {
                let shape = inputs[0].layout().shape().clone();
                grads.register::<Flex>(node.id, from_f32(grad, shape, dtype));
            }
        }
    }
}

impl<C: CheckpointStrategy> GeluMulBackend for Autodiff<Flex, C> {
    fn gelu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let [(gate, gg), (up, gu)] = [gate, up].map(|t| t.into_parts());
        let dtypes = [gate.dtype(), up.dtype()];
        let (inputs, out) = run(gate, up);
        match GeluMulBackward
            .prepare::<C>([gg, gu])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((inputs, dtypes), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_within_its_bound_odd_and_saturates() {
        let mut worst = 0f64;
        for i in -3000..=3000 {
            let x = i as f32 / 1000.0;
            worst = worst.max((erf(x) as f64 - erf_series(x as f64)).abs());
            assert_eq!(erf(-x), -erf(x), "erf is odd at {x}");
        }
        assert!(worst < 5e-7, "max |erf error| on [-3, 3]: {worst:e}");
        let tail: Vec<f32> = (300..=1000).map(|i| erf(i as f32 / 100.0)).collect();
        assert!(tail.windows(2).all(|w| w[0] <= w[1]) && tail[tail.len() - 1] <= 1.0);
        assert!(1.0 - tail[tail.len() - 1] < 1e-7);
    }

    /// erf in f64 by its Taylor series (|x| <= 3: ~60 terms, cancellation below 1e-11).
    fn erf_series(x: f64) -> f64 {
        let (mut term, mut sum) = (x, x);
        for n in 1..120 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
