//! The fused scan over plain `f32` buffers: forward, chunked-recompute backward, and the parallel
//! drivers. Nothing here knows about Burn; `flex.rs` moves tensors in and out.
//!
//! A *lane* is one (batch, channel) pair: its `u`, `delta`, `z` rows are `len` contiguous floats and
//! its `B`/`C` rows are the `[len, state]` block of its (batch, group), time-major so that the inner
//! loop over the state runs over contiguous memory. The state of a lane lives in a small buffer
//! (on the stack for `state <= 64`) and is processed a SIMD vector at a time.

use rayon::prelude::*;

use super::ScanShape;
use crate::host::{output, zeros};
use crate::simd::{
    Isa, Lanes, SCALAR, exp2_approx, level_dividing, sigmoid, simd_dispatch, softplus_and_grad,
};

/// Time steps per checkpoint chunk. The forward stores the state entering every chunk but the
/// first; the backward recomputes one chunk of states at a time from it.
pub(crate) const CHUNK: usize = 64;

/// Above this state size the per-lane state goes to the heap instead of the stack.
const STACK_STATE: usize = 64;

/// The backward aims for at least this many independent work items (see [`channel_blocks`]).
/// A constant rather than the thread count so the partition, and hence every rounding, is the same
/// on every machine.
const TARGET_TASKS: usize = 128;

/// Floats of checkpointed state per lane: the state entering chunks `1..chunks`.
fn checkpoint_len(dims: &ScanShape) -> usize {
    (dims.len.div_ceil(CHUNK) - 1) * dims.state
}

/// The eight inputs as contiguous row-major `f32` buffers, shapes as in [`super::ScanInputs`].
#[derive(Clone, Copy)]
pub(crate) struct Inputs<'a> {
    pub u: &'a [f32],
    pub delta: &'a [f32],
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub c: &'a [f32],
    pub d: &'a [f32],
    pub z: &'a [f32],
    pub delta_bias: &'a [f32],
}

/// One lane's view of the inputs.
struct Lane<'a> {
    u: &'a [f32],
    delta: &'a [f32],
    z: &'a [f32],
    a: &'a [f32],
    b: &'a [f32],
    c: &'a [f32],
    d: f32,
    bias: f32,
}

impl<'a> Inputs<'a> {
    fn lane(&self, dims: &ScanShape, lane: usize) -> Lane<'a> {
        let (batch, channel) = (lane / dims.channels, lane % dims.channels);
        let group = channel / dims.per_group();
        let row = lane * dims.len..(lane + 1) * dims.len;
        let bc = (batch * dims.groups + group) * dims.len * dims.state;
        let bc = bc..bc + dims.len * dims.state;
        Lane {
            u: &self.u[row.clone()],
            delta: &self.delta[row.clone()],
            z: &self.z[row],
            a: &self.a[channel * dims.state..(channel + 1) * dims.state],
            b: &self.b[bc.clone()],
            c: &self.c[bc],
            d: self.d[channel],
            bias: self.delta_bias[channel],
        }
    }
}

/// Gradients of every input, same shapes and layout as [`Inputs`].
pub(crate) struct Grads {
    pub u: Vec<f32>,
    pub delta: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub c: Vec<f32>,
    pub d: Vec<f32>,
    pub z: Vec<f32>,
    pub delta_bias: Vec<f32>,
}

/// Per-step terms of one chunk, computed for all its steps at once so the transcendental
/// functions vectorize over time: `dt = softplus(delta + bias)`, `dsp = softplus'(delta + bias)`,
/// `sz = sigmoid(z)`, for the steps `t0 + j`, `j` in `0..dt.len()`. Runs `V` over the whole
/// vectors and `f32` over the rest; the forward and the backward split a chunk identically, so
/// they get identical values.
#[inline(always)]
fn step_terms<V: Lanes>(
    isa: Isa<V>,
    lane: &Lane,
    t0: usize,
    dt: &mut [f32],
    dsp: &mut [f32],
    sz: &mut [f32],
) {
    let steps = dt.len();
    let split = steps - steps % V::WIDTH;
    step_terms_range(isa, lane, t0, 0..split, dt, dsp, sz);
    step_terms_range(SCALAR, lane, t0, split..steps, dt, dsp, sz);
}

#[inline(always)]
fn step_terms_range<V: Lanes>(
    isa: Isa<V>,
    lane: &Lane,
    t0: usize,
    js: std::ops::Range<usize>,
    dt: &mut [f32],
    dsp: &mut [f32],
    sz: &mut [f32],
) {
    for j in js.step_by(V::WIDTH) {
        let x = isa.load(&lane.delta[t0 + j..]) + isa.splat(lane.bias);
        let (softplus, grad) = softplus_and_grad(x);
        softplus.store(&mut dt[j..]);
        grad.store(&mut dsp[j..]);
        sigmoid(isa.load(&lane.z[t0 + j..])).store(&mut sz[j..]);
    }
}

