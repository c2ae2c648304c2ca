//! Where the model runs: the Burn device of a `runtime.device` / `--device` value, with a clear
//! error (before Burn would panic) when this build lacks the backend or the machine lacks the
//! device.

use anyhow::{Result, bail};
use burn::tensor::{DType, Device};
use zamba_model::Precision;
use zamba_model::memory::AttentionKernel;

pub use crate::config::Device as DeviceChoice;

/// The Burn device of `choice` (without autodiff) for the process's `local_rank`-th rank on this
/// node: `"cuda:N"` is the first GPU of the node's ranks, which take consecutive GPUs.
pub fn make_device(choice: DeviceChoice, local_rank: usize) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::flex()),
        DeviceChoice::CubeCpu => cube_cpu(),
        DeviceChoice::Cuda(first) => cuda(first, local_rank),
    }
}

/// The attention kernel `choice` runs, whose memory the estimates count (decided by the device
/// alone, so a dry run away from the device estimates it too): the flash-style op on CubeCL
/// devices, the op that keeps the probabilities on the CPU (see `zamba_kernels::causal_attention`).
pub fn attention_kernel(choice: DeviceChoice) -> AttentionKernel {
    match choice {
        DeviceChoice::Cpu => AttentionKernel::Scores,
        DeviceChoice::CubeCpu | DeviceChoice::Cuda(_) => AttentionKernel::Flash,
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
fn cuda(first: usize, local_rank: usize) -> Result<Device> {
    let index = first + local_rank;
    // Constructing a CUDA device panics where the driver is missing; listing them does not.
    let found = Device::enumerate(burn::tensor::DeviceType::Cuda)
        .into_vec()
        .len();
    if index >= found {
        let rank = match local_rank {
            0 => String::new(),
            r => format!(" (\"cuda:{first}\" + local rank {r})"),
        };
        bail!(
            "device \"cuda:{index}\"{rank} is not available: this machine has {found} CUDA device(s) \
             visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
        );
    }
    let cuda_path = std::env::var_os("CUDA_PATH").map(std::path::PathBuf::from);
    if let Some(problem) = zamba_kernels::cuda_kernel_compiler_problem(cuda_path.as_deref()) {
        bail!("device \"cuda:{index}\": {problem}");
    }
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda(first: usize, _local_rank: usize) -> Result<Device> {
    bail!(
        "device \"cuda:{first}\" needs a build with `--features cuda` (run scripts/prepare-llvm.sh \
         once first; see README)"
    )
}

/// What compiles the CubeCL kernels `choice` runs, where this build chooses it (CUDA devices).
pub fn kernel_compiler(choice: DeviceChoice) -> Option<&'static str> {
    match choice {
        DeviceChoice::Cuda(_) => Some(zamba_kernels::CUDA_KERNEL_COMPILER),
        DeviceChoice::Cpu | DeviceChoice::CubeCpu => None,
    }
}

/// Which attention kernels a model of attention head dimension `head_dim` runs on `device` in
/// `precision`: on CubeCL devices the tile or row kernels of `zamba_kernels`; `None` on the CPU.
pub fn attention_kernels(
    device: &Device,
    precision: Precision,
    head_dim: usize,
) -> Option<&'static str> {
    #[cfg(any(feature = "cuda", feature = "cube-cpu"))]
    return zamba_kernels::cube_attention_kernels(device, precision.dtype(), head_dim);
    #[cfg(not(any(feature = "cuda", feature = "cube-cpu")))]
    {
        let _ = (device, precision, head_dim);
        None
    }
}

/// Checks that `device` can compute in `precision`.
pub fn check_precision(device: &Device, choice: DeviceChoice, precision: Precision) -> Result<()> {
    if precision == Precision::Bf16 && !device.supports_dtype(DType::BF16) {
        bail!("precision \"bf16\" is not supported on device \"{choice}\"; use precision \"fp32\"");
    }
    Ok(())
}

/// The device of `choice` for local rank `local_rank` (0 for single-process commands), checked
/// for `precision`: what every command that runs the model starts from.
pub fn device_for(choice: DeviceChoice, local_rank: usize, precision: Precision) -> Result<Device> {
    let device = make_device(choice, local_rank)?;
    check_precision(&device, choice, precision)?;
    Ok(device)
}

/// Training tokens above which a run on `cube-cpu` is more than a smoke test.
const CUBE_CPU_SMOKE_TOKENS: u64 = 1 << 16;

/// `cube-cpu` runs the GPU kernels through LLVM on the CPU to verify them: every kernel launch
/// costs a fraction of a millisecond there, so a run of real length is almost surely a config
/// mistake (`"cpu"` was meant) — worth a warning, not an error.
pub fn cube_cpu_warning(choice: DeviceChoice, total_tokens: u64) -> Option<String> {
    (choice == DeviceChoice::CubeCpu && total_tokens > CUBE_CPU_SMOKE_TOKENS).then(|| {
        format!(
            "warning: runtime.device = \"cube-cpu\" trains {total_tokens} tokens; cube-cpu verifies the GPU \
             kernels on the CPU and runs many times slower than runtime.device = \"cpu\" (docs/performance.md); \
             use \"cpu\" to train on this machine"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available_and_computes_bf16() {
        assert_eq!(
            device_for(DeviceChoice::Cpu, 0, Precision::Bf16).unwrap(),
            Device::flex()
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build() {
        let e = make_device(DeviceChoice::Cuda(1), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cuda:1") && e.contains("--features cuda"), "{e}");
    }

    #[cfg(not(feature = "cube-cpu"))]
    #[test]
    fn cube_cpu_without_the_feature_says_how_to_build() {
        let e = make_device(DeviceChoice::CubeCpu, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--features cube-cpu"), "{e}");
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn absent_cuda_device_is_an_error_not_a_panic() {
        let e = make_device(DeviceChoice::Cuda(4096), 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cuda:4096") && e.contains("not available"),
            "{e}"
        );
    }

    #[cfg(feature = "cube-cpu")]
    #[test]
    fn cube_cpu_with_the_feature() {
        assert_eq!(
            make_device(DeviceChoice::CubeCpu, 0).unwrap(),
            Device::cpu()
        );
    }

    #[test]
    fn a_long_cube_cpu_run_is_warned_about_and_a_smoke_test_is_not() {
        assert!(cube_cpu_warning(DeviceChoice::CubeCpu, CUBE_CPU_SMOKE_TOKENS).is_none());
        let w = cube_cpu_warning(DeviceChoice::CubeCpu, 614_400).unwrap();
        assert!(w.contains("614400") && w.contains("\"cpu\""), "{w}");
        assert!(cube_cpu_warning(DeviceChoice::Cpu, 614_400).is_none());
        assert!(cube_cpu_warning(DeviceChoice::Cuda(0), 614_400).is_none());
    }
}
