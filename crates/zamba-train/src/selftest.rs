//! `zamba-train selftest --device D`: the kernel and model device checks the test suite runs
//! (`zamba_kernels::device_checks`, `zamba_model::device_checks`), run from the binary on the
//! machine at hand — the first thing to run on a new cluster, and what the GPU check runs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use zamba_kernels::check::Check;
use zamba_model::Precision;

use crate::device::{DeviceChoice, device_for};

#[derive(Args)]
pub struct SelftestArgs {
    /// The device to check (cpu, cube-cpu, cuda, cuda:N); its results are compared with the CPU
    /// kernels (Flex).
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// Run only these groups of checks (repeatable; default: all).
    #[arg(long = "only", value_enum)]
    only: Vec<Group>,
    /// Folder holding the transformers fixture (`zamba-tiny-h2`); default: `fixtures/` next to
    /// the binary (the GPU bundle's layout), else the source tree's `tests/fixtures`.
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Print the devices this build can use on this machine, best first (CUDA, cube-cpu, cpu),
    /// one per line, and exit.
    #[arg(long, exclusive = true)]
    list_devices: bool,
}

/// Groups of checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    /// The fused selective scan against the CPU kernel and the fused causal attention against
    /// Burn's attention on the CPU: f32 on odd sizes, bf16, determinism.
    Kernels,
    /// The whole model: vs Flex, layer recomputation, transformers' logits, bf16 vs fp32.
    Model,
}

/// One check's result, as written to JSON.
#[derive(Serialize)]
struct CheckRecord {
    group: Group,
    name: String,
    passed: bool,
    detail: String,
}

#[derive(Serialize)]
struct Report {
    device: String,
    passed: usize,
    failed: usize,
    checks: Vec<CheckRecord>,
}

pub fn run(args: SelftestArgs) -> Result<()> {
    if args.list_devices {
        for device in available_devices() {
            println!("{device}");
        }
        return Ok(());
    }
    let device = device_for(args.device, 0, Precision::Fp32)?;
    if !zamba_kernels::fused_kernel_available(&device) {
        bail!(
            "device \"{}\" has no fused kernels to check in this build",
            args.device
        );
    }
    let fixtures = fixtures_dir(args.fixtures)?;
    let groups = match args.only.is_empty() {
        true => vec![Group::Kernels, Group::Model],
        false => args.only,
    };
    let compiler = crate::device::kernel_compiler(args.device)
        .map_or(String::new(), |c| format!(", kernels compiled by {c}"));
    println!("selftest on {} ({device:?}{compiler})", args.device);
    let mut records = Vec::new();
    for group in groups {
        let checks = match group {
            Group::Kernels => {
                let mut checks = zamba_kernels::device_checks::scan_checks(&device);
                checks.extend(zamba_kernels::device_checks::attention_checks(&device));
                checks.extend(zamba_kernels::device_checks::norm_gate_checks(&device));
                checks.extend(zamba_kernels::device_checks::add_norm_checks(&device));
                checks.extend(zamba_kernels::device_checks::conv_checks(&device));
                checks.extend(zamba_kernels::device_checks::cross_entropy_checks(&device));
                checks.extend(zamba_kernels::device_checks::adamw_checks(&device));
                checks
            }
            Group::Model => zamba_model::device_checks::model_checks(&device, &fixtures),
        };
        for check in checks {
            println!("{check}");
            records.push(record(group, check));
        }
    }
    let failed = records.iter().filter(|r| !r.passed).count();
    let report = Report {
        device: args.device.to_string(),
        passed: records.len() - failed,
        failed,
        checks: records,
    };
    println!(
        "selftest on {}: {} passed, {} failed",
        report.device, report.passed, report.failed
    );
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if failed > 0 {
        bail!("{failed} check(s) failed on {}", report.device);
    }
    Ok(())
}

/// The devices of this build present on this machine, best first.
pub fn available_devices() -> Vec<DeviceChoice> {
    #[allow(unused_mut)]
    let mut devices = Vec::new();
    #[cfg(feature = "cuda")]
    {
        let count = burn::tensor::Device::enumerate(burn::tensor::DeviceType::Cuda)
            .into_vec()
            .len();
        devices.extend((0..count).map(DeviceChoice::Cuda));
    }
    #[cfg(feature = "cube-cpu")]
    devices.push(DeviceChoice::CubeCpu);
    devices.push(DeviceChoice::Cpu);
    devices
}

fn record(group: Group, check: Check) -> CheckRecord {
    let (passed, detail) = match check.outcome {
        Ok(detail) => (true, detail),
        Err(reason) => (false, reason),
    };
    CheckRecord {
        group,
        name: check.name,
        passed,
        detail,
    }
}

/// `--fixtures`, else `fixtures/` next to the binary, else the source tree's.
fn fixtures_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    let fixture = zamba_model::device_checks::FIXTURE;
    let candidates: Vec<PathBuf> = match given {
        Some(dir) => vec![dir],
        None => {
            let beside_binary = std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join("fixtures")));
            let source_tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
            beside_binary.into_iter().chain([source_tree]).collect()
        }
    };
    candidates
        .iter()
        .find(|dir| dir.join(fixture).join("model.safetensors").is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no folder holding the fixture {fixture}/ among {}; pass --fixtures DIR (the \
                 repository's tests/fixtures, or the GPU bundle's fixtures/)",
                candidates
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}
