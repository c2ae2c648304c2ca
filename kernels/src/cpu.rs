//! The fused scan over plain `f32` buffers: forward, chunked-recompute backward, and the parallel
//! drivers. Nothing here knows about Burn; `flex.rs` moves tensors in and out.
//!
//! A *lane* is one (batch, channel) pair: its `u`, `delta`, `z` rows are `len` contiguous floats and
//! its `B`/`C` rows are the `[len, state]` block of its (batch, group), time-major so that the inner
//! loop over the state runs over contiguous memory. The state of a lane lives in a small buffer
//! (on the stack for `state <= 64`) and is processed a SIMD vector at a time.

use std::ops::{Add, Div, Mul, Sub};

use rayon::prelude::*;

/// Time steps per checkpoint chunk. The forward stores the state entering every chunk but the
/// first; the backward recomputes one chunk of states at a time from it.
pub(crate) const CHUNK: usize = 64;

/// Above this state size the per-lane state goes to the heap instead of the stack.
const STACK_STATE: usize = 64;

/// The backward aims for at least this many independent work items (see [`channel_blocks`]).
/// A constant rather than the thread count so the partition, and hence every rounding, is the same
/// on every machine.
const TARGET_TASKS: usize = 128;

/// Problem sizes, validated by [`Dims::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dims {
    pub batch: usize,
    pub channels: usize,
    pub groups: usize,
    pub len: usize,
    pub state: usize,
}

impl Dims {
    /// Checks the shapes of the eight inputs (in argument order) and returns the sizes.
    ///
    /// # Panics
    /// With a message naming the offending input when the shapes are inconsistent.
    pub(crate) fn new(shapes: [&[usize]; 8]) -> Self {
        let [u, delta, a, b, c, d, z, bias] = shapes;
        let [batch, channels, len] = rank::<3>("u", u);
        let [b_batch, groups, b_len, state] = rank::<4>("b", b);
        let expect = |name: &str, got: &[usize], want: &[usize], what: &str| {
            assert!(
                got == want,
                "selective_scan: `{name}` must have shape {what} = {want:?}, got {got:?}"
            );
        };
        expect("delta", delta, u, "[batch, channels, len]");
        expect("z", z, u, "[batch, channels, len]");
        expect("a", a, &[channels, state], "[channels, state]");
        expect(
            "b",
            b,
            &[batch, groups, len, state],
            "[batch, groups, len, state]",
        );
        expect("c", c, b, "[batch, groups, len, state]");
        expect("d", d, &[channels], "[channels]");
        expect("delta_bias", bias, &[channels], "[channels]");
        assert!(
            b_batch == batch && b_len == len,
            "selective_scan: `b` must be [batch, groups, len, state] with batch {batch} and len {len}, got {b:?}"
        );
        assert!(
            batch > 0 && channels > 0 && len > 0 && state > 0 && groups > 0,
            "selective_scan: every dimension must be non-zero (u {u:?}, b {b:?})"
        );
        assert!(
            channels % groups == 0,
            "selective_scan: channels ({channels}) must be a multiple of groups ({groups})"
        );
        Self {
            batch,
            channels,
            groups,
            len,
            state,
        }
    }

    fn per_group(&self) -> usize {
        self.channels / self.groups
    }

    fn lanes(&self) -> usize {
        self.batch * self.channels
    }

    /// Floats of checkpointed state per lane: the state entering chunks `1..chunks`.
    pub(crate) fn checkpoint_len(&self) -> usize {
        (self.len.div_ceil(CHUNK) - 1) * self.state
    }
}

fn rank<const R: usize>(name: &str, shape: &[usize]) -> [usize; R] {
    shape.try_into().unwrap_or_else(|_| {
        panic!("selective_scan: `{name}` must have rank {R}, got shape {shape:?}")
    })
}

/// The eight inputs as contiguous row-major `f32` buffers, shapes as in [`crate::selective_scan`].
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
    fn lane(&self, dims: &Dims, lane: usize) -> Lane<'a> {
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