// The lane kernels at the widest level whose vectors tile the state (the forward and the
// backward pick the same level for the same state size, so the recompute is bit-identical).
simd_dispatch!(fn forward_lane(lane: &Lane, out: &mut [f32], checkpoints: &mut [f32])
    = forward_lane_impl, level = level_dividing(lane.a.len()));

simd_dispatch!(fn backward_task(task: TaskWork, state: usize)
    = backward_task_impl, level = level_dividing(state));

// ---------------------------------------------------------------------------------------------
// Forward.

/// Runs the scan for one lane, writing `y * silu(z)` to `out` and, when `checkpoints` is not empty,
/// the state entering chunk `k` to `checkpoints[(k-1)*N..k*N]` for `k >= 1`.
#[inline(always)]
fn forward_lane_impl<V: Lanes>(isa: Isa<V>, lane: &Lane, out: &mut [f32], checkpoints: &mut [f32]) {
    let n = lane.a.len();
    let mut stack = [0f32; STACK_STATE];
    let mut heap = Vec::new();
    let s: &mut [f32] = if n <= STACK_STATE {
        &mut stack[..n]
    } else {
        heap.resize(n, 0.0);
        &mut heap
    };
    let (mut dt, mut dsp, mut sz) = ([0f32; CHUNK], [0f32; CHUNK], [0f32; CHUNK]);
    let mut y_parts = [0f32; CHUNK * MAX_WIDTH];
    for (chunk, t0) in (0..out.len()).step_by(CHUNK).enumerate() {
        if chunk > 0
            && let Some(dst) = checkpoints.get_mut((chunk - 1) * n..chunk * n)
        {
            dst.copy_from_slice(s);
        }
        let steps = CHUNK.min(out.len() - t0);
        step_terms(
            isa,
            lane,
            t0,
            &mut dt[..steps],
            &mut dsp[..steps],
            &mut sz[..steps],
        );
        for q in (0..n).step_by(V::WIDTH) {
            let (dt, state) = (&dt[..steps], &mut s[q..q + V::WIDTH]);
            match q {
                0 => forward_steps::<V, true>(isa, lane, t0, dt, q, state, &mut y_parts),
                _ => forward_steps::<V, false>(isa, lane, t0, dt, q, state, &mut y_parts),
            }
        }
        // The per-step sums over the state, V::WIDTH steps at a time, and the gated output.
        let (split, d) = (steps - steps % V::WIDTH, isa.splat(lane.d));
        for j in (0..split).step_by(V::WIDTH) {
            let t = t0 + j;
            let y = d.mul_add(isa.load(&lane.u[t..]), step_sums(isa, &y_parts, j));
            (y * isa.load(&lane.z[t..]) * isa.load(&sz[j..])).store(&mut out[t..]);
        }
        for j in split..steps {
            let t = t0 + j;
            let y = lane.d * lane.u[t] + isa.load(&y_parts[j * V::WIDTH..]).sum();
            out[t] = y * lane.z[t] * sz[j];
        }
    }
}

/// `A·log2 e` of one state vector, the rate [`advance`] takes: scaled once per chunk so that each
/// step's decay `exp(Δ A) = 2^(Δ·A·log2 e)` is one multiply and an [`exp2_approx`].
#[inline(always)]
fn log2_rate<V: Lanes>(isa: Isa<V>, lane: &Lane, q: usize) -> V {
    isa.load(&lane.a[q..]) * isa.splat(std::f32::consts::LOG2_E)
}

/// One step of the recurrence for one state vector: `(exp(Δ A), exp(Δ A) ⊙ s + Δ u B)`, given
/// the [`log2_rate`] of `A`. The forward and the backward's recompute both take it from here, so
/// they agree bit for bit.
#[inline(always)]
fn advance<V: Lanes>(s: V, dt: f32, u: f32, rate: V, b: V) -> (V, V) {
    let isa = s.isa();
    let decay = exp2_approx(isa.splat(dt) * rate);
    (decay, decay.mul_add(s, isa.splat(dt * u) * b))
}

