//! Causal attention on every device of this build (`zamba_kernels::kernel_devices`: Flex, and the
//! CubeCL CPU runtime with `--features cube-cpu`, CUDA with `cuda`): the device checks of
//! `zamba_kernels::device_checks::attention_checks`, also run by `zamba-train selftest`.

use zamba_kernels::device_checks::attention_checks;
use zamba_kernels::kernel_devices;

#[test]
fn device_checks_pass_on_every_device() {
    let mut failed = Vec::new();
    for device in kernel_devices() {
        for check in attention_checks(&device) {
            println!("{device:?}: {check}");
            if !check.is_passed() {
                failed.push(format!("{device:?}: {check}"));
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// The tile kernels' shapes on an H100 (warps of 32, 1,024 units and 227 KiB of shared memory per
/// cube) at zamba-1b's head dimension, as docs/architecture.md states, and the byte count behind
/// them: 2 planes × 16-row tiles forward need exactly 69,216 bytes.
#[cfg(feature = "cube")]
#[test]
fn tile_shapes_keep_the_most_planes_resident() {
    use zamba_kernels::attention_tile_shapes;
    let h100 = |shared| attention_tile_shapes(256, 2, 32, 1024, shared);
    assert_eq!(h100(232_448), Some([(2, 16), (4, 32), (1, 16)]));
    // Forward (2, 16): q (32 × 256 bf16) and its f32 accumulator, k and v tiles (16 × 256 bf16),
    // f32 scores and bf16 probabilities (32 × 16), m, l and the rescale (32 f32 each), 7 buffers
    // aligned to 32 bytes. One byte less and it no longer fits: (1, 32) is next.
    let forward = 32 * 256 * (2 + 4) + 2 * 16 * 256 * 2 + 32 * 16 * (4 + 2) + 3 * 32 * 4 + 7 * 32;
    assert_eq!(h100(forward).map(|s| s[0]), Some((2, 16)));
    assert_eq!(h100(forward - 1).map(|s| s[0]), Some((1, 32)));
    // A small head dimension: the largest shape (16 planes resident already).
    assert_eq!(
        attention_tile_shapes(16, 2, 32, 1024, 232_448).map(|s| s[0]),
        Some((4, 64))
    );
    // The CPU runtime's single-unit planes, two units per cube: at most 2 planes.
    let cpu = attention_tile_shapes(48, 2, 1, 2, 48 * 1024).expect("shapes fit");
    assert!(cpu.iter().all(|&(planes, _)| planes <= 2));
    // Too little shared memory for any shape: none (the row kernels run).
    assert_eq!(attention_tile_shapes(256, 2, 32, 1024, 4 * 1024), None);
}
