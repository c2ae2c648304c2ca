//! Which devices have the crate's fused kernels: the routing every op starts with.

use std::path::{Path, PathBuf};

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

/// CUDA's math library, relative to a toolkit root: the LLVM-compiled kernels link it for `exp`,
/// `log`, `tanh`, … (every kernel with a softmax, SiLU or the scan).
const LIBDEVICE: &str = "nvvm/libdevice/libdevice.10.bc";
/// Where cubecl-llvm looks for a toolkit when `CUDA_PATH` is unset (its `nvptx/libdevice.rs`): the
/// first of these holding `nvvm/libdevice`.
const CUDA_ROOTS: [&str; 4] = ["/usr/local/cuda", "/opt/cuda", "/usr/lib/cuda", "/usr"];

/// Why this build's CUDA kernels could not be compiled on this machine, if they could not: with
/// LLVM's NVPTX backend ([`CUDA_KERNEL_COMPILER`]) they link CUDA's libdevice, found as
/// cubecl-llvm finds it — under `cuda_path` (the `CUDA_PATH` variable) when given, else under the
/// first of the usual toolkit roots that has `nvvm/libdevice`. NVRTC builds need nothing here.
pub fn cuda_kernel_compiler_problem(cuda_path: Option<&Path>) -> Option<String> {
    if cfg!(feature = "cuda-nvrtc") {
        return None;
    }
    let root = match cuda_path {
        Some(root) => Some(root.to_path_buf()),
        None => CUDA_ROOTS
            .iter()
            .map(PathBuf::from)
            .find(|root| root.join("nvvm/libdevice").is_dir()),
    };
    if root
        .as_ref()
        .is_some_and(|root| root.join(LIBDEVICE).is_file())
    {
        return None;
    }
    let looked = match cuda_path {
        Some(root) => format!("CUDA_PATH ({})", root.display()),
        None => format!("CUDA_PATH (unset), {}", CUDA_ROOTS.join(", ")),
    };
    Some(format!(
        "CUDA's libdevice ({LIBDEVICE}) was not found in {looked}: this build compiles its CUDA \
         kernels with LLVM, which links it for exp, log and tanh. Set CUDA_PATH to a CUDA toolkit, \
         or `pip install nvidia-cuda-nvcc-cu12` and set CUDA_PATH to its \
         site-packages/nvidia/cuda_nvcc folder"
    ))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libdevice_under_cuda_path_is_found_and_its_absence_named() {
        let root = std::env::temp_dir().join(format!("zamba-libdevice-{}", std::process::id()));
        std::fs::create_dir_all(root.join("nvvm/libdevice")).unwrap();
        let problem = cuda_kernel_compiler_problem(Some(&root));
        if cfg!(feature = "cuda-nvrtc") {
            assert_eq!(problem, None);
        } else {
            let problem = problem.expect("no libdevice.10.bc yet");
            assert!(problem.contains(&root.display().to_string()), "{problem}");
            assert!(problem.contains("CUDA_PATH"), "{problem}");
        }
        std::fs::write(root.join(LIBDEVICE), b"BC").unwrap();
        assert_eq!(cuda_kernel_compiler_problem(Some(&root)), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
