//! Next-token cross-entropy, through the fused kernel of `zamba_kernels` (log-softmax, target
//! pick and mean in one pass; tensor ops on devices without the kernel).

use burn::tensor::{Int, Tensor};

/// Targets equal to this id are padding/masked and do not count (PyTorch's default `-100`).
pub use zamba_kernels::IGNORE_INDEX;

/// Mean cross-entropy over the targets that are not [`IGNORE_INDEX`].
/// `logits`: `[B, L, V]`, `targets`: `[B, L]`. Returns a one-element tensor (0 if every target
/// is ignored, so that such a micro-batch contributes no gradient instead of NaN).
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, l, v] = logits.dims();
    zamba_kernels::cross_entropy(logits.reshape([b * l, v]), targets.reshape([b * l]))
}

/// Loss of predicting `tokens[:, 1:]` from `logits[:, :-1]` (transformers' `labels=input_ids`).
///
/// The targets are `tokens` shifted left by one with [`IGNORE_INDEX`] in the last column, so the
/// logits are used whole (the last position predicts nothing) instead of being sliced and copied.
pub fn next_token_loss(logits: Tensor<3>, tokens: Tensor<2, Int>) -> Tensor<1> {
    let [b, l, _] = logits.dims();
    assert!(
        l >= 2,
        "next_token_loss needs at least 2 tokens per sequence, got {l}"
    );
    assert_eq!(
        tokens.dims(),
        [b, l],
        "next_token_loss: tokens must be [batch, len] like the logits' first two dimensions"
    );
    let device = tokens.device();
    let targets = Tensor::cat(
        vec![
            tokens.slice([0..b, 1..l]),
            Tensor::full([b, 1], IGNORE_INDEX, &device),
        ],
        1,
    );
    cross_entropy(logits, targets)
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
    fn next_token_loss_equals_the_loss_on_sliced_logits() {
        let device = Device::flex();
        device.seed(5);
        let logits = Tensor::<3>::random([2, 5, 7], burn::tensor::Distribution::Default, &device);
        let tokens = Tensor::<2, Int>::from_data(
            TensorData::new(vec![1i64, 2, 3, 4, 5, 6, 0, 1, 2, 3], vec![2, 5]),
            &device,
        );
        let got = next_token_loss(logits.clone(), tokens.clone()).into_scalar::<f32>();
        let sliced = cross_entropy(logits.slice([0..2, 0..4, 0..7]), tokens.slice([0..2, 1..5]))
            .into_scalar::<f32>();
        assert!(
            (got - sliced).abs() <= 1e-6 * sliced.abs(),
            "{got} vs {sliced}"
        );
    }

    #[test]
    fn all_ignored_gives_zero_not_nan() {
        let device = Device::flex();
        let logits = Tensor::<3>::zeros([1, 2, 4], &device);
        let targets = Tensor::<2, Int>::full([1, 2], IGNORE_INDEX, &device);
        assert_eq!(cross_entropy(logits, targets).into_scalar::<f32>(), 0.0);
    }
}
