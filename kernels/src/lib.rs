//! Fused kernels of a Zamba training step for Burn 0.22. On Flex (the CPU) each op is one
//! multi-threaded, vectorised pass where tensor ops take several single-threaded ones; on Burn's
//! CubeCL backend (features `cuda`, `cube-cpu`) the scan, attention, RMSNorm, the GELU gate,
//! the conv, the cross-entropy and AdamW run `#[cube]` kernels and the products use the
//! runtime's own matmul routine. Each op also has
//! its tensor-op definition (`*_reference`): the fallback on devices without the kernel, and what
//! the tests compare it with.
//!
//! - [`selective_scan`], the Mamba-1 recurrence, in the [`scan`] module (its formula, layout,
//!   memory, determinism and backends);
//! - [`linear`] and [`per_head_matmul`] (direct GEMMs on strided operands), [`causal_attention`],
//!   [`gelu_mul`], [`cross_entropy`], [`causal_conv1d_silu`], [`rms_norm`] and [`add_rms_norm`], each with a
//!   hand-written backward; [`adamw_update`], the optimizer step;
//! - [`recompute`]: a block of the model recomputed in the backward (activation checkpointing);
//! - [`device_checks`]: the Cube kernels on a device against the CPU kernel or the tensor-op
//!   definitions (the tests, `selftest`);
//!   [`kernel_devices`]: the devices of this build that have the kernels.

mod adamw;
mod attention;
mod backward_span;
pub mod check;
mod conv;
mod cross_entropy;
#[cfg(feature = "cube")]
mod cube;
mod device;
pub mod device_checks;
mod dtype;
mod gelu;
mod heads;
mod host;
mod linear;
mod recompute;
mod rms_norm;
pub mod scan;
mod simd;
mod strided;

pub use adamw::{AdamWHyper, adamw_update, adamw_update_reference, adamw_update_with_working};
#[cfg(feature = "cube")]
pub use attention::cube_attention_kernels;
pub use attention::{causal_attention, causal_attention_reference};
pub use backward_span::{BlockEdge, mark_backward_span};
pub use conv::{CONV_CUBE_CHUNK, causal_conv1d_silu, causal_conv1d_silu_reference};
pub use cross_entropy::{IGNORE_INDEX, cross_entropy, cross_entropy_reference};
#[cfg(feature = "cube")]
pub use cube::attention_tile_shapes;
#[cfg(feature = "cube")]
pub(crate) use device::on_cube;
pub(crate) use device::on_flex;
pub use device::{CUDA_KERNEL_COMPILER, cuda_kernel_compiler_problem, kernel_devices};
pub use dtype::expect_same_dtype;
pub use gelu::{gelu_mul, gelu_mul_reference};
pub use heads::{per_head_matmul, per_head_matmul_reference, per_head_matmul_transposed};
pub use linear::{linear, linear_channels_first, linear_reference};
pub use rms_norm::{
    RMS_NORM_CUBE_BLOCKS, add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference,
};
pub use scan::{
    ScanInputs, ScanShape, cube_scan_chunk, fused_kernel_available, scan_bytes, scan_chunk,
    scan_flops, scan_lane_ops, selective_scan, selective_scan_reference,
};
pub use simd::{SIMD_ENV, SimdLevel, detected_simd_level, simd_level};

pub use recompute::{MAX_SEGMENT_INPUTS, Segment, recompute};
