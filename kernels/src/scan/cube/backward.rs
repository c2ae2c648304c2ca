//! The backward `#[cube]` kernel: units along time as in the forward, a few channels per cube.
//!
//! A cube is `units × rows` units: `rows` consecutive channels of one group (`UNIT_POS_Y`; cube
//! `(block, batch · groups + group)`), each walked by `units` units along time (`UNIT_POS_X`).
//! The lane is walked one checkpoint chunk at a time, last to first; a chunk is `units · items`
//! steps and unit `i` owns the `items` consecutive steps `i · items ..` of it. Per chunk:
//!
//! 1. each unit stages its steps' `Δ`, `Δ u` and `dy = dout · silu(z)` in shared memory;
//! 2. for each state `n` (a loop outside everything else, so one state's values are in
//!    registers at a time, as in mamba-ssm):
//!    - the forward states: each unit composes its steps into one affine map, the maps are
//!      scanned across the units of the row (plane shuffles within a plane, shared memory across
//!      planes: the forward's scheme) and applied to the chunk's entry state from the forward's
//!      checkpoints; each unit walks its steps and stages `s_t[n]`;
//!    - the adjoint `g_t = exp(Δ_t A) ⊙ h_t` (`h_t = ∂L/∂s_t`), carried from later steps to
//!      earlier ones: the reverse-time maps `g ↦ exp(Δ_t A)(dy_t C_t + g)` composed per unit and
//!      scanned across units in reverse order, applied to the carry from the later chunk; each
//!      unit walks its steps backward accumulating per step the `Σ_n` terms of `dΔ`, `du`, `y`
//!      in shared memory, and its `dA[n]` (summed over the row's units in order by unit 0);
//!    - `dB_t[n]`, `dC_t[n]`: each unit's contributions meet in shared memory and are summed over
//!      the cube's rows in row order into one partial per cube (`[batch · groups, block, len,
//!      state]`), which `sum_parts` adds over the blocks in order;
//! 3. each unit writes `du`, `ddelta`, `dz` of its steps.
//!
//! Per step, with `dy_t = dout_t silu(z_t)`:
//! ```text
//! h_t    = dy_t C_t + exp(Δ_{t+1}A) ⊙ h_{t+1}
//! dC_t  += dy_t s_t          dB_t += h_t Δ_t u_t         dA   += Δ_t h_t ⊙ exp(Δ_t A) ⊙ s_{t-1}
//! dΔ_t   = Σ h_t ⊙ exp(Δ_t A) ⊙ s_{t-1} ⊙ A + u_t Σ h_t ⊙ B_t
//! du_t   = Δ_t Σ h_t ⊙ B_t + D dy_t                      dD  += dy_t u_t
//! dz_t   = dout_t y_t silu'(z_t)                         ddelta_t = dΔ_t softplus'(delta_t + bias)
//! ```
//!
//! The chunk's per-step values live in shared memory, not in unit-local arrays (no spills), and
//! one state at a time in registers; the price is reading a step's `B`/`C` once per state and
//! pass (four times per state element in all), strided by the state size. No atomics and every
//! sum in a fixed order: results are deterministic. Steps past the end compute as `Δ = 0`,
//! `dy = 0` (identity maps, no contributions). Verified on the CPU runtime only: the plane
//! shuffles run only on a GPU, where no scan kernel has run yet.

use cubecl::prelude::*;

use super::kernels::{exclusive_map, row, scan_maps, sigmoid, softplus, softplus_grad};

/// The fields of a cube's staging memory, each a `[rows, chunk]` array (a unit's step `j` of row
/// `r` at `r · chunk + j · units + unit`: consecutive units, consecutive floats): `Δ`, `Δ u`,
/// `dy`, the current state's `s_t`, and the per-step `Σ_n` of `h ⊙ exp(ΔA) ⊙ s_{t-1} ⊙ A`,
/// of `h ⊙ B` and of `C ⊙ s` (`y` less `D u`).
const DT: usize = 0;
const DU: usize = 1;
const DY: usize = 2;
const S: usize = 3;
const R: usize = 4;
const HB: usize = 5;
const Y: usize = 6;
const FIELDS: usize = 7;

