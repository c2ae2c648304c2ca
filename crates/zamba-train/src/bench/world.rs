//! `bench model --world N`: the whole data-parallel training step — forward/backward of each rank's
//! rows, bucketed gradient averaging, the agreement on loss and norm, AdamW and the parameter
//! update — with N ranks as threads against one rank, on the same global batch and the same cores;
//! and the heap each rank's training state takes (parameters, gradients, master weights, moments)
//! against the estimate `--dry-run` makes of it. With `--link-gbps`, the ranks' links are
//! throttled to a slower interconnect ([`ThrottledLink`]) and the step's data-parallel efficiency
//! is what the communication it cannot hide behind the backward leaves of it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use burn::tensor::{Device, Tensor};
use zamba_dist::{Communicator, DistOptions, ReduceOp, ThrottledLink};
use zamba_model::params::{FlopsPerToken, ParamCounts};
use zamba_model::{
    ActivationCheckpointing, Execution, Precision, RandomInit, ZambaConfig, ZambaModel,
};
use zamba_train::data_parallel::{DataParallel, Sharding, StateBytes};
use zamba_train::memory;
use zamba_train::optim::AdamW;
use zamba_train::step::{StepContext, StepEvent, StepObserver, train_step};

use super::{BENCH_STEP, bench_adamw, random_batch};

/// The measured state may differ from the estimate by this share of it: the bookkeeping of each
/// tensor and of the gradient and moment maps, the step's small tensors (inputs, the loss) —
/// about 0.2% of zamba-bench's state and 3% of zamba-tiny's.
const STATE_TOLERANCE: f64 = 0.05;

/// What `bench model --world` runs.
pub struct WorldBench<'a> {
    pub config: &'a ZambaConfig,
    pub batch: usize,
    pub seq_len: usize,
    pub steps: usize,
    pub world: usize,
    pub sharding: Sharding,
    pub precision: Precision,
    pub checkpointing: ActivationCheckpointing,
    /// Reduce gradients during the backward (the trainer's default) rather than after it.
    pub overlap: bool,
    /// Simulate a slower link per rank.
    pub link: Option<LinkSpeed>,
    /// Gradient buckets of up to this many MiB.
    pub bucket_mb: f64,
}

/// The simulated link of `--link-gbps`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LinkSpeed {
    Gbps(f64),
    /// As fast as makes a step's gradient traffic take as long as its backward, both measured
    /// on a calibration step on an unthrottled link (`--link-gbps auto`).
    MatchBackward,
}

impl std::str::FromStr for LinkSpeed {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "auto" => Ok(LinkSpeed::MatchBackward),
            number => match number.parse::<f64>() {
                Ok(gbps) if gbps.is_finite() && gbps > 0.0 => Ok(LinkSpeed::Gbps(gbps)),
                _ => Err(format!(
                    "{text:?} is neither a positive number of Gbit/s (e.g. 0.1) nor \"auto\""
                )),
            },
        }
    }
}

/// A link this fast puts no measurable time on the wire: the calibration step's.
const UNTHROTTLED_GBPS: f64 = 1e6;

/// Time per step on rank 0, split into its parts, and the heap of the ranks' training state.
#[derive(Default, Clone, Copy)]
struct StepTimes {
    compute: Duration,
    sync: Duration,
    update: Duration,
    /// The last micro-batch's backward (within `compute`).
    backward: Duration,
    /// What the step waited on communication ([`StepOutcome::communication_wait`]).
    exposed: Duration,
    /// Time on the simulated link (with `--link-gbps`).
    wire: Duration,
    /// The simulated link's Gbit/s (with `--link-gbps`; chosen by the calibration with `auto`).
    gbps: f64,
    /// Live heap of all ranks' state once the gradients are summed, less the heap once the
    /// ranks have dropped their models and optimizers, divided by the ranks.
    state_per_rank: f64,
}

impl StepTimes {
    fn total(&self) -> Duration {
        self.compute + self.sync + self.update
    }
}

