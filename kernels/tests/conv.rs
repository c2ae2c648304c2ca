//! The fused causal depthwise conv + SiLU against its tensor-op version (value and gradients of
//! `loss = Σ w · out`) and central finite differences in f64.

mod common;

use burn::tensor::{Device, Tensor};
use common::{OpRun, Rng, finite_difference, tensor, values};
use zamba_kernels::{causal_conv1d_silu, causal_conv1d_silu_reference};

type ConvFn = fn(Tensor<3>, Tensor<2>, Tensor<1>) -> Tensor<3>;

fn conv_run(
    op: ConvFn,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    dims: [usize; 4],
    loss_w: &[f32],
) -> OpRun {
    let [batch, channels, len, taps] = dims;
    let device = Device::flex().autodiff();
    let xt = tensor(x, [batch, channels, len], &device).require_grad();
    let wt = tensor(w, [channels, taps], &device).require_grad();
    let bt = tensor(b, [channels], &device).require_grad();
    let out = op(xt.clone(), wt.clone(), bt.clone());
    let grads = (out.clone() * tensor(loss_w, [batch, channels, len], &device))
        .sum()
        .backward();
    OpRun {
        out: values(out),
        grads: vec![
            values(xt.grad(&grads).unwrap()),
            values(wt.grad(&grads).unwrap()),
            values(bt.grad(&grads).unwrap()),
        ],
    }
}

fn conv_case(dims: [usize; 4], seed: u64) -> [Vec<f32>; 4] {
    let [batch, channels, len, taps] = dims;
    let mut rng = Rng(seed);
    [
        rng.vec(batch * channels * len, -2.0, 2.0),
        rng.vec(channels * taps, -1.0, 1.0),
        rng.vec(channels, -0.5, 0.5),
        rng.vec(batch * channels * len, -1.0, 1.0),
    ]
}

#[test]
fn causal_conv_silu_matches_tensor_ops() {
    for dims in [[2, 5, 37, 4], [3, 16, 64, 4], [1, 2, 3, 4], [2, 3, 20, 1]] {
        let [x, w, b, lw] = conv_case(dims, dims[2] as u64);
        let fused = conv_run(causal_conv1d_silu, &x, &w, &b, dims, &lw);
        let reference = conv_run(causal_conv1d_silu_reference, &x, &w, &b, dims, &lw);
        fused.assert_matches(
            &reference,
            &["x", "weight", "bias"],
            [1e-6, 2e-6],
            &format!("{dims:?}"),
        );
    }
}

#[test]
fn causal_conv_silu_gradients_match_finite_differences() {
    let dims = [1, 2, 6, 3];
    let [batch, channels, len, taps] = dims;
    let [x, w, b, lw] = conv_case(dims, 3);
    let fused = conv_run(causal_conv1d_silu, &x, &w, &b, dims, &lw);
    // All inputs in one f64 vector: x, then w, then b.
    let all: Vec<f64> = x.iter().chain(&w).chain(&b).map(|&v| v as f64).collect();
    let (nx, nw) = (x.len(), w.len());
    let loss = |p: &[f64]| {
        let (x, rest) = p.split_at(nx);
        let (w, b) = rest.split_at(nw);
        let mut total = 0.0;
        for lane in 0..batch * channels {
            let c = lane % channels;
            for t in 0..len {
                let mut a = b[c];
                for k in 0..taps {
                    if let Some(src) = (t + k).checked_sub(taps - 1) {
                        a += w[c * taps + k] * x[lane * len + src];
                    }
                }
                total += lw[lane * len + t] as f64 * a / (1.0 + (-a).exp());
            }
        }
        total
    };
    let grads: Vec<f32> = fused.grads.concat();
    for (i, &g) in grads.iter().enumerate() {
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