/// One unit's lane: its place in the cube, the offsets of its rows in each tensor, where its
/// steps are staged.
#[derive(CubeType, Clone)]
struct Lane {
    channel: usize,
    /// `UNIT_POS_X`: the unit's place along time.
    unit: usize,
    /// `UNIT_POS_Y`: the channel's row of the cube.
    line: usize,
    u: usize,
    delta: usize,
    z: usize,
    dout: usize,
    grad: usize,
    b: usize,
    c: usize,
    checkpoint: usize,
    /// The unit's step 0 in field 0 of the staging memory (`+ field · rows · chunk + j · units`).
    slot: usize,
    /// The unit's `[dA, dD, d delta_bias]` in `lane_parts`.
    params: usize,
    /// The cube's partial of `dB`/`dC` at step 0, state 0.
    bc_parts: usize,
    /// Whether the row holds a channel (the last cube of a group may have spare rows, which
    /// compute on its last channel and write nothing).
    active: bool,
}

/// See the module docs. `plane` must divide `units` and be 1 where the device has no plane
/// operations; `lane_parts` is `[batch, units, channels, state + 2]` (`dA`, `dD`, `d delta_bias`
/// per unit and lane), `db_parts`/`dc_parts` `[batch · groups, blocks, len, state]`.
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub(super) fn scan_backward<F: Float>(
    u: &Tensor<F>,
    delta: &Tensor<F>,
    z: &Tensor<F>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    a: &Tensor<f32>,
    d: &Tensor<f32>,
    delta_bias: &Tensor<f32>,
    checkpoints: &Tensor<f32>,
    dout: &Tensor<F>,
    du: &mut Tensor<F>,
    ddelta: &mut Tensor<F>,
    dz: &mut Tensor<F>,
    db_parts: &mut Tensor<f32>,
    dc_parts: &mut Tensor<f32>,
    lane_parts: &mut Tensor<f32>,
    #[comptime] state: usize,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] items: usize,
    #[comptime] plane: usize,
    #[define(F)] _dtype: ElemType,
) {
    let chunk = comptime!(units * items);
    let planes = comptime!(units / plane);
    let len = u.shape(2);
    let lane = lane_of::<F>(
        u,
        delta,
        z,
        dout,
        du,
        b,
        c,
        checkpoints,
        db_parts,
        state,
        rows,
        units,
        items,
    );
    let (channel, unit, line) = (lane.channel, lane.unit, lane.line);
    let mut staging = Shared::<[f32]>::new_slice(comptime!(FIELDS * rows * chunk));
    // [dB | dC][rows, chunk]: one state's contributions of every unit, summed over the rows.
    let mut contributions = Shared::<[f32]>::new_slice(comptime!(2 * rows * chunk));
    // Plane totals of the forward and the reverse scan: [rows, planes, (decay, input)].
    let mut forward_totals = Shared::<[f32]>::new_slice(comptime!(rows * planes * 2));
    let mut reverse_totals = Shared::<[f32]>::new_slice(comptime!(rows * planes * 2));
    // The adjoint carried into each chunk from the later one, per row and state.
    let mut carry = Shared::<[f32]>::new_slice(comptime!(rows * state));
    // One state's dA of each unit's steps in the chunk, and the row's dA so far (unit 0's).
    let mut unit_da = Shared::<[f32]>::new_slice(comptime!(rows * units));
    let mut da = Shared::<[f32]>::new_slice(comptime!(rows * state));
    for n in 0..state {
        carry[line * state + n] = 0.0;
        da[line * state + n] = 0.0;
    }
    let bias = delta_bias[channel];
    let d_skip = d[channel];
    let mut d_skip_grad = 0.0f32;
    let mut bias_grad = 0.0f32;

    let chunks = len.div_ceil(chunk);
    for chunk_back in 0..chunks {
        let chunk_index = chunks - 1 - chunk_back;
        let first = chunk_index * chunk + unit * items;
        stage_steps::<F>(
            u,
            delta,
            z,
            dout,
            &lane,
            &mut staging,
            bias,
            first,
            len,
            rows,
            units,
            items,
        );
        let saved = select(chunk_index > 0, chunk_index, 1) - 1;
        for n in 0..state {
            let a_n = a[channel * state + n];
            let restored = checkpoints[lane.checkpoint + saved * state + n];
            let entry = select(chunk_index > 0, restored, 0.0);
            let s_entry = forward_states::<F>(
                b,
                &lane,
                &mut staging,
                &mut forward_totals,
                a_n,
                entry,
                n,
                first,
                len,
                rows,
                units,
                items,
                plane,
            );
            let carry_at = line * state + n;
            let (da_n, carried) = adjoint::<F>(
                b,
                c,
                &lane,
                &mut staging,
                &mut contributions,
                &mut reverse_totals,
                a_n,
                s_entry,
                carry[carry_at],
                n,
                first,
                len,
                rows,
                units,
                items,
                plane,
            );
            unit_da[line * units + unit] = da_n;
            // Every unit of the row computed the same carry past the chunk; after this barrier
            // no unit reads the old one.
            sync_cube();
            if unit == 0 {
                carry[carry_at] = carried;
                let mut sum = 0.0f32;
                for w in 0..units {
                    sum += unit_da[line * units + w];
                }
                da[carry_at] += sum;
            }
            sum_contributions(
                &contributions,
                db_parts,
                dc_parts,
                lane.bc_parts + n,
                chunk_index * chunk,
                len,
                state,
                rows,
                units,
                items,
            );
        }
        let (d_skip_part, bias_part) = write_step_grads::<F>(
            u, delta, z, dout, du, ddelta, dz, &lane, &staging, bias, d_skip, first, len, rows,
            units, items,
        );
        d_skip_grad += d_skip_part;
        bias_grad += bias_part;
    }
    if lane.active {
        // [dA (state), dD, d delta_bias] of this unit's steps of the lane; the row's dA, which
        // only unit 0 wrote, in unit 0's.
        let dst = lane.params;
        for n in 0..state {
            lane_parts[dst + n] = select(unit == 0, da[line * state + n], 0.0);
        }
        lane_parts[dst + state] = d_skip_grad;
        lane_parts[dst + state + 1] = bias_grad;
    }
}