// ---------------------------------------------------------------------------------------------
// SIMD. The lane kernels are written once, generic over `V: Lanes` (a vector of `V::WIDTH` f32):
// `f32` itself (portable, any state size) and, on x86-64, `avx2::F32x8`, used when the CPU has
// AVX2+FMA (detected at run time, cached by std) and the state size is a multiple of 8. The AVX2
// instances are compiled inside `#[target_feature]` functions so the intrinsics inline. (Plain
// loops over the state are not reliably auto-vectorized by LLVM: the loads and stores through
// the state buffer and the exp's bit tricks defeat its SLP vectorizer.)

/// A vector of `WIDTH` f32. `max`/`min` return `self` when it is NaN, so NaN propagates.
trait Lanes:
    Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self>
{
    const WIDTH: usize;
    fn splat(x: f32) -> Self;
    /// The first `WIDTH` floats of `src`.
    fn load(src: &[f32]) -> Self;
    /// Into the first `WIDTH` floats of `dst`.
    fn store(self, dst: &mut [f32]);
    /// `self * b + c`, fused where the target has FMA.
    fn mul_add(self, b: Self, c: Self) -> Self;
    fn max(self, other: Self) -> Self;
    fn min(self, other: Self) -> Self;
    /// `then` in the lanes where `a < b`, `otherwise` elsewhere (also where either is NaN).
    fn select_lt(a: Self, b: Self, then: Self, otherwise: Self) -> Self;
    /// `2^k` from `t = k + 1.5·2^23` (an integer-valued `k` in `[-126, 127]` stored in the
    /// low mantissa bits of `t`): `(bits(t) + 127) << 23` leaves `k + 127` in the exponent field.
    fn pow2_of_rounded(t: Self) -> Self;
    /// `(m, e)` with `self = m · 2^e`, `m` in `[0.5, 1)`, for positive normal `self`.
    fn frexp(self) -> (Self, Self);
    /// Horizontal sum, in a fixed order.
    fn sum(self) -> f32;
}

impl Lanes for f32 {
    const WIDTH: usize = 1;
    #[inline(always)]
    fn splat(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn load(src: &[f32]) -> Self {
        src[0]
    }
    #[inline(always)]
    fn store(self, dst: &mut [f32]) {
        dst[0] = self;
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        // Without FMA in the baseline target `f32::mul_add` is a call to libm's `fmaf`.
        #[cfg(target_arch = "aarch64")]
        return f32::mul_add(self, b, c);
        #[cfg(not(target_arch = "aarch64"))]
        return self * b + c;
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        if self < other { other } else { self }
    }
    #[inline(always)]
    fn min(self, other: Self) -> Self {
        if self > other { other } else { self }
    }
    #[inline(always)]
    fn pow2_of_rounded(t: Self) -> Self {
        f32::from_bits(t.to_bits().wrapping_add(127) << 23)
    }
    #[inline(always)]
    fn select_lt(a: Self, b: Self, then: Self, otherwise: Self) -> Self {
        if a < b { then } else { otherwise }
    }
    #[inline(always)]
    fn frexp(self) -> (Self, Self) {
        let bits = self.to_bits();
        let m = f32::from_bits((bits & 0x807F_FFFF) | 0x3F00_0000);
        (m, ((bits >> 23) as i32 - 126) as f32)
    }
    #[inline(always)]
    fn sum(self) -> f32 {
        self
    }
}

/// AVX2+FMA vectors. Invariant: values of [`F32x8`] are only created inside functions compiled
/// with `#[target_feature(enable = "avx2,fma")]` that run after the features were detected, so
/// the intrinsics below are always executed on a CPU that has them.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::{Add, Div, Mul, Sub};

    #[derive(Clone, Copy)]
    pub(super) struct F32x8(__m256);

    // SAFETY (every `unsafe` block in this module): see the module invariant; loads and stores
    // check the slice length first.
    impl Add for F32x8 {
        type Output = Self;
        #[inline(always)]
        fn add(self, o: Self) -> Self {
            unsafe { Self(_mm256_add_ps(self.0, o.0)) }
        }
    }
    impl Sub for F32x8 {
        type Output = Self;
        #[inline(always)]
        fn sub(self, o: Self) -> Self {
            unsafe { Self(_mm256_sub_ps(self.0, o.0)) }
        }
    }
    impl Mul for F32x8 {
        type Output = Self;
        #[inline(always)]
        fn mul(self, o: Self) -> Self {
            unsafe { Self(_mm256_mul_ps(self.0, o.0)) }
        }
    }
    impl Div for F32x8 {
        type Output = Self;
        #[inline(always)]
        fn div(self, o: Self) -> Self {
            unsafe { Self(_mm256_div_ps(self.0, o.0)) }
        }
    }

