//! `bench model`: the trainer's step (forward, backward, gradient averaging over one rank, AdamW
//! and the parameter update, exactly as `zamba-train` runs them) on a model preset, against the
//! machine's f32 peak, with the step's heap use next to the `--dry-run` estimate.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use clap::Args;
use zamba_dist::DistOptions;
use zamba_model::memory::ActivationMemory;
use zamba_model::params::{FlopsPerToken, ParamCounts};
use zamba_model::{
    ActivationCheckpointing, Execution, Precision, RandomInit, ZambaConfig, ZambaModel,
};
use zamba_trace::{Capture, Category, span};
use zamba_train::cost_model::{Card, Kernels};
use zamba_train::data_parallel::{DataParallel, Sharding, StateBytes};
use zamba_train::device::{
    DeviceChoice, attention_kernel, attention_kernels, device_for, kernel_compiler,
};
use zamba_train::memory;
use zamba_train::optim::AdamW;
use zamba_train::step::{StepContext, StepEvent, StepObserver, train_step};

use super::scan::{ScanShape, scan_times};
use super::world::LinkSpeed;
use super::{BENCH_STEP, Machine, bench_adamw, load_average, random_batch, sync, time};

#[derive(Args)]
pub struct ModelArgs {
    #[arg(long, default_value = "zamba-bench")]
    pub(super) preset: String,
    #[arg(long, default_value_t = 4)]
    pub(super) batch: usize,
    #[arg(long, default_value_t = 512)]
    pub(super) seq_len: usize,
    /// Measured steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    pub(super) steps: usize,
    /// Data-parallel ranks (threads): time the whole training step — gradient averaging and the
    /// AdamW update included — with this many ranks against one, on the same global batch, and
    /// check each rank's heap of parameters, gradients and optimizer state against the estimate.
    #[arg(long, default_value_t = 1)]
    pub(super) world: usize,
    /// With --world: ZeRO-1 (optimizer state sharded, gradients reduce-scattered) instead of
    /// replicated.
    #[arg(long)]
    pub(super) zero: bool,
    /// With --world: throttle every rank's communicator to a link of this many Gbit/s (a
    /// simulation: each collective sleeps for its bytes on the wire) and print the step's
    /// data-parallel efficiency. `auto`: the speed at which a step's gradient traffic takes as
    /// long as its backward, measured on a calibration step.
    #[arg(long, value_name = "G|auto")]
    pub(super) link_gbps: Option<LinkSpeed>,
    /// With --world: reduce gradients after the backward instead of during it.
    #[arg(long)]
    pub(super) no_overlap: bool,
    /// With --world: gradient buckets of up to this many MiB (see dist.bucket_mb).
    #[arg(long, default_value_t = 25.0)]
    pub(super) bucket_mb: f64,
    /// cpu, cuda, cuda:N or cube-cpu (see runtime.device).
    #[arg(long, default_value = "cpu")]
    pub(super) device: DeviceChoice,
    /// fp32 or bf16 (see runtime.precision).
    #[arg(long, default_value = "fp32")]
    pub(super) precision: Precision,
    /// none or layers (see train.activation_checkpointing).
    #[arg(long, default_value = "none")]
    pub(super) activation_checkpointing: ActivationCheckpointing,
    /// The device's peak GFLOP/s for the MFU figure (e.g. 989000 for an H100/H200's dense bf16).
    /// Default on the `cpu` device: the measured f32 GEMM peak (see `bench peak`).
    #[arg(long)]
    pub(super) peak_gflops: Option<f64>,
    /// Skip torch.matmul in the peak (see `bench peak`).
    #[arg(long)]
    pub(super) no_torch: bool,
    /// Also print the figures as one JSON object on the last line (for scripts).
    #[arg(long)]
    pub(super) json: bool,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub(super) json_file: Option<std::path::PathBuf>,
    /// After the measured steps, run one more with every span recorded (the device synchronised
    /// at each span boundary) and write it to FILE as Chrome-trace JSON (open it in
    /// ui.perfetto.dev or chrome://tracing); prints its time split by op class.
    #[arg(long, value_name = "FILE")]
    pub(super) trace: Option<PathBuf>,
    /// Predict the step on a GPU with the cost model instead of running it (no GPU needed, no
    /// model built; pass --device cuda): per op class the FLOPs, HBM bytes and time, then the
    /// step's time, tokens/s and MFU (docs/performance.md).
    #[arg(long, conflicts_with_all = ["trace", "zero", "peak_gflops"])]
    pub(super) predict: bool,
    /// With --predict: the GPU, by id (h100-sxm, h200, a100-80gb-sxm, …: an unknown value lists
    /// them all) or by the name nvidia-smi prints (e.g. "NVIDIA H100 80GB HBM3").
    #[arg(long, default_value = "h100-sxm", requires = "predict")]
    pub(super) card: Card,
    /// With --predict: "planned" (cuBLASLt GEMMs, flash attention, fused element-wise kernels, a
    /// mamba-ssm-class scan, multi-tensor AdamW) or "current" (the Cube path as it is).
    #[arg(long, default_value = "planned", requires = "predict")]
    pub(super) kernels: Kernels,
    /// With --predict: micro-batches of --batch × --seq-len per optimizer step (gradients
    /// accumulated, one AdamW update for all of them).
    #[arg(long, default_value_t = 1, requires = "predict")]
    pub(super) micro_batches: usize,
    /// With --predict: replace fractions of the kernel set's defaults, e.g. "gemm=0.7,launch_us=3"
    /// (names: gemm, attention, vector, memory, scan_memory, launch_us).
    #[arg(long, requires = "predict")]
    pub(super) fractions: Option<String>,
}

