//! Which devices have the crate's fused kernels: the routing every op starts with.

use burn::backend::DispatchDevice;
use burn::tensor::Device;

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

/// What compiles the CubeCL kernels for CUDA devices in this build: LLVM's NVPTX backend
/// (cubecl-cuda's default) or, with the `cuda-nvrtc` feature, CUDA C++ through NVRTC.
pub const CUDA_KERNEL_COMPILER: &str = match cfg!(feature = "cuda-nvrtc") {
    true => "CUDA C++ through NVRTC",
    false => "LLVM (NVPTX)",
};

/// Whether `device` is a Flex device (with or without autodiff): where the fused CPU ops
/// ([`crate::cross_entropy`], [`crate::causal_conv1d_silu`], [`crate::rms_norm`],
/// [`crate::adamw_update`]) run; elsewhere they fall back to their tensor-op definitions.
pub(crate) fn on_flex(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// Whether `device` is a CubeCL device (with or without autodiff): where the products, the
/// attention, RMSNorm, the GELU gate and the conv run through `cube::ops`.
#[cfg(feature = "cube")]
pub(crate) fn on_cube(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Cube(_)
    )
}