/// The lane of this unit: cube `(block, batch · groups + group)` holds channels `block · rows ..`
/// of the group, one per row.
#[allow(clippy::too_many_arguments)]
#[cube]
fn lane_of<F: Float>(
    u: &Tensor<F>,
    delta: &Tensor<F>,
    z: &Tensor<F>,
    dout: &Tensor<F>,
    du: &mut Tensor<F>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    checkpoints: &Tensor<f32>,
    db_parts: &mut Tensor<f32>,
    #[comptime] state: usize,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] items: usize,
) -> Lane {
    let channels = u.shape(1);
    let groups = b.shape(1);
    let per_group = channels / groups;
    let batch_group = CUBE_POS_Y as usize;
    let (batch, group) = (batch_group / groups, batch_group % groups);
    let block = CUBE_POS_X as usize;
    let unit = UNIT_POS_X as usize;
    let line = UNIT_POS_Y as usize;
    let local = block * rows + line;
    let active = local < per_group;
    let channel = group * per_group + select(active, local, per_group - 1);
    Lane {
        channel,
        unit,
        line,
        u: row(u, batch, channel),
        delta: row(delta, batch, channel),
        z: row(z, batch, channel),
        dout: row(dout, batch, channel),
        // du, ddelta and dz share one layout (made by the launcher).
        grad: batch * du.stride(0) + channel * du.stride(1),
        b: row(b, batch, group),
        c: row(c, batch, group),
        checkpoint: (batch * channels + channel) * checkpoints.shape(2) * state,
        slot: line * units * items + unit,
        params: ((batch * units + unit) * channels + channel) * (state + 2),
        bc_parts: (batch_group * db_parts.shape(1) + block) * u.shape(2) * state,
        active,
    }
}