/// Mean times of the measured steps and the largest heap use among them.
struct StepMeasurement {
    /// The traced step's time split (with `--trace`).
    split: Option<serde_json::Value>,
    grads: Duration,
    update: Duration,
    heap: HeapUse,
}

/// The f32 peak an MFU is relative to: `(what it is, GFLOP/s)`.
struct MfuPeak {
    source: String,
    gflops: f64,
}

pub(super) fn run(a: &ModelArgs) -> Result<()> {
    let config = ZambaConfig::preset(&a.preset)?;
    if a.predict {
        return super::predict::run(a, &config);
    }
    if a.world < 2 && (a.link_gbps.is_some() || a.no_overlap) {
        bail!(
            "--link-gbps and --no-overlap concern the traffic between ranks: add --world N (N ≥ 2)"
        );
    }
    if a.world > 1 {
        if a.trace.is_some() {
            bail!(
                "--trace traces the one-rank step; leave out --world (a run with train.profile_steps traces every rank)"
            );
        }
        if a.device != DeviceChoice::Cpu {
            bail!("--world runs the ranks as threads on the CPU; leave out --device (or use cpu)");
        }
        if !(a.bucket_mb.is_finite() && a.bucket_mb > 0.0) {
            bail!(
                "--bucket-mb {}: a bucket must hold a positive number of MiB",
                a.bucket_mb
            );
        }
        return super::world::run(&super::world::WorldBench {
            config: &config,
            batch: a.batch,
            seq_len: a.seq_len,
            steps: a.steps,
            world: a.world,
            sharding: match a.zero {
                true => Sharding::Zero1,
                false => Sharding::Replicated,
            },
            precision: a.precision,
            checkpointing: a.activation_checkpointing,
            overlap: !a.no_overlap,
            link: a.link_gbps,
            bucket_mb: a.bucket_mb,
        });
    }
    let device = device_for(a.device, 0, a.precision)?;
    let peak = match (a.peak_gflops, a.device) {
        (Some(gflops), _) => Some(MfuPeak {
            source: "--peak-gflops".into(),
            gflops,
        }),
        (None, DeviceChoice::Cpu) => {
            let machine = Machine::measure(!a.no_torch);
            machine.print();
            let (library, gflops) = machine.gemm.best();
            Some(MfuPeak {
                source: library.to_string(),
                gflops,
            })
        }
        (None, _) => None,
    };
    // The bandwidth probe's 512 MB would otherwise be the process's peak RSS.
    let rss_reset = memory::reset_peak_rss();
    let autodiff = device.clone().autodiff();
    let execution = Execution {
        precision: a.precision,
        checkpointing: a.activation_checkpointing,
    };
    let model = ZambaModel::from_source(&config, &mut RandomInit::new(0), &autodiff)?
        .with_execution(execution);
    let batch = random_batch(0, a.batch, a.seq_len, config.vocab_size, &autodiff);
    let (model, measured) = train_steps(
        model,
        &batch,
        a.steps,
        &device,
        a.precision,
        a.trace.as_deref(),
    )?;
    let forward_time = time(a.steps, || {
        let _ = model.valid().forward(batch.0.clone().inner()).into_data();
    })
    .as_secs_f64();
    report(
        a,
        &config,
        &device,
        peak,
        &measured,
        forward_time,
        rss_reset,
    )
}

