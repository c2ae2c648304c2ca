//! The `#[cube]` kernels of causal attention (kept apart from Burn's names: `cubecl::prelude` has
//! its own `Tensor` and `Float`).
//!
//! One unit per row: a cube is `units` consecutive query rows (the forward, dQ) or key rows (dK,
//! dV) of one (batch, head). The other side's rows stream through shared memory in tiles of
//! `tile` rows, loaded by all units of the cube together (consecutive units, consecutive
//! addresses). Inputs are read in their float type `F` (f32, f16 or bf16) at any strides; every
//! product, sum and softmax statistic is f32; outputs are written in `F`, the statistics in f32.
//! Every output element is computed by one unit in a fixed order: no atomics, deterministic.
//!
//! A row past the sequence (the last cube's spare units) computes on the last row and writes
//! nothing: it still takes part in the tile loads and the barriers.

use cubecl::prelude::*;

/// Offset of `(batch, row, head, 0)` in a `[B, L, heads, hd]` tensor.
#[cube]
fn row_at<F: Float>(t: &Tensor<F>, batch: usize, row: usize, head: usize) -> usize {
    batch * t.stride(0) + row * t.stride(1) + head * t.stride(2)
}

/// Row `row` of `t` (at `row_at`), times `scale`, into `dst`.
#[cube]
fn load_row<F: Float>(
    t: &Tensor<F>,
    at: usize,
    scale: f32,
    dst: &mut Array<f32>,
    #[comptime] head_dim: usize,
) {
    for c in 0..head_dim {
        dst[c] = f32::cast_from(t[at + c * t.stride(3)]) * scale;
    }
}

/// Rows `first..first + count` of head `head` of `t` (`count ≤ tile`), times `scale`, into the
/// shared `[tile, hd]` buffer `dst`, by all `units` units of the cube.
#[cube]
fn load_tile<F: Float>(
    t: &Tensor<F>,
    batch: usize,
    head: usize,
    first: usize,
    count: usize,
    scale: f32,
    dst: &mut Shared<[f32]>,
    #[comptime] head_dim: usize,
    #[comptime] units: usize,
) {
    let unit = UNIT_POS_X as usize;
    let total = count * head_dim;
    let rounds = total.div_ceil(units);
    for round in 0..rounds {
        let e = round * units + unit;
        if e < total {
            let r = e / head_dim;
            let c = e % head_dim;
            let at = row_at(t, batch, first + r, head) + c * t.stride(3);
            dst[e] = f32::cast_from(t[at]) * scale;
        }
    }
}

/// `Σ_c a[c] · tile[j, c]`.
#[cube]
fn dot_tile(a: &Array<f32>, tile: &Shared<[f32]>, j: usize, #[comptime] head_dim: usize) -> f32 {
    let mut sum = 0.0f32;
    let base = j * head_dim;
    for c in 0..head_dim {
        sum += a[c] * tile[base + c];
    }
    sum
}

