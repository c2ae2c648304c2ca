//! The backward `#[cube]` kernels of the scan and the helpers both directions share (kept apart
//! from Burn's names: `cubecl::prelude` has its own `Tensor` and `Float`); the forward is in
//! `forward.rs`.
//!
//! The backward runs one unit per (batch, channel) *lane*, its `state`-long recurrence state in
//! registers, sequential over time. Activations (`u`, `delta`, `z`, `B`, `C`, the output and
//! their gradients) are read and written in their own float type `F` (f32, f16 or bf16) at any
//! strides; the state, the parameters (`A`, `D`, `delta_bias`) and every accumulation are `f32`.
//!
//! The backward walks each lane's chunks last to first, restores the chunk's entry state from the
//! forward's checkpoints, recomputes the chunk's states into unit-local memory and walks them back
//! carrying `∂L/∂s`. `dB`/`dC` are sums over the channels of a group: the units of a cube are
//! consecutive channels of one group, each step's contributions meet in shared memory and are
//! summed in a fixed order into one partial per cube; [`sum_parts`] adds the cubes' partials in
//! order. No atomics: results are deterministic.

use cubecl::prelude::*;

/// `softplus(x) = log1p(exp(x))`, and `x` itself above 20 (mamba-ssm's threshold).
#[cube]
pub(super) fn softplus(x: f32) -> f32 {
    select(x > 20.0, x, x.exp().log1p())
}

