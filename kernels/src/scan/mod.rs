//! The fused selective scan (the Mamba-1 recurrence), with a hand-written backward.
//!
//! [`selective_scan`] has the contract of mamba-ssm's
//! `selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)` with variable,
//! grouped `B`/`C`. Per batch `b`, channel `c` (group `g = c / (channels / groups)`), state `n`,
//! with `s_{-1} = 0`:
//!
//! ```text
//! Δ_t    = softplus(delta[b,c,t] + delta_bias[c])          (log1p(exp(x)); x itself above 20)
//! s_t[n] = exp(Δ_t A[c,n]) s_{t-1}[n] + Δ_t B[b,g,t,n] u[b,c,t]
//! y_t    = Σ_n C[b,g,t,n] s_t[n] + D[c] u[b,c,t]
//! out    = y_t · silu(z[b,c,t])
//! ```
//!
//! The inputs, their shapes and meaning are the fields of [`ScanInputs`]; [`ScanShape`] holds the
//! sizes.
//!
//! # Layout
//! All tensors are row-major `f32`: `u`, `delta`, `z`, `out` are `[batch, channels, len]`, so one
//! (batch, channel) *lane* is a contiguous row of `len` floats; `B`, `C` are
//! `[batch, groups, len, state]`, time-major, so the state vector of one step is contiguous and
//! the inner loop over the state vectorizes. Inputs that are not contiguous `f32` are converted
//! once; contiguous `f32` inputs are read in place, and results are handed to Burn without copies.
//!
//! # The CPU kernel (Flex)
//! The forward runs the lanes in parallel (rayon). A lane's state stays in a small stack buffer and
//! is updated one SIMD vector at a time: on x86-64, sixteen floats per instruction with AVX-512F
//! or eight with AVX2+FMA (detected at run time; the state size must be a multiple of the width),
//! through `std::arch` intrinsics; otherwise the same generic code runs on scalars (any state
//! size, any CPU). [`simd_level`] tells which; `ZAMBA_KERNELS_SIMD` caps it. `exp`, `ln`,
//! softplus and sigmoid are polynomial approximations (relative error < 2e-7 for `exp`, < 4e-7
//! for the others, tested) so that they vectorize: `exp(Δ·A)` over the state, and the per-step
//! softplus/sigmoid over the time steps of a chunk, computed before the chunk's recurrence.
//!
//! # Chunked recompute, memory
//! The forward keeps no per-step state. When gradients are needed it saves the state entering
//! every chunk of `T` steps (except the first, which is zero; `T` is [`scan_chunk`]):
//! `batch·channels·state·⌈len / T⌉` floats. The backward walks each lane's chunks from last to
//! first: it restores the chunk's entry state, recomputes the chunk's states and decays into a
//! `T × state` scratch
//! buffer (bit-identical to the forward: same code, same order), then walks the chunk backward,
//! carrying `∂L/∂s`. The op therefore holds `O(batch·channels·len)` (its inputs and gradients) plus
//! `O(batch·channels·state·len / T)`; it never materializes a `[batch, channels, len,
//! state]` tensor. `dB`/`dC` sum over the channels of a group: the channels are split into a fixed
//! number of blocks, each (batch, group, block) task accumulates into its own `[len, state]`
//! buffers, and the blocks are summed afterwards (blocks hold at least `2·state` channels, so these
//! buffers stay within the `O(batch·channels·len)` bound). `dA`, `dD`, `d delta_bias` are per-lane
//! values summed over the batch.
//!
//! # Determinism
//! The work partition depends only on the shapes, never on the thread count or scheduling, and
//! every reduction runs in a fixed order: forward and backward are bit-identical from run to run on
//! the same machine (the AVX2 and the scalar code paths round differently from each other, so
//! results can differ in the last bits between CPUs with and without AVX2).
//!
//! # Backends and fallback
//! One autodiff node over a small kernel interface (`op::ScanKernel`: a forward that can keep the
//! chunk-boundary states, and a backward from them), implemented twice:
//! - Flex: the CPU kernel above (`cpu.rs`, chunks of 64 steps; `flex.rs` hands it Flex's tensors);
//! - Burn's CubeCL backend (`Cube`: CUDA with the `cuda` feature, the LLVM-compiled CPU runtime
//!   with `cube-cpu`): `#[cube]` kernels, a forward in mamba-ssm's layout (a cube per lane, its
//!   units along time, their maps combined by a scan: `cube/forward.rs`) and a backward in the same
//!   class (a cube of a few channels × units along time, the states and the adjoint recomputed per
//!   chunk by scans across units, `dB`/`dC` summed over the cube's channels: `cube/backward.rs`).
//!   Activations may be f32, f16 or bf16 (read and written in their type; the state and every sum
//!   are f32); the checkpoint chunk is one pass of the backward ([`cube_scan_chunk`]).
//!
//! The op is a Burn backend extension (`#[backend_extension(Flex, Cube, Autodiff)]`), routed by
//! the device: in Burn 0.22 a `Tensor`'s `Device` wraps a `burn::backend::DispatchDevice` enum
//! (`Device::as_dispatch`), with autodiff as a wrapper that `Device::inner()` strips. A backend
//! extension panics on a backend it does not list, so [`selective_scan`] checks the device first
//! ([`fused_kernel_available`]); any other device runs [`selective_scan_reference`], which is
//! correct on any backend but issues several ops per time step.
//!
//! # Optimisation level
//! The workspace's dev profile compiles workspace crates at `opt-level = 1` but this crate at
//! `opt-level = 3` (`[profile.dev.package.zamba-kernels]` in the workspace manifest): at level 1
//! the kernels still use the SIMD intrinsics but the compiler inlines less of the code around
//! them, and the scan is the hot loop of every test that trains. `examples/scan_bench.rs` times
//! the op and reports GFLOP/s from [`scan_flops`] and bandwidth from [`scan_bytes`].

