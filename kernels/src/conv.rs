//! Mamba's causal depthwise convolution over time followed by SiLU, as one fused op:
//!
//! ```text
//! a[b,c,t]   = bias[c] + Σ_{k<K} w[c,k] · x[b,c,t+k-(K-1)]      (x = 0 before t = 0)
//! out[b,c,t] = silu(a[b,c,t])
//! ```
//!
//! Written with tensor ops this is a padding copy, `K` shifted multiply-adds and the SiLU, each a
//! full pass over `[batch, channels, len]` (single-threaded on Flex), with autodiff keeping most
//! of the intermediates. The fused forward makes one pass per lane (a (batch, channel) row,
//! vectorized over time, lanes in parallel) and keeps only its input; the backward recomputes
//! `a` and produces all three gradients in one more pass per lane. On CubeCL devices, `#[cube]`
//! kernels (`cube::conv`).

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
use crate::simd::{Isa, Lanes, SCALAR, sigmoid, simd_dispatch, simd_level};

/// Steps of a lane per unit of the CubeCL conv's backward: each chunk's `K + 1` weight and bias
/// gradient sums are written (f32) and then summed over batch and chunks in order.
pub const CONV_CUBE_CHUNK: usize = 64;

/// The fused `silu(causal_depthwise_conv(x) + bias)`; `x`: `[batch, channels, len]`, `weight`:
/// `[channels, K]` (tap `K-1` multiplies the current step), `bias`: `[channels]`. Returns
/// `[batch, channels, len]`. Fused on Flex devices and on CubeCL devices (features `cuda`,
/// `cube-cpu`: any float dtype, f32 arithmetic), [`causal_conv1d_silu_reference`] elsewhere.
///
/// # Panics
/// If the shapes disagree.
pub fn causal_conv1d_silu(x: Tensor<3>, weight: Tensor<2>, bias: Tensor<1>) -> Tensor<3> {
    let _span = zamba_trace::span(zamba_trace::Category::Elementwise, "causal conv + silu");
    check_shapes(&x, &weight, &bias);
    #[cfg(feature = "cube")]
    if crate::on_cube(&x.device()) {
        return crate::cube::ops::causal_conv1d_silu(x, weight, bias);
    }
    if !crate::on_flex(&x.device()) {
        return causal_conv1d_silu_reference(x, weight, bias);
    }
    Tensor::from_dispatch(<Dispatch as CausalConvBackend>::causal_conv1d_silu(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// [`causal_conv1d_silu`] with tensor ops (left zero padding, `K` shifted multiply-adds, SiLU);
/// any backend, differentiated by Burn's autodiff.
pub fn causal_conv1d_silu_reference(x: Tensor<3>, weight: Tensor<2>, bias: Tensor<1>) -> Tensor<3> {
    check_shapes(&x, &weight, &bias);
    let [batch, channels, len] = x.dims();
    let [_, k] = weight.dims();
    // The padding in x's dtype: `cat` reads every part as the first one's type.
    let padding = Tensor::zeros([batch, channels, k - 1], (&x.device(), x.dtype()));
    let padded = Tensor::cat(vec![padding, x], 2);
    let mut out = bias
        .reshape([1, channels, 1])
        .expand([batch, channels, len]);
    for j in 0..k {
        let tap = weight
            .clone()
            .slice([0..channels, j..j + 1])
            .reshape([1, channels, 1]);
        out = out + padded.clone().slice([0..batch, 0..channels, j..j + len]) * tap;
    }
    burn::tensor::activation::silu(out)
}

fn check_shapes(x: &Tensor<3>, weight: &Tensor<2>, bias: &Tensor<1>) {
    expect_same_dtype(
        "causal_conv1d_silu",
        &[
            ("x", x.dtype()),
            ("weight", weight.dtype()),
            ("bias", bias.dtype()),
        ],
    );
    let [_, channels, len] = x.dims();
    let [w_channels, k] = weight.dims();
    assert!(
        w_channels == channels && bias.dims() == [channels] && k > 0 && len > 0,
        "causal_conv1d_silu: x [batch, channels, len] = {:?} needs weight [channels, K] and bias \
         [channels], got weight {:?} and bias {:?}",
        x.dims(),
        weight.dims(),
        bias.dims()
    );
}

#[backend_extension(Flex, Autodiff)]
pub(crate) trait CausalConvBackend: Backend {
    fn causal_conv1d_silu(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// Sizes, from `x` `[batch, channels, len]` and `weight` `[channels, taps]`.
#[derive(Clone, Copy, Debug)]
struct ConvDims {
    channels: usize,
    len: usize,
    taps: usize,
}

impl ConvDims {
    fn of(x: &FlexTensor, weight: &FlexTensor) -> Self {
        let (xs, ws) = (x.layout().shape(), weight.layout().shape());
        Self {
            channels: xs[1],
            len: xs[2],
            taps: ws[1],
        }
    }
}

/// The forward over all lanes: `silu(a)` into a new `[batch, channels, len]` buffer.
fn forward(x: &[f32], weight: &[f32], bias: &[f32], dims: ConvDims) -> Vec<f32> {
    let ConvDims {
        channels,
        len,
        taps,
    } = dims;
    let mut out = output(x.len());
    out.par_chunks_mut(len)
        .zip(x.par_chunks(len))
        .enumerate()
        .for_each_init(
            || vec![0f32; len + taps - 1],
            |padded, (lane, (out, x))| {
                let c = lane % channels;
                padded[taps - 1..].copy_from_slice(x);
                forward_lane(padded, &weight[c * taps..(c + 1) * taps], bias[c], out);
            },
        );
    out
}

simd_dispatch!(fn forward_lane(padded: &[f32], w: &[f32], bias: f32, out: &mut [f32])
    = forward_lane_generic, level = simd_level());

/// `out[t] = silu(bias + Σ_k w[k] padded[t+k])`, `padded` = `K-1` zeros then the lane's input.
#[inline(always)]
fn forward_lane_generic<V: Lanes>(
    isa: Isa<V>,
    padded: &[f32],
    w: &[f32],
    bias: f32,
    out: &mut [f32],
) {
    let split = out.len() - out.len() % V::WIDTH;
    forward_range(isa, padded, w, bias, 0..split, out);
    forward_range(SCALAR, padded, w, bias, split..out.len(), out);
}

#[inline(always)]
fn pre_activation<V: Lanes>(isa: Isa<V>, padded: &[f32], w: &[f32], bias: f32, t: usize) -> V {
    let mut a = isa.splat(bias);
    for (k, &wk) in w.iter().enumerate() {
        a = isa.splat(wk).mul_add(isa.load(&padded[t + k..]), a);
    }
    a
}

#[inline(always)]
fn forward_range<V: Lanes>(
    isa: Isa<V>,
    padded: &[f32],
    w: &[f32],
    bias: f32,
    ts: std::ops::Range<usize>,
    out: &mut [f32],
) {
    for t in ts.step_by(V::WIDTH) {
        let a = pre_activation(isa, padded, w, bias, t);
        (a * sigmoid(a)).store(&mut out[t..]);
    }
}

/// Gradients of all three inputs for the output gradient `dout`.
fn backward(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    dout: &[f32],
    dims: ConvDims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let ConvDims {
        channels,
        len,
        taps,
    } = dims;
    let mut dx = output(x.len());
    // Per lane: [dw[0..K], dbias], summed over the batch afterwards in batch order.
    let mut lane_params = output(x.len() / len * (taps + 1));
    dx.par_chunks_mut(len)
        .zip(lane_params.par_chunks_mut(taps + 1))
        .zip(x.par_chunks(len).zip(dout.par_chunks(len)))
        .enumerate()
        .for_each_init(
            || (vec![0f32; len + taps - 1], vec![0f32; len + taps - 1]),
            |(padded, da), (lane, ((dx, params), (x, dout)))| {
                let c = lane % channels;
                padded[taps - 1..].copy_from_slice(x);
                let w = &weight[c * taps..(c + 1) * taps];
                backward_lane(padded, w, bias[c], dout, da, dx, params);
            },
        );
    let mut dw = vec![0f32; channels * taps];
    let mut dbias = vec![0f32; channels];
    for batch in lane_params.chunks(channels * (taps + 1)) {
        for (c, p) in batch.chunks(taps + 1).enumerate() {
            for (acc, g) in dw[c * taps..(c + 1) * taps].iter_mut().zip(p) {
                *acc += g;
            }
            dbias[c] += p[taps];
        }
    }
    (dx, dw, dbias)
}

simd_dispatch!(fn backward_lane(
    padded: &[f32], w: &[f32], bias: f32, dout: &[f32], da: &mut [f32], dx: &mut [f32],
    params: &mut [f32]) = backward_lane_generic, level = simd_level());

/// One lane: `da = dout · silu'(a)` (into `da[..len]`, `K-1` zeros after it), then
/// `dx[t] = Σ_k w[k] da[t + K-1-k]`, `dw[k] = Σ_t da[t] padded[t+k]`, `dbias = Σ_t da[t]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_lane_generic<V: Lanes>(
    isa: Isa<V>,
    padded: &[f32],
    w: &[f32],
    bias: f32,
    dout: &[f32],
    da: &mut [f32],
    dx: &mut [f32],
    params: &mut [f32],
) {
    let (len, taps) = (dout.len(), w.len());
    let split = len - len % V::WIDTH;
    da_range(isa, padded, w, bias, dout, 0..split, da);
    da_range(SCALAR, padded, w, bias, dout, split..len, da);
    da[len..].fill(0.0);
    let mut sums = vec![isa.splat(0.0); taps + 1];
    for t in (0..split).step_by(V::WIDTH) {
        let g = isa.load(&da[t..]);
        for (k, sum) in sums[..taps].iter_mut().enumerate() {
            *sum = g.mul_add(isa.load(&padded[t + k..]), *sum);
        }
        sums[taps] = sums[taps] + g;
        let mut acc = isa.splat(0.0);
        for (k, &wk) in w.iter().enumerate() {
            acc = isa
                .splat(wk)
                .mul_add(isa.load(&da[t + taps - 1 - k..]), acc);
        }
        acc.store(&mut dx[t..]);
    }
    for (k, p) in params[..taps].iter_mut().enumerate() {
        *p = (split..len).fold(sums[k].sum(), |s, t| s + da[t] * padded[t + k]);
    }
    params[taps] = (split..len).fold(sums[taps].sum(), |s, t| s + da[t]);
    for t in split..len {
        dx[t] = (0..taps).fold(0.0, |acc, k| acc + w[k] * da[t + taps - 1 - k]);
    }
}

#[inline(always)]
fn da_range<V: Lanes>(
    isa: Isa<V>,
    padded: &[f32],
    w: &[f32],
    bias: f32,
    dout: &[f32],
    ts: std::ops::Range<usize>,
    da: &mut [f32],
) {
    let one = isa.splat(1.0);
    for t in ts.step_by(V::WIDTH) {
        let a = pre_activation(isa, padded, w, bias, t);
        let s = sigmoid(a);
        let silu_grad = s * (one + a * (one - s));
        (isa.load(&dout[t..]) * silu_grad).store(&mut da[t..]);
    }
}

impl CausalConvBackend for Flex {
    fn causal_conv1d_silu(x: FlexTensor, weight: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let (dtype, shape) = (x.dtype(), x.layout().shape().clone());
        let [x, weight, bias] = [x, weight, bias].map(contiguous_f32);
        let dims = ConvDims::of(&x, &weight);
        let out = forward(as_f32(&x), as_f32(&weight), as_f32(&bias), dims);
        from_f32(out, shape, dtype)
    }
}

#[derive(Clone, Debug)]
struct ConvState {
    /// `x`, `weight`, `bias` as contiguous `f32`.
    inputs: [FlexTensor; 3],
    dtypes: [DType; 3],
}

#[derive(Debug)]
struct ConvBackward;

impl Backward<Flex, 3> for ConvBackward {
    type State = ConvState;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let _span = zamba_trace::span(
            zamba_trace::Category::Elementwise,
            "causal conv + silu backward",
        );
        let dout = contiguous_f32(grads.consume::<Flex>(&ops.node));
        let ConvState { inputs, dtypes } = ops.state;
        let [x, weight, bias] = &inputs;
        let dims = ConvDims::of(x, weight);
        let (dx, dw, dbias) =
            backward(as_f32(x), as_f32(weight), as_f32(bias), as_f32(&dout), dims);
        for ((parent, grad), (input, dtype)) in ops
            .parents
            .into_iter()
            .zip([dx, dw, dbias])
            .zip(inputs.iter().zip(dtypes))
        {
            if let Some(node) = parent {
                let shape: Shape = input.layout().shape().clone();
                grads.register::<Flex>(node.id, from_f32(grad, shape, dtype));
            }
        }
    }
}

impl<C: CheckpointStrategy> CausalConvBackend for Autodiff<Flex, C> {
    fn causal_conv1d_silu(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [(x, gx), (w, gw), (b, gb)] = [x, weight, bias].map(|t| t.into_parts());
        let dtypes = [&x, &w, &b].map(|t| t.dtype());
        let shape = x.layout().shape().clone();
        let inputs = [x, w, b].map(contiguous_f32);
        let dims = ConvDims::of(&inputs[0], &inputs[1]);
        let [x, w, b] = &inputs;
        let out = forward(as_f32(x), as_f32(w), as_f32(b), dims);
        let out = from_f32(out, shape, dtypes[0]);
        match ConvBackward
            .prepare::<C>([gx, gw, gb])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(ConvState { inputs, dtypes }, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}