/// The chunk's steps `t0..t0 + dt.len()` of state vector `q..q + WIDTH`, continuing `state`, which
/// stays in a register through the chunk: adds this vector's partial products of `Σ C s` to each
/// step's vector in `y_parts` (`FIRST`, for `q == 0`, starts them).
#[inline(always)]
fn forward_steps<V: Lanes, const FIRST: bool>(
    isa: Isa<V>,
    lane: &Lane,
    t0: usize,
    dt: &[f32],
    q: usize,
    state: &mut [f32],
    y_parts: &mut [f32],
) {
    let (n, steps) = (lane.a.len(), dt.len());
    // The bounds of every access below, checked once so that the step loop runs without checks.
    assert!(q + V::WIDTH <= n && t0 + steps <= lane.u.len() && steps * V::WIDTH <= y_parts.len());
    assert!((t0 + steps) * n <= lane.b.len() && (t0 + steps) * n <= lane.c.len());
    let rate = log2_rate(isa, lane, q);
    let mut s = isa.load(state);
    for (j, &dt) in dt.iter().enumerate() {
        let (t, w) = (t0 + j, j * V::WIDTH);
        // SAFETY: `t < t0 + steps`, so `t * n + q + WIDTH <= (t0 + steps) * n`; `j < steps`, so
        // `w + WIDTH <= steps * WIDTH`.
        unsafe {
            let b = isa.load_at(lane.b, t * n + q);
            s = advance(s, dt, *lane.u.get_unchecked(t), rate, b).1;
            let sum = match FIRST {
                true => isa.splat(0.0),
                false => isa.load_at(y_parts, w),
            };
            isa.load_at(lane.c, t * n + q)
                .mul_add(s, sum)
                .store_at(y_parts, w);
        }
    }
    s.store(state);
}

/// The widest vector of [`Lanes`], in floats.
const MAX_WIDTH: usize = 16;

/// Lane `k` = the horizontal sum of the vector of step `j + k`, for the `V::WIDTH` steps from
/// `j`: `parts` holds one vector of per-state partial products per step.
#[inline(always)]
fn step_sums<V: Lanes>(isa: Isa<V>, parts: &[f32], j: usize) -> V {
    let mut rows = [isa.splat(0.0); MAX_WIDTH];
    for (k, row) in rows[..V::WIDTH].iter_mut().enumerate() {
        *row = isa.load(&parts[(j + k) * V::WIDTH..]);
    }
    V::sums(&rows[..V::WIDTH])
}

/// The forward over all lanes. Returns the output `[batch, channels, len]` and, when
/// `save_checkpoints`, the chunk-boundary states `[batch, channels, chunks - 1, state]` (empty
/// otherwise).
pub(crate) fn forward(x: &Inputs, dims: ScanShape, save_checkpoints: bool) -> (Vec<f32>, Vec<f32>) {
    let mut out = output(dims.lanes() * dims.len);
    let per_lane = if save_checkpoints {
        checkpoint_len(&dims)
    } else {
        0
    };
    let mut checkpoints = output(dims.lanes() * per_lane);
    let run = |lane: usize, out: &mut [f32], checkpoints: &mut [f32]| {
        forward_lane(&x.lane(&dims, lane), out, checkpoints);
    };
    if per_lane == 0 {
        out.par_chunks_mut(dims.len)
            .enumerate()
            .for_each(|(lane, out)| run(lane, out, &mut []));
    } else {
        out.par_chunks_mut(dims.len)
            .zip(checkpoints.par_chunks_mut(per_lane))
            .enumerate()
            .for_each(|(lane, (out, checkpoints))| run(lane, out, checkpoints));
    }
    (out, checkpoints)
}

// ---------------------------------------------------------------------------------------------
// Backward.

/// One lane's gradient outputs.
struct LaneGrads<'a> {
    du: &'a mut [f32],
    ddelta: &'a mut [f32],
    dz: &'a mut [f32],
    /// `[dA[0..N], dD, d_delta_bias]` of this lane, summed over batch afterwards.
    params: &'a mut [f32],
}

/// One lane of the backward: its inputs, saved chunk states, output gradient and gradients.
struct LaneWork<'a> {
    lane: Lane<'a>,
    checkpoints: &'a [f32],
    dout: &'a [f32],
    grads: LaneGrads<'a>,
}

/// One task: consecutive lanes of one (batch, group) and the partial sums of dB and dC over them
/// (see [`channel_blocks`]), `[len, 2, state]`: step `t`'s dB row, then its dC row. Interleaved
/// rather than two buffers because two large buffers start at the same offset in a 4 KiB page,
/// and a load from one after a store to the other at the same offset stalls as if it depended on
/// the store (4K aliasing), once per step.
struct TaskWork<'a> {
    lanes: Vec<LaneWork<'a>>,
    dbc: &'a mut [f32],
}

