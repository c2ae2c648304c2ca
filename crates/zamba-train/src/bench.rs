//! `zamba-train bench …`: the numbers behind docs/performance.md. Every figure is reported
//! against a peak measured in the same process (f32 matmul GFLOP/s, memory GB/s).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use burn::module::{Module, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor};
use clap::{Args, Subcommand};
use zamba_model::params::{FlopsPerToken, ParamCounts};
use zamba_model::{RandomInit, ZambaConfig, ZambaModel, next_token_loss};
use zamba_train::memory;
use zamba_train::peak::{PeakReport, measure_f32_peak};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Forward+backward of a model preset: tokens/s, GFLOP/s vs the matmul peak, scan share, memory.
    Model(ModelArgs),
    /// The fused selective-scan op alone vs its roofline, and vs the plain-tensor-op reference.
    Scan(ScanArgs),
    /// The machine's f32 GEMM peak (Burn's matmul, the gemm crate, torch.matmul) and bandwidth.
    Peak(PeakArgs),
}

#[derive(Args)]
pub struct PeakArgs {
    /// Skip torch.matmul (otherwise tried through `ZAMBA_TORCH_PYTHON`, else `python3`).
    #[arg(long)]
    no_torch: bool,
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
    /// Skip torch.matmul in the peak (see `bench peak`).
    #[arg(long)]
    no_torch: bool,
    /// Also print the figures as one JSON object on the last line (for scripts).
    #[arg(long)]
    json: bool,
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
        BenchCommand::Scan(args) => bench_scan(&args, &Machine::measure(false)),
        BenchCommand::Model(args) => bench_model(&args),
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
        let gemm = measure_f32_peak(with_torch);
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

fn time<F: FnMut()>(repeats: usize, mut f: F) -> Duration {
    f();
    let t = Instant::now();
    for _ in 0..repeats {
        f();
    }
    t.elapsed() / repeats as u32
}

fn bench_scan(a: &ScanArgs, peak: &Machine) -> Result<()> {
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
    let (ops_f, ops_b) = zamba_kernels::scan_lane_ops(a.batch, a.channels, a.seq_len, a.state);
    let (bytes_f, bytes_b) =
        zamba_kernels::scan_bytes(a.batch, a.channels, a.seq_len, a.state, a.groups);
    let [flops_f, flops_b, ops_f, ops_b, bytes_f, bytes_b] =
        [flops_f, flops_b, ops_f, ops_b, bytes_f, bytes_b].map(|v| v as f64);
    // Compute ceiling of an exp-bound kernel: the vector unit retires at most one FMA-lane-op per
    // 2 FLOP of the GEMM peak, and every op of the kernel (each instruction of the polynomial exp,
    // compares, blends, multiplies) takes one such slot; see `scan_lane_ops`.
    let lane_ops_per_s = peak.peak_gflops() * 1e9 / 2.0;
    println!(
        "selective_scan B={} D={} L={} N={} G={}; roofline = max(lane-ops / {:.1} G lane-ops/s, bytes / {:.1} GB/s)",
        a.batch,
        a.channels,
        a.seq_len,
        a.state,
        a.groups,
        lane_ops_per_s / 1e9,
        peak.bandwidth_gbs
    );
    for (name, t, flops, ops, bytes, reference) in [
        ("forward", fwd, flops_f, ops_f, bytes_f, ref_fwd),
        (
            "forward+backward",
            fwd + bwd,
            flops_f + flops_b,
            ops_f + ops_b,
            bytes_f + bytes_b,
            ref_fwd + ref_bwd,
        ),
    ] {
        let secs = t.as_secs_f64();
        let roofline = (ops / lane_ops_per_s).max(bytes / (peak.bandwidth_gbs * 1e9));
        println!(
            "  {name:<17} {:>9.3} ms  {:>6.2} GFLOP/s  {:>6.2} G lane-ops/s  {:>6.2} GB/s  roofline {:.3} ms ({:.0}% of roofline)  reference ops {:.1} ms ({:.0}x slower)",
            secs * 1e3,
            flops / secs / 1e9,
            ops / secs / 1e9,
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
    let machine = Machine::measure(!a.no_torch);
    machine.print();
    // The bandwidth probe's 512 MB would otherwise be the process's peak RSS.
    let rss_reset = memory::reset_peak_rss();
    let device = Device::flex().autodiff();
    let mut model = Some(ZambaModel::from_source(
        &config,
        &mut RandomInit::new(0),
        &device,
    )?);
    let tokens = Tensor::<2, Int>::random(
        [a.batch, a.seq_len + 1],
        Distribution::Uniform(0.0, config.vocab_size as f64),
        &device,
    );
    let mut optimizer = FusedAdamW::default();
    let (mut grads_time, mut update_time) = (Duration::ZERO, Duration::ZERO);
    let mut heap = HeapUse::default();
    for step in 0..=a.steps {
        memory::reset_peak();
        let (live_before, _) = memory::heap();
        let t = Instant::now();
        let m = model
            .take()
            .expect("the model is put back after every step");
        let loss = next_token_loss(m.forward(tokens.clone()), tokens.clone());
        let activations = memory::heap().0.saturating_sub(live_before);
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        let backward_done = Instant::now();
        model = Some(optimizer.step(m, &grads));
        drop(grads);
        let done = Instant::now();
        // Step 0 warms up (allocator, first-touch page faults, optimizer moments).
        if step > 0 {
            grads_time += backward_done - t;
            update_time += done - backward_done;
            heap = heap.max(HeapUse {
                activations,
                peak_over_start: memory::heap().1.saturating_sub(live_before),
                start: live_before,
            });
        }
    }
    let model = model.expect("the model is put back after every step");
    let (grads_time, update_time) = (
        grads_time.as_secs_f64() / a.steps as f64,
        update_time.as_secs_f64() / a.steps as f64,
    );
    let step_time = grads_time + update_time;
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
    let (library, peak) = machine.gemm.best();
    println!(
        "model {} ({} parameters), batch {} × seq {}",
        a.preset, params, a.batch, a.seq_len
    );
    println!(
        "  train step: {:.3} s (forward+backward {:.3} s, AdamW update {:.3} s) → {:.0} tokens/s",
        step_time, grads_time, update_time, tok_s
    );
    println!(
        "  inference forward:    {:.3} s  → {:.0} tokens/s",
        forward_time,
        tokens_per_step / forward_time
    );
    println!(
        "  model FLOPs/token (train, 3× fwd): {:.3e} → {:.2} GFLOP/s = {:.1}% of the f32 peak ({peak:.1} GFLOP/s, {library})",
        flops.train(),
        achieved,
        100.0 * achieved / peak
    );
    println!(
        "  selective scan share of the step: {:.1}%",
        100.0 * scan_share
    );
    let state = 16.0 * params;
    let floor = activation_floor_bytes(&config, a.batch, a.seq_len + 1);
    println!(
        "  memory: parameters+gradients+AdamW moments (16 B/param) {:.1} MB; activations kept for backward {:.1} MB (floor {:.1} MB); step peak heap {:.1} MB (minimum {:.1} MB)",
        state / 1e6,
        heap.activations as f64 / 1e6,
        floor / 1e6,
        (heap.start + heap.peak_over_start) as f64 / 1e6,
        (state + floor) / 1e6,
    );
    let rss = memory::peak_rss_bytes();
    if let Some(rss) = rss {
        let note = match rss_reset {
            true => "since the peak measurement",
            false => "includes the 512 MB bandwidth probe",
        };
        println!("  peak RSS {:.1} MB ({note})", rss as f64 / 1e6);
    }
    if a.json {
        let json = serde_json::json!({
            "preset": a.preset,
            "batch": a.batch,
            "seq_len": a.seq_len,
            "threads": rayon::current_num_threads(),
            "step_seconds": step_time,
            "tokens_per_sec": tok_s,
            "model_gflops": achieved,
            "peak_gflops": peak,
            "peak_library": library,
            "fraction_of_peak": achieved / peak,
            "load_average": load_average(),
        });
        println!("{json}");
    }
    Ok(())
}

/// The trainer's AdamW arithmetic (`zamba_kernels::adamw_update`, one fused pass per tensor)
/// with moments kept in visiting order: times the update without the trainer's bookkeeping.
#[derive(Default)]
struct FusedAdamW {
    step: u64,
    /// Taken out while updated, so the kernel owns the buffers and updates them in place.
    moments: Vec<Option<(Tensor<1>, Tensor<1>)>>,
}

impl FusedAdamW {
    fn step(&mut self, model: ZambaModel, grads: &GradientsParams) -> ZambaModel {
        self.step += 1;
        let mut mapper = FusedAdamWMapper {
            opt: self,
            grads,
            index: 0,
        };
        model.map(&mut mapper)
    }
}

struct FusedAdamWMapper<'a> {
    opt: &'a mut FusedAdamW,
    grads: &'a GradientsParams,
    index: usize,
}

impl ModuleMapper for FusedAdamWMapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(grad) = self.grads.get::<D>(param.id) else {
            return param;
        };
        let (id, value, mapper) = param.consume();
        let shape = value.dims();
        let numel = shape.iter().product::<usize>();
        let theta = value.inner().reshape([numel]);
        if self.opt.moments.len() == self.index {
            self.opt.moments.push(None);
        }
        let (m, v) = self.opt.moments[self.index]
            .take()
            .unwrap_or_else(|| (theta.zeros_like(), theta.zeros_like()));
        let hyper = zamba_kernels::AdamWHyper {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: self.opt.step,
            grad_scale: 1.0,
        };
        let (theta, m, v) =
            zamba_kernels::adamw_update(theta, grad.inner().reshape([numel]), m, v, &hyper);
        self.opt.moments[self.index] = Some((m, v));
        self.index += 1;
        let value = Tensor::from_inner(theta.reshape(shape)).require_grad();
        Param::from_mapped_value(id, value, mapper)
    }
}