    impl super::Lanes for F32x8 {
        const WIDTH: usize = 8;
        #[inline(always)]
        fn splat(x: f32) -> Self {
            unsafe { Self(_mm256_set1_ps(x)) }
        }
        #[inline(always)]
        fn load(src: &[f32]) -> Self {
            let src = &src[..8];
            unsafe { Self(_mm256_loadu_ps(src.as_ptr())) }
        }
        #[inline(always)]
        fn store(self, dst: &mut [f32]) {
            let dst = &mut dst[..8];
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe { Self(_mm256_fmadd_ps(self.0, b.0, c.0)) }
        }
        #[inline(always)]
        fn max(self, other: Self) -> Self {
            // `maxps` returns its second operand when either is NaN.
            unsafe { Self(_mm256_max_ps(other.0, self.0)) }
        }
        #[inline(always)]
        fn min(self, other: Self) -> Self {
            unsafe { Self(_mm256_min_ps(other.0, self.0)) }
        }
        #[inline(always)]
        fn pow2_of_rounded(t: Self) -> Self {
            unsafe {
                let bits = _mm256_add_epi32(_mm256_castps_si256(t.0), _mm256_set1_epi32(127));
                Self(_mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits)))
            }
        }
        #[inline(always)]
        fn select_lt(a: Self, b: Self, then: Self, otherwise: Self) -> Self {
            unsafe {
                let lt = _mm256_cmp_ps::<_CMP_LT_OQ>(a.0, b.0);
                Self(_mm256_blendv_ps(otherwise.0, then.0, lt))
            }
        }
        #[inline(always)]
        fn frexp(self) -> (Self, Self) {
            unsafe {
                let bits = _mm256_castps_si256(self.0);
                let m = _mm256_or_si256(
                    _mm256_and_si256(bits, _mm256_set1_epi32(0x807F_FFFF_u32 as i32)),
                    _mm256_set1_epi32(0x3F00_0000),
                );
                let e = _mm256_sub_epi32(_mm256_srli_epi32::<23>(bits), _mm256_set1_epi32(126));
                (Self(_mm256_castsi256_ps(m)), Self(_mm256_cvtepi32_ps(e)))
            }
        }
        #[inline(always)]
        fn sum(self) -> f32 {
            unsafe {
                // ((0+4) + (2+6)) + ((1+5) + (3+7)).
                let half = _mm_add_ps(
                    _mm256_castps256_ps128(self.0),
                    _mm256_extractf128_ps::<1>(self.0),
                );
                let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
                _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)))
            }
        }
    }
}

/// Whether the AVX2 kernels can run for state size `n`.
#[cfg(target_arch = "x86_64")]
fn use_avx2(n: usize) -> bool {
    n.is_multiple_of(8)
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
}

/// `exp(x)` without libm, so that it vectorizes: Cody-Waite reduction `x = k ln2 + r`, a
/// degree-5 polynomial for `e^r` on `|r| <= ln2/2` (Cephes `expf` coefficients) and `2^k`
/// assembled in the exponent bits. Relative error below 2e-7 (tested). Inputs below
/// `ln(2^-126)` give 0 (no subnormals); inputs above 88 saturate at `e^88` (the scan only
/// evaluates `exp(Δ·A)` with `Δ > 0`, `A < 0`); NaN gives NaN.
#[inline(always)]
fn exp_approx<V: Lanes>(x: V) -> V {
    const LO: f32 = -87.336_54;
    const HI: f32 = 88.0;
    // 1.5 * 2^23: adding it rounds to an integer that lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.max(V::splat(LO)).min(V::splat(HI));
    let t = xc.mul_add(V::splat(std::f32::consts::LOG2_E), V::splat(ROUND));
    let k = t - V::splat(ROUND);
    let r = k.mul_add(V::splat(-LN2_HI), xc);
    let r = k.mul_add(V::splat(-LN2_LO), r);
    let mut p = V::splat(1.987_569_1e-4);
    p = p.mul_add(r, V::splat(1.398_2e-3));
    p = p.mul_add(r, V::splat(8.333_452e-3));
    p = p.mul_add(r, V::splat(4.166_579_6e-2));
    p = p.mul_add(r, V::splat(0.166_666_65));
    p = p.mul_add(r, V::splat(0.5));
    let er = p.mul_add(r * r, r) + V::splat(1.0);
    V::select_lt(x, V::splat(LO), V::splat(0.0), er * V::pow2_of_rounded(t))
}

