//! The training loop: `zamba-train --config FILE.toml`. Phase 1 and phase 2 (annealing) are the
//! same loop with different configs.
//!
//! [`train`] sets up what is global to the process (threads, the signal handler), finds out which
//! ranks this process runs (one; one of a launched group; or all of them as threads) and runs
//! [`run_rank`] for each. `run_rank` reads top to bottom: where the run starts from, then per step
//! the step itself ([`crate::step::train_step`]: micro-batches → local gradient sum → one bucketed
//! all-reduce → global norm → skip decision → clip + AdamW) → its metrics → evaluation if due →
//! checkpoint if due.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use zamba_data::{DataConfig, MixtureLoader};
use zamba_dist::ReduceOp;
use zamba_model::params::FlopsPerToken;
use zamba_model::{Execution, ZambaModel};
use zamba_trace::{Category, span, span_with};

use crate::batch::micro_batch;
use crate::checkpoint::background::{PendingCheckpoint, Sealed};
use crate::checkpoint::{self, Snapshot, Target, TrainerState};
use crate::config::Device as DeviceChoice;
use crate::config::{MAX_THREADS, RunConfig, TrainSection};
use crate::data_parallel::DataParallel;
use crate::device::{cube_cpu_warning, device_for};
use crate::eval;
use crate::fault_injection::InjectedFault;
use crate::launch::Ranks;
use crate::memory_plan::Fit;
use crate::metrics::{self, CheckpointRecord, EvalRecord, MetricsWriter, StepRecord};
use crate::optim::{AdamW, AdamWParams};
use crate::peak::TRAINER_PEAK_SHAPES;
use crate::profile::{self, StepProfiler};
use crate::rank::RankContext;
use crate::resume::{self, Start};
use crate::run_lock::RunLock;
use crate::samples::{self, SampleLog, SampleRecord};
use crate::shared_dir;
use crate::signals::StopSignal;
use crate::step::{StepContext, StepOutcome, StepSettings, train_step};

pub struct TrainOptions {
    pub config: PathBuf,
    pub overrides: Vec<String>,
    /// Resume from this checkpoint instead of the newest one in the run dir.
    pub resume: Option<PathBuf>,
    /// Resume even if the data sources changed since the checkpoint.
    pub allow_data_change: bool,
}

/// Trains the run `opts.config` describes, as every rank this process is responsible for.
pub fn train(opts: &TrainOptions) -> Result<()> {
    let mut config = RunConfig::load(&opts.config, &opts.overrides)?;
    let ranks = Ranks::detect(&config)?;
    config.runtime.world_size = ranks.world_size();
    config
        .validate()
        .with_context(|| format!("with {} ranks", ranks.world_size()))?;
    Fit::of(&config, ranks.on_this_host()).check(&config)?;
    set_up_threads(&config)?;
    if let Some(warning) = cube_cpu_warning(config.runtime.device, config.total_tokens()) {
        eprintln!("{warning}");
    }
    let fault = InjectedFault::from_env()?;
    let stop = StopSignal::installed()?;
    stop.begin_run(Duration::from_secs_f64(config.dist.signal_grace_s));
    let trained = ranks.run(&config, stop, |comm, local_rank| {
        let device =
            device_for(config.runtime.device, local_rank, config.runtime.precision)?.autodiff();
        let ctx = RankContext {
            rank: comm.rank(),
            world_size: comm.world_size(),
            local_rank,
            device,
            comm,
        };
        run_rank(&ctx, &config, opts, stop, fault.as_ref())
    });
    trained.map_err(|e| explain_interruption(e, &config.run.dir))
}

/// The compute pool: `runtime.threads`, else rayon's own choice, which `RAYON_NUM_THREADS`
/// sets — checked here, as rayon would panic on a value it cannot honour.
fn set_up_threads(config: &RunConfig) -> Result<()> {
    if let Ok(value) = std::env::var("RAYON_NUM_THREADS") {
        match value.trim().parse::<usize>() {
            Ok(n) if n <= MAX_THREADS => {}
            _ => bail!(
                "RAYON_NUM_THREADS={value:?} is not a thread count from 0 (all cores) to {MAX_THREADS}; \
                 set runtime.threads in the config, or fix the variable"
            ),
        }
    }
    if let Some(threads) = config.runtime.threads {
        // The first run of a process sets the pool; later runs (tests) keep it.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
    Ok(())
}

/// Whether a signal ended a wait somewhere in `e`'s causes.
fn interrupted(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<zamba_dist::DistError>(),
            Some(zamba_dist::DistError::Interrupted { .. })
        ) || cause.to_string().starts_with("interrupted (")
    })
}

