//! The tile kernels of causal attention: the three kernels of [`super::kernels`] (forward, dQ,
//! dK/dV) with every product a 16 × 16 tile product of half-precision operands accumulated in
//! f32 — on the tensor cores (`cmma`) where the device has them for the inputs' type, otherwise
//! computed by the plane's own units from the same shared memory (the CPU runtime: the kernels
//! are verified there without a GPU; only the `cmma` calls of [`tile_product`] differ).
//!
//! A cube is `planes` planes (warps); plane `w` owns 16 consecutive rows of the cube's block
//! (query rows in the forward and dQ, key rows in dK/dV), and the other side streams through
//! shared memory in tiles of `tile` rows, staged by every unit of the cube. Scores,
//! probabilities and the accumulators of the outputs live in shared memory in f32 (a `cmma`
//! fragment's element layout is the device's own, so the row-wise softmax work reads them there);
//! the probabilities and `dS` are rounded to the inputs' type as the next product's operand, as
//! flash-attention does, while the row sums use the f32 values. Every output element is written
//! by one unit from sums in a fixed order: deterministic, no atomics.
//!
//! Rows at or past the sequence's end are staged as zeros and never written.

use cubecl::cmma::{self, MatrixIdent, MatrixLayout};
use cubecl::prelude::*;

/// The comptime shape of a launch (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Tiling {
    /// The head dimension, a multiple of 16.
    pub head_dim: usize,
    /// Rows of the streamed side per shared tile, a multiple of 16.
    pub tile: usize,
    /// Planes per cube, 16 rows of the cube's block each.
    pub planes: usize,
    /// Units per plane: 32 on NVIDIA GPUs, 1 on the CPU runtime.
    pub plane: usize,
    /// Tile products on the tensor cores; else by the plane's units.
    pub tensor_cores: bool,
}

/// Rows of a tile product's output, and of each plane's share of a cube's block.
pub(super) const FRAGMENT: usize = 16;

impl Tiling {
    /// Rows of a cube's block.
    pub(super) fn rows(&self) -> usize {
        FRAGMENT * self.planes
    }

    pub(super) fn units(&self) -> usize {
        self.planes * self.plane
    }
}

/// Elements from a 16 × 16 fragment's first to its last, rows `stride` apart.
fn span(stride: usize) -> usize {
    (FRAGMENT - 1) * stride + FRAGMENT
}