mod cpu;
#[cfg(feature = "cube")]
mod cube;
mod flex;
mod op;
mod reference;

pub use cpu::scan_lane_ops;
#[cfg(feature = "cube")]
pub(crate) use cube::with_backward_layout;

use burn::backend::DispatchDevice;
use burn::tensor::{Device, Tensor};

/// The inputs of the scan, named as in mamba-ssm's `selective_scan_fn` (see the module docs for
/// the formula). Sizes: `batch`, `channels` (d_inner), `len` (sequence length), `state` (N),
/// `groups` (heads; channel `c` belongs to group `c / (channels / groups)`).
#[derive(Clone, Debug)]
pub struct ScanInputs {
    /// `[batch, channels, len]`: the sequence the recurrence runs over.
    pub u: Tensor<3>,
    /// `[batch, channels, len]`: the time step before its bias and softplus (its gradient is
    /// taken through both).
    pub delta: Tensor<3>,
    /// `[channels, state]`: the state matrix, already negative (`A = -exp(A_log)`).
    pub a: Tensor<2>,
    /// `[batch, groups, len, state]`: the input projection `B`, time-major.
    pub b: Tensor<4>,
    /// `[batch, groups, len, state]`: the output projection `C`, time-major.
    pub c: Tensor<4>,
    /// `[channels]`: the skip connection `D`.
    pub d: Tensor<1>,
    /// `[batch, channels, len]`: the gate, `out = y · silu(z)`.
    pub z: Tensor<3>,
    /// `[channels]`: the bias added to `delta` before the softplus.
    pub delta_bias: Tensor<1>,
}

impl ScanInputs {
    /// The sizes of the scan, checking that the inputs' shapes agree.
    ///
    /// # Panics
    /// If a shape disagrees (the message names the input), or a size is zero, or `channels` is
    /// no multiple of `groups`.
    pub fn shape(&self) -> ScanShape {
        let shapes = [
            self.u.shape(),
            self.delta.shape(),
            self.a.shape(),
            self.b.shape(),
            self.c.shape(),
            self.d.shape(),
            self.z.shape(),
            self.delta_bias.shape(),
        ];
        ScanShape::of_inputs(shapes.each_ref().map(|s| s.as_slice()))
    }

    /// The same inputs, each requiring a gradient.
    pub fn require_grad(self) -> Self {
        Self {
            u: self.u.require_grad(),
            delta: self.delta.require_grad(),
            a: self.a.require_grad(),
            b: self.b.require_grad(),
            c: self.c.require_grad(),
            d: self.d.require_grad(),
            z: self.z.require_grad(),
            delta_bias: self.delta_bias.require_grad(),
        }
    }
}

/// The sizes of one scan, whatever the backend (see [`ScanInputs`] for the shapes they make).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanShape {
    pub batch: usize,
    pub channels: usize,
    pub groups: usize,
    pub len: usize,
    pub state: usize,
}

impl ScanShape {
    /// Checks the shapes of the eight inputs, in the order of [`ScanInputs`]' fields, and returns
    /// the sizes.
    ///
    /// # Panics
    /// With a message naming the offending input when the shapes are inconsistent.
    pub(crate) fn of_inputs(shapes: [&[usize]; 8]) -> Self {
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

    /// Channels per group.
    pub(crate) fn per_group(&self) -> usize {
        self.channels / self.groups
    }

    /// (batch, channel) lanes: independent recurrences.
    pub(crate) fn lanes(&self) -> usize {
        self.batch * self.channels
    }
}

fn rank<const R: usize>(name: &str, shape: &[usize]) -> [usize; R] {
    shape.try_into().unwrap_or_else(|_| {
        panic!("selective_scan: `{name}` must have rank {R}, got shape {shape:?}")
    })
}

/// Time steps per checkpoint chunk of the Cube kernel: one pass of its backward (units along
/// time × steps per unit; the backward stages a chunk in shared memory, not in registers, so the
/// state size does not bound it). Takes `state` as [`scan_chunk`] does; defined without the
/// `cube` feature so that the GPU cost model can use it on any build.
pub fn cube_scan_chunk(_state: usize) -> usize {
    64
}

/// Time steps per checkpoint chunk of the fused kernel on `device` for state size `state` (the
/// forward saves the state entering every chunk but the first; the backward recomputes one chunk
/// at a time), or `None` where [`selective_scan`] has no fused kernel.
pub fn scan_chunk(device: &Device, state: usize) -> Option<usize> {
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Flex(_) => Some(cpu::CHUNK),
        #[cfg(feature = "cube")]
        DispatchDevice::Cube(_) => Some(cube_scan_chunk(state)),
        #[allow(unreachable_patterns)]
        _ => {
            let _ = state;
            None
        }
    }
}