/// A task's working memory, reused for each of its lanes in turn: one chunk of recomputed states
/// and decays, and the per-step terms and partial sums of the adjoint walk.
struct Scratch {
    /// `[CHUNK + 1, state]`: row `j` is the state before step `t0 + j`.
    states: Vec<f32>,
    /// `[CHUNK, state]`: `exp(Δ_t A)` of step `t0 + j`.
    decay: Vec<f32>,
    /// The chunk's [`step_terms`] and `dy = dout·silu(z)`.
    dt: [f32; CHUNK],
    dsp: [f32; CHUNK],
    sz: [f32; CHUNK],
    dy: [f32; CHUNK],
    /// Per step of the chunk, one vector of partial products each for `Σ C s`, `Σ h B` and
    /// `Σ h e s_prev A` (their horizontal sums are taken `WIDTH` steps at a time after the walk).
    y_parts: Vec<f32>,
    hb_parts: Vec<f32>,
    r_parts: Vec<f32>,
}

impl Scratch {
    fn new(state: usize) -> Self {
        Self {
            states: vec![0.0; (CHUNK + 1) * state],
            decay: vec![0.0; CHUNK * state],
            dt: [0.0; CHUNK],
            dsp: [0.0; CHUNK],
            sz: [0.0; CHUNK],
            dy: [0.0; CHUNK],
            y_parts: vec![0.0; CHUNK * MAX_WIDTH],
            hb_parts: vec![0.0; CHUNK * MAX_WIDTH],
            r_parts: vec![0.0; CHUNK * MAX_WIDTH],
        }
    }
}

/// Backward of one task's lanes. Walks the chunks last to first, and each chunk lane by lane: for
/// each lane, restores the chunk's entry state from its checkpoints, recomputes the chunk's states
/// and decays (bit-identical to the forward: same arithmetic), then walks its steps backward
/// carrying `h_t = ∂L/∂s_t`:
///
/// ```text
/// h_t    = dy_t C_t + exp(Δ_{t+1}A) ⊙ h_{t+1}            dy_t = dout_t silu(z_t)
/// dC_t  += dy_t s_t          dB_t += h_t Δ_t u_t         dA   += Δ_t h_t ⊙ exp(Δ_t A) ⊙ s_{t-1}
/// dΔ_t   = Σ h_t ⊙ exp(Δ_t A) ⊙ s_{t-1} ⊙ A + u_t Σ h_t ⊙ B_t
/// du_t   = Δ_t Σ h_t ⊙ B_t + D dy_t                      dD  += dy_t u_t
/// dz_t   = dout_t y_t silu'(z_t)                         ddelta_t = dΔ_t softplus'(delta_t + bias)
/// ```
///
/// Chunk outside, lanes inside: the task's lanes share one (batch, group)'s B and C and add into
/// the same dB and dC rows, so a chunk's rows of those stay in L1 while all its lanes pass over
/// them (lane by lane, in lane order). Both recurrences are elementwise over the state, so each
/// state vector is walked through the chunk on its own (state-vector loop outside, step loop
/// inside): its state, carry and dA stay in registers instead of making a store-to-load round
/// trip per step, which would otherwise be the critical path.
#[inline(always)]
fn backward_task_impl<V: Lanes>(isa: Isa<V>, task: TaskWork, state: usize) {
    let TaskWork { mut lanes, dbc } = task;
    let len = lanes[0].dout.len();
    let mut scratch = Scratch::new(state);
    // Per lane: `exp(Δ_{t+1} A) ⊙ ∂L/∂s_{t+1}`, the part of `∂L/∂s_t` from later steps.
    let mut carry = vec![0f32; lanes.len() * state];
    let mut sums: Vec<ParamSums<V>> = lanes.iter().map(|_| ParamSums::new(isa)).collect();
    for chunk in (0..len.div_ceil(CHUNK)).rev() {
        let t0 = chunk * CHUNK;
        let steps = CHUNK.min(len - t0);
        for (i, (carry, sums)) in carry.chunks_mut(state).zip(&mut sums).enumerate() {
            if let Some(next) = lanes.get(i + 1) {
                prefetch_chunk(next, chunk, steps);
            }
            let w = &mut lanes[i];
            start_chunk(isa, w, chunk, steps, &mut scratch);
            for q in (0..state).step_by(V::WIDTH) {
                recompute_states(isa, &w.lane, t0, steps, q, &mut scratch);
                let carry = &mut carry[q..];
                match q {
                    0 => walk_back::<V, true>(isa, w, t0, steps, q, carry, dbc, &mut scratch),
                    _ => walk_back::<V, false>(isa, w, t0, steps, q, carry, dbc, &mut scratch),
                }
            }
            let g = &mut w.grads;
            let outputs = [&mut *g.dz, &mut *g.du, &mut *g.ddelta];
            step_grads(isa, &w.lane, t0, w.dout, &scratch, outputs, sums);
        }
    }
    for (w, sums) in lanes.iter_mut().zip(sums) {
        w.grads.params[state] = sums.d_skip.sum() + sums.d_skip_tail;
        w.grads.params[state + 1] = sums.d_bias.sum() + sums.d_bias_tail;
    }
}

