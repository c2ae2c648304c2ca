//! The fused causal attention against Burn's attention (values and gradients; grouped queries,
//! strided inputs, lengths below, at and across the row blocks) and a plain loop.

mod common;

use burn::tensor::{Device, Tensor};
use common::{OpRun, Rng, rel_err, tensor, values};
use zamba_kernels::{causal_attention, causal_attention_reference};

type AttentionFn = fn(Tensor<4>, Tensor<4>, Tensor<4>, f64) -> Tensor<4>;

/// `dims`: batch, len, heads, kv heads, head dim. With `strided`, q/k/v reach the op as
/// `[B, heads, L, hd]` tensors with dims 1 and 2 swapped (not contiguous).
fn attention_run(
    op: AttentionFn,
    dims: [usize; 5],
    strided: bool,
    inputs: &[Vec<f32>; 4],
) -> OpRun {
    let [b, l, h, kv, hd] = dims;
    let device = Device::flex().autodiff();
    let leaf = |data: &[f32], heads: usize| match strided {
        true => tensor(data, [b, heads, l, hd], &device).require_grad(),
        false => tensor(data, [b, l, heads, hd], &device).require_grad(),
    };
    let [q, k, v] = [(&inputs[0], h), (&inputs[1], kv), (&inputs[2], kv)].map(|(x, n)| leaf(x, n));
    let view = |t: &Tensor<4>| match strided {
        true => t.clone().swap_dims(1, 2),
        false => t.clone(),
    };
    let out = op(view(&q), view(&k), view(&v), 1.0 / (hd as f64).sqrt());
    let grads = (out.clone() * tensor(&inputs[3], [b, l, h, hd], &device))
        .sum()
        .backward();
    OpRun {
        out: values(out),
        grads: [q, k, v]
            .iter()
            .map(|t| values(t.grad(&grads).unwrap()))
            .collect(),
    }
}

fn attention_inputs(dims: [usize; 5], seed: u64) -> [Vec<f32>; 4] {
    let [b, l, h, kv, hd] = dims;
    let mut rng = Rng(seed);
    [
        rng.vec(b * l * h * hd, -2.0, 2.0),
        rng.vec(b * l * kv * hd, -2.0, 2.0),
        rng.vec(b * l * kv * hd, -1.0, 1.0),
        rng.vec(b * l * h * hd, -1.0, 1.0),
    ]
}

#[test]
fn causal_attention_matches_tensor_ops_in_value_and_gradient() {
    // Lengths below, at and across the 64-row blocks; grouped queries; strided inputs.
    for (dims, strided) in [
        ([2, 70, 4, 4, 8], false),
        ([1, 130, 4, 2, 16], false),
        ([2, 64, 2, 1, 4], true),
        ([1, 1, 3, 3, 5], false),
        ([3, 33, 6, 3, 7], true),
    ] {
        let inputs = attention_inputs(dims, dims.iter().product::<usize>() as u64);
        let fused = attention_run(causal_attention, dims, strided, &inputs);
        let reference = attention_run(causal_attention_reference, dims, strided, &inputs);
        fused.assert_matches(
            &reference,
            &["q", "k", "v"],
            [2e-6, 1e-5],
            &format!("{dims:?}"),
        );
    }
}

#[test]
fn causal_attention_values_match_a_plain_loop() {
    let dims = [1, 9, 2, 1, 3];
    let [_, l, h, _, hd] = dims;
    let inputs = attention_inputs(dims, 5);
    let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut want = vec![0f32; l * h * hd];
    for head in 0..h {
        for i in 0..l {
            let score = |j: usize| {
                (0..hd)
                    .map(|c| q[(i * h + head) * hd + c] as f64 * k[j * hd + c] as f64)
                    .sum::<f64>()
                    * scale
            };
            let weights: Vec<f64> = (0..=i).map(|j| score(j).exp()).collect();
            let total: f64 = weights.iter().sum();
            for c in 0..hd {
                let o: f64 = (0..=i).map(|j| weights[j] * v[j * hd + c] as f64).sum();
                want[(i * h + head) * hd + c] = (o / total) as f32;
            }
        }
    }
    let got = attention_run(causal_attention, dims, false, &inputs).out;
    assert!(rel_err(&got, &want) < 1e-6, "{got:?} vs {want:?}");
}

#[test]
#[should_panic(expected = "causal_attention: q [1, 4, 3, 2], k [1, 4, 2, 2]")]
fn causal_attention_rejects_heads_that_do_not_group() {
    let device = Device::flex();
    let t = |heads: usize| tensor(&vec![0.0; 8 * heads], [1, 4, heads, 2], &device);
    let _ = causal_attention(t(3), t(2), t(2), 1.0);
}

#[test]
#[should_panic(expected = "with H a positive multiple of H_kv")]
fn causal_attention_rejects_zero_query_heads() {
    let device = Device::flex();
    let t = |heads: usize| tensor(&vec![0.0; 8 * heads], [1, 4, heads, 2], &device);
    let _ = causal_attention(t(0), t(1), t(1), 1.0);
}

#[test]
fn causal_attention_of_an_empty_sequence_is_empty() {
    let device = Device::flex().autodiff();
    let t = |heads: usize| Tensor::<4>::zeros([2, 0, heads, 4], &device).require_grad();
    let (q, k, v) = (t(4), t(2), t(2));
    let out = causal_attention(q.clone(), k.clone(), v.clone(), 0.5);
    assert_eq!(out.dims(), [2, 0, 4, 4]);
    let grads = out.sum().backward();
    for (name, x) in [("q", q), ("k", k), ("v", v)] {
        assert!(values(x.grad(&grads).unwrap()).is_empty(), "d{name}");
    }
}

/// Every other test of this binary again at the narrower SIMD levels this CPU has.
#[test]
fn narrower_simd_levels_pass_too() {
    common::assert_narrower_simd_levels_pass("narrower_simd_levels_pass_too");
}
