//! RMSNorm and the GELU gate on a device against their tensor-op definitions on the CPU in f32
//! ([`rms_norm_reference`], [`gelu_mul_reference`] on Flex: Burn's compositions): the output
//! and the gradients of both inputs.
//!
//! Both kernels compute in f32 on every device, so f32 inputs get an f32 tolerance everywhere;
//! bf16 inputs are rounded on the way in, the output and the gradients on the way out.

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::check::{Check, Comparisons, Rng};
use crate::{gelu_mul, gelu_mul_reference, rms_norm, rms_norm_reference};

/// The two ops checked here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormGateOp {
    /// `rms_norm(x, gamma, 1e-5)`: inputs `x` `[B, L, W]`, `gamma` `[W]`.
    RmsNorm,
    /// `gelu_mul(gate, up)`: inputs `gate`, `up`, both `[B, L, W]`.
    GeluMul,
}

impl NormGateOp {
    fn name(self) -> &'static str {
        match self {
            Self::RmsNorm => "rms norm",
            Self::GeluMul => "gelu gate",
        }
    }

    fn inputs(self) -> [&'static str; 2] {
        match self {
            Self::RmsNorm => ["x", "gamma"],
            Self::GeluMul => ["gate", "up"],
        }
    }
}

/// Odd sizes `[B, L, W]`, each with whether the inputs of `[B, L, W]` reach the op as transposed
/// views: widths that are no multiple of any vector width or unit count (below, between and
/// above a GPU cube's 256 units), more rows than a launch has cubes (blocks of several rows, the
/// last one short), one row.
pub fn odd_sizes() -> Vec<([usize; 3], bool)> {
    vec![
        ([2, 37, 33], false),
        ([1, 5, 3], false),
        ([3, 7, 130], true),
        ([1, 3, 257], false),
        ([1, 2051, 5], false),
        ([1, 1, 7], true),
    ]
}

/// Random inputs of one call, and the weights `w` of the loss `Σ w · out` whose gradients are
/// compared.
#[derive(Clone, Debug)]
pub struct NormGateCase {
    pub op: NormGateOp,
    /// `[B, L, W]`.
    pub dims: [usize; 3],
    /// The `[B, L, W]` inputs are `[B, W, L]` tensors with dims 1 and 2 swapped (not contiguous).
    pub strided: bool,
    /// The two inputs and `w`, each in the layout of its tensor.
    pub values: [Vec<f32>; 3],
}

impl NormGateCase {
    /// RMSNorm: `x` in `[-3, 3)`, `gamma` in `[0.5, 1.5)`. GELU gate: `gate` in `[-6, 6)` (both
    /// tails of GELU), `up` in `[-2, 2)`.
    pub fn new(op: NormGateOp, dims: [usize; 3], strided: bool, seed: u64) -> Self {
        let n = dims.iter().product();
        let mut rng = Rng::new(seed);
        let (first, second) = match op {
            NormGateOp::RmsNorm => (rng.vec(n, -3.0, 3.0), rng.vec(dims[2], 0.5, 1.5)),
            NormGateOp::GeluMul => (rng.vec(n, -6.0, 6.0), rng.vec(n, -2.0, 2.0)),
        };
        let w = rng.vec(n, -1.0, 1.0);
        Self {
            op,
            dims,
            strided,
            values: [first, second, w],
        }
    }

    /// Rounds every value to a bf16-representable one.
    pub fn rounded_to_bf16(mut self) -> Self {
        super::round_to_bf16(&mut self.values);
        self
    }

