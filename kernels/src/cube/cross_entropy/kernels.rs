//! The `#[cube]` kernels of the cross-entropy (kept apart from Burn's names: `cubecl::prelude`
//! has its own `Tensor` and `Float`).
//!
//! Logits are read in their float type `F` (f32, f16 or bf16) and never copied; every statistic
//! and sum is f32. No atomics: every reduction runs in a fixed order, so reruns are bit-identical.

use cubecl::prelude::*;

/// `(max, Σ exp(x − max))` of two parts combined. Both maxima are finite (they start at
/// `f32::MIN`), so no `exp(−∞ + ∞)` arises.
#[cube]
fn combine(max_a: f32, sum_a: f32, max_b: f32, sum_b: f32) -> (f32, f32) {
    let max = f32::max(max_a, max_b);
    (
        max,
        sum_a * (max_a - max).exp() + sum_b * (max_b - max).exp(),
    )
}

/// Per row of `logits` (`rows` rows of `vocab`, contiguous), one cube of `units` units (a power
/// of two) walking the vocabulary in chunks of `units` columns, unit `u` holding an online
/// `(max, Σ exp)` of columns `u, u + units, …` (consecutive units, consecutive addresses); the
/// units' pairs are then combined through shared memory in a fixed tree. Writes the row's
/// log-sum-exp into `lse` and its loss `lse − logits[target]` into `row_loss` (0 for an ignored
/// row, NaN for a target outside `0..vocab`).
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub(super) fn cross_entropy_rows<F: Float>(
    logits: &Tensor<F>,
    targets: &Tensor<i32>,
    lse: &mut Tensor<f32>,
    row_loss: &mut Tensor<f32>,
    rows: usize,
    rows_per_cube: usize,
    vocab: usize,
    ignore_index: i32,
    #[comptime] units: usize,
    #[define(F)] _dtype: ElemType,
) {
    let unit = UNIT_POS_X as usize;
    let first = CUBE_POS_X as usize * rows_per_cube;
    let end = select(first + rows_per_cube < rows, first + rows_per_cube, rows);
    let mut maxima = Shared::<[f32]>::new_slice(units);
    let mut sums = Shared::<[f32]>::new_slice(units);
    for row in first..end {
        let base = row * vocab;
        let mut max = f32::min_value();
        let mut sum = 0.0f32;
        let mut c = unit;
        while c < vocab {
            let x = f32::cast_from(logits[base + c]);
            // One exp per logit: a new maximum rescales the sum, any other adds its term.
            if x > max {
                sum = sum * (max - x).exp() + 1.0;
                max = x;
            } else {
                sum += (x - max).exp();
            }
            c += units;
        }
        sync_cube(); // every read of the previous row's result is done
        maxima[unit] = max;
        sums[unit] = sum;
        sync_cube();
        let levels = comptime!(units.trailing_zeros() as usize);
        for level in 0..levels {
            let stride = (units / 2) >> level;
            if unit < stride {
                let (m, s) = combine(
                    maxima[unit],
                    sums[unit],
                    maxima[unit + stride],
                    sums[unit + stride],
                );
                maxima[unit] = m;
                sums[unit] = s;
            }
            sync_cube();
        }
        if unit == 0 {
            let row_lse = maxima[0] + sums[0].ln();
            lse[row] = row_lse;
            let target = targets[row];
            let mut loss = 0.0f32;
            if target != ignore_index {
                let column = usize::cast_from(target);
                if target >= 0 && column < vocab {
                    loss = row_lse - f32::cast_from(logits[base + column]);
                } else {
                    loss = f32::NAN;
                }
            }
            row_loss[row] = loss;
        }
    }
}

/// One cube of `units` units (a power of two): the mean of `row_loss` over the rows whose target
/// is not `ignore_index`, into `loss[0]`, and that count (at least 1) into `count[0]`. Unit `u`
/// sums rows `u, u + units, …` in order, then the units' sums are added in a fixed tree.
#[cube(launch, address_type = "dynamic")]
pub(super) fn mean_over_rows(
    row_loss: &Tensor<f32>,
    targets: &Tensor<i32>,
    loss: &mut Tensor<f32>,
    count: &mut Tensor<f32>,
    rows: usize,
    ignore_index: i32,
    #[comptime] units: usize,
) {
    let unit = UNIT_POS_X as usize;
    let mut totals = Shared::<[f32]>::new_slice(units);
    let mut counts = Shared::<[f32]>::new_slice(units);
    let mut total = 0.0f32;
    let mut valid = 0.0f32;
    let mut r = unit;
    while r < rows {
        total += row_loss[r];
        if targets[r] != ignore_index {
            valid += 1.0;
        }
        r += units;
    }
    totals[unit] = total;
    counts[unit] = valid;
    sync_cube();
    let levels = comptime!(units.trailing_zeros() as usize);
    for level in 0..levels {
        let stride = (units / 2) >> level;
        if unit < stride {
            totals[unit] += totals[unit + stride];
            counts[unit] += counts[unit + stride];
        }
        sync_cube();
    }
    if unit == 0 {
        let n = f32::max(counts[0], 1.0);
        loss[0] = totals[0] / n;
        count[0] = n;
    }
}

/// `d logits = (softmax − onehot(target)) · dloss / count` per element (one unit each), with
/// `softmax = exp(logit − lse[row])`; 0 on ignored rows.
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub(super) fn cross_entropy_backward<F: Float>(
    logits: &Tensor<F>,
    targets: &Tensor<i32>,
    lse: &Tensor<f32>,
    dloss: &Tensor<f32>,
    count: &Tensor<f32>,
    grad: &mut Tensor<F>,
    vocab: usize,
    ignore_index: i32,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i < grad.len() {
        let row = i / vocab;
        let target = targets[row];
        let mut g = 0.0f32;
        if target != ignore_index {
            let p = (f32::cast_from(logits[i]) - lse[row]).exp();
            let onehot = select(usize::cast_from(target) == i - row * vocab, 1.0f32, 0.0f32);
            g = (p - onehot) * (dloss[0] / count[0]);
        }
        grad[i] = F::cast_from(g);
    }
}
