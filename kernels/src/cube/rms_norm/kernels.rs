//! The `#[cube]` kernels of RMSNorm (kept apart from Burn's names: `cubecl::prelude` has its own
//! `Tensor` and `Float`).
//!
//! A cube is `units` units working on a block of consecutive rows, one row at a time: unit `u`
//! holds columns `u, u + units, …` of the row in registers (consecutive units, consecutive
//! addresses), and the row's sums are reduced across units through shared memory in a fixed tree
//! (`units` is a power of two). Inputs are read in their float type `F` (f32, f16 or bf16), every
//! statistic and sum is f32, outputs are written in `F`. No atomics: deterministic.

use cubecl::prelude::*;

/// `value` summed over the cube's `units` units (a power of two), in a fixed order; every unit
/// gets the sum. `sums` is the cube's `[units]` shared buffer.
#[cube]
fn cube_sum(value: f32, sums: &mut Shared<[f32]>, #[comptime] units: usize) -> f32 {
    let unit = UNIT_POS_X as usize;
    sync_cube(); // every read of the previous sum is done
    sums[unit] = value;
    sync_cube();
    let levels = comptime!(units.trailing_zeros() as usize);
    for level in 0..levels {
        let stride = (units / 2) >> level;
        if unit < stride {
            sums[unit] += sums[unit + stride];
        }
        sync_cube();
    }
    sums[0]
}

/// Rows `first..` of the cube's block: the block is `rows_per_cube` rows, cut at the last row.
#[cube]
fn block_rows(rows: usize, rows_per_cube: usize) -> (usize, usize) {
    let first = CUBE_POS_X as usize * rows_per_cube;
    let end = first + rows_per_cube;
    (first, select(end < rows, end, rows))
}

/// `x[i]` (f32), plus `t[i]` with `add`.
#[cube]
fn input<F: Float>(x: &Tensor<F>, t: &Tensor<F>, i: usize, #[comptime] add: bool) -> f32 {
    let mut v = f32::cast_from(x[i]);
    if add {
        v += f32::cast_from(t[i]);
    }
    v
}

/// The forward, per row of `x` (`rows` rows of `width`, contiguous), with `x` replaced by the sum
/// `x + t` (formed in registers, never written) when `add`:
/// `y = x · rstd · gamma` with `rstd = 1 / sqrt(mean(x²) + eps)`; with `keep_rstd`, the row's
/// `rstd` (f32) into `rstd`.
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub(super) fn rms_norm_forward<F: Float>(
    x: &Tensor<F>,
    t: &Tensor<F>,
    gamma: &Tensor<F>,
    y: &mut Tensor<F>,
    rstd: &mut Tensor<f32>,
    eps: f32,
    rows: usize,
    rows_per_cube: usize,
    #[comptime] width: usize,
    #[comptime] units: usize,
    #[comptime] keep_rstd: bool,
    #[comptime] add: bool,
    #[define(F)] _dtype: ElemType,
) {
    let unit = UNIT_POS_X as usize;
    let (first, end) = block_rows(rows, rows_per_cube);
    let columns = comptime!(width.div_ceil(units));
    let mut values = Array::<f32>::new(columns);
    let mut sums = Shared::<[f32]>::new_slice(units);
    for row in first..end {
        let base = row * width;
        let mut squares = 0.0f32;
        #[unroll]
        for k in 0..columns {
            let c = k * units + unit;
            let mut v = 0.0f32;
            if c < width {
                v = input(x, t, base + c, add);
            }
            values[k] = v;
            squares += v * v;
        }
        let total = cube_sum(squares, &mut sums, units);
        let r = 1.0f32 / (total / width as f32 + eps).sqrt();
        #[unroll]
        for k in 0..columns {
            let c = k * units + unit;
            if c < width {
                y[base + c] = F::cast_from(values[k] * r * f32::cast_from(gamma[c]));
            }
        }
        if keep_rstd && unit == 0 {
            rstd[row] = r;
        }
    }
}

/// The backward over the cube's block of rows, with `x̂ = x · rstd` and `g = dy · gamma`:
///
/// ```text
/// dx = (g − x̂ · mean(g · x̂)) · rstd        d gamma_block = Σ_{rows of the block} dy · x̂
/// ```
///
/// `dx` contiguous like `x`; `partials` a `[cubes, width]` f32 tensor, row `b` the `d gamma` sum
/// of cube `b`'s rows in order (summed over cubes by [`sum_partials`]). With `add`, `x` is the
/// sum `x + t`, recomputed, and `dx` the gradient of both.
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub(super) fn rms_norm_backward<F: Float>(
    x: &Tensor<F>,
    t: &Tensor<F>,
    gamma: &Tensor<F>,
    rstd: &Tensor<f32>,
    dy: &Tensor<F>,
    dx: &mut Tensor<F>,
    partials: &mut Tensor<f32>,
    rows: usize,
    rows_per_cube: usize,
    #[comptime] width: usize,
    #[comptime] units: usize,
    #[comptime] add: bool,
    #[define(F)] _dtype: ElemType,
) {
    let unit = UNIT_POS_X as usize;
    let (first, end) = block_rows(rows, rows_per_cube);
    let columns = comptime!(width.div_ceil(units));
    let mut normalised = Array::<f32>::new(columns);
    let mut scaled = Array::<f32>::new(columns);
    let mut dgamma = Array::<f32>::new(columns);
    let mut sums = Shared::<[f32]>::new_slice(units);
    #[unroll]
    for k in 0..columns {
        dgamma[k] = 0.0;
    }
    for row in first..end {
        let base = row * width;
        let r = rstd[row];
        let mut dot = 0.0f32;
        #[unroll]
        for k in 0..columns {
            let c = k * units + unit;
            let mut xh = 0.0f32;
            let mut g = 0.0f32;
            if c < width {
                xh = input(x, t, base + c, add) * r;
                let d = f32::cast_from(dy[base + c]);
                g = d * f32::cast_from(gamma[c]);
                dgamma[k] += d * xh;
            }
            normalised[k] = xh;
            scaled[k] = g;
            dot += g * xh;
        }
        let mean = cube_sum(dot, &mut sums, units) / width as f32;
        #[unroll]
        for k in 0..columns {
            let c = k * units + unit;
            if c < width {
                dx[base + c] = F::cast_from((scaled[k] - normalised[k] * mean) * r);
            }
        }
    }
    #[unroll]
    for k in 0..columns {
        let c = k * units + unit;
        if c < width {
            partials[CUBE_POS_X as usize * width + c] = dgamma[k];
        }
    }
}

/// `d gamma[c] = Σ_b partials[b, c]`, over the first `blocks` rows in order; one unit per
/// column.
#[cube(launch, address_type = "dynamic")]
pub(super) fn sum_partials<F: Float>(
    partials: &Tensor<f32>,
    dgamma: &mut Tensor<F>,
    blocks: usize,
    #[define(F)] _dtype: ElemType,
) {
    let c = ABSOLUTE_POS;
    let width = dgamma.len();
    if c < width {
        let mut sum = 0.0f32;
        for b in 0..blocks {
            sum += partials[b * width + c];
        }
        dgamma[c] = F::cast_from(sum);
    }
}