/// The step `first + j` clamped to the lane: steps past the end read a valid address.
#[cube]
fn clamped(first: usize, j: usize, len: usize) -> usize {
    select(first + j < len, first + j, len - 1)
}

/// Step 1: stages `Δ`, `Δ u` and `dy` of the unit's steps from `first`, and clears their sums.
/// Steps past `len` stage zeros.
#[allow(clippy::too_many_arguments)]
#[cube]
fn stage_steps<F: Float>(
    u: &Tensor<F>,
    delta: &Tensor<F>,
    z: &Tensor<F>,
    dout: &Tensor<F>,
    lane: &Lane,
    staging: &mut Shared<[f32]>,
    bias: f32,
    first: usize,
    len: usize,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] items: usize,
) {
    let area = comptime!(rows * units * items);
    for j in 0..items {
        let valid = first + j < len;
        let at = clamped(first, j, len);
        let dt = softplus(f32::cast_from(delta[lane.delta + at * delta.stride(2)]) + bias);
        let ut = f32::cast_from(u[lane.u + at * u.stride(2)]);
        let zt = f32::cast_from(z[lane.z + at * z.stride(2)]);
        let g = f32::cast_from(dout[lane.dout + at * dout.stride(2)]);
        let slot = lane.slot + j * units;
        staging[DT * area + slot] = select(valid, dt, 0.0);
        staging[DU * area + slot] = select(valid, dt * ut, 0.0);
        staging[DY * area + slot] = select(valid, g * zt * sigmoid(zt), 0.0);
        staging[R * area + slot] = 0.0;
        staging[HB * area + slot] = 0.0;
        staging[Y * area + slot] = 0.0;
    }
}

/// The forward states of state `n` over the unit's steps, staged in field `S`, from `entry`, the
/// state entering the chunk; returns the state entering the unit's first step.
#[allow(clippy::too_many_arguments)]
#[cube]
fn forward_states<F: Float>(
    b: &Tensor<F>,
    lane: &Lane,
    staging: &mut Shared<[f32]>,
    totals: &mut Shared<[f32]>,
    a_n: f32,
    entry: f32,
    n: usize,
    first: usize,
    len: usize,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] items: usize,
    #[comptime] plane: usize,
) -> f32 {
    let area = comptime!(rows * units * items);
    let b_n = lane.b + n * b.stride(3);
    let mut decay = 1.0f32;
    let mut input = 0.0f32;
    for j in 0..items {
        let slot = lane.slot + j * units;
        let e = (staging[DT * area + slot] * a_n).exp();
        let b_t = f32::cast_from(b[b_n + clamped(first, j, len) * b.stride(2)]);
        decay *= e;
        input = e * input + staging[DU * area + slot] * b_t;
    }
    let (s_entry, _) = combine_units(decay, input, lane, totals, entry, units, plane, false);
    let mut s = s_entry;
    for j in 0..items {
        let slot = lane.slot + j * units;
        let e = (staging[DT * area + slot] * a_n).exp();
        let b_t = f32::cast_from(b[b_n + clamped(first, j, len) * b.stride(2)]);
        s = e * s + staging[DU * area + slot] * b_t;
        staging[S * area + slot] = s;
    }
    s_entry
}