/// A run a signal stopped before it could checkpoint says so, and how to go on.
fn explain_interruption(e: anyhow::Error, run_dir: &Path) -> anyhow::Error {
    if !interrupted(&e) {
        return e;
    }
    e.context(format!(
        "stopped by a signal before a checkpoint could be written; rerun the same command to resume from the \
         newest checkpoint in {} (if there is one: they are intact)",
        checkpoint::checkpoints_dir(run_dir).display()
    ))
}

/// Everything one rank carries from step to step.
struct RankRun {
    dp: DataParallel,
    model: ZambaModel,
    optimizer: AdamW,
    loader: MixtureLoader,
    state: TrainerState,
    /// Rank 0 only.
    metrics: Option<MetricsWriter>,
    /// Rank 0 only, with `logging.sample_ids`.
    samples: Option<SampleLog>,
    /// GFLOP/s of one device that `mfu` is relative to (rank 0 only).
    mfu_peak: Option<f64>,
    /// Rank 0's hold on the run directory, for the whole run.
    _lock: Option<RunLock>,
}

/// The whole run, as one rank: per step, the step itself → its record → evaluation if due →
/// checkpoint if due. `fault`: a failure to inject (`ZAMBA_INJECT_FAULT`).
fn run_rank(
    ctx: &RankContext,
    config: &RunConfig,
    opts: &TrainOptions,
    stop: &StopSignal,
    fault: Option<&InjectedFault>,
) -> Result<()> {
    let Some(mut run) = start_rank(ctx, config, opts)? else {
        return Ok(());
    };
    stop.training_started();
    let steps = config.train.steps as u64;
    let progress = progress_bar(
        ctx.is_main() && config.logging.progress,
        steps,
        run.state.step,
    );
    let session = Session {
        start: Instant::now(),
        tokens_at_start: run.state.tokens,
    };
    let mut last_loss = f64::NAN;
    let mut checkpoints = Checkpoints {
        asynchronous: config.checkpoint_async(),
        pending: None,
        fault: fault.cloned(),
    };
    let mut profiler = StepProfiler::new(config.train.profile_steps, ctx.rank, run.state.step);

    while run.state.step < steps {
        let step = run.state.step;
        if let Some(fault) = fault {
            fault.check(ctx.rank, step);
        }
        profiler.before_step(step, &ctx.compute_device());
        let step_span = span_with(Category::Step, || format!("step {step}"));
        let started = Instant::now();

        let outcome;
        (run, outcome) = run.step(ctx, config, stop, &progress)?;
        if outcome.skipped.is_none() {
            last_loss = outcome.loss;
        }
        record_step(ctx, config, &mut run, &outcome, started, &progress)?;
        if eval_due(config, run.state.step) && !outcome.interrupted {
            evaluate_and_record(ctx, config, &mut run, &progress)?;
        }
        checkpoints.poll(ctx, config, &mut run, &progress)?;
        if outcome.interrupted || checkpoint_due(config, run.state.step) {
            let _shield = stop.shield();
            let last = outcome.interrupted || run.state.step == steps;
            checkpoints.save(ctx, config, &mut run, last, &progress)?;
        }

        drop(step_span);
        if let Some((path, trace)) =
            profiler.after_step(step, outcome.interrupted, &config.run.dir)?
            && ctx.is_main()
        {
            // Printed even without a progress bar: it says where the trace is.
            progress.suspend(|| eprintln!("{}", profile::describe(&path, &trace)));
        }
        if outcome.interrupted {
            progress.abandon_with_message("interrupted");
            if ctx.is_main() {
                eprintln!(
                    "interrupted after step {step}: checkpoint written; run the same command to resume"
                );
            }
            return Ok(());
        }
    }
    // The last step's checkpoint was waited for; nothing may be left pending at the end.
    checkpoints.finish(ctx, config, &mut run, &progress)?;
    progress.finish();
    if ctx.is_main() {
        report_done(ctx, config, &run.state, last_loss, &session)?;
    }
    Ok(())
}

