//! `zamba-train bench …`: the numbers behind docs/performance.md. Every figure is reported
//! against a peak measured in the same process (f32 matmul GFLOP/s, memory GB/s).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Distribution, Int, Tensor};
use clap::{Args, Subcommand};
use zamba_model::params::{FlopsPerToken, ParamCounts};
use zamba_model::{RandomInit, ZambaConfig, ZambaModel, next_token_loss};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Forward+backward of a model preset: tokens/s, GFLOP/s vs the matmul peak, scan share, memory.
    Model(ModelArgs),
    /// The fused selective-scan op alone vs its roofline, and vs the plain-tensor-op reference.
    Scan(ScanArgs),
    /// The machine's f32 matmul peak and memory bandwidth as this build sees them.
    Peak,
    /// All-reduce time and bandwidth of a communicator (nccl-tests' algbw and busbw).
    Allreduce(AllreduceArgs),
    /// Recurrent decoding: time per generated token vs the length of the prefix already decoded.
    Decode(DecodeArgs),
}

#[derive(Args)]
pub struct DecodeArgs {
    #[arg(long, default_value = "zamba-bench")]
    preset: String,
    /// Prefix lengths at which decoding is measured (ascending).
    #[arg(long, value_delimiter = ',', default_value = "16,128,512,1024,2048")]
    prefix: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Decode steps measured at each prefix length.
    #[arg(long, default_value_t = 32)]
    steps: usize,
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
    /// Data-parallel ranks (threads): time the whole training step — gradient averaging and the
    /// AdamW update included — with this many ranks against one, on the same global batch.
    #[arg(long, default_value_t = 1)]
    world: usize,
    /// With --world: ZeRO-1 (moments sharded, gradients reduce-scattered) instead of replicated.
    #[arg(long)]
    zero: bool,
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
        BenchCommand::Allreduce(args) => bench_allreduce(&args),
        BenchCommand::Decode(args) => bench_decode(&args),
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

fn bench_scan(a: &ScanArgs, peak: &Peak) -> Result<()> {
    if a.channels % a.groups != 0 {
        bail!(
            "--channels {} must be divisible by --groups {}",
            a.channels,
            a.groups
        );
    }
    peak.print();
    let device = Device::flex();
    let (fwd, bwd) = scan_times(
        &device, a.batch, a.channels, a.seq_len, a.state, a.groups, a.repeats, false,
    );
    let (ref_fwd, ref_bwd) = scan_times(
        &device, a.batch, a.channels, a.seq_len, a.state, a.groups, 1, true,
    );
    let (flops_f, flops_b) = zamba_kernels::scan_flops(a.batch, a.channels, a.seq_len, a.state);
    let (bytes_f, bytes_b) =
        zamba_kernels::scan_bytes(a.batch, a.channels, a.seq_len, a.state, a.groups);
    let [flops_f, flops_b, bytes_f, bytes_b] =
        [flops_f, flops_b, bytes_f, bytes_b].map(|v| v as f64);
    println!(
        "selective_scan B={} D={} L={} N={} G={}",
        a.batch, a.channels, a.seq_len, a.state, a.groups
    );
    for (name, t, flops, bytes, reference) in [
        ("forward", fwd, flops_f, bytes_f, ref_fwd),
        (
            "forward+backward",
            fwd + bwd,
            flops_f + flops_b,
            bytes_f + bytes_b,
            ref_fwd + ref_bwd,
        ),
    ] {
        let secs = t.as_secs_f64();
        let roofline = (flops / (peak.matmul_gflops * 1e9)).max(bytes / (peak.bandwidth_gbs * 1e9));
        println!(
            "  {name:<17} {:>9.3} ms  {:>6.2} GFLOP/s  {:>6.2} GB/s  roofline {:.3} ms ({:.0}% of roofline)  reference ops {:.1} ms ({:.0}x slower)",
            secs * 1e3,
            flops / secs / 1e9,
            bytes / secs / 1e9,
            roofline * 1e3,
            100.0 * roofline / secs,
            reference.as_secs_f64() * 1e3,
            reference.as_secs_f64() / secs
        );
    }
    Ok(())
}

/// (forward, backward) time of one scan call with inputs that all require gradients.
#[allow(clippy::too_many_arguments)]
fn scan_times(
    device: &Device,
    batch: usize,
    channels: usize,
    len: usize,
    state: usize,
    groups: usize,
    repeats: usize,
    reference: bool,
) -> (Duration, Duration) {
    let rand = |shape: Vec<usize>, lo: f64, hi: f64| {
        Tensor::<1>::random(
            [shape.iter().product::<usize>()],
            Distribution::Uniform(lo, hi),
            device,
        )
    };
    let u = rand(vec![batch, channels, len], -1.0, 1.0).reshape([batch, channels, len]);
    let delta = rand(vec![batch, channels, len], -3.0, 0.0).reshape([batch, channels, len]);
    let a = rand(vec![channels, state], -2.0, -0.1).reshape([channels, state]);
    let b = rand(vec![batch, groups, len, state], -1.0, 1.0).reshape([batch, groups, len, state]);
    let c = rand(vec![batch, groups, len, state], -1.0, 1.0).reshape([batch, groups, len, state]);
    let d = rand(vec![channels], 0.5, 1.5);
    let z = rand(vec![batch, channels, len], -1.0, 1.0).reshape([batch, channels, len]);
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
        let _ = forward().sum().backward();
    });
    (fwd, total.saturating_sub(fwd))
}

