//! The fused scan on a device against the CPU kernel (Flex).
//!
//! The scan itself has no matrix products, so its arithmetic is f32 on every device and only its
//! bf16 inputs and outputs are rounded.

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::check::{Check, Comparisons, Rng};
use crate::{ScanInputs, ScanShape, scan_chunk, selective_scan};

/// Odd sizes: lengths that are no multiple of either kernel's chunk, N = 1, 5 and 16, several
/// heads, groups whose channels do not fill the last cube of the CubeCL backward, groups of one
/// channel (the backward's cube then spends its units on time), a single step.
pub fn odd_sizes() -> Vec<ScanShape> {
    let s = |batch, channels, groups, len, state| ScanShape {
        batch,
        channels,
        groups,
        len,
        state,
    };
    vec![
        s(2, 6, 2, 37, 16),
        s(3, 5, 1, 150, 1),
        s(2, 12, 3, 45, 16),
        s(1, 3, 3, 70, 5),
        s(2, 4, 4, 1, 16),
    ]
}

/// Names of the scan's inputs, in the order of [`ScanInputs`]' fields.
pub const INPUT_NAMES: [&str; 8] = ["u", "delta", "a", "b", "c", "d", "z", "delta_bias"];

/// Random inputs of one scan in the order of [`INPUT_NAMES`], and the weights `w` of the loss
/// `Σ w · out` whose gradients are compared.
#[derive(Clone, Debug)]
pub struct ScanCase {
    pub size: ScanShape,
    pub inputs: [Vec<f32>; 8],
    pub w: Vec<f32>,
    /// Whether the activations reach the op as transposed views (see [`ScanCase::strided`]).
    pub strided: bool,
}

impl ScanCase {
    /// Inputs in the ranges the model produces: Δ pre-activations mostly below softplus's linear
    /// threshold, `A = -exp(·)` in `[-8, -0.5]`.
    pub fn new(size: ScanShape, seed: u64) -> Self {
        let ScanShape {
            batch,
            channels,
            groups,
            len,
            state,
        } = size;
        let mut rng = Rng::new(seed);
        let rows = batch * channels * len;
        let bc = batch * groups * len * state;
        let mut n = |n: usize, f: &mut dyn FnMut(&mut Rng) -> f32| -> Vec<f32> {
            (0..n).map(|_| f(&mut rng)).collect()
        };
        let u = n(rows, &mut |r| r.normal());
        let delta = n(rows, &mut |r| r.uniform(-4.0, 1.0));
        let a = n(channels * state, &mut |r| {
            -r.uniform(0.5f32.ln(), 8f32.ln()).exp()
        });
        let b = n(bc, &mut |r| r.normal());
        let c = n(bc, &mut |r| r.normal());
        let d = n(channels, &mut |r| r.normal());
        let z = n(rows, &mut |r| 1.5 * r.normal());
        let delta_bias = n(channels, &mut |r| r.uniform(-1.0, 0.5));
        let w = n(rows, &mut |r| r.normal());
        Self {
            size,
            inputs: [u, delta, a, b, c, d, z, delta_bias],
            w,
            strided: false,
        }
    }

    /// The same values, the activations handed to the op as transposed views, as a model's
    /// projections produce them: `u`, `delta`, `z` stored `[batch, len, channels]`, `B`, `C`
    /// stored `[batch, len, groups, state]`, each with dims 1 and 2 swapped. [`ScanCase::run`]
    /// still returns every value in the order of the contiguous layout.
    pub fn strided(mut self) -> Self {
        self.strided = true;
        self
    }