/// The forward: per query row `i`, with `s_j = scale · q_i · k_j` over the keys `j ≤ i`,
/// `out_i = Σ_j exp(s_j − m) v_j / Σ_j exp(s_j − m)`, computed over key tiles with the online
/// softmax (the running maximum `m` and sum `l` rescale the accumulator when `m` grows); with
/// `keep_lse`, the row's log-sum-exp `m + ln l` for the backward.
///
/// Cube `(block, batch · heads + head)`; `out` a contiguous `[B, L, H, hd]`, `lse` a contiguous
/// `[B, H, L]` f32 tensor.
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub(super) fn attention_forward<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    scale: f32,
    #[comptime] head_dim: usize,
    #[comptime] tile: usize,
    #[comptime] units: usize,
    #[comptime] keep_lse: bool,
    #[define(F)] _dtype: ElemType,
) {
    let len = q.shape(1);
    let heads = q.shape(2);
    let group = heads / k.shape(2);
    let batch_head = CUBE_POS_Y as usize;
    let (batch, head) = (batch_head / heads, batch_head % heads);
    let first = CUBE_POS_X as usize * units;
    let row = first + UNIT_POS_X as usize;
    let active = row < len;
    let i = select(active, row, len - 1);
    let keys = select(first + units < len, first + units, len);

    let mut q_row = Array::<f32>::new(head_dim);
    let mut acc = Array::<f32>::new(head_dim);
    let mut scores = Array::<f32>::new(tile);
    load_row(q, row_at(q, batch, i, head), scale, &mut q_row, head_dim);
    for c in 0..head_dim {
        acc[c] = 0.0;
    }
    let mut k_tile = Shared::<[f32]>::new_slice(comptime!(tile * head_dim));
    let mut v_tile = Shared::<[f32]>::new_slice(comptime!(tile * head_dim));
    // The maximum starts finite, so that a tile without a key for this row rescales by 1, never
    // by exp(-inf + inf).
    let mut m = f32::min_value();
    let mut l = 0.0f32;
    let tiles = keys.div_ceil(tile);
    for t in 0..tiles {
        let t0 = t * tile;
        let count = select(t0 + tile < keys, tile, keys - t0);
        sync_cube(); // every read of the previous tile is done
        load_tile(
            k,
            batch,
            head / group,
            t0,
            count,
            1.0,
            &mut k_tile,
            head_dim,
            units,
        );
        load_tile(
            v,
            batch,
            head / group,
            t0,
            count,
            1.0,
            &mut v_tile,
            head_dim,
            units,
        );
        sync_cube();
        let mut tile_max = m;
        for j in 0..count {
            if t0 + j <= i {
                let s = dot_tile(&q_row, &k_tile, j, head_dim);
                scores[j] = s;
                tile_max = f32::max(tile_max, s);
            }
        }
        let rescale = (m - tile_max).exp();
        l *= rescale;
        for c in 0..head_dim {
            acc[c] *= rescale;
        }
        for j in 0..count {
            if t0 + j <= i {
                let p = (scores[j] - tile_max).exp();
                l += p;
                let base = j * head_dim;
                for c in 0..head_dim {
                    acc[c] += p * v_tile[base + c];
                }
            }
        }
        m = tile_max;
    }
    if active {
        let inv = 1.0 / l;
        let at = ((batch * len + row) * heads + head) * head_dim;
        for c in 0..head_dim {
            out[at + c] = F::cast_from(acc[c] * inv);
        }
        if keep_lse {
            lse[batch_head * len + row] = m + l.ln();
        }
    }
}

/// The backward's first half, per query row `i` (cubes as in the forward): `D_i = dO_i · O_i`
/// into `delta` (`[B, H, L]`, f32, for [`attention_backward_key`]), and with the probabilities
/// recomputed from the saved log-sum-exp, `p_j = exp(s_j − lse_i)`,
///
/// ```text
/// dQ_i = scale · Σ_{j ≤ i} p_j (dO_i · v_j − D_i) k_j
/// ```
///
/// `dq` a contiguous `[B, L, H, hd]` tensor.
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub(super) fn attention_backward_query<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &Tensor<F>,
    dout: &Tensor<F>,
    lse: &Tensor<f32>,
    dq: &mut Tensor<F>,
    delta: &mut Tensor<f32>,
    scale: f32,
    #[comptime] head_dim: usize,
    #[comptime] tile: usize,
    #[comptime] units: usize,
    #[define(F)] _dtype: ElemType,
) {
    let len = q.shape(1);
    let heads = q.shape(2);
    let group = heads / k.shape(2);
    let batch_head = CUBE_POS_Y as usize;
    let (batch, head) = (batch_head / heads, batch_head % heads);
    let first = CUBE_POS_X as usize * units;
    let row = first + UNIT_POS_X as usize;
    let active = row < len;
    let i = select(active, row, len - 1);
    let keys = select(first + units < len, first + units, len);

    let mut q_row = Array::<f32>::new(head_dim);
    let mut do_row = Array::<f32>::new(head_dim);
    let mut grad = Array::<f32>::new(head_dim);
    load_row(q, row_at(q, batch, i, head), scale, &mut q_row, head_dim);
    load_row(
        dout,
        row_at(dout, batch, i, head),
        1.0,
        &mut do_row,
        head_dim,
    );
    let out_at = row_at(out, batch, i, head);
    let mut d_i = 0.0f32;
    for c in 0..head_dim {
        d_i += do_row[c] * f32::cast_from(out[out_at + c * out.stride(3)]);
        grad[c] = 0.0;
    }
    let lse_i = lse[batch_head * len + i];
    let mut k_tile = Shared::<[f32]>::new_slice(comptime!(tile * head_dim));
    let mut v_tile = Shared::<[f32]>::new_slice(comptime!(tile * head_dim));
    let tiles = keys.div_ceil(tile);
    for t in 0..tiles {
        let t0 = t * tile;
        let count = select(t0 + tile < keys, tile, keys - t0);
        sync_cube();
        load_tile(
            k,
            batch,
            head / group,
            t0,
            count,
            1.0,
            &mut k_tile,
            head_dim,
            units,
        );
        load_tile(
            v,
            batch,
            head / group,
            t0,
            count,
            1.0,
            &mut v_tile,
            head_dim,
            units,
        );
        sync_cube();
        for j in 0..count {
            if t0 + j <= i {
                let p = (dot_tile(&q_row, &k_tile, j, head_dim) - lse_i).exp();
                let ds = p * (dot_tile(&do_row, &v_tile, j, head_dim) - d_i);
                let base = j * head_dim;
                for c in 0..head_dim {
                    grad[c] += ds * k_tile[base + c];
                }
            }
        }
    }
    if active {
        let at = ((batch * len + row) * heads + head) * head_dim;
        for c in 0..head_dim {
            dq[at + c] = F::cast_from(grad[c] * scale);
        }
        delta[batch_head * len + row] = d_i;
    }
}