impl RankRun {
    /// One optimizer step on the loader's next global batch (this rank's rows), then the
    /// trainer state's bookkeeping. The model moves through the step (no second reference to
    /// its parameters), so the update can reuse their buffers.
    fn step(
        mut self,
        ctx: &RankContext,
        config: &RunConfig,
        stop: &StopSignal,
        progress: &ProgressBar,
    ) -> Result<(Self, StepOutcome)> {
        let batch = span(Category::Data, "next batch").run(|| self.loader.next_batch())?;
        if config.logging.sample_ids {
            let ids = samples::gather(ctx, &batch, &self.loader.source_names())?;
            if let Some(log) = &mut self.samples {
                log.write(&SampleRecord {
                    step: self.state.step,
                    samples: ids,
                })?;
            }
        }
        let micro = config.batch.micro_batch;
        let micro_batches = (0..config.grad_accum_steps())
            .map(|m| micro_batch(&batch, m * micro, micro, &ctx.device));
        let compute = ctx.compute_device();
        let step_ctx = StepContext {
            comm: ctx.comm.as_ref(),
            device: &ctx.device,
            compute: &compute,
            dp: &self.dp,
            overlap: config.dist.overlap_grad_reduce,
        };
        let loss_window = &self.state.loss_window;
        let settings = StepSettings {
            lr: config.lr(self.state.step as usize),
            clip_grad_norm: config.optimizer.clip_grad_norm,
            skip: &|loss, grad_norm| skip_reason(loss, grad_norm, loss_window, &config.train),
            stop: Some(stop),
        };
        let (model, outcome) = train_step(
            self.model,
            &mut self.optimizer,
            micro_batches,
            &step_ctx,
            &settings,
            &mut (),
        )?;
        self.model = model;
        match &outcome.skipped {
            Some(reason) => count_skip(&mut self.state, reason, config, progress)?,
            None => {
                self.state.consecutive_skips = 0;
                push_window(
                    &mut self.state.loss_window,
                    outcome.loss,
                    config.train.spike_window,
                );
            }
        }
        self.state.step += 1;
        self.state.tokens += config.tokens_per_step() as u64;
        self.state.optimizer_step = self.optimizer.step;
        self.state.loader = self.loader.state();
        self.state.world_size = ctx.world_size;
        Ok((self, outcome))
    }
}

/// When this process's part of the run started, for its tokens/s.
struct Session {
    start: Instant,
    tokens_at_start: u64,
}

/// The step's metrics record (rank 0) and progress line; `run.state.step` is already the next.
fn record_step(
    ctx: &RankContext,
    config: &RunConfig,
    run: &mut RankRun,
    outcome: &StepOutcome,
    started: Instant,
    progress: &ProgressBar,
) -> Result<()> {
    let step = run.state.step - 1;
    let lr = config.lr(step as usize);
    let tok_s = config.tokens_per_step() as f64 / started.elapsed().as_secs_f64();
    let train_flops = FlopsPerToken::of(config.model_config(), config.data.seq_len).train();
    let gflops_per_rank = train_flops * tok_s / 1e9 / ctx.world_size as f64;
    if let Some(metrics) = &mut run.metrics {
        let record = StepRecord {
            step,
            tokens: run.state.tokens,
            loss: finite(outcome.loss),
            lr,
            grad_norm: finite(outcome.grad_norm),
            tokens_per_sec: Some(tok_s),
            gflops: Some(gflops_per_rank),
            mfu: run.mfu_peak.map(|peak| gflops_per_rank / peak),
            skipped: outcome.skipped.is_some(),
            world_size: ctx.world_size,
        };
        metrics.step(&record, run.state.step == config.train.steps as u64)?;
    }
    progress.set_position(run.state.step);
    progress.set_message(format!(
        "loss {:.4} lr {lr:.2e} {tok_s:.0} tok/s",
        outcome.loss
    ));
    Ok(())
}

/// Whether evaluation runs after the step that made `done` steps: every `eval.every`, and last.
fn eval_due(config: &RunConfig, done: u64) -> bool {
    let every = config.eval.every as u64;
    every > 0 && (done.is_multiple_of(every) || done == config.train.steps as u64)
}