/// `acc[16 × 16] (+)= A[16 × k] · B[k × 16]`, by one plane, every unit of which calls it with the
/// same arguments: `a` row-major at `a_at` (row stride `a_stride`); `b` row-major at `b_at`
/// (row stride `b_stride`) or, with `b_transposed`, column-major (`b` holds the rows of Bᵀ: the
/// keys of `S = Q Kᵀ`); `acc` f32, row-major. Offsets and strides are multiples of 16 elements
/// (the tensor cores' alignment).
#[allow(clippy::too_many_arguments)]
#[cube]
fn tile_product<E: Float>(
    a: &Shared<[E]>,
    a_at: usize,
    b: &Shared<[E]>,
    b_at: usize,
    acc: &mut Shared<[f32]>,
    acc_at: usize,
    #[comptime] a_stride: usize,
    #[comptime] b_stride: usize,
    #[comptime] acc_stride: usize,
    #[comptime] k: usize,
    #[comptime] b_transposed: bool,
    #[comptime] accumulate: bool,
    #[comptime] tiling: Tiling,
) {
    if comptime!(tiling.tensor_cores) {
        let b_layout = comptime!(match b_transposed {
            true => MatrixLayout::ColMajor,
            false => MatrixLayout::RowMajor,
        });
        // Each slice ends at its fragment's last element.
        let acc_end = acc_at + comptime!(span(acc_stride));
        let mut c = unsafe {
            cmma::Matrix::<f32>::uninitialized(
                MatrixIdent::Accumulator,
                FRAGMENT,
                FRAGMENT,
                FRAGMENT,
                MatrixLayout::Undefined,
            )
        };
        if comptime!(accumulate) {
            cmma::load_with_layout(
                &mut c,
                acc.slice(acc_at, acc_end),
                comptime!(acc_stride as u32),
                MatrixLayout::RowMajor,
            );
        } else {
            cmma::fill(&mut c, 0.0f32);
        }
        #[unroll]
        for step in 0..comptime!(k / FRAGMENT) {
            let a_from = a_at + step * FRAGMENT;
            let a_frag = cmma::Matrix::<E>::from_slice(
                MatrixIdent::A,
                FRAGMENT,
                FRAGMENT,
                FRAGMENT,
                MatrixLayout::RowMajor,
                a.slice(a_from, a_from + comptime!(span(a_stride))),
                comptime!(a_stride as u32),
            );
            let b_from = if comptime!(b_transposed) {
                b_at + step * FRAGMENT
            } else {
                b_at + step * comptime!(FRAGMENT * b_stride)
            };
            let b_frag = cmma::Matrix::<E>::from_slice(
                MatrixIdent::B,
                FRAGMENT,
                FRAGMENT,
                FRAGMENT,
                b_layout,
                b.slice(b_from, b_from + comptime!(span(b_stride))),
                comptime!(b_stride as u32),
            );
            cmma::execute(&a_frag, &b_frag, &c, &c);
        }
        cmma::store(
            acc.slice_mut(acc_at, acc_end),
            &c,
            comptime!(acc_stride as u32),
            MatrixLayout::RowMajor,
        );
    } else {
        let lane = UNIT_POS_X as usize % comptime!(tiling.plane);
        for e in range_stepped(
            lane,
            comptime!(FRAGMENT * FRAGMENT),
            comptime!(tiling.plane),
        ) {
            let r = e / FRAGMENT;
            let n = e % FRAGMENT;
            let out = acc_at + r * acc_stride + n;
            let mut sum = 0.0f32;
            if comptime!(accumulate) {
                sum = acc[out];
            }
            for kk in 0..k {
                let b_value = if comptime!(b_transposed) {
                    b[b_at + n * b_stride + kk]
                } else {
                    b[b_at + kk * b_stride + n]
                };
                sum += f32::cast_from(a[a_at + r * a_stride + kk]) * f32::cast_from(b_value);
            }
            acc[out] = sum;
        }
    }
    // Other units of the plane read what this product wrote.
    sync_plane();
}

/// Where this unit works: the cube's `(batch, head)` (of `heads` heads) and its block's first
/// row; its plane's first row in the block (`own`) and in the sequence (`row0`); its lane in the
/// plane.
#[derive(CubeType)]
struct Place {
    batch: usize,
    head: usize,
    first: usize,
    own: usize,
    row0: usize,
    lane: usize,
}

#[cube]
fn place(heads: usize, #[comptime] tiling: Tiling) -> Place {
    let batch_head = CUBE_POS_Y as usize;
    let first = CUBE_POS_X as usize * comptime!(tiling.rows());
    let unit = UNIT_POS_X as usize;
    let own = unit / comptime!(tiling.plane) * FRAGMENT;
    Place {
        batch: batch_head / heads,
        head: batch_head % heads,
        first,
        own,
        row0: first + own,
        lane: unit % comptime!(tiling.plane),
    }
}

/// Rows `first..first + count` of head `head` of the `[B, L, heads, hd]` tensor `t` into the
/// shared `[count, hd]` buffer `dst`, by every unit of the cube; rows at or past `L` are zero.
#[cube]
fn stage_rows<E: Float>(
    t: &Tensor<E>,
    batch: usize,
    head: usize,
    first: usize,
    dst: &mut Shared<[E]>,
    #[comptime] count: usize,
    #[comptime] tiling: Tiling,
) {
    let len = t.shape(1);
    let head_dim = comptime!(tiling.head_dim);
    for e in range_stepped(
        UNIT_POS_X as usize,
        comptime!(count * head_dim),
        comptime!(tiling.units()),
    ) {
        let row = first + e / head_dim;
        let at = batch * t.stride(0)
            + min(row, len - 1) * t.stride(1)
            + head * t.stride(2)
            + (e % head_dim) * t.stride(3);
        dst[e] = select(row < len, t[at], E::new(0.0));
    }
}