/// The derivative of [`softplus`]: `sigmoid(x)`, and 1 above 20.
#[cube]
fn softplus_grad(x: f32) -> f32 {
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

/// Backward of one lane per unit; the units of a cube are `units` consecutive channels of one
/// group (cube `(block, batch · groups + group)`), the last block's spare units compute on a
/// valid channel and contribute nothing. Per lane it writes `du`, `ddelta`, `dz` and the lane's
/// `dA`, `dD`, `d delta_bias` (summed over batch by [`sum_parts`]); per cube and step the cube's
/// sum of the `dB`, `dC` contributions to `db_parts`/`dc_parts[batch · groups + group, block]`.
///
/// Per step `t`, with `h_t = ∂L/∂s_t` and `dy_t = dout_t silu(z_t)`:
/// ```text
/// h_t    = dy_t C_t + exp(Δ_{t+1}A) ⊙ h_{t+1}
/// dC_t  += dy_t s_t          dB_t += h_t Δ_t u_t         dA   += Δ_t h_t ⊙ exp(Δ_t A) ⊙ s_{t-1}
/// dΔ_t   = Σ h_t ⊙ exp(Δ_t A) ⊙ s_{t-1} ⊙ A + u_t Σ h_t ⊙ B_t
/// du_t   = Δ_t Σ h_t ⊙ B_t + D dy_t                      dD  += dy_t u_t
/// dz_t   = dout_t y_t silu'(z_t)                         ddelta_t = dΔ_t softplus'(delta_t + bias)
/// ```
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
    #[comptime] chunk: usize,
    #[comptime] units: usize,
    #[define(F)] _dtype: ElemType,
) {
    let channels = u.shape(1);
    let len = u.shape(2);
    let groups = b.shape(1);
    let per_group = channels / groups;
    let blocks = db_parts.shape(1);
    let block = CUBE_POS_X as usize;
    let batch_group = CUBE_POS_Y as usize;
    let batch = batch_group / groups;
    let group = batch_group % groups;
    let unit = UNIT_POS_X as usize;
    let local = block * units + unit;
    let active = local < per_group;
    let channel = group * per_group + select(active, local, per_group - 1);
    let lane = batch * channels + channel;

    let mut a_row = Array::<f32>::new(state);
    let mut carry = Array::<f32>::new(state);
    let mut da = Array::<f32>::new(state);
    #[unroll]
    for k in 0..state {
        a_row[k] = a[channel * state + k];
        carry[k] = 0.0;
        da[k] = 0.0;
    }
    let d_skip = d[channel];
    let bias = delta_bias[channel];
    let mut d_skip_grad = 0.0f32;
    let mut bias_grad = 0.0f32;
    let (u_row, delta_row, z_row, dout_row) = (
        row(u, batch, channel),
        row(delta, batch, channel),
        row(z, batch, channel),
        row(dout, batch, channel),
    );
    // du, ddelta and dz share one layout (made by the launcher).
    let grad_row = batch * du.stride(0) + channel * du.stride(1);
    let b_row = row(b, batch, group);
    let c_row = row(c, batch, group);
    let checkpoint_row = lane * checkpoints.shape(2) * state;
    let parts_row = (batch_group * blocks + block) * len * state;

    // Row j: the state before step t0 + j of the current chunk.
    let mut states = Array::<f32>::new(comptime!((chunk + 1) * state));
    // Two buffers of [2 · state, units] contributions, alternating by step: a unit writes the
    // next step's buffer only after the barrier that ends every read of it.
    // Rows padded to `units + 1` floats: the sum's reads (one row per unit, same column) then
    // fall in distinct banks, as do the writes (one column per unit, same row).
    let pitch = comptime!(units + 1);
    let mut shared = Shared::<[f32]>::new_slice(comptime!(4 * state * (units + 1)));
    let mut parity = 0usize;

    let chunks = len.div_ceil(chunk);
    for chunk_back in 0..chunks {
        let chunk_index = chunks - 1 - chunk_back;
        let t0 = chunk_index * chunk;
        let remaining = len - t0;
        let steps = select(remaining < chunk, remaining, chunk);
        let entry = checkpoint_row + select(chunk_index > 0, chunk_index, 1) * state - state;
        #[unroll]
        for k in 0..state {
            states[k] = select(chunk_index > 0, checkpoints[entry + k], 0.0);
        }
        // Recompute the chunk's states as the forward did.
        for j in 0..steps {
            let t = t0 + j;
            let dt = softplus(f32::cast_from(delta[delta_row + t * delta.stride(2)]) + bias);
            let du_t = dt * f32::cast_from(u[u_row + t * u.stride(2)]);
            let b_t = b_row + t * b.stride(2);
            #[unroll]
            for k in 0..state {
                states[(j + 1) * state + k] = (dt * a_row[k]).exp() * states[j * state + k]
                    + du_t * f32::cast_from(b[b_t + k * b.stride(3)]);
            }
        }
        // Walk the chunk backward.
        for j_back in 0..steps {
            let j = steps - 1 - j_back;
            let t = t0 + j;
            let x = f32::cast_from(delta[delta_row + t * delta.stride(2)]) + bias;
            let dt = softplus(x);
            let ut = f32::cast_from(u[u_row + t * u.stride(2)]);
            let zt = f32::cast_from(z[z_row + t * z.stride(2)]);
            let sz = sigmoid(zt);
            let g = f32::cast_from(dout[dout_row + t * dout.stride(2)]);
            let dy = g * zt * sz;
            let b_t = b_row + t * b.stride(2);
            let c_t = c_row + t * c.stride(2);
            let buffer = parity * 2 * state * pitch;
            let mut y = d_skip * ut;
            let mut r = 0.0f32;
            let mut hb = 0.0f32;
            #[unroll]
            for k in 0..state {
                let c_k = f32::cast_from(c[c_t + k * c.stride(3)]);
                let b_k = f32::cast_from(b[b_t + k * b.stride(3)]);
                let cur = states[(j + 1) * state + k];
                let decay = (dt * a_row[k]).exp();
                let h = dy * c_k + carry[k];
                y += c_k * cur;
                let has = h * decay * states[j * state + k];
                r += has * a_row[k];
                da[k] += has * dt;
                hb += h * b_k;
                carry[k] = decay * h;
                shared[buffer + k * pitch + unit] = select(active, h * dt * ut, 0.0);
                shared[buffer + (state + k) * pitch + unit] = select(active, dy * cur, 0.0);
            }
            let ddelta_t = (ut * hb + r) * softplus_grad(x);
            d_skip_grad += dy * ut;
            bias_grad += ddelta_t;
            if active {
                let at = grad_row + t * du.stride(2);
                dz[at] = F::cast_from(g * y * sz * (1.0 + zt * (1.0 - sz)));
                du[at] = F::cast_from(dt * hb + d_skip * dy);
                ddelta[at] = F::cast_from(ddelta_t);
            }
            sync_cube();
            // Sum the cube's contributions: output q (dB rows then dC rows) by unit q % units.
            #[unroll]
            for round in 0..comptime!((2 * state).div_ceil(units)) {
                let q = round * units + unit;
                if q < 2 * state {
                    let mut sum = 0.0f32;
                    for w in 0..units {
                        sum += shared[buffer + q * pitch + w];
                    }
                    let dst = parts_row + t * state;
                    if q < state {
                        db_parts[dst + q] = sum;
                    } else {
                        dc_parts[dst + q - state] = sum;
                    }
                }
            }
            parity = 1 - parity;
        }
    }
    if active {
        // [dA (state), dD, d delta_bias] of this lane.
        let dst = lane * (state + 2);
        #[unroll]
        for k in 0..state {
            lane_parts[dst + k] = da[k];
        }
        lane_parts[dst + state] = d_skip_grad;
        lane_parts[dst + state + 1] = bias_grad;
    }
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