/// `ln(x)` for finite `x >= 1`, Cephes `logf`: `x = m·2^e` with `m` in `[√½, √2)`, then a
/// polynomial in `m - 1`. Relative error ~1e-7 (tested).
#[inline(always)]
fn ln_ge1<V: Lanes>(x: V) -> V {
    let one = V::splat(1.0);
    let (m, e) = x.frexp();
    let small = V::select_lt(
        m,
        V::splat(std::f32::consts::FRAC_1_SQRT_2),
        one,
        V::splat(0.0),
    );
    let e = e - small;
    // m - 1, or 2m - 1 when m < √½ (exact).
    let x = m.mul_add(one + small, V::splat(-1.0));
    let z = x * x;
    let mut p = V::splat(7.037_683_6e-2);
    for coefficient in [
        -1.151_461e-1,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_5e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ] {
        p = p.mul_add(x, V::splat(coefficient));
    }
    let y = e.mul_add(V::splat(-2.121_944_4e-4), p * x * z);
    let y = z.mul_add(V::splat(-0.5), y);
    e.mul_add(V::splat(0.693_359_4), x + y)
}

/// mamba-ssm's softplus `log1p(exp(x))` (`x` itself above 20) and its derivative
/// `exp(x) / (1 + exp(x))` (1 above 20).
#[inline(always)]
fn softplus_and_grad<V: Lanes>(x: V) -> (V, V) {
    let one = V::splat(1.0);
    let threshold = V::splat(20.0);
    let e = exp_approx(x.min(threshold));
    let u = one + e;
    // log1p(e) = ln(1 + e) + (e - ((1 + e) - 1)) / (1 + e): the correction restores what the
    // rounding of 1 + e lost, so tiny e (very negative x) still gives log1p(e) ≈ e.
    let log1p = ln_ge1(u) + (e - (u - one)) / u;
    (
        V::select_lt(threshold, x, x, log1p),
        V::select_lt(threshold, x, one, e / u),
    )
}

#[inline(always)]
fn sigmoid<V: Lanes>(x: V) -> V {
    let one = V::splat(1.0);
    one / (one + exp_approx(V::splat(0.0) - x))
}

/// Per-step terms of one chunk, computed for all its steps at once so the transcendental
/// functions vectorize over time: `dt = softplus(delta + bias)`, `dsp = softplus'(delta + bias)`,
/// `sz = sigmoid(z)`, for the steps `t0 + j`, `j` in `0..dt.len()`. Runs `V` over the whole
/// vectors and `f32` over the rest; the forward and the backward split a chunk identically, so
/// they get identical values.
#[inline(always)]
fn step_terms<V: Lanes>(lane: &Lane, t0: usize, dt: &mut [f32], dsp: &mut [f32], sz: &mut [f32]) {
    let steps = dt.len();
    let split = steps - steps % V::WIDTH;
    step_terms_range::<V>(lane, t0, 0..split, dt, dsp, sz);
    step_terms_range::<f32>(lane, t0, split..steps, dt, dsp, sz);
}

#[inline(always)]
fn step_terms_range<V: Lanes>(
    lane: &Lane,
    t0: usize,
    js: std::ops::Range<usize>,
    dt: &mut [f32],
    dsp: &mut [f32],
    sz: &mut [f32],
) {
    for j in js.step_by(V::WIDTH) {
        let x = V::load(&lane.delta[t0 + j..]) + V::splat(lane.bias);
        let (softplus, grad) = softplus_and_grad(x);
        softplus.store(&mut dt[j..]);
        grad.store(&mut dsp[j..]);
        sigmoid(V::load(&lane.z[t0 + j..])).store(&mut sz[j..]);
    }
}