/// One warm-up step (allocator, first-touch page faults, optimizer moments) and `steps` measured
/// ones of the trainer's step on a world of one; then, with `trace`, one traced step written there.
fn train_steps(
    model: ZambaModel,
    (inputs, targets): &(Tensor<2, Int>, Tensor<2, Int>),
    steps: usize,
    compute: &Device,
    precision: Precision,
    trace: Option<&Path>,
) -> Result<(ZambaModel, StepMeasurement)> {
    let comm = zamba_dist::thread_group(1, &DistOptions::default())
        .pop()
        .expect("a group of one");
    let dp = DataParallel::new(&model, 25 << 20, Sharding::Replicated, 0, 1)
        .with_reduction_order(&model.gradient_order())
        .with_precision(precision);
    let mut optimizer = AdamW::new(bench_adamw());
    let mut model = dp.prepare(model, &mut optimizer, comm.as_ref(), compute)?;
    let device = inputs.device();
    let ctx = StepContext {
        comm: comm.as_ref(),
        device: &device,
        compute,
        dp: &dp,
        overlap: true,
    };
    let (mut grads_time, mut update_time) = (Duration::ZERO, Duration::ZERO);
    let mut heap = HeapUse::default();
    let mut split = None;
    for step in 0..=steps + usize::from(trace.is_some()) {
        let capture = (step > steps).then(|| {
            let device = compute.clone();
            Capture::start("bench model step").with_sync(move || sync(&device))
        });
        let step_span = span(Category::Step, "step");
        memory::reset_peak();
        let mut probe = StepProbe::new(compute);
        let micro_batches = std::iter::once((inputs.clone(), targets.clone()));
        (model, _) = train_step(
            model,
            &mut optimizer,
            micro_batches,
            &ctx,
            &BENCH_STEP,
            &mut probe,
        )?;
        sync(compute);
        let done = Instant::now();
        drop(step_span);
        if let (Some(capture), Some(path)) = (capture, trace) {
            split = Some(write_trace(capture, path)?);
        } else if step > 0 {
            grads_time += probe.backward_done - probe.start;
            update_time += done - probe.backward_done;
            heap = heap.max(HeapUse {
                activations: probe.activations,
                peak_over_start: memory::heap().1.saturating_sub(probe.live_before),
                start: probe.live_before,
            });
        }
    }
    let n = steps.max(1) as u32;
    let measured = StepMeasurement {
        split,
        grads: grads_time / n,
        update: update_time / n,
        heap,
    };
    Ok((model, measured))
}

/// The clock and heap probe of one benchmark step: the heap the forward leaves for the backward
/// (the activations), and when the gradients are done (the device synchronised).
struct StepProbe<'a> {
    compute: &'a Device,
    live_before: usize,
    start: Instant,
    activations: usize,
    backward_done: Instant,
}

