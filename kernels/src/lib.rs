//! Fused selective scan (the Mamba-1 recurrence) for Burn 0.22, with a hand-written backward.
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
//! The crate also holds the other fused CPU ops of a training step — [`linear`] and
//! [`per_head_matmul`] (direct GEMMs on strided operands), [`causal_attention`], [`gelu_mul`],
//! [`cross_entropy`], [`causal_conv1d_silu`], [`rms_norm`] (each with a hand-written backward)
//! and [`adamw_update`] — each one multi-threaded pass where tensor ops take several
//! single-threaded ones, and each with its tensor-op definition (`*_reference`, also the fallback
//! on devices without the kernels) that the tests compare it with.
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
//! - Flex: the CPU kernel above (`cpu.rs`, chunks of 64 steps);
//! - Burn's CubeCL backend (`Cube`: CUDA with the `cuda` feature, the LLVM-compiled CPU runtime
//!   with `cube-cpu`): `#[cube]` kernels with the structure of mamba-ssm's selective scan, see
//!   `cube/kernels.rs`. Activations may be f32, f16 or bf16 (read and written in their type; the
//!   state and every sum are f32); the chunk is sized to keep the recomputed states in unit-local
//!   memory ([`scan_chunk`]).
//!
//! The op is a Burn backend extension (`#[backend_extension(Flex, Cube, Autodiff)]`), routed by
//! the device: in Burn 0.22 a `Tensor`'s `Device` wraps a `burn::backend::DispatchDevice` enum
//! (`Device::as_dispatch`), with autodiff as a wrapper that `Device::inner()` strips. A backend
//! extension panics on a backend it does not list, so [`selective_scan`] checks the device first
//! ([`fused_kernel_available`]); any other device runs [`selective_scan_reference`], which is
//! correct on any backend but issues several ops per time step.
//!
//! # Performance note
//! The workspace's dev profile compiles workspace crates at `opt-level = 1`; the kernels still use
//! the AVX2 intrinsics there but inline less, and run about 1.5× slower than at `opt-level = 3`
//! (release, or `[profile.dev.package.zamba-kernels] opt-level = 3`). `examples/scan_bench.rs`
//! times the op and reports GFLOP/s from [`scan_flops`] and bandwidth from [`scan_bytes`].

mod adamw;
mod attention;
mod backward_span;
pub mod check;
mod conv;
mod cross_entropy;
#[cfg(feature = "cube")]
mod cube;
pub mod device_checks;
mod dtype;
mod gelu;
mod heads;
mod host;
mod linear;
mod recompute;
mod rms_norm;
mod scan;
mod simd;
mod strided;

pub use adamw::{AdamWHyper, adamw_update, adamw_update_reference};
pub use attention::{causal_attention, causal_attention_reference};
pub use backward_span::{BlockEdge, mark_backward_span};
pub use conv::{causal_conv1d_silu, causal_conv1d_silu_reference};
pub use cross_entropy::{IGNORE_INDEX, cross_entropy, cross_entropy_reference};
pub use dtype::expect_same_dtype;
pub use gelu::{gelu_mul, gelu_mul_reference};
pub use heads::{per_head_matmul, per_head_matmul_reference, per_head_matmul_transposed};
pub use linear::{linear, linear_channels_first, linear_reference};
pub use rms_norm::{rms_norm, rms_norm_reference};
pub use scan::cpu::scan_lane_ops;
pub use simd::{SIMD_ENV, SimdLevel, detected_simd_level, simd_level};

pub use recompute::{MAX_SEGMENT_INPUTS, Segment, recompute};

use burn::backend::DispatchDevice;
use burn::tensor::{Device, Tensor};

/// Time steps per checkpoint chunk of the fused kernel on `device` for state size `state` (the
/// forward saves the state entering every chunk but the first; the backward recomputes one chunk
/// at a time), or `None` where [`selective_scan`] has no fused kernel.
pub fn scan_chunk(device: &Device, state: usize) -> Option<usize> {
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Flex(_) => Some(scan::cpu::CHUNK),
        #[cfg(feature = "cube")]
        DispatchDevice::Cube(_) => Some(scan::cube::chunk(state)),
        #[allow(unreachable_patterns)]
        _ => {
            let _ = state;
            None
        }
    }
}

/// Validates the input shapes, panicking with a message naming the bad input.
#[allow(clippy::too_many_arguments)]
fn check_shapes(
    u: &Tensor<3>,
    delta: &Tensor<3>,
    a: &Tensor<2>,
    b: &Tensor<4>,
    c: &Tensor<4>,
    d: &Tensor<1>,
    z: &Tensor<3>,
    delta_bias: &Tensor<1>,
) {
    let shapes = [
        u.shape(),
        delta.shape(),
        a.shape(),
        b.shape(),
        c.shape(),
        d.shape(),
        z.shape(),
        delta_bias.shape(),
    ];
    scan::cpu::Dims::new(shapes.each_ref().map(|s| s.as_slice()));
}

/// Every device of this build that has a fused kernel and is present on this machine, in this
/// order: Flex; the CubeCL CPU runtime (feature `cube-cpu`); each visible CUDA device (feature
/// `cuda`). The kernel and model tests run on all of them.
pub fn kernel_devices() -> Vec<Device> {
    #[allow(unused_mut)]
    let mut devices = vec![Device::flex()];
    #[cfg(feature = "cube-cpu")]
    devices.push(Device::cpu());
    #[cfg(feature = "cuda")]
    devices.extend(Device::enumerate(burn::tensor::DeviceType::Cuda).into_vec());
    devices
}