fn bench_model(a: &ModelArgs) -> Result<()> {
    let config = ZambaConfig::preset(&a.preset)?;
    if a.world > 1 {
        let sharding = match a.zero {
            true => zamba_train::data_parallel::Sharding::Zero1,
            false => zamba_train::data_parallel::Sharding::Replicated,
        };
        return crate::bench_world::run(&config, a.batch, a.seq_len, a.steps, a.world, sharding);
    }
    let peak = Peak::measure();
    peak.print();
    let device = Device::flex().autodiff();
    let model = ZambaModel::from_source(&config, &mut RandomInit::new(0), &device)?;
    let tokens = Tensor::<2, Int>::random(
        [a.batch, a.seq_len + 1],
        Distribution::Uniform(0.0, config.vocab_size as f64),
        &device,
    );
    let step = || {
        let logits = model.forward(tokens.clone());
        let loss = next_token_loss(logits, tokens.clone());
        let grads = loss.backward();
        std::hint::black_box(grads);
    };
    let step_time = time(a.steps, step).as_secs_f64();
    let forward_time = time(a.steps, || {
        let _ = model.valid().forward(tokens.clone().inner()).into_data();
    })
    .as_secs_f64();

    let tokens_per_step = (a.batch * a.seq_len) as f64;
    let flops = FlopsPerToken::of(&config, a.seq_len);
    let tok_s = tokens_per_step / step_time;
    let achieved = flops.train() * tok_s / 1e9;
    let (scan_f, scan_b) = scan_times(
        &Device::flex(),
        a.batch,
        config.d_inner(),
        a.seq_len + 1,
        config.mamba_d_state,
        config.n_mamba_heads,
        a.steps,
        false,
    );
    let scan_share = config.num_hidden_layers as f64 * (scan_f + scan_b).as_secs_f64() / step_time;
    let params = ParamCounts::of(&config).total() as f64;
    println!(
        "model {} ({} parameters), batch {} × seq {}",
        a.preset, params, a.batch, a.seq_len
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
    println!(
        "  model FLOPs/token (train, 3× fwd): {:.3e} → {:.2} GFLOP/s = {:.1}% of the measured matmul peak",
        flops.train(),
        achieved,
        100.0 * achieved / peak.matmul_gflops
    );
    println!(
        "  selective scan share of the step: {:.1}%",
        100.0 * scan_share
    );
    if let Some(rss) = peak_rss_bytes() {
        println!(
            "  peak RSS {:.1} MB; params+grads+AdamW moments (16 B/param) = {:.1} MB",
            rss as f64 / 1e6,
            16.0 * params / 1e6
        );
    }
    Ok(())
}

/// One decoder walks through the prefix lengths: it is fed up to each length, then `steps` decode
/// steps are timed (logits read back to the host each step, as generation does). For contrast,
/// the time of one full forward over the prefix — what re-running the prefix per token would
/// cost — is measured too.
fn bench_decode(a: &DecodeArgs) -> Result<()> {
    if a.prefix.is_empty() || a.prefix.windows(2).any(|w| w[0] >= w[1]) || a.steps == 0 {
        bail!("--prefix must be ascending lengths and --steps at least 1");
    }
    let config = ZambaConfig::preset(&a.preset)?;
    let device = Device::flex();
    let model = ZambaModel::from_source(&config, &mut RandomInit::new(0), &device)?;
    let last = *a.prefix.last().expect("non-empty");
    let mut decoder = model.decoder(a.batch, last + a.steps * a.prefix.len());
    let token = |i: usize| vec![(i * 7919 % config.vocab_size) as u32; a.batch];
    println!(
        "decode {} ({} parameters), batch {}, {} steps per point",
        a.preset,
        model.num_params(),
        a.batch,
        a.steps
    );
    println!(
        "{:>8} {:>12} {:>14} {:>26}",
        "prefix", "ms/token", "tokens/s", "full forward of prefix (ms)"
    );
    for &prefix in &a.prefix {
        while decoder.len() < prefix {
            let _ = decoder.step(&token(decoder.len())).into_data();
        }
        let t = Instant::now();
        for _ in 0..a.steps {
            let _ = decoder.step(&token(decoder.len())).into_data();
        }
        let per_step = t.elapsed().as_secs_f64() / a.steps as f64;
        let tokens = Tensor::<2, Int>::random(
            [a.batch, prefix],
            Distribution::Uniform(0.0, config.vocab_size as f64),
            &device,
        );
        let forward = time(1, || {
            let _ = model.forward(tokens.clone()).into_data();
        });
        println!(
            "{prefix:>8} {:>12.3} {:>14.1} {:>26.1}",
            per_step * 1e3,
            a.batch as f64 / per_step,
            forward.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// VmHWM from /proc (Linux); None elsewhere.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AllreduceBackend {
    /// Ranks as threads of this process, sharing memory.
    Threads,
    /// Ranks as threads of this process, each with its own TCP connections over loopback.
    Tcp,
    /// NCCL, one thread per GPU (needs a build with `--features cuda` and `--world` GPUs).
    Nccl,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AllreduceDtype {
    F32,
    Bf16,
}

#[derive(Args)]
pub struct AllreduceArgs {
    /// Ranks.
    #[arg(long, default_value_t = 4)]
    world: usize,
    /// Message sizes in bytes, comma-separated; K, M, G suffixes are powers of 1024.
    #[arg(long, value_delimiter = ',', default_value = "4K,64K,1M,16M,64M")]
    sizes: Vec<String>,
    #[arg(long, value_enum, default_value = "threads")]
    backend: AllreduceBackend,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: AllreduceDtype,
    /// Timed all-reduces per size (after one warm-up).
    #[arg(long, default_value_t = 5)]
    iters: usize,
}

fn parse_size(text: &str) -> Result<usize> {
    let text = text.trim();
    let (digits, scale) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], 1 << 10),
        Some((i, 'M' | 'm')) => (&text[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    match digits.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n * scale),
        _ => bail!("--sizes: {text:?} is not a size in bytes like 4096, 64K or 16M"),
    }
}

/// The communicators of one benchmark group, and the device each rank's tensors live on.
fn allreduce_group(a: &AllreduceArgs) -> Result<Vec<(Box<dyn zamba_dist::Communicator>, Device)>> {
    let opts = zamba_dist::DistOptions {
        timeout: Duration::from_secs(120),
    };
    match a.backend {
        AllreduceBackend::Threads => Ok(zamba_dist::thread_group(a.world, &opts)
            .into_iter()
            .map(|c| (c, Device::flex()))
            .collect()),
        AllreduceBackend::Tcp => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let token = zamba_dist::generate_token()?;
            let info = |rank| zamba_dist::RendezvousInfo {
                rank,
                world_size: a.world,
                local_rank: rank,
                local_world_size: a.world,
                master_addr: "127.0.0.1".into(),
                master_port: port,
                launcher: zamba_dist::Launcher::Torchrun,
                token: Some(zamba_dist::TokenSource::Value(token.clone())),
            };
            std::thread::scope(|s| {
                let joins: Vec<_> = (0..a.world)
                    .map(|rank| {
                        let info = info(rank);
                        let opts = &opts;
                        s.spawn(move || zamba_dist::init(&info, zamba_dist::Backend::Tcp, opts))
                    })
                    .collect();
                joins
                    .into_iter()
                    .map(|j| Ok((j.join().expect("rendezvous thread")?, Device::flex())))
                    .collect()
            })
        }
        AllreduceBackend::Nccl => nccl_group(a, &opts),
    }
}

#[cfg(not(feature = "cuda"))]
fn nccl_group(
    _: &AllreduceArgs,
    _: &zamba_dist::DistOptions,
) -> Result<Vec<(Box<dyn zamba_dist::Communicator>, Device)>> {
    bail!("--backend nccl needs a zamba-train built with `--features cuda`")
}

#[cfg(feature = "cuda")]
fn nccl_group(
    a: &AllreduceArgs,
    opts: &zamba_dist::DistOptions,
) -> Result<Vec<(Box<dyn zamba_dist::Communicator>, Device)>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let token = zamba_dist::generate_token()?;
    std::thread::scope(|s| {
        let joins: Vec<_> = (0..a.world)
            .map(|rank| {
                let info = zamba_dist::RendezvousInfo {
                    rank,
                    world_size: a.world,
                    local_rank: rank,
                    local_world_size: a.world,
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                    launcher: zamba_dist::Launcher::Torchrun,
                    token: Some(zamba_dist::TokenSource::Value(token.clone())),
                };
                s.spawn(move || zamba_dist::connect_nccl(&info, rank, opts))
            })
            .collect();
        joins
            .into_iter()
            .enumerate()
            .map(|(rank, j)| {
                let comm: Box<dyn zamba_dist::Communicator> =
                    Box::new(j.join().expect("NCCL init thread")?);
                Ok((comm, Device::cuda(rank)))
            })
            .collect()
    })
}

