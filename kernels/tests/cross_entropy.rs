//! The fused cross-entropy (forward and gradient) against its tensor-op version and central
//! finite differences in f64; ignored rows, NaN logits, targets outside the vocabulary.

mod common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::{Rng, finite_difference, rel_err, tensor, values};
use zamba_kernels::{IGNORE_INDEX, cross_entropy, cross_entropy_reference};

/// `(loss, d loss / d logits)` of `op` on an autodiff Flex device.
fn ce_run(
    op: fn(Tensor<2>, Tensor<1, Int>) -> Tensor<1>,
    logits: &[f32],
    targets: &[i64],
    vocab: usize,
) -> (f32, Vec<f32>) {
    let device = Device::flex().autodiff();
    let rows = targets.len();
    let x = tensor(logits, [rows, vocab], &device).require_grad();
    let t = Tensor::<1, Int>::from_data(TensorData::new(targets.to_vec(), vec![rows]), &device);
    let loss = op(x.clone(), t);
    let grads = (loss.clone() * 1.5).sum().backward();
    (values(loss)[0], values(x.grad(&grads).unwrap()))
}

fn ce_case(rows: usize, vocab: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
    let mut rng = Rng(seed);
    let logits = rng.vec(rows * vocab, -6.0, 6.0);
    let targets = (0..rows)
        .map(|r| match r % 5 {
            3 => IGNORE_INDEX,
            _ => (rng.uniform(0.0, vocab as f32) as i64).min(vocab as i64 - 1),
        })
        .collect();
    (logits, targets)
}

#[test]
fn cross_entropy_matches_tensor_ops_in_value_and_gradient() {
    // Vocabulary sizes with and without a vector remainder.
    for (rows, vocab) in [(37, 4096), (11, 1000), (5, 3)] {
        let (logits, targets) = ce_case(rows, vocab, rows as u64);
        let (loss, grad) = ce_run(cross_entropy, &logits, &targets, vocab);
        let (want_loss, want_grad) = ce_run(cross_entropy_reference, &logits, &targets, vocab);
        assert!(
            ((loss - want_loss) / want_loss).abs() < 1e-6,
            "{rows}x{vocab}: loss {loss} vs {want_loss}"
        );
        let err = rel_err(&grad, &want_grad);
        assert!(err < 2e-6, "{rows}x{vocab}: gradient error {err:e}");
        for (r, &t) in targets.iter().enumerate() {
            if t == IGNORE_INDEX {
                assert!(grad[r * vocab..(r + 1) * vocab].iter().all(|&g| g == 0.0));
            }
        }
    }
}

#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    let (rows, vocab) = (4, 9);
    let (logits, targets) = ce_case(rows, vocab, 7);
    let (_, grad) = ce_run(cross_entropy, &logits, &targets, vocab);
    let loss = |x: &[f64]| {
        let mut total = 0.0;
        let mut count = 0;
        for (row, &t) in x.chunks(vocab).zip(&targets) {
            if t != IGNORE_INDEX {
                let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
                total += lse - row[t as usize];
                count += 1;
            }
        }
        1.5 * total / count as f64
    };
    let x: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
    for (i, &g) in grad.iter().enumerate() {
        let fd = finite_difference(&loss, &x, i, 1e-5);
        assert!((g as f64 - fd).abs() < 1e-6, "logit {i}: {g} vs {fd}");
    }
}

#[test]
fn cross_entropy_edge_cases() {
    let device = Device::flex();
    let ignored = Tensor::<1, Int>::full([3], IGNORE_INDEX, &device);
    let loss = cross_entropy(Tensor::zeros([3, 8], &device), ignored);
    assert_eq!(values(loss), [0.0]);
    let (mut logits, targets) = ce_case(2, 16, 1);
    logits[5] = f32::NAN;
    let t = Tensor::<1, Int>::from_data(TensorData::new(targets, vec![2]), &device);
    let loss = cross_entropy(tensor(&logits, [2, 16], &device), t);
    assert!(values(loss)[0].is_nan(), "a NaN logit must give a NaN loss");
}

#[test]
#[should_panic(expected = "outside the vocabulary")]
fn cross_entropy_rejects_targets_outside_the_vocabulary() {
    let device = Device::flex();
    let t = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 8], vec![2]), &device);
    cross_entropy(Tensor::zeros([2, 8], &device), t);
}

/// Every other test of this binary again at the narrower SIMD levels this CPU has.
#[test]
fn narrower_simd_levels_pass_too() {
    common::assert_narrower_simd_levels_pass("narrower_simd_levels_pass_too");
}