/// Runs `steps` measured steps (after one warm-up) with 1 and with `world` thread ranks; with a
/// simulated link, with `world` ranks only.
pub fn run(b: &WorldBench) -> Result<()> {
    let (batch, world) = (b.batch, b.world);
    if batch % world != 0 {
        bail!("--batch {batch} must be divisible by --world {world}");
    }
    if let Some(speed) = b.link {
        return run_on_link(b, speed);
    }
    let flops = FlopsPerToken::of(b.config, b.seq_len).train();
    let tokens = (batch * b.seq_len) as f64;
    println!(
        "data-parallel step, {batch} × {} tokens per step, {:?}, precision {}, ranks as threads sharing {} cores",
        b.seq_len,
        b.sharding,
        b.precision,
        rayon::current_num_threads()
    );
    let mut baseline = None;
    let mut mismatches = Vec::new();
    for w in [1, world] {
        let t = measure(b, batch / w, w)?;
        let step = t.total().as_secs_f64();
        println!(
            "  world {w}: {step:.3} s/step → {:.0} tokens/s, {:.2} GFLOP/s; forward+backward {:.3} s, \
             gradient averaging + agreement {:.3} s ({:.1}%), AdamW + parameter update {:.3} s ({:.1}%)",
            tokens / step,
            flops * tokens / step / 1e9,
            t.compute.as_secs_f64(),
            t.sync.as_secs_f64(),
            100.0 * t.sync.as_secs_f64() / step,
            t.update.as_secs_f64(),
            100.0 * t.update.as_secs_f64() / step,
        );
        if let Some(mismatch) = check_state(b, w, t.state_per_rank) {
            mismatches.push(mismatch);
        }
        match baseline {
            None => baseline = Some(step),
            Some(one) => println!(
                "  world {w} vs world 1 on the same batch and cores: {:+.1}% step time",
                100.0 * (step / one - 1.0)
            ),
        }
    }
    match mismatches.is_empty() {
        true => Ok(()),
        false => bail!("{}", mismatches.join("; ")),
    }
}

/// `world` ranks on links of `gbps` Gbit/s: the step, the traffic and the efficiency.
fn run_on_link(b: &WorldBench, speed: LinkSpeed) -> Result<()> {
    let (batch, world) = (b.batch, b.world);
    let link = match speed {
        LinkSpeed::Gbps(gbps) => format!("a simulated {gbps} Gbit/s link"),
        LinkSpeed::MatchBackward => {
            "a simulated link on which the step's gradient traffic takes as long as its backward \
             (both measured on a calibration step)"
                .into()
        }
    };
    println!(
        "data-parallel step, {batch} × {} tokens per step, {:?}, precision {}, activation checkpointing {}, \
         {world} ranks as threads sharing {} cores, each on {link}, buckets of {} MiB, \
         reduction {}",
        b.seq_len,
        b.sharding,
        b.precision,
        b.checkpointing,
        rayon::current_num_threads(),
        b.bucket_mb,
        match b.overlap {
            true => "overlapped with the backward",
            false => "after the backward (--no-overlap)",
        }
    );
    let t = measure(b, batch / world, world)?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let step = t.total();
    if speed == LinkSpeed::MatchBackward {
        println!("  link: {:.4} Gbit/s per rank", t.gbps);
    }
    println!(
        "  {:.1} ms/step: forward+backward {:.1} ms (backward {:.1} ms), gradient averaging + agreement {:.1} ms, \
         AdamW + parameter update {:.1} ms; {:.1} ms on the wire per step",
        ms(step),
        ms(t.compute),
        ms(t.backward),
        ms(t.sync),
        ms(t.update),
        ms(t.wire)
    );
    let exposed = t.exposed.min(step);
    println!(
        "data-parallel efficiency {:.1}% (exposed communication {:.1} ms of {:.1} ms per step)",
        100.0 * (1.0 - exposed.as_secs_f64() / step.as_secs_f64()),
        ms(exposed),
        ms(step)
    );
    match check_state(b, world, t.state_per_rank) {
        Some(mismatch) => bail!("{mismatch}"),
        None => Ok(()),
    }
}