    /// Input `i` in the order [`ScanCase::run`] stores it: `to_stored` moves a contiguous
    /// value to the strided storage order, `!to_stored` back.
    fn reorder(&self, i: usize, values: &[f32], to_stored: bool) -> Vec<f32> {
        let ScanShape {
            batch,
            channels,
            groups,
            len,
            state,
        } = self.size;
        // (outer, rows, cols, inner): contiguous order [outer, rows, cols, inner], stored order
        // [outer, cols, rows, inner].
        let (rows, cols, inner) = match i {
            0 | 1 | 6 if self.strided => (channels, len, 1),
            3 | 4 if self.strided => (groups, len, state),
            _ => return values.to_vec(),
        };
        let (from, to) = match to_stored {
            true => ((rows, cols), (cols, rows)),
            false => ((cols, rows), (rows, cols)),
        };
        let mut out = vec![0.0; values.len()];
        for o in 0..batch {
            for r in 0..from.0 {
                for c in 0..from.1 {
                    let src = ((o * from.0 + r) * from.1 + c) * inner;
                    let dst = ((o * to.0 + c) * to.1 + r) * inner;
                    out[dst..dst + inner].copy_from_slice(&values[src..src + inner]);
                }
            }
        }
        out
    }

    /// Sets every `every`-th Δ pre-activation beyond softplus's linear threshold of 20.
    pub fn with_large_deltas(mut self, every: usize) -> Self {
        for t in (0..self.inputs[1].len()).step_by(every) {
            self.inputs[1][t] = 21.0 + (t % 3) as f32;
        }
        self
    }

    /// Rounds the activations (`u, delta, b, c, z`) to bf16-representable values.
    pub fn rounded_to_bf16(mut self) -> Self {
        let [u, delta, _, b, c, _, z, _] = &mut self.inputs;
        super::round_to_bf16([u, delta, b, c, z]);
        self
    }

    pub fn shapes(&self) -> [Vec<usize>; 8] {
        let ScanShape {
            batch,
            channels,
            groups,
            len,
            state,
        } = self.size;
        let rows = vec![batch, channels, len];
        let bc = vec![batch, groups, len, state];
        [
            rows.clone(),
            rows.clone(),
            vec![channels, state],
            bc.clone(),
            bc,
            vec![channels],
            rows,
            vec![channels],
        ]
    }

    /// Output and every input's gradient of `Σ w · out` on the autodiff version of `device`,
    /// with the activations (`u, delta, b, c, z`) in `activations` and the parameters in f32.
    /// The gradients are returned in f32, each checked to come back in its input's dtype.
    pub fn run(&self, device: &Device, activations: DType) -> Result<ScanRun, String> {
        let device = device.clone().autodiff();
        let shapes = self.shapes();
        let input = |i: usize| -> Tensor<1> {
            let stored = self.reorder(i, &self.inputs[i], true);
            let t =
                Tensor::<1>::from_data(TensorData::new(stored, [self.inputs[i].len()]), &device);
            match [0, 1, 3, 4, 6].contains(&i) {
                true => t.cast(activations),
                false => t,
            }
            .require_grad()
        };
        let leaves: [Tensor<1>; 8] = std::array::from_fn(input);
        let dims = |i: usize| shapes[i].clone();
        let rows = |i: usize| -> Tensor<3> {
            let [b, c, l] = to3(&dims(i));
            match self.strided {
                true => leaves[i].clone().reshape([b, l, c]).swap_dims(1, 2),
                false => leaves[i].clone().reshape([b, c, l]),
            }
        };
        let bc = |i: usize| -> Tensor<4> {
            let [b, g, l, n] = to4(&dims(i));
            match self.strided {
                true => leaves[i].clone().reshape([b, l, g, n]).swap_dims(1, 2),
                false => leaves[i].clone().reshape([b, g, l, n]),
            }
        };
        let out = selective_scan(ScanInputs {
            u: rows(0),
            delta: rows(1),
            a: leaves[2].clone().reshape([dims(2)[0], dims(2)[1]]),
            b: bc(3),
            c: bc(4),
            d: leaves[5].clone(),
            z: rows(6),
            delta_bias: leaves[7].clone(),
        });
        if out.dtype() != activations {
            return Err(format!(
                "output in {:?}, expected the activations' {activations:?}",
                out.dtype()
            ));
        }
        let w = Tensor::<3>::from_data(TensorData::new(self.w.clone(), dims(0)), &device);
        let grads = (out.clone().cast(DType::F32) * w).sum().backward();
        let mut grad_values = Vec::with_capacity(8);
        for (i, leaf) in leaves.iter().enumerate() {
            let grad = leaf
                .grad(&grads)
                .ok_or_else(|| format!("no gradient for {}", INPUT_NAMES[i]))?;
            if grad.dtype() != leaf.dtype() {
                return Err(format!(
                    "d{} in {:?}, expected its input's {:?}",
                    INPUT_NAMES[i],
                    grad.dtype(),
                    leaf.dtype()
                ));
            }
            grad_values.push(self.reorder(i, &f32_values(grad), false));
        }
        Ok(ScanRun {
            out: f32_values(out.flatten::<1>(0, 2)),
            grads: grad_values.try_into().expect("eight gradients"),
        })
    }
}