/// Zeroes the 16 rows of the plane starting at row `own` of the shared `[rows, width]` f32
/// buffer `dst`.
#[cube]
fn zero_rows(
    dst: &mut Shared<[f32]>,
    own: usize,
    lane: usize,
    #[comptime] width: usize,
    #[comptime] plane: usize,
) {
    for e in range_stepped(lane, comptime!(FRAGMENT * width), plane) {
        dst[own * width + e] = 0.0;
    }
}

/// The plane's 16 accumulator rows (from row `own` of the shared `[rows, hd]` buffer `acc`),
/// times `scale`, to the rows `row0..` of head `head` of the contiguous `[B, L, heads, hd]`
/// tensor `dst`; rows at or past `L` are not written.
#[allow(clippy::too_many_arguments)]
#[cube]
fn write_rows<E: Float>(
    acc: &Shared<[f32]>,
    dst: &mut Tensor<E>,
    batch: usize,
    head: usize,
    own: usize,
    row0: usize,
    lane: usize,
    scale: f32,
    #[comptime] tiling: Tiling,
) {
    let len = dst.shape(1);
    let heads = dst.shape(2);
    let head_dim = comptime!(tiling.head_dim);
    for e in range_stepped(
        lane,
        comptime!(FRAGMENT * head_dim),
        comptime!(tiling.plane),
    ) {
        let row = row0 + e / head_dim;
        if row < len {
            let at = ((batch * len + row) * heads + head) * head_dim + e % head_dim;
            dst[at] = E::cast_from(acc[own * head_dim + e] * scale);
        }
    }
}

/// The plane's scores `S = Q Kᵀ` (or `Sᵀ = K Qᵀ`): rows `own..own + 16` of `rows_s` against the
/// `tile` rows of `cols_s`, into the same rows of the shared `[rows, tile]` buffer `s`.
#[cube]
fn scores<E: Float>(
    rows_s: &Shared<[E]>,
    cols_s: &Shared<[E]>,
    s: &mut Shared<[f32]>,
    own: usize,
    #[comptime] tiling: Tiling,
) {
    let head_dim = comptime!(tiling.head_dim);
    let tile = comptime!(tiling.tile);
    #[unroll]
    for block in 0..comptime!(tile / FRAGMENT) {
        tile_product(
            rows_s,
            own * head_dim,
            cols_s,
            block * comptime!(FRAGMENT * head_dim),
            s,
            own * tile + block * FRAGMENT,
            head_dim,
            head_dim,
            tile,
            head_dim,
            true,
            false,
            tiling,
        );
    }
}

/// `acc[own.., :] += P · X`: the plane's 16 rows of the shared `[rows, tile]` operand `p` times
/// the shared `[tile, hd]` rows `x`, into rows `own..own + 16` of the shared `[rows, hd]` f32
/// accumulator.
#[cube]
fn accumulate_product<E: Float>(
    p: &Shared<[E]>,
    x: &Shared<[E]>,
    acc: &mut Shared<[f32]>,
    own: usize,
    #[comptime] tiling: Tiling,
) {
    let head_dim = comptime!(tiling.head_dim);
    let tile = comptime!(tiling.tile);
    #[unroll]
    for block in 0..comptime!(head_dim / FRAGMENT) {
        tile_product(
            p,
            own * tile,
            x,
            block * FRAGMENT,
            acc,
            own * head_dim + block * FRAGMENT,
            tile,
            head_dim,
            head_dim,
            tile,
            false,
            true,
            tiling,
        );
    }
}