/// Asks for the cache lines a lane reads and writes in chunk `chunk` (the next lane's, while this
/// one is processed): lanes are visited chunk by chunk, so each lane's rows are touched in short
/// pieces 2 KiB apart, which the hardware prefetchers do not follow, and every piece would
/// otherwise start with a wait on memory.
#[inline(always)]
fn prefetch_chunk(w: &LaneWork, chunk: usize, steps: usize) {
    const FLOATS_PER_LINE: usize = 16;
    let (g, t0, n) = (&w.grads, chunk * CHUNK, w.lane.a.len());
    let rows: [&[f32]; 7] = [
        w.lane.u,
        w.lane.delta,
        w.lane.z,
        w.dout,
        g.du,
        g.ddelta,
        g.dz,
    ];
    for row in rows {
        for t in (t0..t0 + steps).step_by(FLOATS_PER_LINE) {
            prefetch(&row[t..]);
        }
    }
    if chunk > 0 {
        for i in (0..n).step_by(FLOATS_PER_LINE) {
            prefetch(&w.checkpoints[(chunk - 1) * n + i..]);
        }
    }
}

/// A hint to bring the cache line holding `data[0]` into L1.
#[inline(always)]
fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch of a valid address; SSE is part of the x86-64 baseline.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Restores the state entering chunk `chunk` (zero for the first) and computes the chunk's step
/// terms and `dy`.
#[inline(always)]
fn start_chunk<V: Lanes>(isa: Isa<V>, w: &LaneWork, chunk: usize, steps: usize, s: &mut Scratch) {
    let (lane, n, t0) = (&w.lane, w.lane.a.len(), chunk * CHUNK);
    let entry = &mut s.states[..n];
    match chunk {
        0 => entry.fill(0.0),
        _ => entry.copy_from_slice(&w.checkpoints[(chunk - 1) * n..chunk * n]),
    }
    step_terms(
        isa,
        lane,
        t0,
        &mut s.dt[..steps],
        &mut s.dsp[..steps],
        &mut s.sz[..steps],
    );
    for j in 0..steps {
        let t = t0 + j;
        s.dy[j] = w.dout[t] * lane.z[t] * s.sz[j];
    }
}

/// The chunk's states and decays of state vector `q..q + WIDTH`, exactly as the forward computed
/// them: `states` row `j + 1` is the state after step `t0 + j`, `decay` row `j` is its
/// `exp(Δ A)`.
#[inline(always)]
fn recompute_states<V: Lanes>(
    isa: Isa<V>,
    lane: &Lane,
    t0: usize,
    steps: usize,
    q: usize,
    s: &mut Scratch,
) {
    let n = lane.a.len();
    // The bounds of every access below, checked once so that the step loop runs without checks.
    assert!(q + V::WIDTH <= n && steps <= CHUNK && t0 + steps <= lane.u.len());
    assert!((t0 + steps) * n <= lane.b.len() && steps * n <= s.decay.len());
    assert!((steps + 1) * n <= s.states.len());
    let rate = log2_rate(isa, lane, q);
    let mut state = isa.load(&s.states[q..]);
    for j in 0..steps {
        let t = t0 + j;
        // SAFETY: `j < steps <= CHUNK` (the length of `dt`), `t < t0 + steps`, and the vectors
        // end at `(t0 + steps) * n` in `b`, `steps * n` in `decay`, `(steps + 1) * n` in `states`.
        unsafe {
            let b = isa.load_at(lane.b, t * n + q);
            let decay;
            (decay, state) = advance(
                state,
                *s.dt.get_unchecked(j),
                *lane.u.get_unchecked(t),
                rate,
                b,
            );
            decay.store_at(&mut s.decay, j * n + q);
            state.store_at(&mut s.states, (j + 1) * n + q);
        }
    }
}

