//! Next-token cross-entropy.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

/// Targets equal to this id are padding/masked and do not count (PyTorch's default `-100`).
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy over the targets that are not [`IGNORE_INDEX`].
/// `logits`: `[B, L, V]`, `targets`: `[B, L]`. Returns a one-element tensor (0 if every target
/// is ignored, so that such a micro-batch contributes no gradient instead of NaN).
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, l, v] = logits.dims();
    let log_probs = log_softmax(logits.reshape([b * l, v]), 1);
    let targets = targets.reshape([b * l]);
    let valid = targets.clone().not_equal_elem(IGNORE_INDEX);
    let safe_targets = targets.mask_fill(valid.clone().bool_not(), 0);
    let picked = log_probs
        .gather(1, safe_targets.reshape([b * l, 1]))
        .reshape([b * l]);
    let valid = valid.float();
    let count = valid.clone().sum().clamp_min(1.0);
    (picked * valid).sum().neg() / count
}

/// Loss of predicting `tokens[:, 1:]` from `logits[:, :-1]` (transformers' `labels=input_ids`).
pub fn next_token_loss(logits: Tensor<3>, tokens: Tensor<2, Int>) -> Tensor<1> {
    let [b, l, v] = logits.dims();
    assert!(
        l >= 2,
        "next_token_loss needs at least 2 tokens per sequence, got {l}"
    );
    let inputs = logits.slice([0..b, 0..l - 1, 0..v]);
    let targets = tokens.slice([0..b, 1..l]);
    cross_entropy(inputs, targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn matches_hand_computation_and_ignores_masked_targets() {
        let device = Device::flex();
        let logits = Tensor::<3>::from_data(
            TensorData::new(
                vec![1.0f32, 2.0, 3.0, 0.5, 0.5, 0.5, -1.0, 0.0, 4.0],
                vec![1, 3, 3],
            ),
            &device,
        );
        let targets = Tensor::<2, Int>::from_data(
            TensorData::new(vec![2i64, IGNORE_INDEX, 0], vec![1, 3]),
            &device,
        );
        let nll = |row: [f64; 3], t: usize| {
            let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
            lse - row[t]
        };
        let expected = (nll([1.0, 2.0, 3.0], 2) + nll([-1.0, 0.0, 4.0], 0)) / 2.0;
        let got = cross_entropy(logits, targets).into_scalar::<f32>() as f64;
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
    }

    #[test]
    fn all_ignored_gives_zero_not_nan() {
        let device = Device::flex();
        let logits = Tensor::<3>::zeros([1, 2, 4], &device);
        let targets = Tensor::<2, Int>::full([1, 2], IGNORE_INDEX, &device);
        assert_eq!(cross_entropy(logits, targets).into_scalar::<f32>(), 0.0);
    }
}