/// Whether a checkpoint is written after the step that made `done` steps.
fn checkpoint_due(config: &RunConfig, done: u64) -> bool {
    let every = config.checkpoint.every as u64;
    done == config.train.steps as u64 || (every > 0 && done.is_multiple_of(every))
}

/// Held-out losses (every rank takes part), recorded by rank 0.
fn evaluate_and_record(
    ctx: &RankContext,
    config: &RunConfig,
    run: &mut RankRun,
    progress: &ProgressBar,
) -> Result<()> {
    let losses = evaluate(ctx, &run.model, &run.loader, config)?;
    if let Some(metrics) = &mut run.metrics
        && !losses.is_empty()
    {
        let step = run.state.step - 1;
        progress.println(format!("step {step}: eval {}", describe_losses(&losses)));
        metrics.eval(&EvalRecord {
            step,
            tokens: run.state.tokens,
            loss: losses,
        })?;
    }
    Ok(())
}

/// Rank 0's end of a finished run: the completion marker and one summary line.
fn report_done(
    ctx: &RankContext,
    config: &RunConfig,
    state: &TrainerState,
    last_loss: f64,
    session: &Session,
) -> Result<()> {
    let run_dir = &config.run.dir;
    metrics::mark_done(run_dir, state.step)?;
    let elapsed = session.start.elapsed().as_secs_f64();
    eprintln!(
        "done: {} steps, {} tokens, final train loss {last_loss:.4}, {} skipped updates, {:.0} tokens/s this session \
         ({} rank(s)); metrics in {}",
        state.step,
        state.tokens,
        state.total_skips,
        (state.tokens - session.tokens_at_start) as f64 / elapsed.max(1e-9),
        ctx.world_size,
        run_dir.join(metrics::METRICS_FILE).display()
    );
    Ok(())
}

/// Set-up of a rank: the run directory (rank 0 locks it, every rank proves it sees it), where
/// the run starts from, the data (rank 0 first), the parameter layout, the optimizer state for
/// this rank's share, the loader and the metrics. `None`: the run has nothing left to train.
fn start_rank(
    ctx: &RankContext,
    config: &RunConfig,
    opts: &TrainOptions,
) -> Result<Option<RankRun>> {
    let run_dir = &config.run.dir;
    let lock = match ctx.is_main() {
        true => RunLock::acquire(run_dir).map(Some),
        false => Ok(None),
    };
    let lock = ctx.agree(lock, "locking the run directory")?;
    shared_dir::prove_shared(ctx, run_dir)?;
    let resume = resume::agreed_resume_dir(ctx, config, opts.resume.as_deref())?;
    if let Some(dir) = &resume
        && finished(ctx, config, dir)?
    {
        return Ok(None);
    }
    let start = resume::starting_point(config, resume, &ctx.device);
    let start = ctx.agree(start, "loading the starting point")?;
    // Only now, with the start settled, is the run's config.toml (re)written: a run refused
    // above leaves the directory as it was.
    let (data, mfu_peak) = prepare_data(ctx, config)?;
    let execution = Execution {
        precision: config.runtime.precision,
        checkpointing: config.train.activation_checkpointing,
    };
    let start = Start {
        model: start.model.with_execution(execution),
        ..start
    };
    if ctx.is_main() {
        eprintln!("{}", start.description);
    }
    let (dp, optimizer, model) = distribute(ctx, config, start.model, &start.moments_from)?;
    let loader = MixtureLoader::new(
        &data,
        ctx.rank,
        ctx.world_size,
        config.global_sequences(),
        start.state.as_ref().map(|s| s.loader.clone()),
        opts.allow_data_change,
    )?;
    let state = start.state.unwrap_or_else(|| TrainerState {
        step: 0,
        tokens: 0,
        consecutive_skips: 0,
        total_skips: 0,
        loss_window: Vec::new(),
        optimizer_step: 0,
        loader: loader.state(),
        world_size: ctx.world_size,
    });
    let samples = match ctx.is_main() && config.logging.sample_ids {
        true => Some(SampleLog::open(run_dir, state.step)?),
        false => None,
    };
    let metrics = match ctx.is_main() {
        true => {
            let writer = MetricsWriter::open(run_dir, state.step, config.logging.every)?;
            Some(match config.logging.tensorboard {
                true => writer.with_tensorboard(run_dir, state.step, &config.to_toml_string()?)?,
                false => writer,
            })
        }
        false => None,
    };
    Ok(Some(RankRun {
        dp,
        model,
        optimizer,
        loader,
        state,
        metrics,
        samples,
        mfu_peak,
        _lock: lock,
    }))
}