    /// Output and input gradients of `Σ w · op(a, b)` with the fused op on the autodiff version
    /// of `device` in `dtype`, or with its reference. The output and gradients are checked to
    /// come back in `dtype` and returned in f32 (`d gamma` as `[1, 1, W]`); with `tracked`, only
    /// those inputs require a gradient.
    pub fn run(
        &self,
        device: &Device,
        dtype: DType,
        reference: bool,
        tracked: [bool; 2],
    ) -> Result<NormGateRun, String> {
        let device = device.clone().autodiff();
        let leaves = [0, 1].map(|i| {
            let leaf = self.leaf(i, &device).cast(dtype);
            match tracked[i] {
                true => leaf.require_grad(),
                false => leaf,
            }
        });
        let [a, b] = [0, 1].map(|i| self.view(i, leaves[i].clone()));
        let out = match (self.op, reference) {
            (NormGateOp::RmsNorm, false) => rms_norm(a, b.reshape([self.dims[2]]), 1e-5),
            (NormGateOp::RmsNorm, true) => rms_norm_reference(a, b.reshape([self.dims[2]]), 1e-5),
            (NormGateOp::GeluMul, false) => gelu_mul(a, b),
            (NormGateOp::GeluMul, true) => gelu_mul_reference(a, b),
        };
        if out.dtype() != dtype {
            return Err(format!("output in {:?}, expected {dtype:?}", out.dtype()));
        }
        let weights = self.view(2, self.leaf(2, &device));
        let grads = (out.clone().cast(DType::F32) * weights).sum().backward();
        let mut grad_values = Vec::new();
        for (leaf, name) in leaves.iter().zip(self.op.inputs()) {
            let Some(grad) = leaf.grad(&grads) else {
                grad_values.push(None);
                continue;
            };
            if grad.dtype() != dtype {
                return Err(format!("d{name} in {:?}, expected {dtype:?}", grad.dtype()));
            }
            grad_values.push(Some(f32_values(grad)));
        }
        Ok(NormGateRun {
            out: f32_values(out),
            grads: grad_values.try_into().expect("two gradients"),
        })
    }

    /// Value `i` (f32) as stored: `gamma` as `[1, 1, W]`, a `[B, L, W]` input as `[B, W, L]`
    /// when strided.
    fn leaf(&self, i: usize, device: &Device) -> Tensor<3> {
        let [b, l, w] = self.dims;
        let shape = match (i, self.op, self.strided) {
            (1, NormGateOp::RmsNorm, _) => [1, 1, w],
            (_, _, true) => [b, w, l],
            (_, _, false) => [b, l, w],
        };
        Tensor::from_data(TensorData::new(self.values[i].clone(), shape), device)
    }

    /// Stored value `i` as the op takes it: `[B, L, W]` (a transposed view when strided), `gamma`
    /// as it is.
    fn view(&self, i: usize, t: Tensor<3>) -> Tensor<3> {
        let is_gamma = i == 1 && self.op == NormGateOp::RmsNorm;
        match self.strided && !is_gamma {
            true => t.swap_dims(1, 2),
            false => t,
        }
    }
}

fn f32_values(t: Tensor<3>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 values")
}

/// The output and the gradients of both inputs (where tracked) of one [`NormGateCase::run`].
#[derive(Clone, Debug, PartialEq)]
pub struct NormGateRun {
    pub out: Vec<f32>,
    pub grads: [Option<Vec<f32>>; 2],
}

impl NormGateRun {
    fn compare(&self, what: &str, op: NormGateOp, want: &Self, tol: f64, c: &mut Comparisons) {
        c.close(format!("{what} out"), &self.out, &want.out, tol);
        c.close_grads(what, &op.inputs(), &self.grads, &want.grads, tol);
    }
}

/// f32 against the reference: both sides f32 throughout; they differ in the order of the sums,
/// in `1/sqrt` against a division by `sqrt`, and in GELU's `erf` (the kernel's approximation,
/// absolute error 1.5e-7, against libm's).
const F32_TOLERANCE: f64 = 1e-5;

/// bf16 inputs against the reference in f32 on the same bf16-representable values: the output
/// and the gradients are rounded to bf16 once (2^-9 of the largest value), and `d gamma`'s sum
/// over the rows is f32 on both sides.
const BF16_TOLERANCE: f64 = 8e-3;

const BOTH: [bool; 2] = [true; 2];

