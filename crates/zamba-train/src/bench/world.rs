//! `bench model --world N`: the whole data-parallel training step — forward/backward of each rank's
//! rows, bucketed gradient averaging, the agreement on loss and norm, AdamW and the parameter
//! update — with N ranks as threads against one rank, on the same global batch and the same cores.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use burn::tensor::Device;
use zamba_dist::{Communicator, DistOptions};
use zamba_model::params::FlopsPerToken;
use zamba_model::{RandomInit, ZambaConfig, ZambaModel};
use zamba_train::data_parallel::{DataParallel, Sharding};
use zamba_train::optim::AdamW;
use zamba_train::step::{StepContext, StepEvent, StepObserver, train_step};

use super::{BENCH_STEP, bench_adamw, random_batch};

/// Time per step on rank 0, split into its parts.
#[derive(Default, Clone, Copy)]
struct StepTimes {
    compute: Duration,
    sync: Duration,
    update: Duration,
}

impl StepTimes {
    fn total(&self) -> Duration {
        self.compute + self.sync + self.update
    }
}

/// Runs `steps` measured steps (after one warm-up) with 1 and with `world` thread ranks.
pub fn run(
    config: &ZambaConfig,
    batch: usize,
    seq_len: usize,
    steps: usize,
    world: usize,
    sharding: Sharding,
) -> Result<()> {
    if batch % world != 0 {
        bail!("--batch {batch} must be divisible by --world {world}");
    }
    let flops = FlopsPerToken::of(config, seq_len).train();
    let tokens = (batch * seq_len) as f64;
    println!(
        "data-parallel step, {batch} × {seq_len} tokens per step, {sharding:?}, ranks as threads sharing {} cores",
        rayon::current_num_threads()
    );
    let mut baseline = None;
    for w in [1, world] {
        let t = measure(config, batch / w, seq_len, steps, w, sharding)?;
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
        match baseline {
            None => baseline = Some(step),
            Some(one) => println!(
                "  world {w} vs world 1 on the same batch and cores: {:+.1}% step time",
                100.0 * (step / one - 1.0)
            ),
        }
    }
    Ok(())
}

fn measure(
    config: &ZambaConfig,
    rows: usize,
    seq_len: usize,
    steps: usize,
    world: usize,
    sharding: Sharding,
) -> Result<StepTimes> {
    let comms = zamba_dist::thread_group(world, &DistOptions::default());
    let rank0 = Mutex::new(StepTimes::default());
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let rank0 = &rank0;
                scope.spawn(move || -> Result<()> {
                    let times = rank_steps(config, rows, seq_len, steps, comm.as_ref(), sharding)?;
                    if comm.rank() == 0 {
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

/// One rank's steps; returns the mean time of the measured ones.
fn rank_steps(
    config: &ZambaConfig,
    rows: usize,
    seq_len: usize,
    steps: usize,
    comm: &dyn Communicator,
    sharding: Sharding,
) -> Result<StepTimes> {
    let device = Device::flex().autodiff();
    let compute = Device::flex();
    let mut model = ZambaModel::from_source(config, &mut RandomInit::new(0), &device)?;
    let dp = DataParallel::new(&model, 25 << 20, sharding, comm.rank(), comm.world_size());
    let mut optimizer = AdamW::new(bench_adamw());
    device.seed(comm.rank() as u64);
    let (inputs, targets) = random_batch(rows, seq_len, config.vocab_size, &device);
    let ctx = StepContext {
        comm,
        device: &device,
        compute: &compute,
        dp: &dp,
    };
    let mut total = StepTimes::default();
    for step in 0..=steps {
        comm.barrier()?;
        let mut clock = RankClock::new(comm);
        let micro_batches = std::iter::once((inputs.clone(), targets.clone()));
        (model, _) = train_step(
            model,
            &mut optimizer,
            micro_batches,
            &ctx,
            &BENCH_STEP,
            &mut clock,
        )?;
        if step > 0 {
            total.compute += clock.gradients - clock.start;
            total.sync += clock.reduced - clock.gradients;
            total.update += clock.updated - clock.reduced;
        }
    }
    let n = steps.max(1) as u32;
    Ok(StepTimes {
        compute: total.compute / n,
        sync: total.sync / n,
        update: total.update / n,
    })
}

/// When a rank's step passed its points; the update ends at a barrier, so that its time
/// includes the slowest rank's (Burn's CPU ops run eagerly: no device to synchronise).
struct RankClock<'a> {
    comm: &'a dyn Communicator,
    start: Instant,
    gradients: Instant,
    reduced: Instant,
    updated: Instant,
}

impl<'a> RankClock<'a> {
    fn new(comm: &'a dyn Communicator) -> Self {
        let now = Instant::now();
        Self {
            comm,
            start: now,
            gradients: now,
            reduced: now,
            updated: now,
        }
    }
}

impl StepObserver for RankClock<'_> {
    fn observe(&mut self, event: StepEvent) -> Result<()> {
        match event {
            StepEvent::Forward { .. } => {}
            StepEvent::Gradients => self.gradients = Instant::now(),
            StepEvent::Reduced => self.reduced = Instant::now(),
            StepEvent::Updated => {
                self.comm.barrier()?;
                self.updated = Instant::now();
            }
        }
        Ok(())
    }
}