/// The parameters' layout over the ranks, this rank's share of the optimizer state (from
/// `moments_from`, a checkpoint and its optimizer step, if given), and the model with rank 0's
/// parameters on every rank, in the working type (see [`DataParallel::prepare`]).
fn distribute(
    ctx: &RankContext,
    config: &RunConfig,
    model: ZambaModel,
    moments_from: &Option<(PathBuf, u64)>,
) -> Result<(DataParallel, AdamW, ZambaModel)> {
    let bucket_bytes = (config.dist.bucket_mb * (1 << 20) as f64) as usize;
    let dp = DataParallel::new(
        &model,
        bucket_bytes,
        config.optimizer.zero,
        ctx.rank,
        ctx.world_size,
    )
    .with_reduction_order(&model.gradient_order())
    .with_precision(config.runtime.precision)
    .with_transport(config.dist.grad_reduce_dtype);
    let compute = ctx.compute_device();
    let adamw = AdamWParams::from(&config.optimizer);
    let optimizer = match moments_from {
        Some((dir, step)) => checkpoint::load_optimizer(dir, adamw, *step, &dp, &compute),
        None => Ok(AdamW::new(adamw)),
    };
    let mut optimizer = ctx.agree(optimizer, "loading the optimizer state")?;
    let model = dp.prepare(model, &mut optimizer, ctx.comm.as_ref(), &compute)?;
    Ok((dp, optimizer, model))
}

/// Whether the checkpoint to resume from already has every step of the run (rank 0 says so).
fn finished(ctx: &RankContext, config: &RunConfig, dir: &Path) -> Result<bool> {
    let state = ctx.agree(checkpoint::read_state(dir), "reading the trainer state")?;
    let steps = config.train.steps as u64;
    if state.step < steps {
        return Ok(false);
    }
    if ctx.is_main() {
        let position = match state.step == steps {
            true => format!("step {steps} of {steps}"),
            false => format!(
                "step {}, beyond this config's train.steps = {steps}",
                state.step
            ),
        };
        eprintln!(
            "{} is already finished: its newest checkpoint {} is at {position}; nothing to train. To train \
             further, raise train.steps (the LR schedule then spans the new length)",
            config.run.dir.display(),
            dir.display()
        );
    }
    Ok(true)
}

/// Rank 0 writes the resolved config into the run directory and makes the data (synthetic sets
/// are generated on first use) before the other ranks look for it in the cache; and it measures
/// the peak that `mfu` is relative to.
fn prepare_data(ctx: &RankContext, config: &RunConfig) -> Result<(DataConfig, Option<f64>)> {
    let run_dir = &config.run.dir;
    let prepared = match ctx.is_main() {
        true => config
            .to_toml_string()
            .map_err(anyhow::Error::from)
            .and_then(|resolved| {
                std::fs::write(run_dir.join("config.toml"), resolved)
                    .with_context(|| format!("writing {}/config.toml", run_dir.display()))?;
                Ok((Some(config.resolve_data()?), mfu_peak(config)))
            }),
        false => Ok((None, None)),
    };
    let (data, mfu_peak) = ctx.agree(prepared, "preparing the run directory and data")?;
    let data = match data {
        Some(data) => data,
        None => config.resolve_data()?,
    };
    Ok((data, mfu_peak))
}

/// The GFLOP/s the `mfu` column is relative to: `runtime.peak_gflops`, else on CPU the machine's
/// f32 GEMM peak measured now (the fastest library, as `zamba-train bench peak` reports it, at
/// the step's shapes so that it takes under a second).
fn mfu_peak(config: &RunConfig) -> Option<f64> {
    if let Some(peak) = config.runtime.peak_gflops {
        return Some(peak);
    }
    match config.runtime.device {
        DeviceChoice::Cpu => {
            let report = crate::peak::measure_f32_peak(&TRAINER_PEAK_SHAPES, true);
            let (library, peak) = report.best();
            eprintln!(
                "mfu is relative to the f32 GEMM peak measured now: {peak:.1} GFLOP/s ({library}); set runtime.peak_gflops to skip the measurement"
            );
            Some(peak)
        }
        _ => None,
    }
}