/// Prints a world's measured state per rank next to its estimate; the mismatch, if beyond
/// [`STATE_TOLERANCE`].
fn check_state(b: &WorldBench, world: usize, measured: f64) -> Option<String> {
    let params = ParamCounts::of(b.config).total();
    let sharding = match world {
        1 => Sharding::Replicated,
        _ => b.sharding,
    };
    let e = StateBytes::per_param(b.precision, sharding, world).times(params);
    let gap = (measured - e.total()) / e.total();
    let mb = |bytes: f64| bytes / 1e6;
    println!(
        "  world {world}: training state per rank {:.1} MB on the heap; estimate {:.1} MB (parameters {:.1} + \
         gradients {:.1} + master weights {:.1} + AdamW moments {:.1}): {:+.1}% (tolerance ±{:.0}%)",
        mb(measured),
        mb(e.total()),
        mb(e.params),
        mb(e.grads),
        mb(e.master),
        mb(e.moments),
        100.0 * gap,
        100.0 * STATE_TOLERANCE
    );
    (gap.abs() > STATE_TOLERANCE).then(|| {
        format!(
            "world {world}: the training state takes {:.1} MB per rank on the heap, {:+.1}% off the estimate of \
             {:.1} MB (tolerance ±{:.0}%)",
            mb(measured),
            100.0 * gap,
            mb(e.total()),
            100.0 * STATE_TOLERANCE
        )
    })
}

fn measure(b: &WorldBench, rows: usize, world: usize) -> Result<StepTimes> {
    let comms = zamba_dist::thread_group(world, &DistOptions::default());
    let rank0 = Mutex::new(StepTimes::default());
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let rank0 = &rank0;
                scope.spawn(move || -> Result<()> {
                    let rank = comm.rank();
                    let times = match b.link {
                        Some(speed) => {
                            let gbps = match speed {
                                LinkSpeed::Gbps(gbps) => gbps,
                                LinkSpeed::MatchBackward => UNTHROTTLED_GBPS,
                            };
                            let link = ThrottledLink::new(comm, gbps);
                            rank_steps(b, rows, &link, Some((&link, speed)))?
                        }
                        None => rank_steps(b, rows, comm.as_ref(), None)?,
                    };
                    if rank == 0 {
                        *rank0.lock().expect("not poisoned") = times;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| anyhow!("a rank panicked"))?)
    })?;
    Ok(rank0.into_inner().expect("not poisoned"))
}

/// One rank's steps (on `link` when it is the communicator); returns the mean time of the
/// measured ones and, from one more step, the heap of the ranks' state.
fn rank_steps(
    b: &WorldBench,
    rows: usize,
    comm: &dyn Communicator,
    link: Option<(&ThrottledLink, LinkSpeed)>,
) -> Result<StepTimes> {
    let device = Device::flex().autodiff();
    let compute = Device::flex();
    let execution = Execution {
        precision: b.precision,
        checkpointing: b.checkpointing,
    };
    let model = ZambaModel::from_source(b.config, &mut RandomInit::new(0), &device)?
        .with_execution(execution);
    let (rank, world) = (comm.rank(), comm.world_size());
    let sharding = match world {
        1 => Sharding::Replicated,
        _ => b.sharding,
    };
    let bucket_bytes = (b.bucket_mb * (1 << 20) as f64) as usize;
    let dp = DataParallel::new(&model, bucket_bytes, sharding, rank, world)
        .with_reduction_order(&model.gradient_order())
        .with_precision(b.precision);
    let mut optimizer = AdamW::new(bench_adamw());
    let mut model = dp.prepare(model, &mut optimizer, comm, &compute)?;
    let (inputs, targets) =
        random_batch(rank as u64, rows, b.seq_len, b.config.vocab_size, &device);
    let mut total = StepTimes::default();
    let on_wire = || link.map_or(Duration::ZERO, |(l, _)| l.time_on_wire());
    let bytes_on_wire = || link.map_or(0, |(l, _)| l.bytes_on_wire());
    // A warm-up step, with `auto` a calibration step, then the measured steps, then the probe.
    let calibration = match link {
        Some((link, LinkSpeed::MatchBackward)) => Some((1, link)),
        _ => None,
    };
    let first_measured = 1 + usize::from(calibration.is_some());
    let probe_step = first_measured + b.steps;
    for step in 0..=probe_step {
        comm.barrier()?;
        let probe = step == probe_step;
        // The heap probe's barrier must not run beside the communication thread's collectives.
        let ctx = StepContext {
            comm,
            device: &device,
            compute: &compute,
            dp: &dp,
            overlap: b.overlap && !probe,
        };
        let mut clock = RankClock::new(comm, probe);
        let micro_batches = std::iter::once((inputs.clone(), targets.clone()));
        let (wire_before, bytes_before) = (on_wire(), bytes_on_wire());
        let outcome;
        (model, outcome) = train_step(
            model,
            &mut optimizer,
            micro_batches,
            &ctx,
            &BENCH_STEP,
            &mut clock,
        )?;
        if probe {
            total.state_per_rank = clock.state_heap as f64;
        } else if let Some((_, link)) = calibration.filter(|(at, _)| *at == step) {
            let backward = clock.gradients - clock.forward;
            let bytes = bytes_on_wire() - bytes_before;
            total.gbps = match_backward(comm, link, bytes, backward, &compute)?;
        } else if step >= first_measured {
            total.compute += clock.gradients - clock.start;
            total.backward += clock.gradients - clock.forward;
            total.sync += clock.reduced - clock.gradients;
            total.update += clock.updated - clock.reduced;
            total.exposed += outcome.communication_wait;
            total.wire += on_wire() - wire_before;
        }
    }
    // What the state held is what dropping it frees: buffers the compute library keeps per
    // thread once it has run are in both readings.
    drop((model, optimizer, inputs, targets));
    let without_state = rank0_heap(comm)? as f64;
    let n = b.steps.max(1) as u32;
    Ok(StepTimes {
        compute: total.compute / n,
        sync: total.sync / n,
        update: total.update / n,
        backward: total.backward / n,
        exposed: total.exposed / n,
        wire: total.wire / n,
        gbps: match link {
            Some((_, LinkSpeed::Gbps(gbps))) => gbps,
            _ => total.gbps,
        },
        state_per_rank: (total.state_per_rank - without_state) / world as f64,
    })
}