/// The backward's second half, per key row `j`: cube `(block, batch · kv_heads + kv_head)` holds
/// `units` key rows of one key/value head, and sums over the query heads of its group in order
/// of head, each over the query rows `i ≥ j` in tiles:
///
/// ```text
/// dV_j = Σ_h Σ_{i ≥ j} p_ij dO_i        dK_j = scale · Σ_h Σ_{i ≥ j} p_ij (dO_i · v_j − D_i) q_i
/// ```
///
/// `dk`, `dv` contiguous `[B, L, H_kv, hd]` tensors.
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub(super) fn attention_backward_key<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    dout: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    scale: f32,
    #[comptime] head_dim: usize,
    #[comptime] tile: usize,
    #[comptime] units: usize,
    #[define(F)] _dtype: ElemType,
) {
    let len = q.shape(1);
    let heads = q.shape(2);
    let kv_heads = k.shape(2);
    let group = heads / kv_heads;
    let batch_kv = CUBE_POS_Y as usize;
    let (batch, kv_head) = (batch_kv / kv_heads, batch_kv % kv_heads);
    let first = CUBE_POS_X as usize * units;
    let row = first + UNIT_POS_X as usize;
    let active = row < len;
    let j = select(active, row, len - 1);

    let mut k_row = Array::<f32>::new(head_dim);
    let mut v_row = Array::<f32>::new(head_dim);
    let mut dk_acc = Array::<f32>::new(head_dim);
    let mut dv_acc = Array::<f32>::new(head_dim);
    load_row(k, row_at(k, batch, j, kv_head), 1.0, &mut k_row, head_dim);
    load_row(v, row_at(v, batch, j, kv_head), 1.0, &mut v_row, head_dim);
    for c in 0..head_dim {
        dk_acc[c] = 0.0;
        dv_acc[c] = 0.0;
    }
    let mut q_tile = Shared::<[f32]>::new_slice(comptime!(tile * head_dim));
    let mut do_tile = Shared::<[f32]>::new_slice(comptime!(tile * head_dim));
    let mut stats = Shared::<[f32]>::new_slice(comptime!(2 * tile));
    let unit = UNIT_POS_X as usize;
    // The cube's first key sees queries `first..len`.
    let queries = len - first;
    let tiles = queries.div_ceil(tile);
    for n in 0..group {
        let head = kv_head * group + n;
        let stat_row = (batch * heads + head) * len;
        for t in 0..tiles {
            let t0 = first + t * tile;
            let count = select(t0 + tile < len, tile, len - t0);
            sync_cube();
            load_tile(
                q,
                batch,
                head,
                t0,
                count,
                scale,
                &mut q_tile,
                head_dim,
                units,
            );
            load_tile(
                dout,
                batch,
                head,
                t0,
                count,
                1.0,
                &mut do_tile,
                head_dim,
                units,
            );
            let rounds = count.div_ceil(units);
            for round in 0..rounds {
                let r = round * units + unit;
                if r < count {
                    stats[r] = lse[stat_row + t0 + r];
                    stats[tile + r] = delta[stat_row + t0 + r];
                }
            }
            sync_cube();
            for r in 0..count {
                if t0 + r >= j {
                    let p = (dot_tile(&k_row, &q_tile, r, head_dim) - stats[r]).exp();
                    let ds = p * (dot_tile(&v_row, &do_tile, r, head_dim) - stats[tile + r]);
                    let base = r * head_dim;
                    for c in 0..head_dim {
                        dv_acc[c] += p * do_tile[base + c];
                        // The tile holds scale · q: this is scale · ds · q.
                        dk_acc[c] += ds * q_tile[base + c];
                    }
                }
            }
        }
    }
    if active {
        let at = ((batch * len + row) * kv_heads + kv_head) * head_dim;
        for c in 0..head_dim {
            dk[at + c] = F::cast_from(dk_acc[c]);
            dv[at + c] = F::cast_from(dv_acc[c]);
        }
    }
}
