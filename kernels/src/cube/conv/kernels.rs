//! The `#[cube]` kernels of the causal depthwise convolution + SiLU (kept apart from Burn's names:
//! `cubecl::prelude` has its own `Tensor` and `Float`). `x` is read in its float type `F` at any
//! strides, the weights and bias contiguous; the arithmetic is f32, outputs are written in `F`.
//! The taps `K` are a compile-time constant: every loop over them unrolls.

use cubecl::prelude::*;

/// `a = bias[c] + Σ_{k<K} w[c,k] · x[b,c,t+k-(K-1)]` (`x = 0` before `t = 0`).
#[cube]
fn pre_activation<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    bias: &Tensor<F>,
    lane: usize,
    channel: usize,
    t: usize,
    #[comptime] taps: usize,
) -> f32 {
    let mut a = f32::cast_from(bias[channel]);
    #[unroll]
    for k in 0..taps {
        // Step t + k - (K - 1), when it is not before the start.
        if t + k >= comptime!(taps - 1) {
            let step = t + k - comptime!(taps - 1);
            a += f32::cast_from(weight[channel * taps + k])
                * f32::cast_from(x[lane + step * x.stride(2)]);
        }
    }
    a
}

/// `d a = dout · silu'(a)`, `silu'(a) = σ(a) · (1 + a · (1 − σ(a)))`, at step `t` of a lane.
#[cube]
#[allow(clippy::too_many_arguments)]
fn pre_activation_grad<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    bias: &Tensor<F>,
    dout: &Tensor<F>,
    lane: usize,
    dout_lane: usize,
    channel: usize,
    t: usize,
    #[comptime] taps: usize,
) -> f32 {
    let a = pre_activation(x, weight, bias, lane, channel, t, taps);
    let s = 1.0f32 / (1.0f32 + (-a).exp());
    f32::cast_from(dout[dout_lane + t]) * s * (1.0f32 + a * (1.0f32 - s))
}

/// `out = silu(a)`, one unit per element of the contiguous `[B, C, L]` output.
#[cube(launch, address_type = "dynamic")]
pub(super) fn conv_forward<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    bias: &Tensor<F>,
    out: &mut Tensor<F>,
    #[comptime] taps: usize,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i < out.len() {
        let (channels, len) = (out.shape(1), out.shape(2));
        let t = i % len;
        let channel = (i / len) % channels;
        let batch = i / (len * channels);
        let lane = batch * x.stride(0) + channel * x.stride(1);
        let a = pre_activation(x, weight, bias, lane, channel, t, taps);
        out[i] = F::cast_from(a / (1.0f32 + (-a).exp()));
    }
}

/// The backward, one unit per `chunk` steps of a lane `(b, c)`: for each step `s` of its chunk
/// `dx[s] = Σ_k w[c,k] · da[s + K-1-k]` (the `da` of later steps recomputed, past the chunk's end
/// too), and the chunk's sums `Σ_t da[t] · x[t+k-(K-1)]` (per tap `k`) and `Σ_t da[t]` into
/// `partials` (`[B, C, chunks, K + 1]`, f32), summed over batch and chunks by [`sum_partials`].
/// `dout` and `dx` are contiguous `[B, C, L]`.
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub(super) fn conv_backward<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    bias: &Tensor<F>,
    dout: &Tensor<F>,
    dx: &mut Tensor<F>,
    partials: &mut Tensor<f32>,
    chunks: usize,
    #[comptime] chunk: usize,
    #[comptime] taps: usize,
    #[define(F)] _dtype: ElemType,
) {
    let unit = ABSOLUTE_POS;
    let (channels, len) = (dx.shape(1), dx.shape(2));
    if unit < dx.shape(0) * channels * chunks {
        let piece = unit % chunks;
        let channel = (unit / chunks) % channels;
        let batch = unit / (chunks * channels);
        let lane = batch * x.stride(0) + channel * x.stride(1);
        let dense_lane = (batch * channels + channel) * len;
        let first = piece * chunk;
        let end = select(first + chunk < len, first + chunk, len);
        let mut sums = Array::<f32>::new(comptime!(taps + 1));
        #[unroll]
        for k in 0..comptime!(taps + 1) {
            sums[k] = 0.0;
        }
        for s in first..end {
            let mut grad = 0.0f32;
            #[unroll]
            for k in 0..taps {
                let t = s + comptime!(taps - 1) - k;
                if t < len {
                    let da = pre_activation_grad(
                        x, weight, bias, dout, lane, dense_lane, channel, t, taps,
                    );
                    grad += f32::cast_from(weight[channel * taps + k]) * da;
                }
            }
            dx[dense_lane + s] = F::cast_from(grad);
            let da = pre_activation_grad(x, weight, bias, dout, lane, dense_lane, channel, s, taps);
            #[unroll]
            for k in 0..taps {
                if s + k >= comptime!(taps - 1) {
                    let step = s + k - comptime!(taps - 1);
                    sums[k] += da * f32::cast_from(x[lane + step * x.stride(2)]);
                }
            }
            sums[taps] += da;
        }
        let at = unit * comptime!(taps + 1);
        #[unroll]
        for k in 0..comptime!(taps + 1) {
            partials[at + k] = sums[k];
        }
    }
}

/// `d weight[c, k]` (`k < K`) and `d bias[c]` (`k = K`): the partials of channel `c` summed over
/// batch, then chunk, in order; one unit per `(c, k)`.
#[cube(launch, address_type = "dynamic")]
pub(super) fn sum_partials<F: Float>(
    partials: &Tensor<f32>,
    dweight: &mut Tensor<F>,
    dbias: &mut Tensor<F>,
    batch: usize,
    chunks: usize,
    #[comptime] taps: usize,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    let channels = dbias.len();
    if i < channels * comptime!(taps + 1) {
        let channel = i / comptime!(taps + 1);
        let k = i % comptime!(taps + 1);
        let mut sum = 0.0f32;
        for b in 0..batch {
            for piece in 0..chunks {
                let unit = (b * channels + channel) * chunks + piece;
                sum += partials[unit * comptime!(taps + 1) + k];
            }
        }
        if k < taps {
            dweight[channel * taps + k] = F::cast_from(sum);
        } else {
            dbias[channel] = F::cast_from(sum);
        }
    }
}
