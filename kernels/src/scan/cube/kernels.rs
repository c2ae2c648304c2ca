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

/// Inclusive scan of the units' maps `x ↦ decay · x + input` over the `plane` lanes of a plane
/// (`lane` is this unit's): in time order, or with `reverse` from the last lane down (each
/// lane's map then applies after those of the lanes above it). With `plane = 1` the unit's own
/// map is its plane's total.
#[cube]
pub(super) fn scan_maps(
    decay: f32,
    input: f32,
    lane: usize,
    #[comptime] plane: usize,
    #[comptime] reverse: bool,
) -> (f32, f32) {
    let mut decay = decay;
    let mut input = input;
    if comptime!(plane > 1) {
        #[unroll]
        for round in 0..comptime!(plane.trailing_zeros() as usize) {
            let offset = comptime!(1usize << round);
            let (other_decay, other_input, take) =
                neighbour(decay, input, lane, offset, plane, reverse);
            let composed = decay * other_input + input;
            decay = select(take, decay * other_decay, decay);
            input = select(take, composed, input);
        }
    }
    (decay, input)
}

/// The map of the lane `offset` below this one (above with `reverse`), and whether there is one.
#[cube]
fn neighbour(
    decay: f32,
    input: f32,
    lane: usize,
    #[comptime] offset: usize,
    #[comptime] plane: usize,
    #[comptime] reverse: bool,
) -> (f32, f32, bool) {
    if comptime!(reverse) {
        (
            plane_shuffle_down(decay, offset as u32),
            plane_shuffle_down(input, offset as u32),
            lane + offset < plane,
        )
    } else {
        (
            plane_shuffle_up(decay, offset as u32),
            plane_shuffle_up(input, offset as u32),
            lane >= offset,
        )
    }
}

/// The exclusive scan from the inclusive one: the neighbour's map (below in time order, above
/// with `reverse`), the identity at the plane's edge.
#[cube]
pub(super) fn exclusive_map(
    decay: f32,
    input: f32,
    lane: usize,
    #[comptime] plane: usize,
    #[comptime] reverse: bool,
) -> (f32, f32) {
    let mut out_decay = 1.0f32;
    let mut out_input = 0.0f32;
    if comptime!(plane > 1) {
        let (other_decay, other_input, take) =
            neighbour(decay, input, lane, 1usize, plane, reverse);
        out_decay = select(take, other_decay, 1.0);
        out_input = select(take, other_input, 0.0);
    }
    (out_decay, out_input)
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