/// The adjoint walk of state vector `q..q + WIDTH` of one lane backward through the chunk:
/// continues `carry` (this vector of the lane's), adds into the dB and dC rows of the chunk's
/// steps and the lane's dA, and adds this vector's partial products of `Σ C s`, `Σ h B`,
/// `Σ h e s_prev A` to the per-step parts (`FIRST`, for `q == 0`, starts them).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn walk_back<V: Lanes, const FIRST: bool>(
    isa: Isa<V>,
    w: &mut LaneWork,
    t0: usize,
    steps: usize,
    q: usize,
    carry: &mut [f32],
    dbc: &mut [f32],
    s: &mut Scratch,
) {
    let lane = &w.lane;
    let n = lane.a.len();
    let rows = (t0 + steps) * n;
    // The bounds of every access below, checked once so that the step loop runs without checks.
    assert!(q + V::WIDTH <= n && steps <= CHUNK && t0 + steps <= lane.u.len());
    assert!(rows <= lane.b.len() && rows <= lane.c.len() && 2 * rows <= dbc.len());
    assert!((steps + 1) * n <= s.states.len() && steps * n <= s.decay.len());
    assert!(steps * V::WIDTH <= s.y_parts.len());
    assert!(steps * V::WIDTH <= s.hb_parts.len() && steps * V::WIDTH <= s.r_parts.len());
    let a = isa.load(&lane.a[q..]);
    let mut carried = isa.load(carry);
    let mut da = isa.load(&w.grads.params[q..]);
    for j in (0..steps).rev() {
        let (t, w) = (t0 + j, j * V::WIDTH);
        let row = t * n + q;
        // SAFETY: `j < steps <= CHUNK` (the length of `dt` and `dy`), `t < t0 + steps`,
        // `row + WIDTH <= rows`, and the asserts above cover the scratch rows.
        unsafe {
            let part = |parts: &[f32]| match FIRST {
                true => isa.splat(0.0),
                false => isa.load_at(parts, w),
            };
            let (dt, dy) = (*s.dt.get_unchecked(j), *s.dy.get_unchecked(j));
            let du = isa.splat(dt * lane.u.get_unchecked(t));
            let (dt, dy) = (isa.splat(dt), isa.splat(dy));
            let c = isa.load_at(lane.c, row);
            let cur = isa.load_at(&s.states, (j + 1) * n + q);
            let e = isa.load_at(&s.decay, j * n + q);
            let from_output = dy * c;
            let h = from_output + carried;
            // e ⊙ h with the carry entering by one FMA: the step-to-step dependency is one FMA.
            carried = e.mul_add(carried, e * from_output);
            let (db, dc) = (row + t * n, row + (t + 1) * n);
            h.mul_add(du, isa.load_at(dbc, db)).store_at(dbc, db);
            dy.mul_add(cur, isa.load_at(dbc, dc)).store_at(dbc, dc);
            let has = h * e * isa.load_at(&s.states, j * n + q);
            da = has.mul_add(dt, da);
            c.mul_add(cur, part(&s.y_parts)).store_at(&mut s.y_parts, w);
            h.mul_add(isa.load_at(lane.b, row), part(&s.hb_parts))
                .store_at(&mut s.hb_parts, w);
            has.mul_add(a, part(&s.r_parts)).store_at(&mut s.r_parts, w);
        }
    }
    carried.store(carry);
    da.store(&mut w.grads.params[q..]);
}

/// `Σ dy·u` (dD) and `Σ ddelta` (d delta_bias) of one lane: vector partials plus a scalar tail.
struct ParamSums<V> {
    d_skip: V,
    d_bias: V,
    d_skip_tail: f32,
    d_bias_tail: f32,
}

impl<V: Lanes> ParamSums<V> {
    fn new(isa: Isa<V>) -> Self {
        Self {
            d_skip: isa.splat(0.0),
            d_bias: isa.splat(0.0),
            d_skip_tail: 0.0,
            d_bias_tail: 0.0,
        }
    }
}