/// Counts a skipped update; too many in a row end the run.
fn count_skip(
    state: &mut TrainerState,
    reason: &str,
    config: &RunConfig,
    progress: &ProgressBar,
) -> Result<()> {
    state.consecutive_skips += 1;
    state.total_skips += 1;
    progress.println(format!("step {}: update skipped ({reason})", state.step));
    if state.consecutive_skips as usize >= config.train.max_consecutive_skips {
        bail!(
            "{} updates in a row were skipped (last: {reason}); stopping. The last good checkpoint in {} is intact; \
             lower the learning rate or check the data before resuming",
            state.consecutive_skips,
            checkpoint::checkpoints_dir(&config.run.dir).display()
        );
    }
    Ok(())
}

/// The run's checkpoints: written while the step loop waits, or in the background
/// (`checkpoint.async`) with at most one write pending — see [`checkpoint::background`].
struct Checkpoints {
    asynchronous: bool,
    pending: Option<PendingCheckpoint>,
    /// A `kill-writing` fault to inject while writing.
    fault: Option<InjectedFault>,
}

impl Checkpoints {
    /// At a step boundary (every rank): reports the pending checkpoint if it has been sealed,
    /// and stops the run if its write failed.
    fn poll(
        &mut self,
        ctx: &RankContext,
        config: &RunConfig,
        run: &mut RankRun,
        progress: &ProgressBar,
    ) -> Result<()> {
        let Some(pending) = &mut self.pending else {
            return Ok(());
        };
        let _span = span(Category::Checkpoint, "pending checkpoint");
        let step = pending.step;
        match pending.poll(ctx) {
            Ok(None) => Ok(()),
            Ok(Some(sealed)) => {
                self.pending = None;
                report_checkpoint(ctx, config, run, &sealed, true, progress)
            }
            Err(e) => {
                self.pending = None;
                Err(explain_failed_checkpoint(e, step - 1, &config.run.dir))
            }
        }
    }

    /// Waits for the pending checkpoint, if any, and reports it.
    fn finish(
        &mut self,
        ctx: &RankContext,
        config: &RunConfig,
        run: &mut RankRun,
        progress: &ProgressBar,
    ) -> Result<()> {
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        let step = pending.step;
        let sealed = pending
            .wait(ctx)
            .map_err(|e| explain_failed_checkpoint(e, step - 1, &config.run.dir))?;
        report_checkpoint(ctx, config, run, &sealed, true, progress)
    }

    /// Checkpoints the state after the last step (every rank takes part), once a pending write
    /// is done. In the background unless `checkpoint.async` is off; waited for if `last` (the
    /// end of the run, or a signal).
    fn save(
        &mut self,
        ctx: &RankContext,
        config: &RunConfig,
        run: &mut RankRun,
        last: bool,
        progress: &ProgressBar,
    ) -> Result<()> {
        let _span = span(Category::Checkpoint, "checkpoint");
        self.finish(ctx, config, run, progress)?;
        let started = Instant::now();
        let step = run.state.step;
        let explain = |e| explain_failed_checkpoint(e, step - 1, &config.run.dir);
        let resolved_config = config.to_toml_string()?;
        let snapshot = Snapshot {
            model: &run.model,
            model_config: config.model_config(),
            optimizer: &run.optimizer,
            sharding: run.dp.sharding(),
            state: &run.state,
            resolved_config: &resolved_config,
        };
        if !self.asynchronous {
            let dir = checkpoint::save(ctx, &config.run.dir, &snapshot).map_err(explain)?;
            let elapsed = started.elapsed();
            let sealed = Sealed {
                dir,
                step,
                stall: elapsed,
                waited: elapsed,
                write: elapsed,
            };
            return report_checkpoint(ctx, config, run, &sealed, false, progress);
        }
        let target = Target::of(&config.run.dir, step);
        let sharding = snapshot.sharding;
        let pending = checkpoint::begin(ctx, &target, &snapshot).and_then(|share| {
            let fault = self.fault.clone();
            PendingCheckpoint::start(ctx, target.clone(), step, share, sharding, fault, started)
        });
        let pending = pending.map_err(|e| {
            checkpoint::remove_partial(ctx, &target.tmp, sharding);
            explain(e.context(format!("writing checkpoint {}", target.tmp.display())))
        })?;
        self.pending = Some(pending);
        match last {
            true => self.finish(ctx, config, run, progress),
            false => Ok(()),
        }
    }
}