fn to3(s: &[usize]) -> [usize; 3] {
    [s[0], s[1], s[2]]
}

fn to4(s: &[usize]) -> [usize; 4] {
    [s[0], s[1], s[2], s[3]]
}

fn f32_values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 values")
}

/// The output and the eight input gradients of one [`ScanCase::run`], as f32.
#[derive(Clone, Debug)]
pub struct ScanRun {
    pub out: Vec<f32>,
    pub grads: [Vec<f32>; 8],
}

impl ScanRun {
    /// Compares output and gradients with `want`, within `out_tol` and `grad_tol`.
    fn compare(
        &self,
        what: &str,
        want: &ScanRun,
        out_tol: f64,
        grad_tol: f64,
        c: &mut Comparisons,
    ) {
        c.close(format!("{what} out"), &self.out, &want.out, out_tol);
        for (i, name) in INPUT_NAMES.iter().enumerate() {
            c.close(
                format!("{what} d{name}"),
                &self.grads[i],
                &want.grads[i],
                grad_tol,
            );
        }
    }
}

/// f32 activations against the CPU kernel. Tolerance 1e-4 of the largest value: both sides are
/// f32 throughout; they differ in the order of the sums over the state and in `exp` (the CPU
/// kernel's polynomial, the device's own).
const F32_TOLERANCE: f64 = 1e-4;

/// bf16 activations against the CPU kernel in f32 on the same bf16-representable values: the
/// output is rounded to bf16 (2^-9 relative, 8e-3 allows a few roundings of the largest value);
/// the gradients see the rounded output gradient and come back rounded (2e-2).
const BF16_OUT_TOLERANCE: f64 = 8e-3;
const BF16_GRAD_TOLERANCE: f64 = 2e-2;

/// Every scan check on `device` (which must have the fused kernel; the comparisons are with the
/// CPU kernel, so on Flex itself they are exact).
pub fn scan_checks(device: &Device) -> Vec<Check> {
    let mut checks = Vec::new();
    if *device != Device::flex() {
        checks.push(vs_cpu_kernel(device));
    }
    if device.supports_dtype(DType::BF16) {
        checks.push(Check::run(
            "scan bf16 activations vs the CPU kernel",
            || {
                let case = ScanCase::new(odd_sizes()[2], 21).rounded_to_bf16();
                let want = case.run(&Device::flex(), DType::F32)?;
                let got = case.run(device, DType::BF16)?;
                let mut c = Comparisons::new();
                got.compare(
                    "bf16",
                    &want,
                    BF16_OUT_TOLERANCE,
                    BF16_GRAD_TOLERANCE,
                    &mut c,
                );
                c.outcome()
            },
        ));
    }
    checks.push(strided_views(device));
    checks.push(deterministic(device));
    #[cfg(feature = "cube")]
    if matches!(
        device.clone().inner().as_dispatch(),
        burn::backend::DispatchDevice::Cube(_)
    ) {
        checks.push(backward_layouts(device));
    }
    checks
}

