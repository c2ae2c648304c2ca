//! `linear` (direct GEMMs on strided operands) against Burn's matmul and a plain loop: values
//! and gradients, contiguous and transposed operands, both output orders.

mod common;

use burn::tensor::{Device, Tensor};
use common::{OpRun, Rng, rel_err, tensor, values};
use zamba_kernels::{linear, linear_channels_first, linear_reference};

type LinearFn = fn(Tensor<3>, Tensor<2>) -> Tensor<3>;

/// How the operands reach the op: as contiguous tensors, or as transposed views of buffers laid
/// out the other way (out_proj's input, the tied head's weight).
#[derive(Clone, Copy, Debug)]
struct LinearCase {
    dims: [usize; 4], // batch, rows, d_in, d_out
    x_transposed: bool,
    w_transposed: bool,
}

fn linear_run(op: LinearFn, case: LinearCase, x: &[f32], w: &[f32], loss_w: &[f32]) -> OpRun {
    let [b, m, k, n] = case.dims;
    let device = Device::flex().autodiff();
    let xt = match case.x_transposed {
        true => tensor(x, [b, k, m], &device).require_grad(),
        false => tensor(x, [b, m, k], &device).require_grad(),
    };
    let wt = match case.w_transposed {
        true => tensor(w, [n, k], &device).require_grad(),
        false => tensor(w, [k, n], &device).require_grad(),
    };
    let x_in = match case.x_transposed {
        true => xt.clone().swap_dims(1, 2),
        false => xt.clone(),
    };
    let w_in = match case.w_transposed {
        true => wt.clone().transpose(),
        false => wt.clone(),
    };
    let out = op(x_in, w_in);
    let grads = (out.clone() * tensor(loss_w, [b, m, n], &device))
        .sum()
        .backward();
    OpRun {
        out: values(out),
        grads: vec![
            values(xt.grad(&grads).unwrap()),
            values(wt.grad(&grads).unwrap()),
        ],
    }
}

#[test]
fn linear_matches_tensor_ops_on_strided_operands() {
    let mut cases = Vec::new();
    // Small (one thread) and above the parallel threshold; batch 1 and several.
    for dims in [[2, 70, 33, 19], [1, 5, 3, 2], [4, 128, 96, 200]] {
        for (x_transposed, w_transposed) in
            [(false, false), (true, false), (false, true), (true, true)]
        {
            cases.push(LinearCase {
                dims,
                x_transposed,
                w_transposed,
            });
        }
    }
    for case in cases {
        let [b, m, k, n] = case.dims;
        let mut rng = Rng((b * m * k * n) as u64);
        let (x, w, lw) = (
            rng.vec(b * m * k, -2.0, 2.0),
            rng.vec(k * n, -1.0, 1.0),
            rng.vec(b * m * n, -1.0, 1.0),
        );
        let reference = linear_run(linear_reference, case, &x, &w, &lw);
        let channels_first: LinearFn = |x, w| linear_channels_first(x, w).swap_dims(1, 2);
        for (order, op) in [
            ("row-major", linear as LinearFn),
            ("channels-first", channels_first),
        ] {
            let fused = linear_run(op, case, &x, &w, &lw);
            fused.assert_matches(
                &reference,
                &["x", "w"],
                [1e-6, 1e-6],
                &format!("{order} {case:?}"),
            );
        }
    }
}

#[test]
fn linear_values_match_a_plain_loop_in_every_rank() {
    let (k, n) = (7, 5);
    let mut rng = Rng(3);
    let (x, w) = (rng.vec(6 * k, -1.0, 1.0), rng.vec(k * n, -1.0, 1.0));
    let want: Vec<f32> = x
        .chunks(k)
        .flat_map(|row| {
            (0..n).map(|j| {
                (0..k)
                    .map(|i| row[i] as f64 * w[i * n + j] as f64)
                    .sum::<f64>() as f32
            })
        })
        .collect();
    let device = Device::flex();
    let w_t = tensor(&w, [k, n], &device);
    let got2 = values(linear(tensor(&x, [6, k], &device), w_t.clone()));
    let got4 = values(linear(tensor(&x, [1, 2, 3, k], &device), w_t));
    assert!(rel_err(&got2, &want) < 1e-6);
    assert_eq!(got2, got4);
}

#[test]
#[should_panic(expected = "linear: x's last dimension is 4 but the weight is [3, 2]")]
fn linear_rejects_mismatched_dimensions() {
    let device = Device::flex();
    let _ = linear(
        tensor(&[0.0; 8], [2, 4], &device),
        tensor(&[0.0; 6], [3, 2], &device),
    );
}

/// A batch of no rows: the output is empty, and the weight gradient, a sum of no products, is
/// zero (not memory the products never wrote).
#[test]
fn linear_of_an_empty_batch_has_a_zero_weight_gradient() {
    let device = Device::flex().autodiff();
    let x = Tensor::<3>::zeros([0, 5, 3], &device).require_grad();
    let w = tensor(&Rng(1).vec(6, -1.0, 1.0), [3, 2], &device).require_grad();
    let out = linear(x.clone(), w.clone());
    assert_eq!(out.dims(), [0, 5, 2]);
    let grads = out.sum().backward();
    assert_eq!(values(w.grad(&grads).unwrap()), [0.0; 6]);
    assert!(values(x.grad(&grads).unwrap()).is_empty());
}