/// The per-step gradients `[dz, du, ddelta]` of one chunk from the walk's partial products,
/// `V::WIDTH` steps at a time (the tail with scalars):
/// `dz = dout·y·silu'(z)`, `du = Δ·Σ hB + D·dy`, `ddelta = (u·Σ hB + Σ h e s A)·softplus'`.
#[inline(always)]
fn step_grads<V: Lanes>(
    isa: Isa<V>,
    lane: &Lane,
    t0: usize,
    dout: &[f32],
    scratch: &Scratch,
    [dz, du, dd]: [&mut [f32]; 3],
    sums: &mut ParamSums<V>,
) {
    let steps = scratch.dt.len().min(dout.len() - t0);
    let split = steps - steps % V::WIDTH;
    let (d, one) = (isa.splat(lane.d), isa.splat(1.0));
    for j in (0..split).step_by(V::WIDTH) {
        let t = t0 + j;
        let (u, z, g) = (
            isa.load(&lane.u[t..]),
            isa.load(&lane.z[t..]),
            isa.load(&dout[t..]),
        );
        let (dt, dsp, sz) = (
            isa.load(&scratch.dt[j..]),
            isa.load(&scratch.dsp[j..]),
            isa.load(&scratch.sz[j..]),
        );
        let dy = isa.load(&scratch.dy[j..]);
        let y = d.mul_add(u, step_sums(isa, &scratch.y_parts, j));
        let hb = step_sums(isa, &scratch.hb_parts, j);
        let r = step_sums(isa, &scratch.r_parts, j);
        (g * y * sz * z.mul_add(one - sz, one)).store(&mut dz[t..]);
        dt.mul_add(hb, d * dy).store(&mut du[t..]);
        let ddelta = u.mul_add(hb, r) * dsp;
        ddelta.store(&mut dd[t..]);
        sums.d_bias = sums.d_bias + ddelta;
        sums.d_skip = dy.mul_add(u, sums.d_skip);
    }
    for j in split..steps {
        let t = t0 + j;
        let (ut, zt, g, sz) = (lane.u[t], lane.z[t], dout[t], scratch.sz[j]);
        let w = j * V::WIDTH;
        let dy = scratch.dy[j];
        let y = lane.d * ut + isa.load(&scratch.y_parts[w..]).sum();
        let hb = isa.load(&scratch.hb_parts[w..]).sum();
        let r = isa.load(&scratch.r_parts[w..]).sum();
        dz[t] = g * y * sz * (1.0 + zt * (1.0 - sz));
        du[t] = scratch.dt[j] * hb + lane.d * dy;
        let ddelta = (ut * hb + r) * scratch.dsp[j];
        dd[t] = ddelta;
        sums.d_bias_tail += ddelta;
        sums.d_skip_tail += dy * ut;
    }
}

/// How many blocks the channels of each group are split into for the backward. Every
/// (batch, group, block) is one task with private `[len, state]` accumulators for dB and dC,
/// summed over blocks afterwards in a fixed order (deterministic). Blocks hold at least
/// `2 * state` channels, so the accumulators never outweigh the `[len]` rows of their lanes:
/// their memory stays `O(batch · channels · len)`.
fn channel_blocks(dims: &ScanShape) -> usize {
    let wanted = TARGET_TASKS.div_ceil(dims.batch * dims.groups);
    let most = (dims.per_group() / (2 * dims.state)).max(1);
    wanted.clamp(1, most)
}

/// Splits `buf` into consecutive pieces of the given lengths.
fn split_lengths<'a>(mut buf: &'a mut [f32], lengths: &[usize]) -> Vec<&'a mut [f32]> {
    lengths
        .iter()
        .map(|&len| {
            let (head, tail) = std::mem::take(&mut buf).split_at_mut(len);
            buf = tail;
            head
        })
        .collect()
}

/// Sums the interleaved dB/dC partials `[outer, blocks, len, 2, state]` (see [`TaskWork`]) over
/// `blocks`, in block order, into dB and dC, each `[outer, len, state]`.
fn reduce_blocks(
    parts: &[f32],
    outer: usize,
    blocks: usize,
    len: usize,
    state: usize,
) -> (Vec<f32>, Vec<f32>) {
    let rows = len * state;
    // Pieces of whole steps, small enough to spread over the threads.
    let piece_steps = (4096 / state).max(1);
    let (mut db, mut dc) = (zeros(outer * rows), zeros(outer * rows));
    let outputs = db.par_chunks_mut(rows).zip(dc.par_chunks_mut(rows));
    outputs.enumerate().for_each(|(o, (db, dc))| {
        let pieces = db.par_chunks_mut(piece_steps * state);
        let pieces = pieces.zip(dc.par_chunks_mut(piece_steps * state));
        pieces.enumerate().for_each(|(p, (db, dc))| {
            for block in 0..blocks {
                let part = &parts[(o * blocks + block) * 2 * rows..][..2 * rows];
                let steps = db.chunks_exact_mut(state).zip(dc.chunks_exact_mut(state));
                for (k, (db, dc)) in steps.enumerate() {
                    let (b, c) =
                        part[(p * piece_steps + k) * 2 * state..][..2 * state].split_at(state);
                    db.iter_mut().zip(b).for_each(|(d, s)| *d += s);
                    dc.iter_mut().zip(c).for_each(|(d, s)| *d += s);
                }
            }
        });
    });
    (db, dc)
}

