//! `zamba-train bench …`: the numbers behind docs/performance.md. Every figure is reported
//! against a peak measured in the same process (f32 GEMM GFLOP/s of the best library on the
//! machine, memory GB/s).

mod allreduce;
mod decode;
mod model;
mod scan;
mod world;

use std::time::{Duration, Instant};

use anyhow::Result;
use burn::tensor::{Device, Distribution, Int, Tensor};
use clap::{Args, Subcommand};
use zamba_train::optim::AdamWParams;
use zamba_train::peak::{PEAK_SHAPES, PeakReport, measure_f32_peak};

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
}

#[derive(Args)]
pub struct PeakArgs {
    /// Skip torch.matmul (otherwise tried through `ZAMBA_TORCH_PYTHON`, else `python3`).
    #[arg(long)]
    no_torch: bool,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    println!(
        "threads: {}, kernels SIMD: {:?}, load average: {}",
        rayon::current_num_threads(),
        zamba_kernels::simd_level(),
        load_average()
    );
    match cmd {
        BenchCommand::Peak(args) => {
            Machine::measure(!args.no_torch).print();
            Ok(())
        }
        BenchCommand::Scan(args) => scan::run(&args, &Machine::measure(false)),
        BenchCommand::Model(args) => model::run(&args),
        BenchCommand::Allreduce(args) => allreduce::run(&args),
        BenchCommand::Decode(args) => decode::run(&args),
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
    rows: usize,
    seq_len: usize,
    vocab: usize,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let tokens = Tensor::<2, Int>::random(
        [rows, seq_len + 1],
        Distribution::Uniform(0.0, vocab as f64),
        device,
    );
    (
        tokens.clone().slice([0..rows, 0..seq_len]),
        tokens.slice([0..rows, 1..seq_len + 1]),
    )
}

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
