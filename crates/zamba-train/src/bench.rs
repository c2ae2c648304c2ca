//! `zamba-train bench …`: the numbers behind docs/performance.md. Every figure is reported
//! against a peak measured in the same process (f32 matmul GFLOP/s, memory GB/s).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use burn::module::Module;
use burn::tensor::{DType, Device, Distribution, Int, Tensor};
use clap::{Args, Subcommand};
use zamba_model::memory::ActivationMemory;
use zamba_model::params::{FlopsPerToken, ParamCounts};
use zamba_model::{
    ActivationCheckpointing, Execution, Precision, RandomInit, ZambaConfig, ZambaModel,
    next_token_loss,
};

use zamba_train::device::{DeviceChoice, device_for};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Forward+backward of a model preset: tokens/s, GFLOP/s vs the matmul peak, scan share, memory.
    Model(ModelArgs),
    /// The fused selective-scan op alone vs its roofline, and vs the plain-tensor-op reference;
    /// with `--device`, that device's kernel next to the CPU kernel.
    Scan(ScanArgs),
    /// The machine's f32 matmul peak and memory bandwidth as this build sees them.
    Peak,
}

#[derive(Args)]
pub struct ModelArgs {
    #[arg(long, default_value = "zamba-bench")]
    preset: String,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Measured steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// cpu, cuda, cuda:N or cube-cpu (see runtime.device).
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// fp32 or bf16 (see runtime.precision).
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    /// none or layers (see train.activation_checkpointing).
    #[arg(long, default_value = "none")]
    activation_checkpointing: ActivationCheckpointing,
    /// The device's peak GFLOP/s for the MFU figure (e.g. 989000 for an H100/H200's dense bf16).
    /// Default on the `cpu` device: the f32 matmul peak measured through Flex.
    #[arg(long)]
    peak_gflops: Option<f64>,
}

#[derive(Args)]
pub struct ScanArgs {
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 512)]
    channels: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    #[arg(long, default_value_t = 16)]
    state: usize,
    #[arg(long, default_value_t = 2)]
    groups: usize,
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Also time the fused kernel of this device (cuda, cuda:N, cube-cpu) next to the CPU kernel.
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    println!("threads: {}", rayon::current_num_threads());
    match cmd {
        BenchCommand::Peak => {
            let peak = Peak::measure();
            peak.print();
            Ok(())
        }
        BenchCommand::Scan(args) => bench_scan(&args, &Peak::measure()),
        BenchCommand::Model(args) => bench_model(&args),
    }
}

/// Measured machine peaks.
struct Peak {
    matmul_gflops: f64,
    bandwidth_gbs: f64,
}