/// The backward over all lanes, given the checkpoints saved by [`forward`] and the output
/// gradient `dout` (`[batch, channels, len]`).
pub(crate) fn backward(x: &Inputs, dims: ScanShape, checkpoints: &[f32], dout: &[f32]) -> Grads {
    let ScanShape {
        batch,
        channels,
        groups,
        len,
        state,
    } = dims;
    let per_group = dims.per_group();
    let blocks = channel_blocks(&dims);
    let rows = len * state;
    let per_lane_checkpoints = checkpoint_len(&dims);
    let params_len = state + 2;

    let mut du = output(dims.lanes() * len);
    let mut ddelta = output(dims.lanes() * len);
    let mut dz = output(dims.lanes() * len);
    // dA accumulates over the chunks, from zero.
    let mut params = zeros(dims.lanes() * params_len);
    let mut dbc_parts = zeros(batch * groups * blocks * 2 * rows);

    // Tasks in (batch, group, block) order own consecutive lanes, so every per-lane buffer splits
    // into consecutive pieces.
    let tasks: Vec<(usize, usize)> = (0..batch * groups * blocks)
        .map(|task| {
            let (bg, block) = (task / blocks, task % blocks);
            let first = (bg % groups) * per_group;
            let lane0 = (bg / groups) * channels + first;
            (
                lane0 + block * per_group / blocks,
                lane0 + (block + 1) * per_group / blocks,
            )
        })
        .collect();
    let sizes = |per: usize| -> Vec<usize> { tasks.iter().map(|(s, e)| (e - s) * per).collect() };
    let du_parts = split_lengths(&mut du, &sizes(len));
    let ddelta_parts = split_lengths(&mut ddelta, &sizes(len));
    let dz_parts = split_lengths(&mut dz, &sizes(len));
    let param_parts = split_lengths(&mut params, &sizes(params_len));

    let work: Vec<TaskWork> = tasks
        .iter()
        .zip(du_parts)
        .zip(ddelta_parts)
        .zip(dz_parts)
        .zip(param_parts)
        .zip(dbc_parts.chunks_mut(2 * rows))
        .map(|(((((&(first, end), du), ddelta), dz), params), dbc)| {
            let lanes = (first..end)
                .zip(du.chunks_mut(len))
                .zip(ddelta.chunks_mut(len))
                .zip(dz.chunks_mut(len))
                .zip(params.chunks_mut(params_len))
                .map(|((((lane, du), ddelta), dz), params)| LaneWork {
                    lane: x.lane(&dims, lane),
                    checkpoints: &checkpoints
                        [lane * per_lane_checkpoints..(lane + 1) * per_lane_checkpoints],
                    dout: &dout[lane * len..(lane + 1) * len],
                    grads: LaneGrads {
                        du,
                        ddelta,
                        dz,
                        params,
                    },
                })
                .collect();
            TaskWork { lanes, dbc }
        })
        .collect();
    work.into_par_iter()
        .for_each(|task| backward_task(task, state));

    // dA, dD and d_delta_bias: sum the per-lane values over batch, in batch order.
    let mut da = vec![0f32; channels * state];
    let mut dd = vec![0f32; channels];
    let mut dbias = vec![0f32; channels];
    for lane_params in params.chunks_exact(params_len * channels) {
        for (ch, p) in lane_params.chunks_exact(params_len).enumerate() {
            for (acc, v) in da[ch * state..(ch + 1) * state].iter_mut().zip(&p[..state]) {
                *acc += v;
            }
            dd[ch] += p[state];
            dbias[ch] += p[state + 1];
        }
    }

    let (db, dc) = reduce_blocks(&dbc_parts, batch * groups, blocks, len, state);
    Grads {
        u: du,
        delta: ddelta,
        a: da,
        b: db,
        c: dc,
        d: dd,
        z: dz,
        delta_bias: dbias,
    }
}

/// Vector-lane arithmetic operations of the fused kernels as written, `(forward, backward)`: the
/// compute side of the scan's roofline (`bench scan`). Unlike [`super::scan_flops`], which counts
/// an `exp` as one FLOP, every instruction of the polynomials `exp` (19) and `exp2` (13; AVX-512
/// fuses three of each into one: counted in full at every level), `ln` and the softplus/sigmoid
/// built on them counts, as do compares and blends: that is what an exp-bound kernel spends its
/// vector issue slots on. A horizontal sum of `N` lanes counts `N - 1` adds.
///
/// Per (batch, channel, step, state) element: forward 17 (`Δ·A`, `exp2`, the state update, the
/// `C·s` accumulation); backward 28 (the recompute, 16, and the adjoint walk, 12). Per (batch,
/// channel, step): 77 for the step terms (softplus and its derivative, 55; sigmoid, 22), plus the
/// horizontal sums and scalar tail: forward `N + 4`, backward `3N + 12`.
pub fn scan_lane_ops(shape: ScanShape) -> (u64, u64) {
    const STEP_TERMS: u64 = 77;
    let steps = (shape.lanes() * shape.len) as u64;
    let n = shape.state as u64;
    (
        steps * (17 * n + STEP_TERMS + n + 4),
        steps * (28 * n + STEP_TERMS + 3 * n + 12),
    )
}
