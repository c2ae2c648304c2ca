//! `per_head_matmul` (one GEMM per batch and head on strided operands) against Burn's batched
//! matmul: values and gradients, strided inputs, both output orders.

mod common;

use burn::tensor::{Device, Tensor};
use common::{OpRun, Rng, tensor, values};
use zamba_kernels::{per_head_matmul, per_head_matmul_reference, per_head_matmul_transposed};

type HeadsFn = fn(Tensor<3>, Tensor<4>) -> Tensor<4>;

/// `dims`: batch, heads, M, K, N. With `sliced`, `x` is rows `1..K + 1` of a taller tensor (a
/// strided view, as `dt` is of `x_proj`'s output).
fn heads_run(op: HeadsFn, dims: [usize; 5], sliced: bool, inputs: &[Vec<f32>; 3]) -> OpRun {
    let [b, h, m, k, n] = dims;
    let device = Device::flex().autodiff();
    let wt = tensor(&inputs[0], [h, m, k], &device).require_grad();
    let rows = if sliced { k + 2 } else { k };
    let xt = tensor(&inputs[1], [b, h, rows, n], &device).require_grad();
    let x_in = match sliced {
        true => xt.clone().slice([0..b, 0..h, 1..k + 1, 0..n]),
        false => xt.clone(),
    };
    let out = op(wt.clone(), x_in);
    let grads = (out.clone() * tensor(&inputs[2], [b, h, m, n], &device))
        .sum()
        .backward();
    OpRun {
        out: values(out),
        grads: vec![
            values(wt.grad(&grads).unwrap()),
            values(xt.grad(&grads).unwrap()),
        ],
    }
}

#[test]
fn per_head_matmul_matches_tensor_ops_in_value_and_gradient() {
    for (dims, sliced) in [
        ([2, 3, 5, 7, 11], false),
        ([4, 2, 48, 256, 130], false),
        ([3, 2, 9, 4, 20], true),
    ] {
        let [b, h, m, k, n] = dims;
        let rows = if sliced { k + 2 } else { k };
        let mut rng = Rng(dims.iter().product::<usize>() as u64);
        let inputs = [
            rng.vec(h * m * k, -1.0, 1.0),
            rng.vec(b * h * rows * n, -2.0, 2.0),
            rng.vec(b * h * m * n, -1.0, 1.0),
        ];
        let reference = heads_run(per_head_matmul_reference, dims, sliced, &inputs);
        let transposed: HeadsFn = |w, x| per_head_matmul_transposed(w, x).swap_dims(2, 3);
        for (order, op) in [
            ("row-major", per_head_matmul as HeadsFn),
            ("transposed", transposed),
        ] {
            let fused = heads_run(op, dims, sliced, &inputs);
            fused.assert_matches(
                &reference,
                &["w", "x"],
                [1e-6, 1e-6],
                &format!("{order} {dims:?}"),
            );
        }
    }
}

#[test]
#[should_panic(expected = "per_head_matmul: w [2, 3, 4] and x [1, 3, 4, 5]")]
fn per_head_matmul_rejects_mismatched_heads() {
    let device = Device::flex();
    let _ = per_head_matmul(
        tensor(&[0.0; 24], [2, 3, 4], &device),
        tensor(&[0.0; 60], [1, 3, 4, 5], &device),
    );
}

/// A batch of none: the weight gradient, a sum of no products, is zero (not memory the products
/// never wrote).
#[test]
fn per_head_matmul_of_an_empty_batch_has_a_zero_weight_gradient() {
    let device = Device::flex().autodiff();
    let w = tensor(&Rng(2).vec(24, -1.0, 1.0), [2, 3, 4], &device).require_grad();
    let x = Tensor::<4>::zeros([0, 2, 4, 5], &device).require_grad();
    let out = per_head_matmul(w.clone(), x.clone());
    assert_eq!(out.dims(), [0, 2, 3, 5]);
    let grads = out.sum().backward();
    assert_eq!(values(w.grad(&grads).unwrap()), [0.0; 24]);
}