/// Every RMSNorm and GELU-gate check on `device`.
pub fn norm_gate_checks(device: &Device) -> Vec<Check> {
    let mut checks = Vec::new();
    for op in [NormGateOp::RmsNorm, NormGateOp::GeluMul] {
        checks.push(vs_reference(device, op));
        // Flex has no bf16 kernel: its bf16 op is the reference itself.
        if *device != Device::flex() && device.supports_dtype(DType::BF16) {
            checks.push(bf16_vs_reference(device, op));
        }
        checks.push(partly_tracked_and_deterministic(device, op));
        checks.push(empty_rows(device, op));
    }
    checks
}

fn vs_reference(device: &Device, op: NormGateOp) -> Check {
    Check::run(
        format!("{} f32 vs the reference, odd sizes", op.name()),
        || {
            let mut c = Comparisons::new();
            for (k, (dims, strided)) in odd_sizes().into_iter().enumerate() {
                let case = NormGateCase::new(op, dims, strided, 200 + k as u64);
                let want = case.run(&Device::flex(), DType::F32, true, BOTH)?;
                let got = case.run(device, DType::F32, false, BOTH)?;
                let what = format!("{dims:?}{}", if strided { " strided" } else { "" });
                got.compare(&what, op, &want, F32_TOLERANCE, &mut c);
            }
            c.outcome()
        },
    )
}

fn bf16_vs_reference(device: &Device, op: NormGateOp) -> Check {
    Check::run(
        format!("{} bf16 vs the reference in f32", op.name()),
        || {
            let mut c = Comparisons::new();
            for (dims, strided) in [([2, 45, 130], false), ([1, 9, 257], true)] {
                let case = NormGateCase::new(op, dims, strided, 31).rounded_to_bf16();
                let want = case.run(&Device::flex(), DType::F32, true, BOTH)?;
                let got = case.run(device, DType::BF16, false, BOTH)?;
                got.compare(&format!("{dims:?}"), op, &want, BF16_TOLERANCE, &mut c);
            }
            c.outcome()
        },
    )
}

/// Two runs agree bit for bit; a run with only the second input tracked gives the same output
/// and the same gradient of it, and no other gradient.
fn partly_tracked_and_deterministic(device: &Device, op: NormGateOp) -> Check {
    let [_, second] = op.inputs();
    Check::run(
        format!("{} deterministic bit for bit, partly tracked", op.name()),
        || {
            let case = NormGateCase::new(op, [2, 1100, 67], false, 13);
            let first = case.run(device, DType::F32, false, BOTH)?;
            let again = case.run(device, DType::F32, false, BOTH)?;
            if first != again {
                return Err("two runs on the same inputs differ".into());
            }
            let only = case.run(device, DType::F32, false, [false, true])?;
            let want = [None, first.grads[1].clone()];
            match only.out == first.out && only.grads == want {
                true => Ok(format!(
                    "two runs identical; only d{second} when only {second} is tracked"
                )),
                false => Err(format!(
                    "with only {second} tracked: a different output or gradients"
                )),
            }
        },
    )
}

/// No rows (`L = 0`): an empty output, an empty gradient of the `[B, 0, W]` input and, for
/// RMSNorm, a zero `d gamma` of width `W` (a sum over no rows).
fn empty_rows(device: &Device, op: NormGateOp) -> Check {
    Check::run(format!("{} of no rows", op.name()), || {
        let case = NormGateCase::new(op, [2, 0, 6], false, 1);
        let run = case.run(device, DType::F32, false, BOTH)?;
        let [first, second] = &run.grads;
        let want_second = match op {
            NormGateOp::RmsNorm => vec![0.0; 6],
            NormGateOp::GeluMul => vec![],
        };
        match run.out.is_empty()
            && first.as_deref() == Some(&[][..])
            && second.as_deref() == Some(&want_second[..])
        {
            true => Ok("empty output and gradients, zero sums".into()),
            false => Err(format!(
                "output {} values, gradients {first:?} and {second:?}",
                run.out.len()
            )),
        }
    })
}