/// Declares `$name`, which runs `$generic` with AVX2 vectors when [`use_avx2`] allows for state
/// size `$state` (through the `#[target_feature]` function `$avx2`) and with scalar `f32`
/// otherwise.
macro_rules! dispatch {
    ($name:ident, $avx2:ident, $generic:ident, ($($arg:ident: $ty:ty),*), $state:expr) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if use_avx2($state) {
                // SAFETY: `use_avx2` checked that the CPU has AVX2 and FMA.
                return unsafe { $avx2($($arg),*) };
            }
            $generic::<f32>($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx2($($arg: $ty),*) {
            $generic::<avx2::F32x8>($($arg),*)
        }
    };
}

dispatch!(forward_lane, forward_lane_avx2, forward_lane_impl,
    (lane: &Lane, out: &mut [f32], checkpoints: &mut [f32]), lane.a.len());

dispatch!(backward_lane, backward_lane_avx2, backward_lane_impl,
    (lane: &Lane, checkpoints: &[f32], dout: &[f32], grads: LaneGrads, scratch: &mut Scratch),
    lane.a.len());

// ---------------------------------------------------------------------------------------------
// Forward.

/// Runs the scan for one lane, writing `y * silu(z)` to `out` and, when `checkpoints` is not empty,
/// the state entering chunk `k` to `checkpoints[(k-1)*N..k*N]` for `k >= 1`.
#[inline(always)]
fn forward_lane_impl<V: Lanes>(lane: &Lane, out: &mut [f32], checkpoints: &mut [f32]) {
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
    for (chunk, t0) in (0..out.len()).step_by(CHUNK).enumerate() {
        if chunk > 0
            && let Some(dst) = checkpoints.get_mut((chunk - 1) * n..chunk * n)
        {
            dst.copy_from_slice(s);
        }
        let steps = CHUNK.min(out.len() - t0);
        step_terms::<V>(
            lane,
            t0,
            &mut dt[..steps],
            &mut dsp[..steps],
            &mut sz[..steps],
        );
        for j in 0..steps {
            let t = t0 + j;
            let ut = lane.u[t];
            let (dt_v, du_v) = (V::splat(dt[j]), V::splat(dt[j] * ut));
            let b = &lane.b[t * n..(t + 1) * n];
            let c = &lane.c[t * n..(t + 1) * n];
            let mut y = V::splat(0.0);
            for q in (0..n).step_by(V::WIDTH) {
                let decay = exp_approx(dt_v * V::load(&lane.a[q..]));
                let next = decay.mul_add(V::load(&s[q..]), du_v * V::load(&b[q..]));
                next.store(&mut s[q..]);
                y = V::load(&c[q..]).mul_add(next, y);
            }
            let y = lane.d * ut + y.sum();
            out[t] = y * lane.z[t] * sz[j];
        }
    }
}

/// The forward over all lanes. Returns the output `[batch, channels, len]` and, when
/// `save_checkpoints`, the chunk-boundary states `[batch, channels, chunks - 1, state]` (empty
/// otherwise).
pub(crate) fn forward(x: &Inputs, dims: Dims, save_checkpoints: bool) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0f32; dims.lanes() * dims.len];
    let per_lane = if save_checkpoints {
        dims.checkpoint_len()
    } else {
        0
    };
    let mut checkpoints = vec![0f32; dims.lanes() * per_lane];
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

/// Per-lane gradient outputs plus the (batch, group) accumulators the lane adds into.
struct LaneGrads<'a> {
    du: &'a mut [f32],
    ddelta: &'a mut [f32],
    dz: &'a mut [f32],
    /// `[dA[0..N], dD, d_delta_bias]` of this lane, summed over batch afterwards.
    params: &'a mut [f32],
    /// `[len, state]` partial sums over the channels of one block; see [`channel_blocks`].
    db: &'a mut [f32],
    dc: &'a mut [f32],
}

/// Reused by every lane of a task: one chunk of recomputed states and decays, and the adjoint.
struct Scratch {
    /// `[CHUNK + 1, state]`: row `j` is the state before step `t0 + j`.
    states: Vec<f32>,
    /// `[CHUNK, state]`: `exp(Δ_t A)` of step `t0 + j`.
    decay: Vec<f32>,
    /// `exp(Δ_{t+1} A) ⊙ ∂L/∂s_{t+1}`: the part of `∂L/∂s_t` coming from later steps.
    carry: Vec<f32>,
    /// The chunk's [`step_terms`].
    dt: [f32; CHUNK],
    dsp: [f32; CHUNK],
    sz: [f32; CHUNK],
}

