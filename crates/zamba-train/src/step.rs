//! One optimizer step of data-parallel training, as the trainer and the benchmarks run it:
//! micro-batches → this rank's gradient sum → one bucketed all-reduce (ZeRO-1: reduce-scatter),
//! overlapped with the last micro-batch's backward (see [`crate::overlap`]) → one more of
//! [loss, partial sum of squares, stop request], so that every rank takes the same decisions →
//! skip, or clip + AdamW update.

use std::time::{Duration, Instant};

use anyhow::Result;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Int, Tensor};
use zamba_dist::{Communicator, ReduceOp};
use zamba_model::{ZambaModel, cross_entropy};
use zamba_trace::{Category, span, span_with};

use crate::data_parallel::DataParallel;
use crate::optim::{AdamW, clip_factor};
use crate::signals::StopSignal;

/// Where a step runs: this rank's communicator, its devices, the parameters' layout.
pub struct StepContext<'a> {
    pub comm: &'a dyn Communicator,
    /// With autodiff: where forward and backward run.
    pub device: &'a Device,
    /// Without autodiff: where gradients are reduced and the optimizer runs.
    pub compute: &'a Device,
    pub dp: &'a DataParallel,
    /// Reduce gradients on a communication thread while the last micro-batch's backward runs
    /// (`dist.overlap_grad_reduce`); else after it. The results are the same bit for bit.
    pub overlap: bool,
}

/// Why an update must be skipped, given the agreed loss and gradient norm.
pub type SkipRule<'a> = &'a dyn Fn(f64, f64) -> Option<String>;

/// What one step is to do besides computing gradients.
pub struct StepSettings<'a> {
    pub lr: f64,
    /// The gradient norm above which gradients are scaled down to it (0: never).
    pub clip_grad_norm: f64,
    pub skip: SkipRule<'a>,
    /// Read once per step, after the gradients: a request on any rank stops every rank.
    pub stop: Option<&'a StopSignal>,
}

/// The points of a step an observer (a benchmark's clock, a memory probe) is told about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepEvent {
    /// Micro-batch `micro`'s forward and loss are computed; its backward is next.
    Forward { micro: usize },
    /// Every micro-batch's backward is done and the gradients summed; with overlap, the
    /// reduction of some buckets may be under way or done, and no collective of the rest has
    /// started.
    Gradients,
    /// Gradients are reduced over the ranks and the loss and norm agreed.
    Reduced,
    /// The parameters are updated (or the update was skipped).
    Updated,
}

/// Told about each [`StepEvent`] as the step passes it; the trainer's observer is `()`.
pub trait StepObserver {
    fn observe(&mut self, event: StepEvent) -> Result<()>;
}

impl StepObserver for () {
    fn observe(&mut self, _: StepEvent) -> Result<()> {
        Ok(())
    }
}

/// What every rank agreed on after a step.
#[derive(Clone, Debug)]
pub struct StepOutcome {
    /// The global batch's mean loss.
    pub loss: f64,
    /// The global gradient norm, before clipping.
    pub grad_norm: f64,
    /// Some rank was asked to stop (SIGINT/SIGTERM).
    pub interrupted: bool,
    /// Why the update was skipped, if it was.
    pub skipped: Option<String>,
    /// How long this rank's step waited on communication: the gradient reduction past the end
    /// of the backward, the agreement, and the all-gather of updated parameters (ZeRO-1). What
    /// the communication thread does while the backward runs is not in it.
    pub communication_wait: Duration,
}

/// One step on this rank's `micro_batches` (inputs, targets): returns the model after the update
/// (unchanged when it is skipped) and what the ranks agreed on.
pub fn train_step<I>(
    model: ZambaModel,
    optimizer: &mut AdamW,
    micro_batches: I,
    ctx: &StepContext,
    settings: &StepSettings,
    observer: &mut dyn StepObserver,
) -> Result<(ZambaModel, StepOutcome)>
where
    I: ExactSizeIterator<Item = (Tensor<2, Int>, Tensor<2, Int>)>,
{
    let (grads, sum_squares, loss_sum, mut waited) = match ctx.overlap && ctx.comm.world_size() > 1
    {
        true => overlapped_gradients(&model, micro_batches, ctx, observer)?,
        false => {
            let (grads, loss_sum) = local_gradients(&model, micro_batches, ctx, observer)?;
            observer.observe(StepEvent::Gradients)?;
            let reducing = Instant::now();
            let (grads, sum_squares) = ctx.dp.reduce_gradients(grads, ctx.comm, ctx.compute)?;
            (grads, sum_squares, loss_sum, reducing.elapsed())
        }
    };
    let stop_requested = settings.stop.is_some_and(StopSignal::requested);
    let agreeing = Instant::now();
    let (loss, grad_norm, interrupted) = agree(ctx, loss_sum, sum_squares, stop_requested)?;
    waited += agreeing.elapsed();
    observer.observe(StepEvent::Reduced)?;
    let skipped = (settings.skip)(loss, grad_norm);
    let model = match skipped {
        Some(_) => model,
        None => {
            let scale = clip_factor(grad_norm, settings.clip_grad_norm);
            let (dp, lr) = (ctx.dp, settings.lr);
            let updated = dp.optimize(&model, optimizer, grads, lr, scale);
            let applying = Instant::now();
            let model = span(Category::Optimizer, "apply updated parameters")
                .run(|| dp.apply(model, updated, ctx.comm, ctx.compute))?;
            if dp.gathers_updates() {
                waited += applying.elapsed();
            }
            model
        }
    };
    observer.observe(StepEvent::Updated)?;
    let outcome = StepOutcome {
        loss,
        grad_norm,
        interrupted,
        skipped,
        communication_wait: waited,
    };
    Ok((model, outcome))
}

