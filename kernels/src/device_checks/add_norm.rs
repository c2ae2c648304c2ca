//! RMSNorm of a residual sum (`add_rms_norm(x, t, gamma)`) on a device against its tensor-op
//! definition on the CPU in f32 ([`add_rms_norm_reference`] on Flex: the add, then Burn's
//! RMSNorm): the output and the gradients of `x`, `t` and `gamma`.

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::check::{Arithmetic, Check, Comparisons, Rng};
use crate::{add_rms_norm, add_rms_norm_reference};

/// Random `x`, `t` (`[B, L, W]`), `gamma` (`[W]`) and the weights `w` of the loss `Σ w · out`.
#[derive(Clone, Debug)]
pub struct AddNormCase {
    pub dims: [usize; 3],
    /// `x`, `t`, `gamma`, `w`.
    pub values: [Vec<f32>; 4],
}

impl AddNormCase {
    /// `x` in `[-3, 3)`, `t` in `[-1, 1)`, `gamma` in `[0.5, 1.5)`.
    pub fn new(dims: [usize; 3], seed: u64) -> Self {
        let n = dims.iter().product();
        let mut rng = Rng::new(seed);
        let values = [
            rng.vec(n, -3.0, 3.0),
            rng.vec(n, -1.0, 1.0),
            rng.vec(dims[2], 0.5, 1.5),
            rng.vec(n, -1.0, 1.0),
        ];
        Self { dims, values }
    }

    /// Rounds every value to a bf16-representable one.
    pub fn rounded_to_bf16(mut self) -> Self {
        super::round_to_bf16(&mut self.values);
        self
    }

    /// The output and the gradients of `x`, `t` and `gamma` (`[1, 1, W]`) of `Σ w · out`, with
    /// the fused op on the autodiff version of `device` in `dtype` or with its reference; each
    /// checked to come back in `dtype` and returned in f32.
    pub fn run(
        &self,
        device: &Device,
        dtype: DType,
        reference: bool,
    ) -> Result<[Vec<f32>; 4], String> {
        let device = device.clone().autodiff();
        let [b, l, w] = self.dims;
        let leaf = |i: usize, shape: [usize; 3]| {
            Tensor::<3>::from_data(TensorData::new(self.values[i].clone(), shape), &device)
        };
        let [x, t, gamma] = [(0, [b, l, w]), (1, [b, l, w]), (2, [1, 1, w])]
            .map(|(i, s)| leaf(i, s).cast(dtype).require_grad());
        let op = match reference {
            false => add_rms_norm,
            true => add_rms_norm_reference,
        };
        let out = op(x.clone(), t.clone(), gamma.clone().reshape([w]), 1e-5);
        let grads = (out.clone().cast(DType::F32) * leaf(3, [b, l, w]))
            .sum()
            .backward();
        let mut results = vec![out];
        for (name, input) in ["x", "t", "gamma"].iter().zip([x, t, gamma]) {
            results.push(input.grad(&grads).ok_or(format!("no gradient of {name}"))?);
        }
        let mut values = Vec::new();
        for (name, r) in ["out", "dx", "dt", "dgamma"].iter().zip(results) {
            if r.dtype() != dtype {
                return Err(format!("{name} in {:?}, expected {dtype:?}", r.dtype()));
            }
            values.push(
                r.cast(DType::F32)
                    .into_data()
                    .try_to_vec::<f32>()
                    .expect("f32 values"),
            );
        }
        Ok(values.try_into().expect("four results"))
    }
}

const F32_TOLERANCE: f64 = 1e-5;
const BF16_TOLERANCE: f64 = 8e-3;

fn compare(what: &str, got: &[Vec<f32>; 4], want: &[Vec<f32>; 4], tol: f64, c: &mut Comparisons) {
    for (name, (g, w)) in ["out", "dx", "dt", "dgamma"]
        .iter()
        .zip(got.iter().zip(want))
    {
        c.close(format!("{what} {name}"), g, w, tol);
    }
}

/// Every check of the add + RMSNorm on `device`: odd sizes in f32 (RMSNorm's, see
/// [`super::norm_gate::odd_sizes`]), bf16, bit-identical reruns.
pub fn add_norm_checks(device: &Device) -> Vec<Check> {
    let mut checks = vec![Check::run(
        "add + rms norm f32 vs the reference, odd sizes",
        || {
            let mut c = Comparisons::new();
            let tol = Arithmetic::of(device, DType::F32).tolerance(F32_TOLERANCE, BF16_TOLERANCE);
            for (k, (dims, _)) in super::norm_gate::odd_sizes().into_iter().enumerate() {
                let case = AddNormCase::new(dims, 500 + k as u64);
                let want = case.run(&Device::flex(), DType::F32, true)?;
                let got = case.run(device, DType::F32, false)?;
                compare(&format!("{dims:?}"), &got, &want, tol, &mut c);
            }
            c.outcome()
        },
    )];
    if *device != Device::flex() && device.supports_dtype(DType::BF16) {
        checks.push(Check::run(
            "add + rms norm bf16 vs the reference in f32",
            || {
                let mut c = Comparisons::new();
                let tol =
                    Arithmetic::of(device, DType::BF16).tolerance(F32_TOLERANCE, BF16_TOLERANCE);
                let case = AddNormCase::new([2, 45, 130], 31).rounded_to_bf16();
                let want = case.run(&Device::flex(), DType::F32, true)?;
                let got = case.run(device, DType::BF16, false)?;
                compare("[2, 45, 130]", &got, &want, tol, &mut c);
                c.outcome()
            },
        ));
    }
    checks.push(Check::run(
        "add + rms norm deterministic bit for bit",
        || {
            let case = AddNormCase::new([2, 1100, 67], 13);
            let first = case.run(device, DType::F32, false)?;
            match case.run(device, DType::F32, false)? == first {
                true => Ok("two runs identical".into()),
                false => Err("two runs on the same inputs differ".into()),
            }
        },
    ));
    checks
}