/// nccl-tests' definitions: algbw = bytes / time; busbw = algbw · 2(n−1)/n for all-reduce, the
/// traffic per link of a bandwidth-optimal algorithm, comparable across world sizes.
fn bench_allreduce(a: &AllreduceArgs) -> Result<()> {
    if a.world == 0 || a.iters == 0 {
        bail!("--world and --iters must be at least 1");
    }
    let sizes = a
        .sizes
        .iter()
        .map(|s| parse_size(s))
        .collect::<Result<Vec<_>>>()?;
    let (dtype, element) = match a.dtype {
        AllreduceDtype::F32 => (burn::tensor::DType::F32, 4),
        AllreduceDtype::Bf16 => (burn::tensor::DType::BF16, 2),
    };
    let group = allreduce_group(a)?;
    println!(
        "all_reduce (sum), {:?} backend, world {}, {:?}, {} iterations per size",
        a.backend, a.world, a.dtype, a.iters
    );
    println!(
        "{:>12} {:>12} {:>12} {:>12} {:>12}",
        "bytes", "elements", "time (us)", "algbw GB/s", "busbw GB/s"
    );
    let times: Vec<Vec<f64>> = std::thread::scope(|s| {
        let joins: Vec<_> = group
            .into_iter()
            .map(|(comm, device)| {
                let sizes = &sizes;
                s.spawn(move || -> Result<Vec<f64>> {
                    let mut seconds = Vec::new();
                    for &bytes in sizes {
                        let count = (bytes / element).max(1);
                        let x = Tensor::<1>::ones([count], (&device, dtype));
                        comm.all_reduce(x.clone(), zamba_dist::ReduceOp::Sum)?;
                        comm.barrier()?;
                        let t = Instant::now();
                        for _ in 0..a.iters {
                            let y = comm.all_reduce(x.clone(), zamba_dist::ReduceOp::Sum)?;
                            std::hint::black_box(y);
                        }
                        device.sync().map_err(|e| anyhow::anyhow!("{e:?}"))?;
                        seconds.push(t.elapsed().as_secs_f64() / a.iters as f64);
                    }
                    Ok(seconds)
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("benchmark thread"))
            .collect::<Result<_>>()
    })?;
    let n = a.world as f64;
    for (i, &bytes) in sizes.iter().enumerate() {
        let count = (bytes / element).max(1);
        let bytes = (count * element) as f64;
        // The slowest rank's time is the collective's.
        let secs = times.iter().map(|t| t[i]).fold(0.0, f64::max);
        let algbw = bytes / secs / 1e9;
        let busbw = algbw * 2.0 * (n - 1.0) / n;
        println!(
            "{bytes:>12} {count:>12} {:>12.1} {algbw:>12.3} {busbw:>12.3}",
            secs * 1e6
        );
    }
    Ok(())
}