/// The adjoint of state `n` over the unit's steps from `carried`, the adjoint `g` carried into
/// the chunk from the later one. Accumulates the steps' `Σ_n` sums, stages the `dB`, `dC`
/// contributions; returns the unit's `dA[n]` and the adjoint carried past the whole chunk.
#[allow(clippy::too_many_arguments)]
#[cube]
fn adjoint<F: Float>(
    b: &Tensor<F>,
    c: &Tensor<F>,
    lane: &Lane,
    staging: &mut Shared<[f32]>,
    contributions: &mut Shared<[f32]>,
    totals: &mut Shared<[f32]>,
    a_n: f32,
    s_entry: f32,
    carried: f32,
    n: usize,
    first: usize,
    len: usize,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] items: usize,
    #[comptime] plane: usize,
) -> (f32, f32) {
    let area = comptime!(rows * units * items);
    let (b_n, c_n) = (lane.b + n * b.stride(3), lane.c + n * c.stride(3));
    // The reverse-time map g ↦ exp(Δ_t A)(dy_t C_t + g) of the unit's steps, last step first.
    let mut decay = 1.0f32;
    let mut input = 0.0f32;
    for j_back in 0..items {
        let j = items - 1 - j_back;
        let slot = lane.slot + j * units;
        let e = (staging[DT * area + slot] * a_n).exp();
        let c_t = f32::cast_from(c[c_n + clamped(first, j, len) * c.stride(2)]);
        decay *= e;
        input = e * (staging[DY * area + slot] * c_t + input);
    }
    let (g, past) = combine_units(decay, input, lane, totals, carried, units, plane, true);
    let mut g = g;
    let mut da_n = 0.0f32;
    for j_back in 0..items {
        let j = items - 1 - j_back;
        let slot = lane.slot + j * units;
        let at = clamped(first, j, len);
        let b_t = f32::cast_from(b[b_n + at * b.stride(2)]);
        let c_t = f32::cast_from(c[c_n + at * c.stride(2)]);
        let dt = staging[DT * area + slot];
        let e = (dt * a_n).exp();
        let s_t = staging[S * area + slot];
        let earlier = S * area + slot - select(j > 0, units, 0);
        let s_prev = select(j > 0, staging[earlier], s_entry);
        let h = staging[DY * area + slot] * c_t + g;
        let has = h * e * s_prev;
        staging[R * area + slot] += has * a_n;
        staging[HB * area + slot] += h * b_t;
        staging[Y * area + slot] += c_t * s_t;
        da_n += has * dt;
        g = e * h;
        let db = h * staging[DU * area + slot];
        let dc = staging[DY * area + slot] * s_t;
        contributions[slot] = select(lane.active, db, 0.0);
        contributions[area + slot] = select(lane.active, dc, 0.0);
    }
    (da_n, past)
}

/// Combines the units' maps `x ↦ decay · x + input` of one row (each unit's map composed over its
/// steps) in time order, or with `reverse` in reverse time: within a plane by [`scan_maps`], across
/// planes through `totals`. `entering` is the value entering the row's steps (in the scan's
/// order); returns the value entering this unit's steps, and the value past all of the row's.
#[allow(clippy::too_many_arguments)]
#[cube]
fn combine_units(
    decay: f32,
    input: f32,
    lane: &Lane,
    totals: &mut Shared<[f32]>,
    entering: f32,
    #[comptime] units: usize,
    #[comptime] plane: usize,
    #[comptime] reverse: bool,
) -> (f32, f32) {
    let planes = comptime!(units / plane);
    let (line, in_plane, own_plane) = (lane.line, lane.unit % plane, lane.unit / plane);
    let (decay, input) = scan_maps(decay, input, in_plane, plane, reverse);
    let (edge_decay, edge_input) = exclusive_map(decay, input, in_plane, plane, reverse);
    // The lane holding its plane's whole map: the last in the scan's order.
    let holds_total = if comptime!(reverse) {
        in_plane == 0
    } else {
        in_plane == plane - 1
    };
    if holds_total {
        let dst = (line * planes + own_plane) * 2;
        totals[dst] = decay;
        totals[dst + 1] = input;
    }
    sync_cube();
    // The planes in the scan's order: the value past each, kept while it is before this unit's.
    let mut past = entering;
    let mut at_plane = entering;
    for k in 0..planes {
        let p = if comptime!(reverse) {
            planes - 1 - k
        } else {
            k
        };
        let src = (line * planes + p) * 2;
        past = totals[src] * past + totals[src + 1];
        let before_own = if comptime!(reverse) {
            p > own_plane
        } else {
            p < own_plane
        };
        at_plane = select(before_own, past, at_plane);
    }
    (edge_decay * at_plane + edge_input, past)
}