/// Whether [`selective_scan`] runs a fused kernel on `device` (Flex, and with the `cuda` or
/// `cube-cpu` feature the CubeCL devices; with or without autodiff) rather than the per-step
/// fallback.
pub fn fused_kernel_available(device: &Device) -> bool {
    scan_chunk(device, 1).is_some()
}

/// The selective scan, `y · silu(z)`, fused (see the module docs for the formula and the
/// fallback). Returns `[batch, channels, len]`, in `u`'s dtype.
///
/// # Panics
/// As [`ScanInputs::shape`].
pub fn selective_scan(x: ScanInputs) -> Tensor<3> {
    x.shape(); // checks the shapes first: a panic names the bad input
    let _span = zamba_trace::span(zamba_trace::Category::Scan, "scan forward");
    if fused_kernel_available(&x.u.device()) {
        op::fused(x)
    } else {
        reference::scan(x)
    }
}

/// Same contract as [`selective_scan`], written with plain Burn tensor ops (a few ops per time
/// step; slow). The reference in tests, and the implementation used on devices that have no fused
/// kernel. Differentiable through Burn's autodiff on any backend.
///
/// # Panics
/// As [`ScanInputs::shape`].
pub fn selective_scan_reference(x: ScanInputs) -> Tensor<3> {
    x.shape(); // checks the shapes first: a panic names the bad input
    reference::scan(x)
}

/// Floating-point operations of the fused kernels, `(forward, backward)`, as implemented.
///
/// Counts every arithmetic operation of the inner loops: a multiply-add is 2, `exp`, `log1p` and
/// a division are 1 each. Forward: `7` per (batch, channel, step, state) element (`Δ·A`, `exp`,
/// the state update, the `C·s` accumulation) plus `11` per (batch, channel, step) (softplus,
/// `Δ·u`, `D·u`, the gate). Backward: `22` per element (the chunk recompute of the forward
/// recurrence, 5, and the adjoint walk, 17) plus `33` per step. The backward's final sum of the
/// per-block `dB`/`dC` partials (at most a few adds per `dB` element) is not counted.
pub fn scan_flops(shape: ScanShape) -> (u64, u64) {
    let steps = (shape.lanes() * shape.len) as u64;
    let state = shape.state as u64;
    (steps * (7 * state + 11), steps * (22 * state + 33))
}

/// Minimal memory traffic of the fused kernels in bytes, `(forward, backward)`: each input read
/// once and each output written once, including the chunk checkpoints of `chunk` steps (written by
/// a forward that records gradients, read by the backward; see [`scan_chunk`]). The activations
/// (`u`, `delta`, `z`, `B`, `C`, the output, and their gradients) take `activation_bytes` each
/// (4 in f32, 2 in bf16); the parameters, their gradients and the checkpoints are f32. Scratch
/// buffers that stay in cache are not counted.
///
/// Forward: reads `u`, `delta`, `z` (`batch·channels·len` each), `B`, `C` (`batch·groups·len·state` each), `A`, `D`,
/// `delta_bias`; writes the output and the checkpoints (`batch·channels·state·(⌈len / chunk⌉ - 1)`).
/// Backward: reads `u`, `delta`, `z`, the output gradient, `B`, `C`, `A`, `D`, `delta_bias` and
/// the checkpoints; writes a gradient of the size of every input.
pub fn scan_bytes(shape: ScanShape, chunk: usize, activation_bytes: usize) -> (u64, u64) {
    let ScanShape {
        batch,
        channels,
        groups,
        len,
        state,
    } = shape;
    let lanes = (batch * channels) as u64;
    let rows = lanes * len as u64;
    let bc = (batch * groups * len * state) as u64;
    let params = (channels * state + 2 * channels) as u64;
    let checkpoints = lanes * state as u64 * (len.div_ceil(chunk) as u64).saturating_sub(1);
    let act = activation_bytes as u64;
    let forward = act * (4 * rows + 2 * bc) + 4 * (params + checkpoints);
    let backward = act * (7 * rows + 4 * bc) + 4 * (2 * params + checkpoints);
    (forward, backward)
}