/// Heap bytes of one training step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct HeapUse {
    /// Growth of the live heap from the start of the step to the end of the forward.
    activations: usize,
    /// Peak live heap during the step minus the live heap at its start.
    peak_over_start: usize,
    /// Live heap at the start of the step (model, optimizer moments, inputs).
    start: usize,
}

/// The activations a backward pass must keep, for this model as implemented (fused ops, no
/// recomputation of GEMM inputs), in bytes: per Mamba layer and token, the norm's input and
/// output (`2d`), `x|z` (`2D`), the conv output (`D`), `dt|B|C` (`R + 2N`), `Δ` (`D`), the scan
/// output (`D`) and its chunk checkpoints (`D·N / SCAN_CHUNK`); per use of the shared block, its
/// concatenated input and norm (`4d`), `q`, `k`, `v` and the attention output (`4a`), the
/// `o_proj` output and its norm (`2d`), gate, up and their product (`3i`) and the hybrid
/// projection's input (`d`); the final norm's input and output (`2d`) and the logits (`V`).
fn activation_floor_bytes(c: &ZambaConfig, batch: usize, len: usize) -> f64 {
    let (d, di, n, r) = (
        c.hidden_size as f64,
        c.d_inner() as f64,
        c.mamba_d_state as f64,
        c.dt_rank() as f64,
    );
    let (a, i) = (c.attention_hidden_size() as f64, c.intermediate_size as f64);
    let per_mamba = 2.0 * d + 5.0 * di + r + 2.0 * n + di * n / zamba_kernels::SCAN_CHUNK as f64;
    let per_shared = 4.0 * d + 4.0 * a + 2.0 * d + 3.0 * i + d;
    let per_token = c.num_hidden_layers as f64 * per_mamba
        + c.hybrid_layers().len() as f64 * per_shared
        + 2.0 * d
        + c.vocab_size as f64;
    4.0 * per_token * (batch * len) as f64
}