/// The online softmax's step for the plane's 16 query rows (global rows `row0..`, block rows
/// `own..`) over the key tile at `t0`: the running maximum `m` and sum `l` updated, the
/// accumulator rows rescaled, and the probabilities `exp(scale · s − m)` (zero where masked)
/// written over the scores in f32 and into `p` in the inputs' type.
#[allow(clippy::too_many_arguments)]
#[cube]
fn softmax_step<E: Float>(
    s: &mut Shared<[f32]>,
    p: &mut Shared<[E]>,
    acc: &mut Shared<[f32]>,
    stats: &mut Shared<[f32]>,
    own: usize,
    row0: usize,
    t0: usize,
    len: usize,
    lane: usize,
    scale: f32,
    #[comptime] tiling: Tiling,
) {
    let tile = comptime!(tiling.tile);
    let head_dim = comptime!(tiling.head_dim);
    let plane = comptime!(tiling.plane);
    let rows = comptime!(tiling.rows());
    // `stats` holds m, l and this step's rescale factor, `rows` each.
    for r in range_stepped(lane, FRAGMENT, plane) {
        let i = row0 + r;
        let m_old = stats[own + r];
        let mut m = m_old;
        for j in 0..tile {
            if t0 + j <= i && t0 + j < len {
                m = f32::max(m, s[(own + r) * tile + j] * scale);
            }
        }
        stats[own + r] = m;
        stats[comptime!(2 * rows) + own + r] = (m_old - m).exp();
    }
    sync_plane();
    for e in range_stepped(lane, comptime!(FRAGMENT * tile), plane) {
        let r = e / tile;
        let j = t0 + e % tile;
        let at = own * tile + e;
        let valid = j <= row0 + r && j < len;
        let prob = select(valid, (s[at] * scale - stats[own + r]).exp(), 0.0);
        s[at] = prob;
        p[at] = E::cast_from(prob);
    }
    for e in range_stepped(lane, comptime!(FRAGMENT * head_dim), plane) {
        acc[own * head_dim + e] *= stats[comptime!(2 * rows) + own + e / head_dim];
    }
    sync_plane();
    for r in range_stepped(lane, FRAGMENT, plane) {
        let mut sum = 0.0f32;
        for j in 0..tile {
            sum += s[(own + r) * tile + j];
        }
        let l_at = comptime!(rows) + own + r;
        stats[l_at] = stats[l_at] * stats[comptime!(2 * rows) + own + r] + sum;
    }
    sync_plane();
}

