//! The fused RMSNorm against its tensor-op version (value and gradients of `loss = Σ w · out`)
//! and central finite differences in f64.

mod common;

use burn::tensor::{Device, Tensor};
use common::{OpRun, Rng, finite_difference, tensor, values};
use zamba_kernels::{rms_norm, rms_norm_reference};

type NormFn = fn(Tensor<3>, Tensor<1>, f64) -> Tensor<3>;

fn norm_run(op: NormFn, x: &[f32], gamma: &[f32], shape: [usize; 3], loss_w: &[f32]) -> OpRun {
    let device = Device::flex().autodiff();
    let xt = tensor(x, shape, &device).require_grad();
    let gt = tensor(gamma, [shape[2]], &device).require_grad();
    let out = op(xt.clone(), gt.clone(), 1e-5);
    let grads = (out.clone() * tensor(loss_w, shape, &device))
        .sum()
        .backward();
    OpRun {
        out: values(out),
        grads: vec![
            values(xt.grad(&grads).unwrap()),
            values(gt.grad(&grads).unwrap()),
        ],
    }
}

#[test]
fn rms_norm_matches_tensor_ops() {
    for shape in [[2, 70, 256], [3, 5, 20], [1, 130, 7]] {
        let n: usize = shape.iter().product();
        let mut rng = Rng(n as u64);
        let (x, gamma, lw) = (
            rng.vec(n, -3.0, 3.0),
            rng.vec(shape[2], 0.5, 1.5),
            rng.vec(n, -1.0, 1.0),
        );
        let fused = norm_run(rms_norm, &x, &gamma, shape, &lw);
        let reference = norm_run(rms_norm_reference, &x, &gamma, shape, &lw);
        fused.assert_matches(
            &reference,
            &["x", "gamma"],
            [1e-6, 5e-6],
            &format!("{shape:?}"),
        );
    }
}

#[test]
fn rms_norm_gradients_match_finite_differences() {
    let shape = [1, 3, 5];
    let n = 15;
    let mut rng = Rng(9);
    let (x, gamma, lw) = (
        rng.vec(n, -2.0, 2.0),
        rng.vec(5, 0.5, 1.5),
        rng.vec(n, -1.0, 1.0),
    );
    let fused = norm_run(rms_norm, &x, &gamma, shape, &lw);
    let all: Vec<f64> = x.iter().chain(&gamma).map(|&v| v as f64).collect();
    let loss = |p: &[f64]| {
        let (x, g) = p.split_at(n);
        x.chunks(5)
            .zip(lw.chunks(5))
            .map(|(row, w)| {
                let rms = (row.iter().map(|v| v * v).sum::<f64>() / 5.0 + 1e-5).sqrt();
                (0..5)
                    .map(|j| w[j] as f64 * row[j] / rms * g[j])
                    .sum::<f64>()
            })
            .sum()
    };
    for (i, &g) in fused.grads.concat().iter().enumerate() {
        let fd = finite_difference(&loss, &all, i, 1e-5);
        assert!(
            (g as f64 - fd).abs() < 2e-5 * (1.0 + fd.abs()),
            "input {i}: {g} vs {fd}"
        );
    }
}

/// Every other test of this binary again at the narrower SIMD levels this CPU has.
#[test]
fn narrower_simd_levels_pass_too() {
    common::assert_narrower_simd_levels_pass("narrower_simd_levels_pass_too");
}
