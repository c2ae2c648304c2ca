//! `bench model`: the trainer's step (forward, backward, gradient averaging over one rank, AdamW
//! and the parameter update, exactly as `zamba-train` runs them) on a model preset, against the
//! machine's f32 peak, with the step's heap use next to its theoretical minimum.

use std::time::{Duration, Instant};

use anyhow::Result;
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor};
use clap::Args;
use zamba_dist::DistOptions;
use zamba_model::params::{FlopsPerToken, ParamCounts};
use zamba_model::{RandomInit, ZambaConfig, ZambaModel, next_token_loss};
use zamba_train::data_parallel::{DataParallel, Sharding};
use zamba_train::memory;
use zamba_train::optim::AdamW;

use super::{Machine, bench_adamw, load_average, scan::scan_times, time};

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
    /// Skip torch.matmul in the peak (see `bench peak`).
    #[arg(long)]
    no_torch: bool,
    /// Also print the figures as one JSON object on the last line (for scripts).
    #[arg(long)]
    json: bool,
}

/// Mean times of the measured steps and the largest heap use among them.
struct StepMeasurement {
    grads: Duration,
    update: Duration,
    heap: HeapUse,
}

pub(super) fn run(a: &ModelArgs) -> Result<()> {
    let config = ZambaConfig::preset(&a.preset)?;
    if a.world > 1 {
        let sharding = match a.zero {
            true => Sharding::Zero1,
            false => Sharding::Replicated,
        };
        return super::world::run(&config, a.batch, a.seq_len, a.steps, a.world, sharding);
    }
    let machine = Machine::measure(!a.no_torch);
    machine.print();
    // The bandwidth probe's 512 MB would otherwise be the process's peak RSS.
    let rss_reset = memory::reset_peak_rss();
    let device = Device::flex().autodiff();
    let model = ZambaModel::from_source(&config, &mut RandomInit::new(0), &device)?;
    let tokens = Tensor::<2, Int>::random(
        [a.batch, a.seq_len + 1],
        Distribution::Uniform(0.0, config.vocab_size as f64),
        &device,
    );
    let (model, measured) = train_steps(model, &tokens, a.steps)?;
    let forward_time = time(a.steps, || {
        let _ = model.valid().forward(tokens.clone().inner()).into_data();
    })
    .as_secs_f64();
    report(a, &config, &machine, &measured, forward_time, rss_reset);
    Ok(())
}

/// One warm-up step (allocator, first-touch page faults, optimizer moments) and `steps` measured
/// ones of the trainer's step on a world of one.
fn train_steps(
    mut model: ZambaModel,
    tokens: &Tensor<2, Int>,
    steps: usize,
) -> Result<(ZambaModel, StepMeasurement)> {
    let compute = Device::flex();
    let comm = zamba_dist::thread_group(1, &DistOptions::default())
        .pop()
        .expect("a group of one");
    let dp = DataParallel::new(&model, 25 << 20, Sharding::Replicated, 0, 1);
    let mut optimizer = AdamW::new(bench_adamw());
    let (mut grads_time, mut update_time) = (Duration::ZERO, Duration::ZERO);
    let mut heap = HeapUse::default();
    for step in 0..=steps {
        memory::reset_peak();
        let (live_before, _) = memory::heap();
        let t = Instant::now();
        let loss = next_token_loss(model.forward(tokens.clone()), tokens.clone());
        let activations = memory::heap().0.saturating_sub(live_before);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let backward_done = Instant::now();
        let (grads, _) = dp.reduce_gradients(grads, comm.as_ref(), &compute)?;
        model = dp.update(
            model,
            &mut optimizer,
            grads,
            1e-4,
            1.0,
            comm.as_ref(),
            &compute,
        )?;
        let done = Instant::now();
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
    let n = steps.max(1) as u32;
    let measured = StepMeasurement {
        grads: grads_time / n,
        update: update_time / n,
        heap,
    };
    Ok((model, measured))
}

fn report(
    a: &ModelArgs,
    config: &ZambaConfig,
    machine: &Machine,
    measured: &StepMeasurement,
    forward_time: f64,
    rss_reset: bool,
) {
    let (grads_time, update_time) = (measured.grads.as_secs_f64(), measured.update.as_secs_f64());
    let step_time = grads_time + update_time;
    let tokens_per_step = (a.batch * a.seq_len) as f64;
    let flops = FlopsPerToken::of(config, a.seq_len);
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
    let params = ParamCounts::of(config).total() as f64;
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
    let heap = measured.heap;
    let state = 16.0 * params;
    let floor = activation_floor_bytes(config, a.batch, a.seq_len + 1);
    println!(
        "  memory: parameters+gradients+AdamW moments (16 B/param) {:.1} MB; activations kept for backward {:.1} MB (floor {:.1} MB); step peak heap {:.1} MB (minimum {:.1} MB)",
        state / 1e6,
        heap.activations as f64 / 1e6,
        floor / 1e6,
        (heap.start + heap.peak_over_start) as f64 / 1e6,
        (state + floor) / 1e6,
    );
    if let Some(rss) = memory::peak_rss_bytes() {
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