/// Layouts of the Cube backward (`rows × units` per cube) that the device would not choose at
/// the check's sizes: 2 channels per cube, the last cube of each group half filled, 2 units along
/// time (the scans across units in shared memory); with CUDA also 64 units, two 32-wide planes
/// per channel (the shuffles and the step between planes, which the default layout's one plane
/// per channel never takes). The CPU runtime runs a thread per unit, and more threads than cores
/// make its barriers slow: it gets only the small layout.
#[cfg(feature = "cube")]
const FORCED_LAYOUTS: &[(usize, usize)] = if cfg!(feature = "cuda") {
    &[(2, 2), (2, 64)]
} else {
    &[(2, 2)]
};

/// The Cube backward in each of [`FORCED_LAYOUTS`] against the CPU kernel.
#[cfg(feature = "cube")]
fn backward_layouts(device: &Device) -> Check {
    Check::run(
        "scan backward, other cube layouts vs the CPU kernel",
        || {
            let size = ScanShape {
                batch: 1,
                channels: 6,
                groups: 2,
                len: 70,
                state: 3,
            };
            let case = ScanCase::new(size, 41).with_large_deltas(23);
            let want = case.run(&Device::flex(), DType::F32)?;
            let mut c = Comparisons::new();
            for &(rows, units) in FORCED_LAYOUTS {
                let got = crate::scan::with_backward_layout(rows, units, || {
                    case.run(device, DType::F32)
                })?;
                let what = format!("{rows} rows × {units} units, {size:?}");
                got.compare(&what, &want, F32_TOLERANCE, F32_TOLERANCE, &mut c);
            }
            c.outcome()
        },
    )
}

/// Transposed views of the activations give the contiguous run's results bit for bit (the
/// kernels read at any strides; the arithmetic is the same).
fn strided_views(device: &Device) -> Check {
    Check::run("scan transposed inputs = contiguous, bit for bit", || {
        let case = ScanCase::new(odd_sizes()[2], 31);
        let contiguous = case.run(device, DType::F32)?;
        let strided = case.strided().run(device, DType::F32)?;
        let bits = |run: &ScanRun| -> Vec<u32> {
            let all = std::iter::once(&run.out).chain(&run.grads);
            all.flat_map(|v| v.iter().map(|x| x.to_bits())).collect()
        };
        match bits(&contiguous) == bits(&strided) {
            true => Ok("output and every gradient identical".into()),
            false => Err("transposed views change the results".into()),
        }
    })
}

fn vs_cpu_kernel(device: &Device) -> Check {
    Check::run("scan f32 vs the CPU kernel, odd sizes", || {
        let mut c = Comparisons::new();
        for (k, size) in odd_sizes().into_iter().enumerate() {
            let case = ScanCase::new(size, 300 + k as u64).with_large_deltas(23);
            let want = case.run(&Device::flex(), DType::F32)?;
            let got = case.run(device, DType::F32)?;
            let chunk = scan_chunk(device, size.state).ok_or("no fused scan on this device")?;
            let what = format!("{size:?} chunk {chunk}");
            got.compare(&what, &want, F32_TOLERANCE, F32_TOLERANCE, &mut c);
        }
        c.outcome()
    })
}

/// Two runs agree bit for bit, at a size whose backward splits each group's channels into
/// several blocks (the CPU kernel's partial sums) and several cubes (the CubeCL backward).
fn deterministic(device: &Device) -> Check {
    Check::run("scan deterministic bit for bit", || {
        let size = ScanShape {
            batch: 2,
            channels: 64,
            groups: 2,
            len: 70,
            state: 8,
        };
        let case = ScanCase::new(size, 11);
        let first = case.run(device, DType::F32)?;
        let second = case.run(device, DType::F32)?;
        let bits = |run: &ScanRun| -> Vec<u32> {
            let all = std::iter::once(&run.out).chain(&run.grads);
            all.flat_map(|v| v.iter().map(|x| x.to_bits())).collect()
        };
        match bits(&first) == bits(&second) {
            true => Ok("two runs, identical output and gradients".into()),
            false => Err("two runs on the same inputs differ".into()),
        }
    })
}