/// Whether `device` is a Flex device (with or without autodiff): where the fused CPU ops
/// ([`cross_entropy`], [`causal_conv1d_silu`], [`rms_norm`], [`adamw_update`]) run; elsewhere they
/// fall back to their tensor-op definitions.
pub(crate) fn on_flex(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// Whether `device` is a CubeCL device (with or without autodiff): where the products and the
/// attention run through `cube::ops`.
#[cfg(feature = "cube")]
pub(crate) fn on_cube(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Cube(_)
    )
}

/// Whether [`selective_scan`] runs a fused kernel on `device` (Flex, and with the `cuda` or
/// `cube-cpu` feature the CubeCL devices; with or without autodiff) rather than the per-step
/// fallback.
pub fn fused_kernel_available(device: &Device) -> bool {
    scan_chunk(device, 1).is_some()
}

/// The selective scan, `y · silu(z)`, fused (see the crate docs for the formula and the fallback).
///
/// Shapes: `Bt` = batch, `Dc` = channels (d_inner), `L` = sequence length, `N` = state size,
/// `G` = groups (heads); channel `c` belongs to group `c / (Dc / G)`.
/// `u`, `delta`, `z`: `[Bt, Dc, L]`; `a`: `[Dc, N]` (already negative: `A = -exp(A_log)`);
/// `b`, `c`: `[Bt, G, L, N]`; `d`: `[Dc]`; `delta_bias`: `[Dc]`. Returns `[Bt, Dc, L]`. `delta` is
/// the pre-bias, pre-softplus time step; its gradient is taken through both.
///
/// # Panics
/// If the shapes disagree (the message names the input), or a dimension is zero.
#[allow(clippy::too_many_arguments)]
pub fn selective_scan(
    u: Tensor<3>,
    delta: Tensor<3>,
    a: Tensor<2>,
    b: Tensor<4>,
    c: Tensor<4>,
    d: Tensor<1>,
    z: Tensor<3>,
    delta_bias: Tensor<1>,
) -> Tensor<3> {
    check_shapes(&u, &delta, &a, &b, &c, &d, &z, &delta_bias);
    let _span = zamba_trace::span(zamba_trace::Category::Scan, "scan forward");
    if fused_kernel_available(&u.device()) {
        scan::op::fused(u, delta, a, b, c, d, z, delta_bias)
    } else {
        scan::reference::scan(u, delta, a, b, c, d, z, delta_bias)
    }
}

/// Same contract as [`selective_scan`], written with plain Burn tensor ops (a few ops per time
/// step; slow). The reference in tests, and the implementation used on devices that have no fused
/// kernel. Differentiable through Burn's autodiff on any backend.
///
/// # Panics
/// As [`selective_scan`].
#[allow(clippy::too_many_arguments)]
pub fn selective_scan_reference(
    u: Tensor<3>,
    delta: Tensor<3>,
    a: Tensor<2>,
    b: Tensor<4>,
    c: Tensor<4>,
    d: Tensor<1>,
    z: Tensor<3>,
    delta_bias: Tensor<1>,
) -> Tensor<3> {
    check_shapes(&u, &delta, &a, &b, &c, &d, &z, &delta_bias);
    scan::reference::scan(u, delta, a, b, c, d, z, delta_bias)
}

/// Floating-point operations of the fused kernels, `(forward, backward)`, as implemented.
///
/// Counts every arithmetic operation of the inner loops: a multiply-add is 2, `exp`, `log1p` and
/// a division are 1 each. Forward: `7` per (batch, channel, step, state) element (`Δ·A`, `exp`,
/// the state update, the `C·s` accumulation) plus `11` per (batch, channel, step) (softplus,
/// `Δ·u`, `D·u`, the gate). Backward: `22` per element (the chunk recompute of the forward
/// recurrence, 5, and the adjoint walk, 17) plus `33` per step. The backward's final sum of the
/// per-block `dB`/`dC` partials (at most a few adds per `dB` element) is not counted.
pub fn scan_flops(batch: usize, channels: usize, len: usize, state: usize) -> (u64, u64) {
    let steps = (batch * channels * len) as u64;
    let state = state as u64;
    (steps * (7 * state + 11), steps * (22 * state + 33))
}

/// Minimal memory traffic of the fused kernels in bytes, `(forward, backward)`: each input read
/// once and each output written once, including the chunk checkpoints of `chunk` steps (written by
/// a forward that records gradients, read by the backward; see [`scan_chunk`]). The activations
/// (`u`, `delta`, `z`, `B`, `C`, the output, and their gradients) take `activation_bytes` each
/// (4 in f32, 2 in bf16); the parameters, their gradients and the checkpoints are f32. Scratch
/// buffers that stay in cache are not counted.
///
/// Forward: reads `u`, `delta`, `z` (`Bt·Dc·L` each), `B`, `C` (`Bt·G·L·N` each), `A`, `D`,
/// `delta_bias`; writes the output and the checkpoints (`Bt·Dc·N·(⌈L / chunk⌉ - 1)`).
/// Backward: reads `u`, `delta`, `z`, the output gradient, `B`, `C`, `A`, `D`, `delta_bias` and
/// the checkpoints; writes a gradient of the size of every input.
pub fn scan_bytes(
    batch: usize,
    channels: usize,
    len: usize,
    state: usize,
    groups: usize,
    chunk: usize,
    activation_bytes: usize,
) -> (u64, u64) {
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
