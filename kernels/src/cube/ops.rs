//! The products of the model on the CubeCL backend — `linear`, the per-head products — written
//! with [`product`] (whose forward and backward use the matmul routine of the device's runtime,
//! see [`super::gemm`]) instead of Burn's `matmul`; causal attention, the fused op of
//! [`super::attention`]; RMSNorm, the GELU gate, the causal conv + SiLU and the cross-entropy,
//! the fused ops of [`super::rms_norm`], [`super::gelu`], [`super::conv`] and
//! [`super::cross_entropy`]; the AdamW update of [`super::adamw`].

use burn::tensor::Tensor;

pub(crate) use super::adamw::adamw_update;
pub(crate) use super::attention::{causal_attention, kernels_on as attention_kernels_on};
pub(crate) use super::conv::causal_conv1d_silu;
pub(crate) use super::cross_entropy::cross_entropy;
pub(crate) use super::gelu::gelu_mul;
use super::product::product;
pub(crate) use super::rms_norm::{add_rms_norm, rms_norm};

/// `x · weight` over the last dimension of `x` (see [`crate::linear`]).
pub(crate) fn linear<const D: usize>(x: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    let mut dims = x.dims();
    let [d_in, d_out] = weight.dims();
    let rows = dims[..D - 1].iter().product();
    dims[D - 1] = d_out;
    product(x.reshape([rows, d_in]), weight).reshape(dims)
}

/// `w[h] · x[b, h]`: `w` `[H, M, K]`, `x` `[B, H, K, N]` → `[B, H, M, N]` (see
/// [`crate::per_head_matmul`]); `w` is broadcast over the batch as a view, and its gradient summed
/// over the batch by the broadcast's backward.
pub(crate) fn per_head_matmul(w: Tensor<3>, x: Tensor<4>) -> Tensor<4> {
    let [batch, heads, _, _] = x.dims();
    let [_, m, k] = w.dims();
    product(w.unsqueeze::<4>().expand([batch, heads, m, k]), x)
}

/// `(w[h] · x[b, h])ᵀ = x[b, h]ᵀ · w[h]ᵀ`, `[B, H, N, M]`, written in that layout (see
/// [`crate::per_head_matmul_transposed`]).
pub(crate) fn per_head_matmul_transposed(w: Tensor<3>, x: Tensor<4>) -> Tensor<4> {
    let [batch, heads, _, _] = x.dims();
    let [_, m, k] = w.dims();
    let w_t = w
        .swap_dims(1, 2)
        .unsqueeze::<4>()
        .expand([batch, heads, k, m]);
    product(x.swap_dims(2, 3), w_t)
}
