//! The products of the model on the CubeCL backend — `linear`, the per-head products, causal
//! attention — written with [`product`] (whose forward and backward use the matmul routine of
//! the device's runtime, see [`super::gemm`]) instead of Burn's `matmul`.

use burn::tensor::activation::softmax;
use burn::tensor::{DType, Int, Tensor};

use super::product::product;

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

/// Causal attention (see [`crate::causal_attention`]): scores and the output through
/// [`product`], the softmax in f32 whatever the inputs' dtype, grouped key/value heads repeated.
pub(crate) fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f64) -> Tensor<4> {
    let dtype = q.dtype();
    let [batch, len, heads, _] = q.dims();
    let groups = heads / k.dims()[2];
    let repeat = |t: Tensor<4>| {
        let [b, l, kv, hd] = t.dims();
        t.unsqueeze_dim::<5>(3)
            .expand([b, l, kv, groups, hd])
            .reshape([b, l, kv * groups, hd])
    };
    let [q, k, v] = [q, repeat(k), repeat(v)].map(|t| t.swap_dims(1, 2)); // [B, H, L, hd]
    let scores = product(q, k.swap_dims(2, 3)).cast(DType::F32) * scale;
    let device = scores.device();
    let position = Tensor::<1, Int>::arange(0..len as i64, &device);
    let future = position
        .clone()
        .reshape([1, len])
        .greater(position.reshape([len, 1]))
        .unsqueeze::<4>()
        .expand([batch, heads, len, len]);
    let probs = softmax(scores.mask_fill(future, f32::NEG_INFINITY), 3).cast(dtype);
    product(probs, v).swap_dims(1, 2)
}
