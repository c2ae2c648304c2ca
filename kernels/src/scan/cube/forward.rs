//! The forward `#[cube]` kernel: mamba-ssm's layout, parallel over time within a lane.
//!
//! One cube per (batch, channel) lane (`CUBE_POS_X` the channel, `CUBE_POS_Y` the batch), so
//! `batch · channels` cubes fill the device at micro-batch 1. Its `units` units walk the lane in
//! *passes* of `units · items` steps; unit `i` owns the `items` consecutive steps
//! `pass · units · items + i · items ..` (time-contiguous loads and stores). Per pass:
//!
//! 1. each unit composes its steps into one affine map per state `n`, `s ↦ P[n] s + Q[n]`
//!    (`P = Π exp(Δ_t A[n])`, `Q` the inputs `Δ_t u_t B_t[n]` carried through the later decays);
//!    steps past the end are `Δ = 0`, the identity;
//! 2. the maps are combined across units by a scan: within a plane (warp) by `plane_shuffle_up`
//!    in `log2(plane)` rounds, across planes through shared memory (each plane's total, applied
//!    in plane order). Where the device has no plane operations (`plane = 1`, e.g. the CPU
//!    runtime) every unit is its own plane and the same code is all shared memory;
//! 3. each unit applies the maps before it to the state entering the pass (every unit holds that
//!    *carry* in registers and advances it by all plane totals at the end of the pass) and walks
//!    its steps again: states, `y = Σ C s + D u`, `y · silu(z)`, and with `save_checkpoints` the
//!    state entering every `checkpoint_chunk`-th step for the backward. The walk recomputes each
//!    decay `exp(Δ A[n])`: keeping all `items · state` of step 1's would not fit in registers.
//!
//! The state is `state` f32 registers per unit; the loop over it is inside the loop over time,
//! so a step's row of `B`/`C` (`[batch, groups, len, state]`, time-major) is read contiguously.
//! Every combination runs in a fixed order: results are deterministic. Activations are read and
//! written in their float type `F`; the state and every sum are f32.

use cubecl::prelude::*;

use super::kernels::{exclusive_map, row, scan_maps, sigmoid, softplus};

/// See the module docs. `plane` must divide `units` and be 1 where the device has no plane
/// operations; `checkpoints` is `[batch, channels, saved, state]` (a one-element placeholder
/// without `save_checkpoints`).
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub(super) fn scan_forward<F: Float>(
    u: &Tensor<F>,
    delta: &Tensor<F>,
    z: &Tensor<F>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    a: &Tensor<f32>,
    d: &Tensor<f32>,
    delta_bias: &Tensor<f32>,
    out: &mut Tensor<F>,
    checkpoints: &mut Tensor<f32>,
    #[comptime] state: usize,
    #[comptime] units: usize,
    #[comptime] items: usize,
    #[comptime] plane: usize,
    #[comptime] checkpoint_chunk: usize,
    #[comptime] save_checkpoints: bool,
    #[define(F)] _dtype: ElemType,
) {
    let channel = CUBE_POS_X as usize;
    let batch = CUBE_POS_Y as usize;
    let unit = UNIT_POS_X as usize;
    let channels = u.shape(1);
    let len = u.shape(2);
    let group = channel / (channels / b.shape(1));
    let planes = comptime!(units / plane);

    let mut a_row = Array::<f32>::new(state);
    let mut carry = Array::<f32>::new(state);
    let mut decay = Array::<f32>::new(state);
    let mut input = Array::<f32>::new(state);
    let mut s = Array::<f32>::new(state);
    #[unroll]
    for k in 0..state {
        a_row[k] = a[channel * state + k];
        carry[k] = 0.0;
    }
    let bias = delta_bias[channel];
    let d_skip = d[channel];
    let mut dt_items = Array::<f32>::new(items);
    let mut u_items = Array::<f32>::new(items);
    let rows = Rows {
        u: row(u, batch, channel),
        delta: row(delta, batch, channel),
        z: row(z, batch, channel),
        out: batch * out.stride(0) + channel * out.stride(1),
        b: row(b, batch, group),
        c: row(c, batch, group),
        checkpoint: (batch * channels + channel) * checkpoints.shape(2) * state,
    };
    // Two buffers of the planes' totals ([plane][decay n.., input n..]), alternating by pass: a
    // pass writes one only after the barrier that ends every read of it two passes before.
    let mut totals = Shared::<[f32]>::new_slice(comptime!(2 * planes * 2 * state));

    let span = units * items;
    let passes = len.div_ceil(span);
    for pass in 0..passes {
        let first = pass * span + unit * items;
        // 1. This unit's steps as one map per state.
        compose_steps::<F>(
            u,
            delta,
            b,
            &rows,
            &a_row,
            bias,
            first,
            len,
            &mut decay,
            &mut input,
            &mut dt_items,
            &mut u_items,
            state,
            items,
        );
        // 2. Scan across units: s ↦ decay · s + input, earlier units applied first.
        let lane = unit % plane;
        let buffer = (pass % 2) * planes * 2 * state;
        #[unroll]
        for k in 0..state {
            let (total_decay, total_input) = scan_maps(decay[k], input[k], lane, plane, false);
            decay[k] = total_decay;
            input[k] = total_input;
        }
        if lane == plane - 1 {
            let dst = buffer + (unit / plane) * 2 * state;
            #[unroll]
            for k in 0..state {
                totals[dst + k] = decay[k];
                totals[dst + state + k] = input[k];
            }
        }
        #[unroll]
        for k in 0..state {
            let (before_decay, before_input) =
                exclusive_map(decay[k], input[k], lane, plane, false);
            decay[k] = before_decay;
            input[k] = before_input;
        }
        sync_cube();
        // 3. The state entering this unit's steps (the carry, the planes before this unit's,
        // the lanes before it in its plane), then the carry past the whole pass.
        #[unroll]
        for k in 0..state {
            s[k] = carry[k];
        }
        for p in 0..planes {
            let src = buffer + p * 2 * state;
            let before = p < unit / plane;
            #[unroll]
            for k in 0..state {
                let next = totals[src + k] * carry[k] + totals[src + state + k];
                s[k] = select(before, next, s[k]);
                carry[k] = next;
            }
        }
        #[unroll]
        for k in 0..state {
            s[k] = decay[k] * s[k] + input[k];
        }
        walk_steps::<F>(
            z,
            b,
            c,
            out,
            checkpoints,
            &rows,
            &mut s,
            &a_row,
            &dt_items,
            &u_items,
            d_skip,
            first,
            len,
            state,
            items,
            checkpoint_chunk,
            save_checkpoints,
        );
    }
}