impl Scratch {
    fn new(state: usize) -> Self {
        Self {
            states: vec![0.0; (CHUNK + 1) * state],
            decay: vec![0.0; CHUNK * state],
            carry: vec![0.0; state],
            dt: [0.0; CHUNK],
            dsp: [0.0; CHUNK],
            sz: [0.0; CHUNK],
        }
    }
}

/// Backward of one lane. Walks the chunks last to first: restores the chunk's entry state from
/// `checkpoints`, recomputes its states and decays (bit-identical to the forward: same code, same
/// order), then walks its steps backward carrying `h_t = ∂L/∂s_t`:
///
/// ```text
/// h_t    = dy_t C_t + exp(Δ_{t+1}A) ⊙ h_{t+1}            dy_t = dout_t silu(z_t)
/// dC_t  += dy_t s_t          dB_t += h_t Δ_t u_t         dA   += Δ_t h_t ⊙ exp(Δ_t A) ⊙ s_{t-1}
/// dΔ_t   = Σ h_t ⊙ exp(Δ_t A) ⊙ s_{t-1} ⊙ A + u_t Σ h_t ⊙ B_t
/// du_t   = Δ_t Σ h_t ⊙ B_t + D dy_t                      dD  += dy_t u_t
/// dz_t   = dout_t y_t silu'(z_t)                         ddelta_t = dΔ_t softplus'(delta_t + bias)
/// ```
#[inline(always)]
fn backward_lane_impl<V: Lanes>(
    lane: &Lane,
    checkpoints: &[f32],
    dout: &[f32],
    grads: LaneGrads,
    scratch: &mut Scratch,
) {
    let n = lane.a.len();
    let len = dout.len();
    let (da, rest) = grads.params.split_at_mut(n);
    let (mut d_skip, mut d_bias) = (0f32, 0f32);
    scratch.carry.fill(0.0);

    for chunk in (0..len.div_ceil(CHUNK)).rev() {
        let t0 = chunk * CHUNK;
        let steps = CHUNK.min(len - t0);
        let entry = &mut scratch.states[..n];
        match chunk {
            0 => entry.fill(0.0),
            _ => entry.copy_from_slice(&checkpoints[(chunk - 1) * n..chunk * n]),
        }
        let (dt, dsp, sz) = (
            &mut scratch.dt[..steps],
            &mut scratch.dsp[..steps],
            &mut scratch.sz[..steps],
        );
        step_terms::<V>(lane, t0, dt, dsp, sz);
        // Recompute the chunk's states exactly as the forward did.
        for (j, &dt_j) in dt.iter().enumerate() {
            let t = t0 + j;
            let (dt_v, du_v) = (V::splat(dt_j), V::splat(dt_j * lane.u[t]));
            let (prev, next) = scratch.states[j * n..(j + 2) * n].split_at_mut(n);
            let decay = &mut scratch.decay[j * n..(j + 1) * n];
            let b = &lane.b[t * n..(t + 1) * n];
            for q in (0..n).step_by(V::WIDTH) {
                let e = exp_approx(dt_v * V::load(&lane.a[q..]));
                e.store(&mut decay[q..]);
                e.mul_add(V::load(&prev[q..]), du_v * V::load(&b[q..]))
                    .store(&mut next[q..]);
            }
        }
        // Walk the chunk backward.
        for j in (0..steps).rev() {
            let t = t0 + j;
            let (dt, sz) = (dt[j], sz[j]);
            let ut = lane.u[t];
            let zt = lane.z[t];
            let g = dout[t];
            let dy = g * zt * sz;
            let (dt_v, du_v, dy_v) = (V::splat(dt), V::splat(dt * ut), V::splat(dy));
            let prev = &scratch.states[j * n..(j + 1) * n];
            let cur = &scratch.states[(j + 1) * n..(j + 2) * n];
            let decay = &scratch.decay[j * n..(j + 1) * n];
            let row = t * n..(t + 1) * n;
            let (b, c) = (&lane.b[row.clone()], &lane.c[row.clone()]);
            let (db, dc) = (&mut grads.db[row.clone()], &mut grads.dc[row]);
            let (mut y, mut r, mut hb) = (V::splat(0.0), V::splat(0.0), V::splat(0.0));
            for q in (0..n).step_by(V::WIDTH) {
                let (c_q, cur_q, e_q) =
                    (V::load(&c[q..]), V::load(&cur[q..]), V::load(&decay[q..]));
                let h = dy_v.mul_add(c_q, V::load(&scratch.carry[q..]));
                y = c_q.mul_add(cur_q, y);
                dy_v.mul_add(cur_q, V::load(&dc[q..])).store(&mut dc[q..]);
                h.mul_add(du_v, V::load(&db[q..])).store(&mut db[q..]);
                let has = h * e_q * V::load(&prev[q..]);
                r = has.mul_add(V::load(&lane.a[q..]), r);
                has.mul_add(dt_v, V::load(&da[q..])).store(&mut da[q..]);
                hb = h.mul_add(V::load(&b[q..]), hb);
                (e_q * h).store(&mut scratch.carry[q..]);
            }
            let y = lane.d * ut + y.sum();
            let hb = hb.sum();
            grads.dz[t] = g * y * sz * (1.0 + zt * (1.0 - sz));
            grads.du[t] = dt * hb + lane.d * dy;
            let ddelta = (ut * hb + r.sum()) * dsp[j];
            grads.ddelta[t] = ddelta;
            d_bias += ddelta;
            d_skip += dy * ut;
        }
    }
    rest[0] = d_skip;
    rest[1] = d_bias;
}