/// A sealed checkpoint: rank 0 prunes older ones, says where it is and records its cost.
fn report_checkpoint(
    ctx: &RankContext,
    config: &RunConfig,
    run: &mut RankRun,
    sealed: &Sealed,
    asynchronous: bool,
    progress: &ProgressBar,
) -> Result<()> {
    if !ctx.is_main() {
        return Ok(());
    }
    checkpoint::prune(
        &config.run.dir,
        config.checkpoint.keep_last,
        config.checkpoint.keep_every as u64,
    )?;
    let record = CheckpointRecord {
        step: sealed.step - 1,
        asynchronous,
        stall_s: sealed.stall.as_secs_f64(),
        wait_s: sealed.waited.as_secs_f64(),
        write_s: sealed.write.as_secs_f64(),
    };
    progress.println(format!(
        "step {}: checkpoint {} (training stalled {:.2} s; written in {:.2} s{})",
        record.step,
        sealed.dir.display(),
        record.stall_s,
        record.write_s,
        if asynchronous {
            ", in the background"
        } else {
            ""
        }
    ));
    match &mut run.metrics {
        Some(metrics) => metrics.checkpoint(&record),
        None => Ok(()),
    }
}

/// The run stops after a failed checkpoint; what to do next depends on why it failed.
fn explain_failed_checkpoint(e: anyhow::Error, step: u64, run_dir: &Path) -> anyhow::Error {
    let storage_full = e.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull
                    | std::io::ErrorKind::QuotaExceeded
                    | std::io::ErrorKind::FileTooLarge
            )
        })
    });
    let between_ranks = e
        .chain()
        .any(|cause| cause.downcast_ref::<zamba_dist::DistError>().is_some())
        || e.to_string().contains("on another rank");
    let next = if interrupted(&e) {
        "a second signal interrupted it; rerun the same command to resume from the newest"
    } else if storage_full {
        "free disk space (or raise the quota), then rerun the same command to resume from the newest"
    } else if between_ranks {
        "the ranks could not complete it together (see the error); fix that, then rerun the same command to resume \
         from the newest"
    } else {
        "rerun the same command to resume from the newest once the cause is fixed"
    };
    e.context(format!(
        "the checkpoint after step {step} failed, so the run stops here; the earlier checkpoints in {} are intact: {next}",
        checkpoint::checkpoints_dir(run_dir).display()
    ))
}

fn describe_losses(losses: &BTreeMap<String, Option<f64>>) -> String {
    let text: Vec<String> = losses
        .iter()
        .map(|(s, l)| format!("{s} {}", l.map_or("nan".into(), |l| format!("{l:.4}"))))
        .collect();
    text.join(", ")
}

