//! RMSNorm (alone and of a residual sum), the GELU gate, the causal conv + SiLU, the
//! cross-entropy and AdamW on every device of this build (`zamba_kernels::kernel_devices`: Flex, and the CubeCL CPU runtime with
//! `--features cube-cpu`, CUDA with `cuda`): the device checks of
//! `zamba_kernels::device_checks::{norm_gate_checks, add_norm_checks, conv_checks,
//! cross_entropy_checks, adamw_checks}`, also
//! run by `zamba-train selftest`.

use zamba_kernels::device_checks::{
    adamw_checks, add_norm_checks, conv_checks, cross_entropy_checks, norm_gate_checks,
};
use zamba_kernels::kernel_devices;

#[test]
fn device_checks_pass_on_every_device() {
    let mut failed = Vec::new();
    for device in kernel_devices() {
        let mut checks = norm_gate_checks(&device);
        checks.extend(add_norm_checks(&device));
        checks.extend(conv_checks(&device));
        checks.extend(cross_entropy_checks(&device));
        checks.extend(adamw_checks(&device));
        for check in checks {
            println!("{device:?}: {check}");
            if !check.is_passed() {
                failed.push(format!("{device:?}: {check}"));
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