/// The forward: per query row, the online softmax over key tiles (see [`super::kernels`]'s
/// forward for the equations), with `S = Q Kᵀ` and `O += P V` as tile products; with
/// `keep_lse`, each row's log-sum-exp `m + ln l`.
///
/// Cube `(block, batch · heads + head)` of `tiling.units()` units; `out` a contiguous
/// `[B, L, H, hd]`, `lse` a contiguous `[B, H, L]` f32 tensor.
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub(super) fn attention_forward<E: Float>(
    q: &Tensor<E>,
    k: &Tensor<E>,
    v: &Tensor<E>,
    out: &mut Tensor<E>,
    lse: &mut Tensor<f32>,
    scale: f32,
    #[comptime] tiling: Tiling,
    #[comptime] keep_lse: bool,
    #[define(E)] _dtype: ElemType,
) {
    let head_dim = comptime!(tiling.head_dim);
    let tile = comptime!(tiling.tile);
    let rows = comptime!(tiling.rows());
    let len = q.shape(1);
    let heads = q.shape(2);
    let group = heads / k.shape(2);
    let batch_head = CUBE_POS_Y as usize;
    let at = place(heads, tiling);
    let (batch, head, first) = (at.batch, at.head, at.first);
    let (own, row0, lane) = (at.own, at.row0, at.lane);

    let mut q_s = Shared::<[E]>::new_aligned_slice(comptime!(rows * head_dim), 32usize);
    let mut k_s = Shared::<[E]>::new_aligned_slice(comptime!(tile * head_dim), 32usize);
    let mut v_s = Shared::<[E]>::new_aligned_slice(comptime!(tile * head_dim), 32usize);
    let mut acc = Shared::<[f32]>::new_aligned_slice(comptime!(rows * head_dim), 32usize);
    let mut s = Shared::<[f32]>::new_aligned_slice(comptime!(rows * tile), 32usize);
    let mut p = Shared::<[E]>::new_aligned_slice(comptime!(rows * tile), 32usize);
    let mut stats = Shared::<[f32]>::new_slice(comptime!(3 * rows));

    stage_rows(q, batch, head, first, &mut q_s, rows, tiling);
    zero_rows(&mut acc, own, lane, head_dim, comptime!(tiling.plane));
    // The maximum starts finite, so that the first rescale is exp(min - m) = 0, never NaN.
    for r in range_stepped(lane, FRAGMENT, comptime!(tiling.plane)) {
        stats[own + r] = f32::min_value();
        stats[rows + own + r] = 0.0;
    }
    let keys = min(first + rows, len);
    for t in 0..keys.div_ceil(tile) {
        let t0 = t * tile;
        sync_cube(); // every read of the previous tile is done
        stage_rows(k, batch, head / group, t0, &mut k_s, tile, tiling);
        stage_rows(v, batch, head / group, t0, &mut v_s, tile, tiling);
        sync_cube();
        // A tile wholly after the plane's last row adds nothing to it.
        if t0 < row0 + FRAGMENT {
            scores(&q_s, &k_s, &mut s, own, tiling);
            softmax_step(
                &mut s, &mut p, &mut acc, &mut stats, own, row0, t0, len, lane, scale, tiling,
            );
            accumulate_product(&p, &v_s, &mut acc, own, tiling);
        }
    }
    for r in range_stepped(lane, FRAGMENT, comptime!(tiling.plane)) {
        let inv = 1.0 / stats[rows + own + r];
        stats[comptime!(2 * rows) + own + r] = inv;
        if comptime!(keep_lse) {
            if row0 + r < len {
                lse[batch_head * len + row0 + r] = stats[own + r] + stats[rows + own + r].ln();
            }
        }
    }
    sync_plane();
    for r in 0..FRAGMENT {
        let inv = stats[comptime!(2 * rows) + own + r];
        for c in range_stepped(lane, head_dim, comptime!(tiling.plane)) {
            acc[(own + r) * head_dim + c] *= inv;
        }
    }
    sync_plane();
    write_rows(&acc, out, batch, head, own, row0, lane, 1.0, tiling);
}