/// Sets `link` to the speed at which `bytes` take `backward` on the wire, both averaged over the
/// ranks so that every rank's link is the same; returns that speed in Gbit/s.
fn match_backward(
    comm: &dyn Communicator,
    link: &ThrottledLink,
    bytes: u64,
    backward: Duration,
    compute: &Device,
) -> Result<f64> {
    let mine = Tensor::<1>::from_floats([bytes as f32, backward.as_secs_f32()], compute);
    let mean = comm
        .all_reduce(mine, ReduceOp::Avg)?
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow!("reading the calibration back: {e:?}"))?;
    let (bytes, seconds) = (mean[0] as f64, mean[1] as f64);
    if bytes <= 0.0 || seconds <= 0.0 {
        bail!(
            "--link-gbps auto: the calibration step sent {bytes} bytes in a backward of {seconds} s; \
             nothing to match (is the gradient reduced at all?)"
        );
    }
    let gbps = bytes * 8.0 / seconds / 1e9;
    link.set_gbps(gbps);
    Ok(gbps)
}

/// The process's live heap as rank 0 reads it while every rank waits at the same point (ranks
/// are threads sharing one heap); 0 on the other ranks.
fn rank0_heap(comm: &dyn Communicator) -> Result<usize> {
    comm.barrier()?;
    let live = match comm.rank() {
        0 => memory::heap().0,
        _ => 0,
    };
    comm.barrier()?;
    Ok(live)
}

/// When a rank's step passed its points; the update ends at a barrier, so that its time
/// includes the slowest rank's (Burn's CPU ops run eagerly: no device to synchronise). A probing
/// clock also reads the heap of every rank's state once the gradients are summed (the
/// activations are freed then, and the reduction has not begun).
struct RankClock<'a> {
    comm: &'a dyn Communicator,
    probe: bool,
    start: Instant,
    /// The (last) micro-batch's forward is done.
    forward: Instant,
    gradients: Instant,
    reduced: Instant,
    updated: Instant,
    state_heap: usize,
}

impl<'a> RankClock<'a> {
    fn new(comm: &'a dyn Communicator, probe: bool) -> Self {
        let now = Instant::now();
        Self {
            comm,
            probe,
            start: now,
            forward: now,
            gradients: now,
            reduced: now,
            updated: now,
            state_heap: 0,
        }
    }
}

impl StepObserver for RankClock<'_> {
    fn observe(&mut self, event: StepEvent) -> Result<()> {
        match event {
            StepEvent::Forward { .. } => self.forward = Instant::now(),
            StepEvent::Gradients => {
                self.gradients = Instant::now();
                if self.probe {
                    self.state_heap = rank0_heap(self.comm)?;
                }
            }
            StepEvent::Reduced => self.reduced = Instant::now(),
            StepEvent::Updated => {
                self.comm.barrier()?;
                self.updated = Instant::now();
            }
        }
        Ok(())
    }
}
