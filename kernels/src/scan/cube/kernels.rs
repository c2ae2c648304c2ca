//! The helpers the scan's `#[cube]` kernels share (kept apart from Burn's names:
//! `cubecl::prelude` has its own `Tensor` and `Float`), and [`sum_parts`], which adds the
//! backward's per-cube partials in a fixed order; the forward is in `forward.rs`, the backward in
//! `backward.rs`.

use cubecl::prelude::*;

/// `softplus(x) = log1p(exp(x))`, and `x` itself above 20 (mamba-ssm's threshold).
#[cube]
pub(super) fn softplus(x: f32) -> f32 {
    select(x > 20.0, x, x.exp().log1p())
}

/// The derivative of [`softplus`]: `sigmoid(x)`, and 1 above 20.
#[cube]
pub(super) fn softplus_grad(x: f32) -> f32 {
    select(x > 20.0, 1.0, sigmoid(x))
}

#[cube]
pub(super) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Offset of the row `(i, j, ..)` of a tensor of rank 3 or more.
#[cube]
pub(super) fn row<F: Float>(t: &Tensor<F>, i: usize, j: usize) -> usize {
    i * t.stride(0) + j * t.stride(1)
}

/// `out[o, r] = Σ_k parts[o, k, r]`, summed in order of `k`; `parts` is a contiguous
/// `[outer, count, rows]` `f32` tensor, `out` a contiguous `[outer, rows]` one of type `O`.
#[cube(launch, address_type = "dynamic")]
pub(super) fn sum_parts<O: Float>(
    parts: &Tensor<f32>,
    out: &mut Tensor<O>,
    count: usize,
    rows: usize,
    #[define(O)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let outer = i / rows;
    let row = i % rows;
    let mut sum = 0.0f32;
    for k in 0..count {
        sum += parts[(outer * count + k) * rows + row];
    }
    out[i] = O::cast_from(sum);
}