impl<'a> StepProbe<'a> {
    fn new(compute: &'a Device) -> Self {
        let now = Instant::now();
        Self {
            compute,
            live_before: memory::heap().0,
            start: now,
            activations: 0,
            backward_done: now,
        }
    }
}

impl StepObserver for StepProbe<'_> {
    fn observe(&mut self, event: StepEvent) -> Result<()> {
        match event {
            StepEvent::Forward { .. } => {
                self.activations = memory::heap().0.saturating_sub(self.live_before);
            }
            StepEvent::Gradients => {
                sync(self.compute);
                self.backward_done = Instant::now();
            }
            StepEvent::Reduced | StepEvent::Updated => {}
        }
        Ok(())
    }
}

/// Writes the traced step to `path`, prints its time split and returns it as JSON: the seconds
/// and share of the step of each op class (exclusive of nested spans), and the scan's forward and
/// backward apart.
fn write_trace(capture: Capture, path: &Path) -> Result<serde_json::Value> {
    let trace = capture.finish();
    trace
        .write_chrome(path, 0, "zamba-train bench model")
        .with_context(|| format!("writing the trace {}", path.display()))?;
    println!(
        "  trace of one step written to {} (open it in ui.perfetto.dev or chrome://tracing); time by op class:",
        path.display()
    );
    let summary = trace.summary();
    for line in summary.table().lines() {
        println!("    {line}");
    }
    let wall = summary.wall.as_secs_f64().max(1e-12);
    let split: Vec<serde_json::Value> = summary
        .exclusive_seconds()
        .into_iter()
        .filter(|(_, seconds)| *seconds > 0.0)
        .map(|(category, seconds)| {
            serde_json::json!({"category": category, "seconds": seconds, "share": seconds / wall})
        })
        .collect();
    let scan = |prefix: &str| -> f64 {
        let spans = trace.spans().iter();
        let named = spans.filter(|s| s.category == Category::Scan && s.name.starts_with(prefix));
        named.map(|s| s.duration.as_secs_f64()).sum()
    };
    Ok(serde_json::json!({
        "wall_seconds": wall,
        "split": split,
        "scan_forward_seconds": scan("scan forward"),
        "scan_backward_seconds": scan("scan backward"),
    }))
}