/// The values of a small tensor on the host (one device sync).
/// Why the update of a step must be skipped, if it must.
/// The spike test needs a full window of `spike_window` recent losses.
fn skip_reason(loss: f64, grad_norm: f64, window: &[f64], train: &TrainSection) -> Option<String> {
    if !loss.is_finite() || !grad_norm.is_finite() {
        return Some(format!(
            "non-finite loss {loss} or gradient norm {grad_norm}"
        ));
    }
    let threshold = train.spike_zscore?;
    if window.len() < train.spike_window.max(2) {
        return None;
    }
    let n = window.len() as f64;
    let mean = window.iter().sum::<f64>() / n;
    let std = (window.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let z = (loss - mean) / std.max(1e-12);
    (z > threshold).then(|| {
        format!(
            "loss spike: {loss:.4} is {z:.1} standard deviations above the last {} steps",
            window.len()
        )
    })
}

fn push_window(window: &mut Vec<f64>, loss: f64, size: usize) {
    window.push(loss);
    if window.len() > size.max(1) {
        window.remove(0);
    }
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Mean held-out loss per source over the first `eval.batches × batch.micro_batch` validation
/// sequences of each source — the same sequences whatever the world size: the ranks split them,
/// and their sums are all-reduced (one collective for all sources).
fn evaluate(
    ctx: &RankContext,
    model: &ZambaModel,
    loader: &MixtureLoader,
    config: &RunConfig,
) -> Result<BTreeMap<String, Option<f64>>> {
    let _span = span(Category::Eval, "eval");
    let rows = config.batch.micro_batch;
    let total = (config.eval.batches * rows) as u64;
    let (rank, world) = (ctx.rank as u64, ctx.world_size as u64);
    let mine = total.saturating_sub(rank).div_ceil(world);
    let model = model.valid();
    let device = ctx.compute_device();
    let sources = loader.validation_sources();
    let mut sums = Vec::with_capacity(2 * sources.len());
    for source in &sources {
        let batches = loader.validation(source, rows)?.limit_windows(mine);
        let source_sums = eval::loss_sums(&model, batches, |_| {})?;
        sums.push(source_sums.loss);
        sums.push(Tensor::from_floats([source_sums.tokens as f32], &device));
    }
    if sums.is_empty() {
        return Ok(BTreeMap::new());
    }
    let totals = ctx
        .comm
        .all_reduce(Tensor::cat(sums, 0), ReduceOp::Sum)?
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("f32 sums");
    Ok(sources
        .into_iter()
        .zip(totals.chunks_exact(2))
        .filter(|(_, pair)| pair[1] > 0.0)
        .map(|(source, pair)| (source, finite(pair[0] as f64 / pair[1] as f64)))
        .collect())
}

fn progress_bar(enabled: bool, steps: u64, position: u64) -> ProgressBar {
    let bar = if enabled {
        ProgressBar::new(steps)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(position);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(spike_zscore: Option<f64>, spike_window: usize) -> TrainSection {
        TrainSection {
            steps: 10,
            max_consecutive_skips: 3,
            spike_zscore,
            spike_window,
            activation_checkpointing: Default::default(),
            profile_steps: None,
        }
    }

    #[test]
    fn non_finite_steps_are_skipped() {
        let t = section(None, 4);
        assert!(
            skip_reason(f64::NAN, 1.0, &[], &t)
                .unwrap()
                .contains("non-finite")
        );
        assert!(
            skip_reason(2.0, f64::INFINITY, &[], &t)
                .unwrap()
                .contains("non-finite")
        );
        assert_eq!(skip_reason(2.0, 1.0, &[], &t), None);
    }

    #[test]
    fn a_failed_checkpoint_suggests_what_fits_its_cause() {
        let run_dir = Path::new("/runs/r");
        let explain = |e: anyhow::Error| format!("{:#}", explain_failed_checkpoint(e, 5, run_dir));
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let text = explain(anyhow::Error::new(full).context("writing model.safetensors"));
        assert!(text.contains("free disk space"), "{text}");
        let mismatch = zamba_dist::DistError::Invalid(
            "all_reduce #7: rank 0 called all_reduce(Max, 1 f32), rank 1 called all_reduce(Sum, 9 f32)".into(),
        );
        let text = explain(anyhow::Error::new(mismatch));
        assert!(
            text.contains("the ranks could not complete it together") && !text.contains("disk"),
            "{text}"
        );
        assert!(
            text.contains("after step 5") && text.contains("/runs/r/checkpoints"),
            "{text}"
        );
    }

    #[test]
    fn spikes_are_skipped_only_with_a_full_window() {
        let t = section(Some(6.0), 4);
        let window = [2.0, 2.1, 1.9, 2.0];
        assert!(
            skip_reason(5.0, 1.0, &window, &t)
                .unwrap()
                .contains("loss spike")
        );
        assert_eq!(skip_reason(2.2, 1.0, &window, &t), None);
        assert_eq!(
            skip_reason(5.0, 1.0, &window[..3], &t),
            None,
            "window not full yet"
        );
        assert_eq!(
            skip_reason(5.0, 1.0, &window, &section(None, 4)),
            None,
            "spike skip off"
        );
        let mut w = window.to_vec();
        push_window(&mut w, 3.0, 4);
        assert_eq!(w, vec![2.1, 1.9, 2.0, 3.0]);
    }
}
