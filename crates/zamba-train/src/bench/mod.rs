//! `zamba-train bench …`: the numbers behind docs/performance.md. Every figure is reported
//! against a peak measured in the same process (f32 GEMM GFLOP/s of the best library on the
//! machine, memory GB/s).

mod allreduce;
mod decode;
mod model;
mod overlap_probe;
mod predict;
mod report;
mod scan;
mod world;

use std::time::{Duration, Instant};

use anyhow::Result;
use burn::tensor::{DType, Device, Int, Tensor};
use clap::{Args, Subcommand};
use zamba_model::{Precision, random_tokens};
use zamba_train::device::{DeviceChoice, device_for};
use zamba_train::optim::AdamWParams;
use zamba_train::peak::{PEAK_SHAPES, PeakReport, measure_f32_peak};
use zamba_train::step::StepSettings;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The trainer's step on a model preset: tokens/s, GFLOP/s vs the f32 peak, scan share, memory.
    Model(model::ModelArgs),
    /// The fused selective-scan op alone vs its roofline, and vs the plain-tensor-op reference.
    Scan(scan::ScanArgs),
    /// The machine's f32 GEMM peak (Burn's matmul, the gemm crate, torch.matmul) and bandwidth.
    Peak(PeakArgs),
    /// All-reduce time and bandwidth of a communicator (nccl-tests' algbw and busbw).
    Allreduce(allreduce::AllreduceArgs),
    /// Recurrent decoding: time per generated token vs the length of the prefix already decoded.
    Decode(decode::DecodeArgs),
    /// The one-screen summary of a GPU check's output folder (scripts/gpu-check.sh).
    Report(report::ReportArgs),
}

#[derive(Args)]
pub struct PeakArgs {
    /// Skip torch.matmul (otherwise tried through `ZAMBA_TORCH_PYTHON`, else `python3`).
    #[arg(long)]
    no_torch: bool,
    /// Measure one `size³` product on this device (cpu, cuda, cuda:N, cube-cpu) through the
    /// model's GEMM path in `--precision`, next to torch.matmul on the same kind of device,
    /// instead of the CPU f32 table.
    #[arg(long)]
    device: Option<DeviceChoice>,
    /// fp32 or bf16 operands of the --device product.
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    /// Size of the --device product.
    #[arg(long, default_value_t = 8192)]
    size: usize,
    /// Also write the --device figures as JSON to this file.
    #[arg(long, requires = "device")]
    json: Option<std::path::PathBuf>,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    println!(
        "threads: {}, kernels SIMD: {:?}, load average: {}",
        rayon::current_num_threads(),
        zamba_kernels::simd_level(),
        load_average()
    );
    match cmd {
        BenchCommand::Peak(args) => match args.device {
            Some(device) => device_peak(&args, device),
            None => {
                Machine::measure(!args.no_torch).print();
                Ok(())
            }
        },
        BenchCommand::Scan(args) => scan::run(&args, &Machine::measure(false)),
        BenchCommand::Model(args) => model::run(&args),
        BenchCommand::Allreduce(args) => allreduce::run(&args),
        BenchCommand::Decode(args) => decode::run(&args),
        BenchCommand::Report(args) => report::run(&args),
    }
}

/// `/proc/loadavg`'s three averages (the machine may be shared; figures are noisy under load).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

/// Measured machine peaks: f32 GEMM (the best library) and memory bandwidth.
struct Machine {
    gemm: PeakReport,
    bandwidth_gbs: f64,
}

impl Machine {
    /// The GEMM peak of [`measure_f32_peak`]; bandwidth from a 256 MB copy (read + write).
    fn measure(with_torch: bool) -> Self {
        let gemm = measure_f32_peak(&PEAK_SHAPES, with_torch);
        let n = 64 << 20; // 64M floats = 256 MB
        let src = vec![1.0f32; n];
        let mut dst = vec![0.0f32; n];
        dst.copy_from_slice(&src);
        let reps = 5;
        let t = Instant::now();
        for _ in 0..reps {
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
        }
        let bandwidth_gbs = (2 * n * 4 * reps) as f64 / t.elapsed().as_secs_f64() / 1e9;
        Self {
            gemm,
            bandwidth_gbs,
        }
    }

    fn peak_gflops(&self) -> f64 {
        self.gemm.peak_gflops()
    }

    fn print(&self) {
        print!("{}", self.gemm.render());
        println!(
            "memory bandwidth (256 MB copy, read+write, one thread): {:.1} GB/s",
            self.bandwidth_gbs
        );
    }
}

/// `bench peak --device`: one large product through our GEMM path and through torch.matmul.
fn device_peak(args: &PeakArgs, choice: DeviceChoice) -> Result<()> {
    let device = device_for(choice, 0, args.precision)?;
    let dtype = compute_dtype(args.precision);
    let n = args.size;
    let ours = zamba_train::peak::measure_linear(&device, dtype, n).map_err(anyhow::Error::msg)?;
    let torch_device = match choice {
        DeviceChoice::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    };
    let torch = match args.no_torch {
        true => Err("not requested".to_string()),
        false => zamba_train::peak::measure_torch(
            rayon::current_num_threads(),
            &[(n, n, n)],
            &torch_device,
            &args.precision.to_string().replace("fp32", "f32"),
        ),
    };
    println!(
        "{n}×{n}×{n} {} product on {choice}: ours (zamba_kernels::linear) {ours:.1} GFLOP/s",
        args.precision
    );
    match &torch {
        Ok(m) => println!("  {}: {:.1} GFLOP/s", m.library, m.best()),
        Err(why) => println!("  torch.matmul not measured: {why}"),
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "device": choice.to_string(),
            "precision": args.precision.to_string(),
            "size": n,
            "ours_gflops": ours,
            "torch_gflops": torch.as_ref().ok().map(|m| m.best()),
            "torch_library": torch.as_ref().ok().map(|m| m.library.clone()),
            "torch_error": torch.as_ref().err(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

/// The dtype of matmuls and activations in `precision`.
fn compute_dtype(precision: Precision) -> DType {
    match precision {
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
    }
}

/// Waits for the device's queued work (a no-op on Flex).
fn sync(device: &burn::tensor::Device) {
    if let Err(e) = device.sync() {
        panic!("device {device:?} failed while benchmarking: {e:?}");
    }
}

fn time<F: FnMut()>(repeats: usize, mut f: F) -> Duration {
    f();
    let t = Instant::now();
    for _ in 0..repeats {
        f();
    }
    t.elapsed() / repeats as u32
}

/// A random batch shaped as the trainer feeds it: `rows` windows of `seq_len + 1` tokens, split
/// into the model's inputs (the first `seq_len`) and their next-token targets (the last
/// `seq_len`), so the model runs `seq_len` positions per row, every one of which is a counted
/// token.
fn random_batch(
    seed: u64,
    rows: usize,
    seq_len: usize,
    vocab: usize,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let tokens = random_tokens(seed, vocab, [rows, seq_len + 1], device);
    (
        tokens.clone().slice([0..rows, 0..seq_len]),
        tokens.slice([0..rows, 1..seq_len + 1]),
    )
}

/// The benchmark's step: a fixed LR, no clipping, no skipping, no stop requests.
pub(super) const BENCH_STEP: StepSettings<'static> = StepSettings {
    lr: 1e-4,
    clip_grad_norm: 0.0,
    skip: &|_, _| None,
    stop: None,
};

/// The AdamW hyper-parameters of the benchmarked steps (the quickstart's).
fn bench_adamw() -> AdamWParams {
    AdamWParams {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        decay_embeddings: false,
    }
}