/// Row offsets of one lane in each tensor the forward reads or writes.
#[derive(CubeType, Clone)]
struct Rows {
    u: usize,
    delta: usize,
    z: usize,
    out: usize,
    b: usize,
    c: usize,
    checkpoint: usize,
}

/// Step 1 of the forward for one unit's `items` steps from `first`: their `Δ` and `u` (kept for
/// the walk), and the map `s ↦ decay · s + input` per state that the steps compose to. Steps past
/// `len` read the last step (a valid address) with `Δ = 0`: the identity.
#[allow(clippy::too_many_arguments)]
#[cube]
fn compose_steps<F: Float>(
    u: &Tensor<F>,
    delta: &Tensor<F>,
    b: &Tensor<F>,
    rows: &Rows,
    a_row: &Array<f32>,
    bias: f32,
    first: usize,
    len: usize,
    decay: &mut Array<f32>,
    input: &mut Array<f32>,
    dt_items: &mut Array<f32>,
    u_items: &mut Array<f32>,
    #[comptime] state: usize,
    #[comptime] items: usize,
) {
    #[unroll]
    for k in 0..state {
        decay[k] = 1.0;
        input[k] = 0.0;
    }
    #[unroll]
    for i in 0..items {
        let t = first + i;
        let valid = t < len;
        let at = select(valid, t, len - 1);
        let x = f32::cast_from(delta[rows.delta + at * delta.stride(2)]) + bias;
        let dt = select(valid, softplus(x), 0.0);
        let ut = f32::cast_from(u[rows.u + at * u.stride(2)]);
        dt_items[i] = dt;
        u_items[i] = ut;
        let du = dt * ut;
        let b_t = rows.b + at * b.stride(2);
        #[unroll]
        for k in 0..state {
            let e = (dt * a_row[k]).exp();
            decay[k] *= e;
            input[k] = e * input[k] + du * f32::cast_from(b[b_t + k * b.stride(3)]);
        }
    }
}

/// Step 3 of the forward for one unit's `items` steps from `first`, from the state `s` entering
/// them: the states, the output, and the checkpoints.
#[allow(clippy::too_many_arguments)]
#[cube]
fn walk_steps<F: Float>(
    z: &Tensor<F>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    out: &mut Tensor<F>,
    checkpoints: &mut Tensor<f32>,
    rows: &Rows,
    s: &mut Array<f32>,
    a_row: &Array<f32>,
    dt_items: &Array<f32>,
    u_items: &Array<f32>,
    d_skip: f32,
    first: usize,
    len: usize,
    #[comptime] state: usize,
    #[comptime] items: usize,
    #[comptime] checkpoint_chunk: usize,
    #[comptime] save_checkpoints: bool,
) {
    #[unroll]
    for i in 0..items {
        let t = first + i;
        if t < len {
            // The state entering each chunk of the backward's but the first.
            let in_chunk = t % checkpoint_chunk;
            if save_checkpoints && in_chunk == 0 && t > 0 {
                let dst = rows.checkpoint + (t / checkpoint_chunk - 1) * state;
                #[unroll]
                for k in 0..state {
                    checkpoints[dst + k] = s[k];
                }
            }
            let dt = dt_items[i];
            let ut = u_items[i];
            let du = dt * ut;
            let b_t = rows.b + t * b.stride(2);
            let c_t = rows.c + t * c.stride(2);
            let mut y = d_skip * ut;
            #[unroll]
            for k in 0..state {
                let next =
                    (dt * a_row[k]).exp() * s[k] + du * f32::cast_from(b[b_t + k * b.stride(3)]);
                s[k] = next;
                y += f32::cast_from(c[c_t + k * c.stride(3)]) * next;
            }
            let zt = f32::cast_from(z[rows.z + t * z.stride(2)]);
            let out_step = out.stride(2);
            out[rows.out + t * out_step] = F::cast_from(y * zt * sigmoid(zt));
        }
    }
}
