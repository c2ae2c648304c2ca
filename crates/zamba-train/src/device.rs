//! Where the model runs: the Burn device of a `runtime.device` / `--device` value, with a clear
//! error (before Burn would panic) when this build lacks the backend or the machine lacks the
//! device.

use anyhow::{Result, bail};
use burn::tensor::{DType, Device};
use zamba_model::Precision;

pub use crate::config::Device as DeviceChoice;

/// The Burn device of `choice` (without autodiff).
pub fn make_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::flex()),
        DeviceChoice::CubeCpu => cube_cpu(),
        DeviceChoice::Cuda(i) => cuda(i),
    }
}

#[cfg(feature = "cube-cpu")]
fn cube_cpu() -> Result<Device> {
    Ok(Device::cpu())
}

#[cfg(not(feature = "cube-cpu"))]
fn cube_cpu() -> Result<Device> {
    bail!(
        "device \"cube-cpu\" needs a build with `--features cube-cpu` (run scripts/prepare-llvm.sh \
         once first; see README)"
    )
}

#[cfg(feature = "cuda")]
fn cuda(index: usize) -> Result<Device> {
    // Constructing a CUDA device panics where the driver is missing; listing them does not.
    let found = Device::enumerate(burn::tensor::DeviceType::Cuda)
        .into_vec()
        .len();
    if index >= found {
        bail!(
            "device \"cuda:{index}\" is not available: this machine has {found} CUDA device(s) visible \
             (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
        );
    }
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda(index: usize) -> Result<Device> {
    bail!(
        "device \"cuda:{index}\" needs a build with `--features cuda` (run scripts/prepare-llvm.sh \
         once first; see README)"
    )
}

/// Checks that `device` can compute in `precision`.
pub fn check_precision(device: &Device, choice: DeviceChoice, precision: Precision) -> Result<()> {
    if precision == Precision::Bf16 && !device.supports_dtype(DType::BF16) {
        bail!(
            "precision \"bf16\" is not supported on device \"{choice}\"; use precision \"fp32\""
        );
    }
    Ok(())
}

/// The device of `choice`, checked for `precision`: what every command that runs the model
/// starts from.
pub fn device_for(choice: DeviceChoice, precision: Precision) -> Result<Device> {
    let device = make_device(choice)?;
    check_precision(&device, choice, precision)?;
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available_and_computes_bf16() {
        assert_eq!(
            device_for(DeviceChoice::Cpu, Precision::Bf16).unwrap(),
            Device::flex()
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build() {
        let e = make_device(DeviceChoice::Cuda(1)).unwrap_err().to_string();
        assert!(e.contains("cuda:1") && e.contains("--features cuda"), "{e}");
    }

    #[cfg(not(feature = "cube-cpu"))]
    #[test]
    fn cube_cpu_without_the_feature_says_how_to_build() {
        let e = make_device(DeviceChoice::CubeCpu).unwrap_err().to_string();
        assert!(e.contains("--features cube-cpu"), "{e}");
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn absent_cuda_device_is_an_error_not_a_panic() {
        let e = make_device(DeviceChoice::Cuda(4096)).unwrap_err().to_string();
        assert!(e.contains("cuda:4096") && e.contains("not available"), "{e}");
    }

    #[cfg(feature = "cube-cpu")]
    #[test]
    fn cube_cpu_with_the_feature() {
        assert_eq!(make_device(DeviceChoice::CubeCpu).unwrap(), Device::cpu());
    }
}
