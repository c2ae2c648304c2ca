//! The fused AdamW update against its tensor-op version: bit for bit, whatever the length, and
//! without writing into buffers that other tensors share.

mod common;

use burn::tensor::{Device, Tensor, TensorData};
use common::{Rng, tensor, values};
use zamba_kernels::{AdamWHyper, adamw_update, adamw_update_reference};

/// `(theta, grad, m, v, hyper) -> (theta, m, v)`.
type UpdateFn = fn(
    Tensor<1>,
    Tensor<1>,
    Tensor<1>,
    Tensor<1>,
    &AdamWHyper,
) -> (Tensor<1>, Tensor<1>, Tensor<1>);

/// `theta`, `m`, `v` after four updates of `n` parameters from the same random start.
fn adamw_steps(update: UpdateFn, n: usize) -> [Vec<f32>; 3] {
    let device = Device::flex();
    let mut rng = Rng(42);
    let mut theta = tensor(&rng.vec(n, -1.0, 1.0), [n], &device);
    let (mut m, mut v) = (Tensor::zeros([n], &device), Tensor::zeros([n], &device));
    for step in 1..=4u64 {
        let grad = tensor(&rng.vec(n, -3.0, 3.0), [n], &device);
        let hyper = AdamWHyper {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: if step % 2 == 0 { 0.1 } else { 0.0 },
            step,
            grad_scale: 0.7,
        };
        // Keep an alias of theta alive on odd steps: the kernel must not write through it.
        let alias = (step % 2 == 1).then(|| theta.clone());
        let before = alias.as_ref().map(|t| values(t.clone()));
        (theta, m, v) = update(theta, grad, m, v, &hyper);
        if let (Some(alias), Some(before)) = (alias, before) {
            assert_eq!(
                values(alias),
                before,
                "the update wrote into a shared buffer"
            );
        }
    }
    [values(theta), values(m), values(v)]
}

#[test]
fn adamw_update_is_bit_identical_to_tensor_ops() {
    for n in [1, 15, 16, 1000, 70_001] {
        let fused = adamw_steps(adamw_update, n);
        let reference = adamw_steps(adamw_update_reference, n);
        for (name, (f, r)) in ["theta", "m", "v"].iter().zip(fused.iter().zip(&reference)) {
            let same = f.iter().zip(r).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name} differs at n = {n}");
        }
    }
}

#[test]
fn adamw_update_accepts_autodiff_tensors() {
    // Moments restored from a checkpoint may live on the autodiff device.
    let device = Device::flex().autodiff();
    let hyper = AdamWHyper {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
        grad_scale: 1.0,
    };
    let t = |x: f32| Tensor::<1>::from_data(TensorData::new(vec![x; 3], vec![3]), &device);
    let (theta, m, v) = adamw_update(t(1.0), t(2.0), t(0.0), t(0.0), &hyper);
    let (want_theta, want_m, want_v) =
        adamw_update_reference(t(1.0), t(2.0), t(0.0), t(0.0), &hyper);
    assert_eq!(values(theta), values(want_theta));
    assert_eq!(values(m), values(want_m));
    assert_eq!(values(v), values(want_v));
}

#[test]
#[should_panic(expected = "same length")]
fn adamw_update_rejects_mismatched_lengths() {
    let device = Device::flex();
    let hyper = AdamWHyper {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
        grad_scale: 1.0,
    };
    let t = |n| Tensor::<1>::zeros([n], &device);
    adamw_update(t(4), t(5), t(4), t(4), &hyper);
}

/// Every other test of this binary again at the narrower SIMD levels this CPU has.
#[test]
fn narrower_simd_levels_pass_too() {
    common::assert_narrower_simd_levels_pass("narrower_simd_levels_pass_too");
}