/// The backward's first half per query row `i` (cubes as in the forward): `D_i = dO_i · O_i` into
/// `delta` (`[B, H, L]`, f32), and `dQ = scale · dS K` with `S = Q Kᵀ`, `dP = dO Vᵀ`,
/// `P = exp(scale · S − lse)`, `dS = P ⊙ (dP − D)` per key tile; `dq` a contiguous
/// `[B, L, H, hd]` tensor.
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub(super) fn attention_backward_query<E: Float>(
    q: &Tensor<E>,
    k: &Tensor<E>,
    v: &Tensor<E>,
    out: &Tensor<E>,
    dout: &Tensor<E>,
    lse: &Tensor<f32>,
    dq: &mut Tensor<E>,
    delta: &mut Tensor<f32>,
    scale: f32,
    #[comptime] tiling: Tiling,
    #[define(E)] _dtype: ElemType,
) {
    let head_dim = comptime!(tiling.head_dim);
    let tile = comptime!(tiling.tile);
    let rows = comptime!(tiling.rows());
    let plane = comptime!(tiling.plane);
    let len = q.shape(1);
    let heads = q.shape(2);
    let group = heads / k.shape(2);
    let batch_head = CUBE_POS_Y as usize;
    let at = place(heads, tiling);
    let (batch, head, first) = (at.batch, at.head, at.first);
    let (own, row0, lane) = (at.own, at.row0, at.lane);

    let mut q_s = Shared::<[E]>::new_aligned_slice(comptime!(rows * head_dim), 32usize);
    let mut do_s = Shared::<[E]>::new_aligned_slice(comptime!(rows * head_dim), 32usize);
    let mut k_s = Shared::<[E]>::new_aligned_slice(comptime!(tile * head_dim), 32usize);
    let mut v_s = Shared::<[E]>::new_aligned_slice(comptime!(tile * head_dim), 32usize);
    let mut acc = Shared::<[f32]>::new_aligned_slice(comptime!(rows * head_dim), 32usize);
    let mut s = Shared::<[f32]>::new_aligned_slice(comptime!(rows * tile), 32usize);
    let mut dp = Shared::<[f32]>::new_aligned_slice(comptime!(rows * tile), 32usize);
    let mut ds = Shared::<[E]>::new_aligned_slice(comptime!(rows * tile), 32usize);
    let mut stats = Shared::<[f32]>::new_slice(comptime!(2 * rows));

    stage_rows(q, batch, head, first, &mut q_s, rows, tiling);
    stage_rows(dout, batch, head, first, &mut do_s, rows, tiling);
    zero_rows(&mut acc, own, lane, head_dim, plane);
    sync_cube();
    for r in range_stepped(lane, FRAGMENT, plane) {
        let i = min(row0 + r, len - 1);
        let out_at = batch * out.stride(0) + i * out.stride(1) + head * out.stride(2);
        let mut d_i = 0.0f32;
        for c in 0..head_dim {
            d_i += f32::cast_from(do_s[(own + r) * head_dim + c])
                * f32::cast_from(out[out_at + c * out.stride(3)]);
        }
        stats[own + r] = lse[batch_head * len + i];
        stats[rows + own + r] = d_i;
        if row0 + r < len {
            delta[batch_head * len + row0 + r] = d_i;
        }
    }
    sync_plane();
    let keys = min(first + rows, len);
    for t in 0..keys.div_ceil(tile) {
        let t0 = t * tile;
        sync_cube();
        stage_rows(k, batch, head / group, t0, &mut k_s, tile, tiling);
        stage_rows(v, batch, head / group, t0, &mut v_s, tile, tiling);
        sync_cube();
        if t0 < row0 + FRAGMENT {
            scores(&q_s, &k_s, &mut s, own, tiling);
            scores(&do_s, &v_s, &mut dp, own, tiling);
            for e in range_stepped(lane, comptime!(FRAGMENT * tile), plane) {
                let r = e / tile;
                let j = t0 + e % tile;
                let at = own * tile + e;
                let valid = j <= row0 + r && j < len;
                let prob = (s[at] * scale - stats[own + r]).exp();
                let grad = select(valid, prob * (dp[at] - stats[rows + own + r]), 0.0);
                ds[at] = E::cast_from(grad);
            }
            sync_plane();
            accumulate_product(&ds, &k_s, &mut acc, own, tiling);
        }
    }
    write_rows(&acc, dq, batch, head, own, row0, lane, scale, tiling);
}

