//! The causal depthwise convolution + SiLU on a device against its tensor-op definition on the
//! CPU in f32 ([`causal_conv1d_silu_reference`] on Flex): the output and the gradients of `x`,
//! the weights and the bias. The kernels compute in f32 on every device; bf16 inputs are rounded
//! on the way in, the output and the gradients on the way out.

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::check::{Check, Comparisons, Rng};
use crate::{causal_conv1d_silu, causal_conv1d_silu_reference};

/// Odd sizes `[B, C, L, K]`, each with whether `x` reaches the op as a transposed view (the
/// layout of a `[B, L, C]` projection): lengths no multiple of the backward's 64-step chunks,
/// shorter than the taps, one step; one tap and Mamba's four; odd channel counts.
pub fn odd_sizes() -> Vec<([usize; 4], bool)> {
    vec![
        ([2, 5, 70, 4], false),
        ([1, 3, 130, 4], true),
        ([3, 7, 2, 4], false),
        ([2, 4, 33, 1], true),
        ([1, 6, 1, 3], false),
    ]
}

/// Random inputs of one call, and the weights `w` of the loss `Σ w · out` whose gradients are
/// compared.
#[derive(Clone, Debug)]
pub struct ConvCase {
    /// `[B, C, L, K]`.
    pub dims: [usize; 4],
    /// `x` is a `[B, L, C]` tensor with dims 1 and 2 swapped (not contiguous).
    pub strided: bool,
    /// `x`, the weights `[C, K]`, the bias `[C]` and `w`.
    pub values: [Vec<f32>; 4],
}

impl ConvCase {
    /// `x` in `[-2, 2)`, weights in `[-0.5, 0.5)`, bias in `[-1, 1)`: pre-activations of a few
    /// units, both sides of SiLU's bend.
    pub fn new(dims: [usize; 4], strided: bool, seed: u64) -> Self {
        let [b, c, l, k] = dims;
        let mut rng = Rng::new(seed);
        let values = [
            rng.vec(b * c * l, -2.0, 2.0),
            rng.vec(c * k, -0.5, 0.5),
            rng.vec(c, -1.0, 1.0),
            rng.vec(b * c * l, -1.0, 1.0),
        ];
        Self {
            dims,
            strided,
            values,
        }
    }

    /// Rounds every value to a bf16-representable one.
    pub fn rounded_to_bf16(mut self) -> Self {
        super::round_to_bf16(&mut self.values);
        self
    }

    /// Output and input gradients of `Σ w · op(x, weight, bias)` with the fused op on the
    /// autodiff version of `device` in `dtype`, or with its reference; checked to come back in
    /// `dtype`, returned in f32. With `tracked`, only those inputs require a gradient.
    pub fn run(
        &self,
        device: &Device,
        dtype: DType,
        reference: bool,
        tracked: [bool; 3],
    ) -> Result<ConvRun, String> {
        let device = device.clone().autodiff();
        let [b, c, l, k] = self.dims;
        let leaf = |i: usize| {
            let values = TensorData::new(self.values[i].clone(), [self.values[i].len()]);
            let t = Tensor::<1>::from_data(values, &device).cast(dtype);
            match tracked[i] {
                true => t.require_grad(),
                false => t,
            }
        };
        let leaves = [leaf(0), leaf(1), leaf(2)];
        let x = self.view(leaves[0].clone());
        let weight = leaves[1].clone().reshape([c, k]);
        let bias = leaves[2].clone();
        let out = match reference {
            true => causal_conv1d_silu_reference(x, weight, bias),
            false => causal_conv1d_silu(x, weight, bias),
        };
        if out.dtype() != dtype {
            return Err(format!("output in {:?}, expected {dtype:?}", out.dtype()));
        }
        let weights = TensorData::new(self.values[3].clone(), [b * c * l]);
        let weights = self.view(Tensor::<1>::from_data(weights, &device));
        let grads = (out.clone().cast(DType::F32) * weights).sum().backward();
        let mut grad_values = Vec::new();
        for (leaf, name) in leaves.iter().zip(["x", "weight", "bias"]) {
            let Some(grad) = leaf.grad(&grads) else {
                grad_values.push(None);
                continue;
            };
            if grad.dtype() != dtype {
                return Err(format!("d{name} in {:?}, expected {dtype:?}", grad.dtype()));
            }
            grad_values.push(Some(f32_values(grad)));
        }
        Ok(ConvRun {
            out: f32_values(out.reshape([b * c * l])),
            grads: grad_values.try_into().expect("three gradients"),
        })
    }

