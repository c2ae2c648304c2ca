//! The model on every device of this build (`zamba_kernels::kernel_devices`: Flex, and the CubeCL
//! CPU runtime with `--features cube-cpu`, CUDA with `cuda`): the device checks of
//! `zamba_model::device_checks` (also run by `zamba-train selftest`) — a whole forward/backward
//! equals Flex's, per-layer recomputation gives the same gradients as keeping every activation,
//! the logits equal transformers', and bf16 mixed precision stays close to fp32 and hands f32
//! gradients to the f32 master weights.

use std::path::Path;

use zamba_kernels::kernel_devices;
use zamba_model::device_checks::model_checks;

#[test]
fn device_checks_pass_on_every_device() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let mut failed = Vec::new();
    for device in kernel_devices() {
        for check in model_checks(&device, &fixtures) {
            println!("{device:?}: {check}");
            if !check.is_passed() {
                failed.push(format!("{device:?}: {check}"));
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
