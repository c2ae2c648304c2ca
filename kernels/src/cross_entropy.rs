//! Cross-entropy over the vocabulary as one fused op: log-softmax, the pick of the target's
//! log-probability and the mean over valid targets in one pass per row forward, and
//! `softmax - onehot` in one pass per row backward.
//!
//! With tensor ops the same loss materializes the `[rows, vocab]` log-probabilities (plus the
//! max-subtracted copy and the exponentials inside `log_softmax`), and its backward several more
//! tensors of that size; at vocabulary 4096 and 2048 rows each is 32 MB. The fused op keeps only
//! the logits (which the backward needs anyway) and one `f32` per row (the log-sum-exp), and
//! writes the gradient over the logits' buffer when it owns it.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, DType, Dispatch, Flex, backend_extension};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Shape, Tensor};
use rayon::prelude::*;

use crate::host::{as_f32, as_f32_mut, contiguous_f32, from_f32, int_ids, output};
use crate::simd::{Isa, Lanes, exp_approx, simd_dispatch, simd_level};

/// Targets equal to this id are padding/masked and do not count (PyTorch's default `-100`).
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy of `logits` `[rows, vocab]` (any float type: bf16 logits need no f32 copy)
/// against `targets` `[rows]`, over the targets that are not [`IGNORE_INDEX`]:
/// `mean_r (logsumexp(logits[r]) - logits[r, targets[r]])`. Returns a one-element f32 tensor
/// (the statistics are f32 whatever the logits' type); 0 (and a zero gradient) when every target
/// is ignored. The gradient of the logits comes back in their type.
///
/// Fused on Flex devices (see the module docs) and on CubeCL devices (features `cuda`,
/// `cube-cpu`: the logits read in their own float dtype, f32 statistics, `cube::cross_entropy`);
/// [`cross_entropy_reference`] elsewhere. They agree to float rounding (the Flex kernel's `exp`
/// has a relative error below 2e-7).
///
/// # Panics
/// If the shapes disagree, or (on Flex) a target is neither [`IGNORE_INDEX`] nor in `0..vocab`.
/// A CubeCL device does not stop to read the targets back: such a target makes the loss NaN.
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let _span = zamba_trace::span(zamba_trace::Category::Loss, "cross-entropy");
    check_shapes(&logits, &targets);
    #[cfg(feature = "cube")]
    if crate::on_cube(&logits.device()) {
        return crate::cube::ops::cross_entropy(logits, targets);
    }
    if !crate::on_flex(&logits.device()) {
        return cross_entropy_reference(logits, targets);
    }
    Tensor::from_dispatch(<Dispatch as CrossEntropyBackend>::cross_entropy(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}

/// [`cross_entropy`] written with tensor ops (`log_softmax` of the logits cast to f32, `gather`,
/// masked mean); runs on any backend and is differentiated by Burn's autodiff.
pub fn cross_entropy_reference(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    check_shapes(&logits, &targets);
    let [rows, _] = logits.dims();
    let log_probs = log_softmax(logits.cast(DType::F32), 1);
    let valid = targets.clone().not_equal_elem(IGNORE_INDEX);
    let safe_targets = targets.mask_fill(valid.clone().bool_not(), 0);
    let picked = log_probs
        .gather(1, safe_targets.reshape([rows, 1]))
        .reshape([rows]);
    let valid = valid.float();
    let count = valid.clone().sum().clamp_min(1.0);
    (picked * valid).sum().neg() / count
}

fn check_shapes(logits: &Tensor<2>, targets: &Tensor<1, Int>) {
    let [rows, vocab] = logits.dims();
    let [n] = targets.dims();
    assert!(
        n == rows && vocab > 0,
        "cross_entropy: logits [rows, vocab] = {:?} need targets [rows], got [{n}]",
        [rows, vocab]
    );
}

#[backend_extension(Flex, Autodiff)]
pub(crate) trait CrossEntropyBackend: Backend {
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self>;
}

/// What the forward computed and the backward needs.
#[derive(Clone, Debug)]
struct Forward {
    /// Target ids, validated; [`IGNORE_INDEX`] for rows that do not count.
    targets: Arc<Vec<i64>>,
    /// `logsumexp` of each row.
    lse: Arc<Vec<f32>>,
    /// Rows that count, at least 1.
    count: usize,
    loss: f32,
}

impl Forward {
    fn run(logits: &[f32], vocab: usize, targets: Vec<i64>) -> Self {
        for (row, &t) in targets.iter().enumerate() {
            assert!(
                t == IGNORE_INDEX || (0..vocab as i64).contains(&t),
                "cross_entropy: target {t} of row {row} is outside the vocabulary 0..{vocab} \
                 (and is not the ignore index {IGNORE_INDEX})"
            );
        }
        let mut lse = output(targets.len());
        lse.par_iter_mut()
            .zip(logits.par_chunks(vocab))
            .for_each(|(lse, row)| *lse = log_sum_exp(row));
        // Fixed-order f64 sum over the rows: deterministic and independent of the thread count.
        let mut total = 0f64;
        let mut count = 0usize;
        for ((row, &t), &l) in logits.chunks(vocab).zip(&targets).zip(&lse) {
            if t != IGNORE_INDEX {
                total += (l - row[t as usize]) as f64;
                count += 1;
            }
        }
        let count = count.max(1);
        Self {
            targets: Arc::new(targets),
            lse: Arc::new(lse),
            count,
            loss: (total / count as f64) as f32,
        }
    }

    /// Overwrites `logits` with `d loss / d logits` for an output gradient `dout`.
    fn backward(&self, logits: &mut [f32], vocab: usize, dout: f32) {
        let scale = dout / self.count as f32;
        logits
            .par_chunks_mut(vocab)
            .zip(self.targets.par_iter())
            .zip(self.lse.par_iter())
            .for_each(|((row, &t), &lse)| {
                if t == IGNORE_INDEX {
                    row.fill(0.0);
                } else {
                    softmax_times(row, lse, scale);
                    row[t as usize] -= scale;
                }
            });
    }
}

simd_dispatch!(pub(crate) fn log_sum_exp(row: &[f32]) -> f32 = log_sum_exp_generic, level = simd_level());

simd_dispatch!(pub(crate) fn softmax_times(row: &mut [f32], lse: f32, scale: f32)
    = softmax_times_generic, level = simd_level());

/// `max + ln Σ exp(x - max)`: whole vectors with `V`, the tail with scalars.
#[inline(always)]
fn log_sum_exp_generic<V: Lanes>(isa: Isa<V>, row: &[f32]) -> f32 {
    let split = row.len() - row.len() % V::WIDTH;
    let (body, tail) = row.split_at(split);
    let mut max = isa.splat(f32::NEG_INFINITY);
    for i in (0..split).step_by(V::WIDTH) {
        max = isa.load(&body[i..]).max(max);
    }
    let max = tail.iter().fold(max.max_lane(), |m, &x| x.max(m));
    let (max_v, mut sum) = (isa.splat(max), isa.splat(0.0));
    for i in (0..split).step_by(V::WIDTH) {
        sum = sum + exp_approx(isa.load(&body[i..]) - max_v);
    }
    let sum = tail.iter().fold(sum.sum(), |s, &x| s + exp_approx(x - max));
    max + sum.ln()
}

/// `row ← exp(row - lse) · scale`.
#[inline(always)]
fn softmax_times_generic<V: Lanes>(isa: Isa<V>, row: &mut [f32], lse: f32, scale: f32) {
    let split = row.len() - row.len() % V::WIDTH;
    let (body, tail) = row.split_at_mut(split);
    let (lse_v, scale_v) = (isa.splat(lse), isa.splat(scale));
    for i in (0..split).step_by(V::WIDTH) {
        (exp_approx(isa.load(&body[i..]) - lse_v) * scale_v).store(&mut body[i..]);
    }
    for x in tail {
        *x = exp_approx(*x - lse) * scale;
    }
}

fn loss_tensor(loss: f32) -> FlexTensor {
    from_f32(vec![loss], Shape::new([1]), DType::F32)
}

impl CrossEntropyBackend for Flex {
    fn cross_entropy(logits: FlexTensor, targets: FlexTensor) -> FlexTensor {
        let vocab = logits.layout().shape()[1];
        let logits = contiguous_f32(logits);
        let forward = Forward::run(as_f32(&logits), vocab, int_ids(&targets));
        loss_tensor(forward.loss)
    }
}

#[derive(Clone, Debug)]
struct CrossEntropyState {
    logits: FlexTensor,
    dtype: DType,
    forward: Forward,
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    type State = CrossEntropyState;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let _span = zamba_trace::span(zamba_trace::Category::Loss, "cross-entropy backward");
        let dout = contiguous_f32(grads.consume::<Flex>(&ops.node));
        let dout = as_f32(&dout)[0];
        let CrossEntropyState {
            mut logits,
            dtype,
            forward,
        } = ops.state;
        let [parent] = ops.parents;
        let Some(node) = parent else { return };
        let shape = logits.layout().shape().clone();
        forward.backward(as_f32_mut(&mut logits), shape[1], dout);
        grads.register::<Flex>(node.id, crate::host::cast_back(logits, shape, dtype));
    }
}

impl<C: CheckpointStrategy> CrossEntropyBackend for Autodiff<Flex, C> {
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let (logits, guard) = logits.into_parts();
        let dtype = logits.dtype();
        let vocab = logits.layout().shape()[1];
        let logits = contiguous_f32(logits);
        let forward = Forward::run(as_f32(&logits), vocab, int_ids(&targets));
        let out = loss_tensor(forward.loss);
        match CrossEntropyBackward
            .prepare::<C>([guard])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                CrossEntropyState {
                    logits,
                    dtype,
                    forward,
                },
                out,
            ),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}