/// Sums one state's staged `dB`, `dC` contributions over the cube's rows, in row order, into the
/// cube's partials (`parts_at`: the cube's partial of state `n` at step 0) for the steps of the
/// chunk from `t0`; the cube's units share the chunk's `2 · chunk` sums.
#[allow(clippy::too_many_arguments)]
#[cube]
fn sum_contributions(
    contributions: &Shared<[f32]>,
    db_parts: &mut Tensor<f32>,
    dc_parts: &mut Tensor<f32>,
    parts_at: usize,
    t0: usize,
    len: usize,
    #[comptime] state: usize,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] items: usize,
) {
    let chunk = comptime!(units * items);
    let cube = comptime!(rows * units);
    let id = UNIT_POS_Y as usize * units + UNIT_POS_X as usize;
    for round in 0..comptime!((2 * chunk).div_ceil(rows * units)) {
        let q = round * cube + id;
        let field = q / chunk;
        let position = q % chunk;
        let t = t0 + (position % units) * items + position / units;
        if q < 2 * chunk && t < len {
            let mut sum = 0.0f32;
            for r in 0..rows {
                sum += contributions[(field * rows + r) * chunk + position];
            }
            let dst = parts_at + t * state;
            if field == 0 {
                db_parts[dst] = sum;
            } else {
                dc_parts[dst] = sum;
            }
        }
    }
}

/// Step 3: `du`, `ddelta`, `dz` of the unit's steps from `first`; returns the steps' sums of
/// `dD` and `d delta_bias`.
#[allow(clippy::too_many_arguments)]
#[cube]
fn write_step_grads<F: Float>(
    u: &Tensor<F>,
    delta: &Tensor<F>,
    z: &Tensor<F>,
    dout: &Tensor<F>,
    du: &mut Tensor<F>,
    ddelta: &mut Tensor<F>,
    dz: &mut Tensor<F>,
    lane: &Lane,
    staging: &Shared<[f32]>,
    bias: f32,
    d_skip: f32,
    first: usize,
    len: usize,
    #[comptime] rows: usize,
    #[comptime] units: usize,
    #[comptime] items: usize,
) -> (f32, f32) {
    let area = comptime!(rows * units * items);
    let mut d_skip_grad = 0.0f32;
    let mut bias_grad = 0.0f32;
    for j in 0..items {
        let t = first + j;
        if t < len && lane.active {
            let slot = lane.slot + j * units;
            let x = f32::cast_from(delta[lane.delta + t * delta.stride(2)]) + bias;
            let ut = f32::cast_from(u[lane.u + t * u.stride(2)]);
            let zt = f32::cast_from(z[lane.z + t * z.stride(2)]);
            let g = f32::cast_from(dout[lane.dout + t * dout.stride(2)]);
            let sz = sigmoid(zt);
            let dy = staging[DY * area + slot];
            let hb = staging[HB * area + slot];
            let y = staging[Y * area + slot] + d_skip * ut;
            let ddelta_t = (ut * hb + staging[R * area + slot]) * softplus_grad(x);
            let at = lane.grad + t * du.stride(2);
            dz[at] = F::cast_from(g * y * sz * (1.0 + zt * (1.0 - sz)));
            du[at] = F::cast_from(staging[DT * area + slot] * hb + d_skip * dy);
            ddelta[at] = F::cast_from(ddelta_t);
            d_skip_grad += dy * ut;
            bias_grad += ddelta_t;
        }
    }
    (d_skip_grad, bias_grad)
}