/// How many blocks the channels of each group are split into for the backward. Every
/// (batch, group, block) is one task with private `[len, state]` accumulators for dB and dC,
/// summed over blocks afterwards in a fixed order (deterministic). Blocks hold at least
/// `2 * state` channels, so the accumulators never outweigh the `[len]` rows of their lanes:
/// their memory stays `O(batch · channels · len)`.
fn channel_blocks(dims: &Dims) -> usize {
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

/// Sums `parts` laid out as `[outer, blocks, rows]` over `blocks`, in block order.
fn reduce_blocks(parts: Vec<f32>, outer: usize, blocks: usize, rows: usize) -> Vec<f32> {
    if blocks == 1 {
        return parts;
    }
    const PIECE: usize = 4096;
    let mut out = vec![0f32; outer * rows];
    out.par_chunks_mut(rows).enumerate().for_each(|(o, dst)| {
        dst.par_chunks_mut(PIECE).enumerate().for_each(|(p, dst)| {
            let piece = dst.len();
            for block in 0..blocks {
                let start = (o * blocks + block) * rows + p * PIECE;
                for (d, s) in dst.iter_mut().zip(&parts[start..start + piece]) {
                    *d += s;
                }
            }
        });
    });
    out
}

/// The backward over all lanes, given the checkpoints saved by [`forward`] and the output
/// gradient `dout` (`[batch, channels, len]`).
pub(crate) fn backward(x: &Inputs, dims: Dims, checkpoints: &[f32], dout: &[f32]) -> Grads {
    let Dims {
        batch,
        channels,
        groups,
        len,
        state,
    } = dims;
    let per_group = dims.per_group();
    let blocks = channel_blocks(&dims);
    let rows = len * state;
    let per_lane_checkpoints = dims.checkpoint_len();
    let params_len = state + 2;

    let mut du = vec![0f32; dims.lanes() * len];
    let mut ddelta = vec![0f32; dims.lanes() * len];
    let mut dz = vec![0f32; dims.lanes() * len];
    let mut params = vec![0f32; dims.lanes() * params_len];
    let mut db_parts = vec![0f32; batch * groups * blocks * rows];
    let mut dc_parts = vec![0f32; batch * groups * blocks * rows];

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
    let db_task = db_parts.chunks_mut(rows);
    let dc_task = dc_parts.chunks_mut(rows);

    let work: Vec<_> = tasks
        .iter()
        .zip(du_parts)
        .zip(ddelta_parts)
        .zip(dz_parts)
        .zip(param_parts)
        .zip(db_task.zip(dc_task))
        .map(|(((((lanes, du), ddelta), dz), params), (db, dc))| {
            (*lanes, du, ddelta, dz, params, db, dc)
        })
        .collect();
    work.into_par_iter()
        .for_each(|((first, end), du, ddelta, dz, params, db, dc)| {
            let mut scratch = Scratch::new(state);
            for (k, lane) in (first..end).enumerate() {
                let lane_rows = k * len..(k + 1) * len;
                let grads = LaneGrads {
                    du: &mut du[lane_rows.clone()],
                    ddelta: &mut ddelta[lane_rows.clone()],
                    dz: &mut dz[lane_rows],
                    params: &mut params[k * params_len..(k + 1) * params_len],
                    db: &mut *db,
                    dc: &mut *dc,
                };
                backward_lane(
                    &x.lane(&dims, lane),
                    &checkpoints[lane * per_lane_checkpoints..(lane + 1) * per_lane_checkpoints],
                    &dout[lane * len..(lane + 1) * len],
                    grads,
                    &mut scratch,
                );
            }
        });

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

    Grads {
        u: du,
        delta: ddelta,
        a: da,
        b: reduce_blocks(db_parts, batch * groups, blocks, rows),
        c: reduce_blocks(dc_parts, batch * groups, blocks, rows),
        d: dd,
        z: dz,
        delta_bias: dbias,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Max relative error of `eval` (8 inputs at a time) against `want` on `xs`.
    fn max_rel_error(
        xs: &[f32],
        eval: impl Fn(&[f32; 8]) -> [f32; 8],
        want: &dyn Fn(f64) -> f64,
    ) -> f64 {
        let mut worst = 0f64;
        for x in xs.chunks_exact(8) {
            let x: &[f32; 8] = x.try_into().expect("chunks of 8");
            for (x, got) in x.iter().zip(eval(x)) {
                let want = want(*x as f64);
                worst = worst.max(((got as f64 - want) / want).abs());
            }
        }
        worst
    }

    /// The vector functions under test, by index.
    #[inline(always)]
    fn apply<V: Lanes>(function: usize, x: V) -> V {
        match function {
            0 => exp_approx(x),
            1 => ln_ge1(x),
            2 => softplus_and_grad(x).0,
            3 => softplus_and_grad(x).1,
            _ => sigmoid(x),
        }
    }

    /// `apply` on AVX2 vectors.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn apply_avx2(function: usize, x: &[f32; 8]) -> [f32; 8] {
        let mut out = [0f32; 8];
        apply(function, avx2::F32x8::load(x)).store(&mut out);
        out
    }

    fn grid(lo: f32, hi: f32, step: f32) -> Vec<f32> {
        let n = ((hi - lo) / step) as usize / 8 * 8;
        (0..n).map(|i| lo + step * i as f32).collect()
    }

    #[test]
    fn vector_math_relative_errors() {
        let softplus = |x: f64| if x > 20.0 { x } else { x.exp().ln_1p() };
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let softplus_grad = |x: f64| if x > 20.0 { 1.0 } else { sigmoid(x) };
        // (name, inputs, exact function, tolerance), in the order of `apply`.
        type Case<'a> = (&'a str, Vec<f32>, &'a dyn Fn(f64) -> f64, f64);
        let cases: [Case; 5] = [
            ("exp", grid(-87.3, 88.0, 1.3e-3), &f64::exp, 2e-7),
            ("ln", grid(1.0, 4e8, 3.1e3), &f64::ln, 2e-7),
            ("softplus", grid(-40.0, 40.0, 3e-4), &softplus, 4e-7),
            ("softplus'", grid(-40.0, 40.0, 3e-4), &softplus_grad, 4e-7),
            ("sigmoid", grid(-40.0, 40.0, 3e-4), &sigmoid, 4e-7),
        ];
        for (function, (name, xs, exact, tol)) in cases.into_iter().enumerate() {
            let err = max_rel_error(&xs, |x| x.map(|x| apply(function, x)), exact);
            assert!(err <= tol, "{name} scalar: {err:e} > {tol:e}");
            #[cfg(target_arch = "x86_64")]
            if use_avx2(8) {
                // SAFETY: `use_avx2` checked the CPU features.
                let err = max_rel_error(&xs, |x| unsafe { apply_avx2(function, x) }, exact);
                assert!(err <= tol, "{name} avx2: {err:e} > {tol:e}");
            }
        }
    }

    #[test]
    fn exp_approx_edges() {
        assert_eq!(exp_approx(-100f32), 0.0);
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(0f32), 1.0);
        assert!(exp_approx(f32::NAN).is_nan());
    }
}