fn report(
    a: &ModelArgs,
    config: &ZambaConfig,
    device: &Device,
    peak: Option<MfuPeak>,
    measured: &StepMeasurement,
    forward_time: f64,
    rss_reset: bool,
) -> Result<()> {
    let (grads_time, update_time) = (measured.grads.as_secs_f64(), measured.update.as_secs_f64());
    let step_time = grads_time + update_time;
    let tokens_per_step = (a.batch * a.seq_len) as f64;
    let flops = FlopsPerToken::of(config, a.seq_len);
    let tok_s = tokens_per_step / step_time;
    let achieved = flops.train() * tok_s / 1e9;
    let scan_shape = ScanShape {
        batch: a.batch,
        channels: config.d_inner(),
        len: a.seq_len,
        state: config.mamba_d_state,
        groups: config.n_mamba_heads,
    };
    let act = super::compute_dtype(a.precision);
    let (scan_f, scan_b) = scan_times(device, scan_shape, act, a.steps, false)?;
    // With per-layer recomputation every layer's scan runs forward twice.
    let forwards = match a.activation_checkpointing {
        ActivationCheckpointing::None => 1.0,
        ActivationCheckpointing::Layers => 2.0,
    };
    let scan_step = forwards * scan_f.as_secs_f64() + scan_b.as_secs_f64();
    let scan_share = config.num_hidden_layers as f64 * scan_step / step_time;
    let params = ParamCounts::of(config).total() as f64;
    let attention = attention_kernels(device, a.precision, config.attention_head_dim());
    println!(
        "model {} ({} parameters), batch {} × seq {}, device {}{}{}, precision {}, activation checkpointing {}",
        a.preset,
        params,
        a.batch,
        a.seq_len,
        a.device,
        kernel_compiler(a.device).map_or(String::new(), |c| format!(" (kernels compiled by {c})")),
        attention.map_or(String::new(), |k| format!(", attention: {k}")),
        a.precision,
        a.activation_checkpointing
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
    let mfu = match &peak {
        Some(p) => format!(
            " = {:.1}% of the peak ({:.1} GFLOP/s, {})",
            100.0 * achieved / p.gflops,
            p.gflops,
            p.source
        ),
        None => " (give --peak-gflops for MFU)".into(),
    };
    println!(
        "  model FLOPs/token (train, 3× fwd): {:.3e} → {:.2} GFLOP/s{mfu}",
        flops.train(),
        achieved,
    );
    println!(
        "  selective scan share of the step: {:.1}%",
        100.0 * scan_share
    );
    let pool_peak = print_memory(a, config, device, measured.heap, params, rss_reset);
    if a.json || a.json_file.is_some() {
        let json = serde_json::json!({
            "preset": a.preset,
            "batch": a.batch,
            "seq_len": a.seq_len,
            "device": a.device.to_string(),
            "kernel_compiler": kernel_compiler(a.device),
            "attention_kernels": attention,
            "precision": a.precision.to_string(),
            "threads": rayon::current_num_threads(),
            "step_seconds": step_time,
            "tokens_per_sec": tok_s,
            "model_gflops": achieved,
            "peak_gflops": peak.as_ref().map(|p| p.gflops),
            "peak_library": peak.as_ref().map(|p| p.source.clone()),
            "fraction_of_peak": peak.as_ref().map(|p| achieved / p.gflops),
            "load_average": load_average(),
            "device_pool_peak_mb": pool_peak.map(|bytes| bytes as f64 / 1e6),
            "traced_step": measured.split,
        });
        if a.json {
            println!("{json}");
        }
        if let Some(path) = &a.json_file {
            std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
        }
    }
    Ok(())
}

/// The step's memory next to its estimate: the training state (as one rank lays it out) plus
/// the activations `--dry-run` estimates for this model, precision and checkpointing. Returns
/// the device memory pool's peak in bytes, where the device has pools.
fn print_memory(
    a: &ModelArgs,
    config: &ZambaConfig,
    device: &Device,
    heap: HeapUse,
    params: f64,
    rss_reset: bool,
) -> Option<u64> {
    let state = StateBytes::per_param(a.precision, Sharding::Replicated, 1)
        .times(params as u64)
        .total();
    let estimate = ActivationMemory::of(
        config,
        a.batch,
        a.seq_len,
        a.precision,
        a.activation_checkpointing,
        attention_kernel(a.device),
    );
    println!(
        "  memory: parameters, gradients and optimizer state {:.1} MB (estimate); activations kept for backward {:.1} MB on the host heap (estimate {:.1} MB); step peak heap {:.1} MB (states + estimated activations {:.1} MB)",
        state / 1e6,
        heap.activations as f64 / 1e6,
        estimate.kept / 1e6,
        (heap.start + heap.peak_over_start) as f64 / 1e6,
        (state + estimate.peak()) / 1e6,
    );
    let pool_peak = device.memory_pool_report().map(|pools| {
        let peak: u64 = pools.iter().map(|p| p.pages_peak * p.page_size).sum();
        println!("  device memory pool peak {:.1} MB", peak as f64 / 1e6);
        peak
    });
    if let Some(rss) = memory::peak_rss_bytes() {
        let note = match rss_reset {
            true => "since the peak measurement",
            false => "includes the 512 MB bandwidth probe",
        };
        println!("  peak RSS {:.1} MB ({note})", rss as f64 / 1e6);
    }
    pool_peak
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
