//! The fused GELU gate `gelu(gate) · up` against its tensor-op version and central finite
//! differences of the exact (erf) GELU in f64.

mod common;

use burn::tensor::{Device, Tensor};
use common::{OpRun, Rng, finite_difference, tensor, values};
use zamba_kernels::{gelu_mul, gelu_mul_reference};

type GeluFn = fn(Tensor<3>, Tensor<3>) -> Tensor<3>;

fn gelu_run(op: GeluFn, inputs: &[Vec<f32>; 3], shape: [usize; 3]) -> OpRun {
    let device = Device::flex().autodiff();
    let gate = tensor(&inputs[0], shape, &device).require_grad();
    let up = tensor(&inputs[1], shape, &device).require_grad();
    let out = op(gate.clone(), up.clone());
    let grads = (out.clone() * tensor(&inputs[2], shape, &device))
        .sum()
        .backward();
    OpRun {
        out: values(out),
        grads: vec![
            values(gate.grad(&grads).unwrap()),
            values(up.grad(&grads).unwrap()),
        ],
    }
}

#[test]
fn gelu_mul_matches_tensor_ops_and_finite_differences() {
    for shape in [[2, 70, 129], [1, 3, 5]] {
        let n: usize = shape.iter().product();
        let mut rng = Rng(n as u64);
        let inputs = [
            rng.vec(n, -6.0, 6.0),
            rng.vec(n, -2.0, 2.0),
            rng.vec(n, -1.0, 1.0),
        ];
        let fused = gelu_run(gelu_mul, &inputs, shape);
        let reference = gelu_run(gelu_mul_reference, &inputs, shape);
        fused.assert_matches(
            &reference,
            &["gate", "up"],
            [1e-6, 2e-6],
            &format!("{shape:?}"),
        );
    }
    // d/dgate of gelu(gate)·up, by central differences of the f64 formula.
    let gelu64 = |x: f64| {
        let erf = |x: f64| {
            let (mut term, mut sum) = (x, x);
            for k in 1..120 {
                term *= -x * x / k as f64;
                sum += term / (2 * k + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
    };
    let gates = [-3.5f32, -1.0, -0.2, 0.0, 0.3, 1.7, 4.0];
    let ones = vec![1.0; gates.len()];
    let run = gelu_run(
        gelu_mul,
        &[gates.to_vec(), ones.clone(), ones],
        [1, 1, gates.len()],
    );
    for (i, &g) in gates.iter().enumerate() {
        let fd = finite_difference(&|p: &[f64]| gelu64(p[0]), &[g as f64], 0, 1e-5);
        assert!(
            (run.out[i] as f64 - gelu64(g as f64)).abs() < 1e-6,
            "gelu({g})"
        );
        assert!(
            (run.grads[0][i] as f64 - fd).abs() < 2e-6,
            "gelu'({g}): {} vs {fd}",
            run.grads[0][i]
        );
    }
}

/// Every other test of this binary again at the narrower SIMD levels this CPU has.
#[test]
fn narrower_simd_levels_pass_too() {
    common::assert_narrower_simd_levels_pass("narrower_simd_levels_pass_too");
}