impl Peak {
    /// f32 matmul: the best of square products through Burn's CPU backend (the `gemm` crate, all
    /// threads). Bandwidth: a large copy (read + write) through the same backend.
    fn measure() -> Self {
        let device = Device::flex();
        let mut best: f64 = 0.0;
        for n in [512usize, 1024, 2048] {
            let a = Tensor::<2>::random([n, n], Distribution::Default, &device);
            let b = Tensor::<2>::random([n, n], Distribution::Default, &device);
            let _ = a.clone().matmul(b.clone()).into_data();
            let reps = if n >= 2048 { 3 } else { 8 };
            let t = Instant::now();
            for _ in 0..reps {
                let _ = a.clone().matmul(b.clone()).into_data();
            }
            let secs = t.elapsed().as_secs_f64() / reps as f64;
            best = best.max(2.0 * (n * n * n) as f64 / secs / 1e9);
        }
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
            matmul_gflops: best,
            bandwidth_gbs,
        }
    }

    fn print(&self) {
        println!(
            "f32 matmul peak (best of 512³/1024³/2048³ through burn-flex gemm): {:.1} GFLOP/s",
            self.matmul_gflops
        );
        println!(
            "memory bandwidth (256 MB copy, read+write, one thread): {:.1} GB/s",
            self.bandwidth_gbs
        );
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

/// The scan's problem size.
#[derive(Clone, Copy)]
struct ScanShape {
    batch: usize,
    channels: usize,
    len: usize,
    state: usize,
    groups: usize,
}

fn bench_scan(a: &ScanArgs, peak: &Peak) -> Result<()> {
    if a.channels % a.groups != 0 {
        bail!(
            "--channels {} must be divisible by --groups {}",
            a.channels,
            a.groups
        );
    }
    let shape = ScanShape {
        batch: a.batch,
        channels: a.channels,
        len: a.seq_len,
        state: a.state,
        groups: a.groups,
    };
    let device = device_for(a.device, Precision::Fp32)?;
    peak.print();
    println!(
        "selective_scan B={} D={} L={} N={} G={}",
        a.batch, a.channels, a.seq_len, a.state, a.groups
    );
    let flex = Device::flex();
    let cpu = scan_times(&flex, shape, DType::F32, a.repeats, false)?;
    let reference = scan_times(&flex, shape, DType::F32, 1, true)?;
    print_scan_rows("CPU kernel (cpu)", &flex, shape, cpu, Some(reference), peak);
    if device != flex {
        let times = scan_times(&device, shape, DType::F32, a.repeats, false)?;
        let name = format!("fused kernel ({})", a.device);
        print_scan_rows(&name, &device, shape, times, None, peak);
        println!(
            "  forward+backward: {:.2}x the CPU kernel's time",
            (times.0 + times.1).as_secs_f64() / (cpu.0 + cpu.1).as_secs_f64()
        );
    }
    Ok(())
}

/// Forward and forward+backward rows: time, GFLOP/s, GB/s, share of the roofline (the measured
/// CPU peaks), and the plain-tensor-op reference's time where given.
fn print_scan_rows(
    name: &str,
    device: &Device,
    s: ScanShape,
    (fwd, bwd): (Duration, Duration),
    reference: Option<(Duration, Duration)>,
    peak: &Peak,
) {
    let chunk = zamba_kernels::scan_chunk(device, s.state).unwrap_or(1);
    let (flops_f, flops_b) = zamba_kernels::scan_flops(s.batch, s.channels, s.len, s.state);
    let (bytes_f, bytes_b) =
        zamba_kernels::scan_bytes(s.batch, s.channels, s.len, s.state, s.groups, chunk);
    let [flops_f, flops_b, bytes_f, bytes_b] =
        [flops_f, flops_b, bytes_f, bytes_b].map(|v| v as f64);
    println!("{name}:");
    let rows = [
        ("forward", fwd, flops_f, bytes_f, reference.map(|r| r.0)),
        (
            "forward+backward",
            fwd + bwd,
            flops_f + flops_b,
            bytes_f + bytes_b,
            reference.map(|r| r.0 + r.1),
        ),
    ];
    for (row, t, flops, bytes, reference) in rows {
        let secs = t.as_secs_f64();
        let roofline = (flops / (peak.matmul_gflops * 1e9)).max(bytes / (peak.bandwidth_gbs * 1e9));
        let versus = reference
            .map(|r| {
                format!(
                    "  reference ops {:.1} ms ({:.0}x slower)",
                    r.as_secs_f64() * 1e3,
                    r.as_secs_f64() / secs
                )
            })
            .unwrap_or_default();
        println!(
            "  {row:<17} {:>9.3} ms  {:>6.2} GFLOP/s  {:>6.2} GB/s  roofline {:.3} ms ({:.0}% of roofline){versus}",
            secs * 1e3,
            flops / secs / 1e9,
            bytes / secs / 1e9,
            roofline * 1e3,
            100.0 * roofline / secs,
        );
    }
}

/// (forward, backward) time of one scan call on `device` with inputs that all require gradients;
/// the activations (`u, delta, b, c, z`) in `dtype`, the parameters f32.
fn scan_times(
    device: &Device,
    s: ScanShape,
    dtype: DType,
    repeats: usize,
    reference: bool,
) -> Result<(Duration, Duration)> {
    let rand = |shape: Vec<usize>, lo: f64, hi: f64| {
        Tensor::<1>::random(
            [shape.iter().product::<usize>()],
            Distribution::Uniform(lo, hi),
            device,
        )
    };
    let ScanShape {
        batch,
        channels,
        len,
        state,
        groups,
    } = s;
    let act = |t: Tensor<1>| t.cast(dtype);
    let rows = [batch, channels, len];
    let bc = [batch, groups, len, state];
    let u = act(rand(rows.to_vec(), -1.0, 1.0)).reshape(rows);
    let delta = act(rand(rows.to_vec(), -3.0, 0.0)).reshape(rows);
    let a = rand(vec![channels, state], -2.0, -0.1).reshape([channels, state]);
    let b = act(rand(bc.to_vec(), -1.0, 1.0)).reshape(bc);
    let c = act(rand(bc.to_vec(), -1.0, 1.0)).reshape(bc);
    let d = rand(vec![channels], 0.5, 1.5);
    let z = act(rand(rows.to_vec(), -1.0, 1.0)).reshape(rows);
    let bias = rand(vec![channels], -1.0, 0.0);
    let scan = if reference {
        zamba_kernels::selective_scan_reference
    } else {
        zamba_kernels::selective_scan
    };
    let forward = || {
        scan(
            u.clone().autodiff().require_grad(),
            delta.clone().autodiff().require_grad(),
            a.clone().autodiff().require_grad(),
            b.clone().autodiff().require_grad(),
            c.clone().autodiff().require_grad(),
            d.clone().autodiff().require_grad(),
            z.clone().autodiff().require_grad(),
            bias.clone().autodiff().require_grad(),
        )
    };
    let fwd = time(repeats, || {
        let _ = forward().inner().into_data();
    });
    let total = time(repeats, || {
        let grads = forward().sum().backward();
        std::hint::black_box(grads);
        sync(device);
    });
    Ok((fwd, total.saturating_sub(fwd)))
}

/// Waits for the device's queued work (a no-op on Flex).
fn sync(device: &Device) {
    if let Err(e) = device.sync() {
        panic!("device {device:?} failed while benchmarking: {e:?}");
    }
}

fn bench_model(a: &ModelArgs) -> Result<()> {
    let config = ZambaConfig::preset(&a.preset)?;
    let device = device_for(a.device, a.precision)?;
    let peak_gflops = match (a.peak_gflops, a.device) {
        (Some(peak), _) => Some(peak),
        (None, DeviceChoice::Cpu) => {
            let peak = Peak::measure();
            peak.print();
            Some(peak.matmul_gflops)
        }
        (None, _) => None,
    };
    let execution = Execution {
        precision: a.precision,
        checkpointing: a.activation_checkpointing,
    };
    let autodiff = device.clone().autodiff();
    let model = ZambaModel::from_source(&config, &mut RandomInit::new(0), &autodiff)?
        .with_execution(execution);
    let tokens = Tensor::<2, Int>::random(
        [a.batch, a.seq_len + 1],
        Distribution::Uniform(0.0, config.vocab_size as f64),
        &autodiff,
    );
    reset_peak_rss();
    let step = || {
        let logits = model.forward(tokens.clone());
        let loss = next_token_loss(logits, tokens.clone());
        let grads = loss.backward();
        std::hint::black_box(grads);
        sync(&device);
    };
    let step_time = time(a.steps, step).as_secs_f64();
    let rss = peak_rss_bytes();
    let pool = device_pool_peak_bytes(&device);
    let forward_time = time(a.steps, || {
        let _ = model.valid().forward(tokens.clone().inner()).into_data();
    })
    .as_secs_f64();

    let tokens_per_step = (a.batch * a.seq_len) as f64;
    let flops = FlopsPerToken::of(&config, a.seq_len);
    let tok_s = tokens_per_step / step_time;
    let achieved = flops.train() * tok_s / 1e9;
    let scan_shape = ScanShape {
        batch: a.batch,
        channels: config.d_inner(),
        len: a.seq_len + 1,
        state: config.mamba_d_state,
        groups: config.n_mamba_heads,
    };
    let act = match a.precision {
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
    };
    let (scan_f, scan_b) = scan_times(&device, scan_shape, act, a.steps, false)?;
    // With per-layer recomputation every layer's scan runs forward twice.
    let forwards = match a.activation_checkpointing {
        ActivationCheckpointing::None => 1.0,
        ActivationCheckpointing::Layers => 2.0,
    };
    let scan_step = forwards * scan_f.as_secs_f64() + scan_b.as_secs_f64();
    let scan_share = config.num_hidden_layers as f64 * scan_step / step_time;
    let params = ParamCounts::of(&config).total() as f64;
    println!(
        "model {} ({} parameters), batch {} × seq {}, device {}, precision {}, activation checkpointing {}",
        a.preset, params, a.batch, a.seq_len, a.device, a.precision, a.activation_checkpointing
    );
    println!(
        "  train step (fwd+bwd): {:.3} s  → {:.0} tokens/s",
        step_time, tok_s
    );
    println!(
        "  inference forward:    {:.3} s  → {:.0} tokens/s",
        forward_time,
        tokens_per_step / forward_time
    );
    let mfu = peak_gflops
        .map(|peak| format!(" = {:.1}% of {peak:.0} GFLOP/s", 100.0 * achieved / peak))
        .unwrap_or_else(|| " (give --peak-gflops for MFU)".into());
    println!(
        "  model FLOPs/token (train, 3× fwd): {:.3e} → {:.2} GFLOP/s{mfu}",
        flops.train(),
        achieved,
    );
    println!(
        "  selective scan share of the step: {:.1}%",
        100.0 * scan_share
    );
    let estimate = ActivationMemory::of(
        &config,
        a.batch,
        a.seq_len + 1,
        a.precision,
        a.activation_checkpointing,
    );
    let states = 8.0 * params;
    let measured = match (pool, rss) {
        (Some(pool), _) => format!("device memory pool peak {:.1} MB", pool as f64 / 1e6),
        (None, Some(rss)) => format!("peak RSS during the steps {:.1} MB", rss as f64 / 1e6),
        (None, None) => "peak memory not measurable here".into(),
    };
    println!(
        "  {measured}; estimate: parameters+gradients {:.1} MB (8 B/param; training adds AdamW's 8 B/param) + activations {:.1} MB",
        states / 1e6,
        estimate.peak() / 1e6
    );
    Ok(())
}

/// The peak of the device's memory pools since the process started (CubeCL devices); None
/// elsewhere.
fn device_pool_peak_bytes(device: &Device) -> Option<u64> {
    let pools = device.memory_pool_report()?;
    Some(pools.iter().map(|p| p.pages_peak * p.page_size).sum())
}

/// Restarts the peak-RSS count (Linux: `5` to `/proc/self/clear_refs`), so that the next reading
/// covers what follows, not the peak measurement's buffers.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// VmHWM from /proc (Linux); None elsewhere.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