    /// A flat `[B, C, L]`-sized value as the op takes it: `[B, C, L]`, or when strided a
    /// `[B, L, C]` tensor with dims 1 and 2 swapped.
    fn view(&self, t: Tensor<1>) -> Tensor<3> {
        let [b, c, l, _] = self.dims;
        match self.strided {
            true => t.reshape([b, l, c]).swap_dims(1, 2),
            false => t.reshape([b, c, l]),
        }
    }
}

fn f32_values(t: Tensor<1>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 values")
}

/// The output and the gradients of `x`, the weights and the bias (where tracked) of one
/// [`ConvCase::run`], the gradients in the order the inputs are stored.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvRun {
    pub out: Vec<f32>,
    pub grads: [Option<Vec<f32>>; 3],
}

impl ConvRun {
    fn compare(&self, what: &str, want: &Self, tol: f64, c: &mut Comparisons) {
        c.close(format!("{what} out"), &self.out, &want.out, tol);
        c.close_grads(
            what,
            &["x", "weight", "bias"],
            &self.grads,
            &want.grads,
            tol,
        );
    }
}

/// f32 against the reference: both sides f32; they differ in the order of the sums (the weight
/// and bias gradients sum over batch and steps) and in `exp`.
const F32_TOLERANCE: f64 = 1e-5;

/// bf16: the output and the gradients rounded to bf16 once (2^-9 of the largest value); the
/// reference's own intermediates are f32.
const BF16_TOLERANCE: f64 = 8e-3;

const ALL: [bool; 3] = [true; 3];

/// Every causal conv + SiLU check on `device`.
pub fn conv_checks(device: &Device) -> Vec<Check> {
    let mut checks = vec![vs_reference(device)];
    // Flex has no bf16 kernel: its bf16 op is the reference itself.
    if *device != Device::flex() && device.supports_dtype(DType::BF16) {
        checks.push(Check::run(
            "conv + silu bf16 vs the reference in f32",
            || {
                let case = ConvCase::new([2, 9, 75, 4], true, 41).rounded_to_bf16();
                let want = case.run(&Device::flex(), DType::F32, true, ALL)?;
                let got = case.run(device, DType::BF16, false, ALL)?;
                let mut c = Comparisons::new();
                got.compare("bf16", &want, BF16_TOLERANCE, &mut c);
                c.outcome()
            },
        ));
    }
    checks.push(partly_tracked_and_deterministic(device));
    checks
}

fn vs_reference(device: &Device) -> Check {
    Check::run("conv + silu f32 vs the reference, odd sizes", || {
        let mut c = Comparisons::new();
        for (n, (dims, strided)) in odd_sizes().into_iter().enumerate() {
            let case = ConvCase::new(dims, strided, 300 + n as u64);
            let want = case.run(&Device::flex(), DType::F32, true, ALL)?;
            let got = case.run(device, DType::F32, false, ALL)?;
            let what = format!("{dims:?}{}", if strided { " strided" } else { "" });
            got.compare(&what, &want, F32_TOLERANCE, &mut c);
        }
        c.outcome()
    })
}

/// Two runs agree bit for bit; a run with only the weights tracked gives the same output and the
/// same weight gradient, and no other gradient.
fn partly_tracked_and_deterministic(device: &Device) -> Check {
    Check::run(
        "conv + silu deterministic bit for bit, partly tracked",
        || {
            let case = ConvCase::new([3, 16, 200, 4], false, 17);
            let first = case.run(device, DType::F32, false, ALL)?;
            let again = case.run(device, DType::F32, false, ALL)?;
            if first != again {
                return Err("two runs on the same inputs differ".into());
            }
            let only = case.run(device, DType::F32, false, [false, true, false])?;
            let want = [None, first.grads[1].clone(), None];
            match only.out == first.out && only.grads == want {
                true => {
                    Ok("two runs identical; only dweight when only the weights are tracked".into())
                }
                false => {
                    Err("with only the weights tracked: a different output or gradients".into())
                }
            }
        },
    )
}
