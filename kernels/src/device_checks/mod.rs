//! The fused kernels on a device against their oracles on the CPU: what the kernel tests run on
//! every device of a build, and what `zamba-train selftest` runs on a new machine. Each check is
//! named and carries the tolerance its comparison is entitled to, with the reason (see
//! [`crate::check::Arithmetic`]).
//!
//! - [`scan_checks`]: the selective scan against the CPU kernel;
//! - [`attention_checks`]: causal attention against Burn's attention (the plain-tensor
//!   definition, [`crate::causal_attention_reference`]) on the CPU;
//! - [`norm_gate_checks`]: RMSNorm and the GELU gate against their tensor-op definitions
//!   ([`crate::rms_norm_reference`], [`crate::gelu_mul_reference`]) on the CPU;
//! - [`add_norm_checks`]: RMSNorm of a residual sum against the add and
//!   [`crate::rms_norm_reference`] on the CPU;
//! - [`conv_checks`]: the causal conv + SiLU against its tensor-op definition
//!   ([`crate::causal_conv1d_silu_reference`]) on the CPU;
//! - [`cross_entropy_checks`]: the cross-entropy against its tensor-op definition
//!   ([`crate::cross_entropy_reference`]) on the CPU;
//! - [`adamw_checks`]: the AdamW update against its tensor-op definition
//!   ([`crate::adamw_update_reference`]) on the device and on the CPU, within an ulp.

mod adamw;
mod add_norm;
mod attention;
mod conv;
mod cross_entropy;
mod norm_gate;
mod scan;

pub use adamw::adamw_checks;
pub use add_norm::{AddNormCase, add_norm_checks};
pub use attention::{AttentionCase, AttentionRun, attention_checks};
pub use conv::{ConvCase, ConvRun, conv_checks};
pub use cross_entropy::{CrossEntropyCase, CrossEntropyRun, Ignored, cross_entropy_checks};
pub use norm_gate::{NormGateCase, NormGateOp, NormGateRun, norm_gate_checks};
pub use scan::{INPUT_NAMES, ScanCase, ScanRun, odd_sizes, scan_checks};

/// Rounds every value to the nearest bf16-representable one, so that a bf16 run and its f32
/// reference start from the same inputs.
fn round_to_bf16<'a>(inputs: impl IntoIterator<Item = &'a mut Vec<f32>>) {
    for x in inputs.into_iter().flatten() {
        *x = half::bf16::from_f32(*x).to_f32();
    }
}
