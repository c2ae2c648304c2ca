//! Gradient reduction overlapped with the backward of a step's last micro-batch.
//!
//! A communication thread, started for the step, owns the reduction: it receives the parameter
//! gradients each recomputed block's backward computes (through a [`zamba_model::gradient_hook`]
//! sink installed on the thread that runs the backward), sums the parts of a parameter used by
//! several blocks (the shared block's) as autodiff does, adds each final gradient to the sum of
//! the earlier micro-batches' gradients, and reduces each bucket
//! ([`DataParallel::reduce_bucket`]) as soon as all its parameters are final — in bucket order,
//! which [`DataParallel::with_reduction_order`] makes the backward's order — while the backward
//! goes on. When the backward ends, the remaining gradients (the embedding's, the final norm's;
//! every one without layer recomputation) follow and the remaining buckets are reduced. The step thread takes each bucket's result as it comes.
//!
//! Every value is computed by the same operations in the same order as without overlap (the sum
//! over micro-batches, the flat buffer, the collective, the sum of squares in bucket order), so
//! the results are the same bit for bit; only the thread and the time differ.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use zamba_dist::{Communicator, DistError};
use zamba_model::gradient_hook::install_gradient_sink;

use crate::data_parallel::{DataParallel, take_flat};

/// What the step thread hands the communication thread.
enum Delivery {
    /// A block's part of a parameter's gradient of the last micro-batch, flattened, in the
    /// working type (boxed: a tensor handle is large next to the other variant).
    Part(ParamId, Option<Box<Tensor<1>>>),
    /// The rest of the last micro-batch's gradients once its backward is over (in f32).
    Rest(GradientsParams),
}

/// Runs `backward` — the last micro-batch's, returning its gradients in f32 — while a
/// communication thread reduces every bucket as soon as its gradients are final. `previous` is
/// the f32 sum of the earlier micro-batches' gradients; `final_in_backward` the parameters whose
/// gradients the backward hands out as it goes, with the number of parts of each
/// ([`zamba_model::ZambaModel::gradients_final_in_backward`]). `after_backward` runs once the
/// backward is over, before the remaining gradients are handed over. Returns each bucket's
/// [`DataParallel::reduce_bucket`] result, in bucket order, and how long the step thread waited
/// for them once the backward was over.
pub(crate) fn reduce_during_backward(
    dp: &DataParallel,
    comm: &dyn Communicator,
    device: &Device,
    final_in_backward: &[(ParamId, usize)],
    previous: GradientsParams,
    backward: impl FnOnce() -> GradientsParams,
    after_backward: impl FnOnce() -> Result<()>,
) -> Result<(Vec<Tensor<1>>, Duration)> {
    let (slots, early) = initial_slots(dp, final_in_backward);
    let (deliveries, inbox) = mpsc::channel();
    let (results, reduced) = mpsc::channel();
    let reducer = Reducer {
        dp,
        comm,
        device,
        early,
        previous,
        slots,
        next: 0,
        results,
    };
    // A traced step shows the reduction on a track of its own next to the step's.
    let capture = zamba_trace::current_capture();
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("gradient reduction".into())
            .spawn_scoped(scope, move || {
                let _traced =
                    capture.map(|(handle, track)| handle.attach(format!("{track} communication")));
                reducer.run(inbox)
            })?;
        let sink = deliveries.clone();
        let guard = install_gradient_sink(Box::new(move |id, grad| {
            // A closed inbox means the reduction failed; the step thread reports why.
            let _ = sink.send(Delivery::Part(id, grad.map(Box::new)));
        }));
        let rest = backward();
        drop(guard);
        let after = after_backward();
        if after.is_ok() {
            let _ = deliveries.send(Delivery::Rest(rest));
        }
        drop(deliveries);
        let waiting = Instant::now();
        let collected = collect(&reduced, dp.bucket_count());
        let waited = waiting.elapsed();
        if worker.join().is_err() {
            return Err(anyhow!("the gradient reduction thread panicked"));
        }
        after?;
        Ok((collected?, waited))
    })
}

/// Every slot's state before the backward, and the slot of each parameter handed out in parts.
fn initial_slots(
    dp: &DataParallel,
    final_in_backward: &[(ParamId, usize)],
) -> (Vec<SlotState>, HashMap<ParamId, usize>) {
    let slot_of: HashMap<ParamId, usize> = dp
        .slots()
        .iter()
        .enumerate()
        .map(|(i, slot)| (slot.id, i))
        .collect();
    let mut slots: Vec<SlotState> = (0..dp.slots().len()).map(|_| SlotState::Waiting).collect();
    let mut early = HashMap::new();
    for &(id, parts) in final_in_backward.iter().filter(|(_, parts)| *parts > 0) {
        let slot = slot_of[&id];
        early.insert(id, slot);
        slots[slot] = SlotState::Parts {
            sum: None,
            left: parts,
        };
    }
    (slots, early)
}

