//! Loader batches as model tensors.

use burn::tensor::{Device, Int, Tensor, TensorData};
use zamba_data::Batch;
use zamba_model::IGNORE_INDEX;

/// Rows `[start, start + rows)` of the batch as `[rows, seq_len]` input and target tensors;
/// targets outside the batch's loss mask become [`IGNORE_INDEX`], so the loss skips them.
pub fn micro_batch(
    batch: &Batch,
    start: usize,
    rows: usize,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let l = batch.seq_len;
    let range = start * l..(start + rows) * l;
    let inputs: Vec<i64> = batch.inputs[range.clone()]
        .iter()
        .map(|&t| t as i64)
        .collect();
    let targets = target_ids(batch, range);
    let tensor =
        |ids: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(ids, vec![rows, l]), device);
    (tensor(inputs), tensor(targets))
}

/// Target ids of the flat positions `range`, masked ones as [`IGNORE_INDEX`].
pub fn target_ids(batch: &Batch, range: std::ops::Range<usize>) -> Vec<i64> {
    let targets = &batch.targets[range.clone()];
    match &batch.loss_mask {
        None => targets.iter().map(|&t| t as i64).collect(),
        Some(mask) => targets
            .iter()
            .zip(&mask[range])
            .map(|(&t, &keep)| if keep { t as i64 } else { IGNORE_INDEX })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn masked_targets_become_the_ignore_index() {
        let batch = Batch {
            step: 0,
            rows: 2,
            seq_len: 2,
            inputs: vec![1, 2, 3, 4],
            targets: vec![2, 5, 4, 6],
            loss_mask: Some(vec![true, false, false, true]),
            row_sources: vec![0, 0],
            row_windows: vec![0, 1],
            source_tokens: BTreeMap::new(),
        };
        assert_eq!(
            target_ids(&batch, 0..4),
            vec![2, IGNORE_INDEX, IGNORE_INDEX, 6]
        );
        let device = Device::flex();
        let (inputs, targets) = micro_batch(&batch, 1, 1, &device);
        assert_eq!(
            inputs
                .into_data()
                .convert::<i64>()
                .try_into_vec::<i64>()
                .unwrap(),
            vec![3, 4]
        );
        assert_eq!(
            targets
                .into_data()
                .convert::<i64>()
                .try_into_vec::<i64>()
                .unwrap(),
            vec![IGNORE_INDEX, 6]
        );
        let unmasked = Batch {
            loss_mask: None,
            ..batch
        };
        assert_eq!(target_ids(&unmasked, 0..4), vec![2, 5, 4, 6]);
    }
}