/// The backward's second half per key row `j`: cube `(block, batch · kv_heads + kv_head)`, plane
/// `w` owning 16 key rows of one key/value head, summing over the query heads of its group in
/// order of head and over the query rows `i ≥ j` in tiles, with `Sᵀ = K Qᵀ`, `dPᵀ = V dOᵀ`:
/// `dV += Pᵀ dO`, `dK += scale · dSᵀ Q`; `dk`, `dv` contiguous `[B, L, H_kv, hd]` tensors.
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub(super) fn attention_backward_key<E: Float>(
    q: &Tensor<E>,
    k: &Tensor<E>,
    v: &Tensor<E>,
    dout: &Tensor<E>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<E>,
    dv: &mut Tensor<E>,
    scale: f32,
    #[comptime] tiling: Tiling,
    #[define(E)] _dtype: ElemType,
) {
    let head_dim = comptime!(tiling.head_dim);
    let tile = comptime!(tiling.tile);
    let rows = comptime!(tiling.rows());
    let plane = comptime!(tiling.plane);
    let len = q.shape(1);
    let heads = q.shape(2);
    let kv_heads = k.shape(2);
    let group = heads / kv_heads;
    let at = place(kv_heads, tiling);
    let (batch, kv_head, first) = (at.batch, at.head, at.first);
    let (own, row0, lane) = (at.own, at.row0, at.lane);

    let mut k_s = Shared::<[E]>::new_aligned_slice(comptime!(rows * head_dim), 32usize);
    let mut v_s = Shared::<[E]>::new_aligned_slice(comptime!(rows * head_dim), 32usize);
    let mut q_s = Shared::<[E]>::new_aligned_slice(comptime!(tile * head_dim), 32usize);
    let mut do_s = Shared::<[E]>::new_aligned_slice(comptime!(tile * head_dim), 32usize);
    let mut dk_acc = Shared::<[f32]>::new_aligned_slice(comptime!(rows * head_dim), 32usize);
    let mut dv_acc = Shared::<[f32]>::new_aligned_slice(comptime!(rows * head_dim), 32usize);
    let mut s = Shared::<[f32]>::new_aligned_slice(comptime!(rows * tile), 32usize);
    let mut dp = Shared::<[f32]>::new_aligned_slice(comptime!(rows * tile), 32usize);
    let mut p = Shared::<[E]>::new_aligned_slice(comptime!(rows * tile), 32usize);
    let mut ds = Shared::<[E]>::new_aligned_slice(comptime!(rows * tile), 32usize);
    let mut stats = Shared::<[f32]>::new_slice(comptime!(2 * tile));

    stage_rows(k, batch, kv_head, first, &mut k_s, rows, tiling);
    stage_rows(v, batch, kv_head, first, &mut v_s, rows, tiling);
    zero_rows(&mut dk_acc, own, lane, head_dim, plane);
    zero_rows(&mut dv_acc, own, lane, head_dim, plane);
    // The cube's first key sees the queries `first..len`.
    let tiles = (len - first).div_ceil(tile);
    for n in 0..group {
        let head = kv_head * group + n;
        let stat_row = (batch * heads + head) * len;
        for t in 0..tiles {
            let t0 = first + t * tile;
            sync_cube();
            stage_rows(q, batch, head, t0, &mut q_s, tile, tiling);
            stage_rows(dout, batch, head, t0, &mut do_s, tile, tiling);
            for c in range_stepped(UNIT_POS_X as usize, tile, comptime!(tiling.units())) {
                let i = min(t0 + c, len - 1);
                stats[c] = lse[stat_row + i];
                stats[tile + c] = delta[stat_row + i];
            }
            sync_cube();
            // A query tile wholly before the plane's first key adds nothing to it.
            if t0 + tile > row0 {
                scores(&k_s, &q_s, &mut s, own, tiling);
                scores(&v_s, &do_s, &mut dp, own, tiling);
                for e in range_stepped(lane, comptime!(FRAGMENT * tile), plane) {
                    let c = e % tile;
                    let i = t0 + c;
                    let at = own * tile + e;
                    let valid = i >= row0 + e / tile && i < len;
                    let prob = select(valid, (s[at] * scale - stats[c]).exp(), 0.0);
                    p[at] = E::cast_from(prob);
                    ds[at] = E::cast_from(prob * (dp[at] - stats[tile + c]));
                }
                sync_plane();
                accumulate_product(&p, &do_s, &mut dv_acc, own, tiling);
                accumulate_product(&ds, &q_s, &mut dk_acc, own, tiling);
            }
        }
    }
    write_rows(&dk_acc, dk, batch, kv_head, own, row0, lane, scale, tiling);
    write_rows(&dv_acc, dv, batch, kv_head, own, row0, lane, 1.0, tiling);
}