/// This rank's micro-batches, forward and backward: the gradients summed in f32 and the summed
/// loss (on the device: no host sync per micro-batch). Each loss is the micro-batch mean divided by
/// the rank's number of micro-batches, so the sum is the gradient of this rank's rows' mean
/// loss; averaged over ranks it is the gradient of the global batch's mean loss.
fn local_gradients<I>(
    model: &ZambaModel,
    micro_batches: I,
    ctx: &StepContext,
    observer: &mut dyn StepObserver,
) -> Result<(GradientsParams, Tensor<1>)>
where
    I: ExactSizeIterator<Item = (Tensor<2, Int>, Tensor<2, Int>)>,
{
    let accum = micro_batches.len();
    let mut accumulator = GradientsAccumulator::new();
    let mut loss_sum = Tensor::<1>::zeros([1], &ctx.device.clone().without_autodiff());
    for (m, batch) in micro_batches.enumerate() {
        let loss = forward(model, batch, m, accum, &mut loss_sum, observer)?;
        let grads = backward(model, loss, m, ctx);
        let _accumulate = span(Category::Gradients, "accumulate gradients");
        accumulator.accumulate(model, grads);
    }
    Ok((accumulator.grads(), loss_sum))
}

/// As [`local_gradients`] followed by [`DataParallel::reduce_gradients`], with the reduction
/// overlapped with the last micro-batch's backward: the segments' averaged gradients, this
/// rank's partial sum of squares, its summed loss, and how long it waited for the reduction
/// once the backward was over.
fn overlapped_gradients<I>(
    model: &ZambaModel,
    micro_batches: I,
    ctx: &StepContext,
    observer: &mut dyn StepObserver,
) -> Result<(Vec<Tensor<1>>, Tensor<1>, Tensor<1>, Duration)>
where
    I: ExactSizeIterator<Item = (Tensor<2, Int>, Tensor<2, Int>)>,
{
    let accum = micro_batches.len();
    let mut accumulator = GradientsAccumulator::new();
    let mut loss_sum = Tensor::<1>::zeros([1], &ctx.device.clone().without_autodiff());
    let mut last = None;
    for (m, batch) in micro_batches.enumerate() {
        let loss = forward(model, batch, m, accum, &mut loss_sum, observer)?;
        if m + 1 < accum {
            let grads = backward(model, loss, m, ctx);
            let _accumulate = span(Category::Gradients, "accumulate gradients");
            accumulator.accumulate(model, grads);
        } else {
            last = Some(loss);
        }
    }
    let last = last.ok_or_else(|| anyhow::anyhow!("a step needs at least one micro-batch"))?;
    let (reduced, waited) = crate::overlap::reduce_during_backward(
        ctx.dp,
        ctx.comm,
        ctx.compute,
        &model.gradients_final_in_backward(),
        accumulator.grads(),
        || backward(model, last, accum - 1, ctx),
        || observer.observe(StepEvent::Gradients),
    )?;
    let (grads, sum_squares) = ctx.dp.reduced_segments(reduced, ctx.compute);
    Ok((grads, sum_squares, loss_sum, waited))
}

/// Micro-batch `m` of `accum`'s forward: its loss (with autodiff), divided by `accum`, also
/// added to `loss_sum`.
fn forward(
    model: &ZambaModel,
    (inputs, targets): (Tensor<2, Int>, Tensor<2, Int>),
    m: usize,
    accum: usize,
    loss_sum: &mut Tensor<1>,
    observer: &mut dyn StepObserver,
) -> Result<Tensor<1>> {
    let logits =
        span_with(Category::Forward, || format!("forward {m}")).run(|| model.logits(inputs));
    let loss = cross_entropy(logits, targets) / accum as f64;
    *loss_sum = loss_sum.clone() + loss.clone().inner().reshape([1]);
    observer.observe(StepEvent::Forward { micro: m })?;
    Ok(loss)
}

/// Micro-batch `m`'s backward: its gradients, in the type they are summed in.
fn backward(model: &ZambaModel, loss: Tensor<1>, m: usize, ctx: &StepContext) -> GradientsParams {
    let grads = span_with(Category::Backward, || format!("backward {m}")).run(|| loss.backward());
    ctx.dp
        .accumulation_type(GradientsParams::from_grads(grads, model))
}

/// One all-reduce of [this rank's loss, its partial sum of squared gradients, its stop request]
/// and one host read: the global batch's loss, the global gradient norm, and whether any rank
/// was asked to stop.
fn agree(
    ctx: &StepContext,
    loss_sum: Tensor<1>,
    sum_squares: Tensor<1>,
    stop_requested: bool,
) -> Result<(f64, f64, bool)> {
    let _span = span(
        Category::Communication,
        "agree on loss, gradient norm, stop",
    );
    let control = Tensor::cat(
        vec![
            loss_sum,
            sum_squares,
            Tensor::from_floats([f32::from(stop_requested)], ctx.compute),
        ],
        0,
    );
    let values = ctx
        .comm
        .all_reduce(control, ReduceOp::Sum)?
        .into_data()
        .try_into_vec_as::<f32>()
        .expect("f32 values");
    let [loss, sum_squares, stops] = std::array::from_fn(|i| values[i] as f64);
    let world_size = ctx.comm.world_size() as f64;
    Ok((loss / world_size, sum_squares.sqrt(), stops > 0.0))
}