/// The reduced buckets, in order, as the communication thread sends them.
fn collect(
    reduced: &Receiver<Result<Tensor<1>, DistError>>,
    buckets: usize,
) -> Result<Vec<Tensor<1>>> {
    let mut out = Vec::with_capacity(buckets);
    while out.len() < buckets {
        match reduced.recv() {
            Ok(result) => out.push(result?),
            Err(_) => {
                return Err(anyhow!(
                    "the gradient reduction ended after {} of {buckets} buckets",
                    out.len()
                ));
            }
        }
    }
    Ok(out)
}

/// Where a parameter's gradient stands on the communication thread.
enum SlotState {
    /// Final when the backward is over.
    Waiting,
    /// Handed out in parts during the backward: their sum so far (working type), and how many
    /// are still to come.
    Parts { sum: Option<Tensor<1>>, left: usize },
    /// Summed over the micro-batches (f32); `None`: no gradient at all.
    Final(Option<Tensor<1>>),
    /// In a bucket handed to the communicator.
    Reduced,
}

/// The communication thread's state.
struct Reducer<'a> {
    dp: &'a DataParallel,
    comm: &'a dyn Communicator,
    device: &'a Device,
    /// The slot of each parameter whose gradient the backward hands out in parts.
    early: HashMap<ParamId, usize>,
    previous: GradientsParams,
    slots: Vec<SlotState>,
    /// The next bucket to reduce.
    next: usize,
    results: Sender<Result<Tensor<1>, DistError>>,
}

impl Reducer<'_> {
    fn run(mut self, inbox: Receiver<Delivery>) {
        for delivery in inbox {
            match delivery {
                Delivery::Part(id, part) => {
                    if let Some(&slot) = self.early.get(&id) {
                        self.add_part(slot, part.map(|p| *p));
                    }
                }
                Delivery::Rest(mut grads) => {
                    for slot in 0..self.slots.len() {
                        // A block whose backward did not run (an unused layer) left its parts
                        // to the end, where autodiff has summed what there was.
                        if matches!(
                            self.slots[slot],
                            SlotState::Waiting | SlotState::Parts { .. }
                        ) {
                            let grad = take_flat(&mut grads, &self.dp.slots()[slot]);
                            self.finish(slot, grad);
                        }
                    }
                }
            }
            if !self.reduce_ready() {
                return;
            }
        }
    }

    /// Adds a block's part to `slot`'s gradient as autodiff does (the new part plus the sum so
    /// far, in the working type); with the last part, the gradient is final.
    fn add_part(&mut self, slot: usize, part: Option<Tensor<1>>) {
        let SlotState::Parts { sum, left } = &mut self.slots[slot] else {
            return;
        };
        *sum = match (part, sum.take()) {
            (Some(part), Some(sum)) => Some(part.add(sum)),
            (part, sum) => part.or(sum),
        };
        *left -= 1;
        if *left == 0 {
            let grad = sum.take().map(|g| self.dp.flat_accumulation_type(g));
            self.finish(slot, grad);
        }
    }

    /// The last micro-batch's `grad` of `slot` added to the earlier ones' sum, as
    /// `GradientsAccumulator` adds it (earlier sum + new).
    fn finish(&mut self, slot: usize, grad: Option<Tensor<1>>) {
        let previous = take_flat(&mut self.previous, &self.dp.slots()[slot]);
        let sum = match (previous, grad) {
            (Some(previous), Some(grad)) => Some(previous.add(grad)),
            (previous, None) => previous,
            (None, grad) => grad,
        };
        self.slots[slot] = SlotState::Final(sum);
    }

    /// Reduces the buckets, in order, whose gradients are all final; false once the step thread
    /// no longer listens or a collective failed (the group is then failed: nothing more can go).
    fn reduce_ready(&mut self) -> bool {
        while self.next < self.dp.bucket_count() {
            let params = self.dp.bucket_params(self.next);
            if params
                .clone()
                .any(|s| !matches!(self.slots[s], SlotState::Final(_)))
            {
                return true;
            }
            let parts = params
                .map(
                    |s| match std::mem::replace(&mut self.slots[s], SlotState::Reduced) {
                        SlotState::Final(grad) => grad,
                        _ => unreachable!("checked final above"),
                    },
                )
                .collect();
            let result = self
                .dp
                .reduce_bucket(self.next, parts, self.comm, self.device);
            let failed = result.is_err();
            if self.results.send(result).is_err() || failed {
                return false;
            }
            self.next += 1;
        }
        true
    }
}
