//! Causal attention on a device against Burn's attention on the CPU in f32
//! ([`causal_attention_reference`] on Flex, the plain-tensor definition): the output and the
//! gradients of `q`, `k` and `v`.
//!
//! f32 inputs run the row kernels, whose products and sums are all f32 on every device: an f32
//! tolerance everywhere. bf16 inputs are rounded on the way in, the output and the gradients on
//! the way out; with a head dimension a multiple of 16 they run the tile kernels (tensor cores on
//! a GPU, the same tile products by plane units on the CPU runtime), which also round the
//! probabilities and `dS` to bf16 as operands of the next product.

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::check::{Check, Comparisons, Rng};
use crate::{causal_attention, causal_attention_reference};

/// Odd sizes `[batch, len, heads, kv_heads, head_dim]`, each with whether the inputs reach the op
/// as transposed views: lengths that are no multiple of the rows per cube or per tile (and cross
/// a 64-row tile), odd head dimensions, grouped queries (`H_kv < H`, groups of 2 and 3), one step.
pub fn odd_sizes() -> Vec<([usize; 5], bool)> {
    vec![
        ([2, 37, 4, 2, 8], false),
        ([1, 70, 3, 1, 5], false),
        ([3, 33, 6, 3, 7], true),
        ([1, 130, 2, 2, 8], true),
        ([2, 1, 2, 1, 5], false),
    ]
}

/// Sizes of the tile kernels' check (head dimensions multiples of 16): lengths that cross the
/// planes' 16 rows and the 64-row tiles, grouped queries (groups of 2 and 3), transposed views,
/// one step.
fn tile_sizes() -> Vec<([usize; 5], bool)> {
    vec![
        ([2, 37, 4, 2, 16], false),
        ([1, 70, 3, 1, 32], true),
        ([1, 130, 2, 2, 16], false),
        ([2, 1, 2, 1, 16], false),
        ([1, 45, 2, 1, 48], true),
    ]
}

/// Random inputs of one call, and the weights `w` of the loss `Σ w · out` whose gradients are
/// compared.
#[derive(Clone, Debug)]
pub struct AttentionCase {
    /// `[batch, len, heads, kv_heads, head_dim]`.
    pub dims: [usize; 5],
    /// The inputs are `[B, heads, L, hd]` tensors with dims 1 and 2 swapped (not contiguous).
    pub strided: bool,
    /// `q`, `k`, `v` and `w`, each in the layout of its tensor.
    pub values: [Vec<f32>; 4],
}

impl AttentionCase {
    /// Scores of a few units (`q`, `k` in `[-2, 2)`): softmax rows from flat to peaked.
    pub fn new(dims: [usize; 5], strided: bool, seed: u64) -> Self {
        let [b, l, h, kv, hd] = dims;
        let mut rng = Rng::new(seed);
        let values = [
            rng.vec(b * l * h * hd, -2.0, 2.0),
            rng.vec(b * l * kv * hd, -2.0, 2.0),
            rng.vec(b * l * kv * hd, -1.0, 1.0),
            rng.vec(b * l * h * hd, -1.0, 1.0),
        ];
        Self {
            dims,
            strided,
            values,
        }
    }

    /// Rounds `q`, `k`, `v` and `w` to bf16-representable values.
    pub fn rounded_to_bf16(mut self) -> Self {
        super::round_to_bf16(&mut self.values);
        self
    }

    /// Output and input gradients of `Σ w · op(q, k, v)` with `op` [`causal_attention`] on the
    /// autodiff version of `device` in `dtype`, or with `op` the reference. The gradients are
    /// checked to come back in `dtype` and returned in f32; with `tracked`, only those inputs
    /// require a gradient.
    pub fn run(
        &self,
        device: &Device,
        dtype: DType,
        reference: bool,
        tracked: [bool; 3],
    ) -> Result<AttentionRun, String> {
        let device = device.clone().autodiff();
        let [b, l, h, kv, hd] = self.dims;
        let layout = |heads: usize| match self.strided {
            true => [b, heads, l, hd],
            false => [b, l, heads, hd],
        };
        let leaf = |i: usize, heads: usize| {
            let data = TensorData::new(self.values[i].clone(), layout(heads));
            let t = Tensor::<4>::from_data(data, &device).cast(dtype);
            match tracked.get(i) {
                Some(true) => t.require_grad(),
                _ => t,
            }
        };
        let leaves = [leaf(0, h), leaf(1, kv), leaf(2, kv)];
        let view = |t: &Tensor<4>| match self.strided {
            true => t.clone().swap_dims(1, 2),
            false => t.clone(),
        };
        let [q, k, v] = leaves.each_ref().map(view);
        let scale = 1.0 / (hd as f64).sqrt();
        let out = match reference {
            true => causal_attention_reference(q, k, v, scale),
            false => causal_attention(q, k, v, scale),
        };
        if out.dtype() != dtype {
            return Err(format!("output in {:?}, expected {dtype:?}", out.dtype()));
        }
        let w = view(&leaf(3, h)).cast(DType::F32);
        let grads = (out.clone().cast(DType::F32) * w).sum().backward();
        let mut grad_values = Vec::new();
        for (leaf, name) in leaves.iter().zip(["q", "k", "v"]) {
            let Some(grad) = leaf.grad(&grads) else {
                grad_values.push(None);
                continue;
            };
            if grad.dtype() != dtype {
                return Err(format!("d{name} in {:?}, expected {dtype:?}", grad.dtype()));
            }
            grad_values.push(Some(f32_values(grad)));
        }
        Ok(AttentionRun {
            out: f32_values(out),
            grads: grad_values.try_into().expect("three gradients"),
        })
    }
}

fn f32_values(t: Tensor<4>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 values")
}

/// The output and the gradients of `q`, `k`, `v` (where tracked) of one [`AttentionCase::run`].
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionRun {
    pub out: Vec<f32>,
    pub grads: [Option<Vec<f32>>; 3],
}

impl AttentionRun {
    fn compare(&self, what: &str, want: &Self, [out_tol, grad_tol]: [f64; 2], c: &mut Comparisons) {
        c.close(format!("{what} out"), &self.out, &want.out, out_tol);
        c.close_grads(what, &["q", "k", "v"], &self.grads, &want.grads, grad_tol);
    }
}

/// f32 against the reference: both sides f32 throughout; they differ in the order of the sums and
/// in `exp` (the device's own, on a GPU an approximation to about 2^-22).
const F32_TOLERANCE: f64 = 1e-4;

/// bf16 inputs against the reference in f32 on the same bf16-representable values: the output is
/// rounded to bf16 (2^-9 of the largest value, and a few roundings allowed); the gradients see
/// the rounded output (in `D = dO · O`) and come back rounded.
const BF16_TOLERANCE: [f64; 2] = [8e-3, 2e-2];

const ALL: [bool; 3] = [true; 3];

/// Every attention check on `device`.
pub fn attention_checks(device: &Device) -> Vec<Check> {
    let mut checks = vec![vs_reference(device)];
    // Flex has no bf16 kernel: its bf16 attention is the reference itself.
    if *device != Device::flex() && device.supports_dtype(DType::BF16) {
        checks.push(Check::run("attention bf16 vs the reference in f32", || {
            let case = AttentionCase::new([2, 45, 4, 2, 8], false, 21).rounded_to_bf16();
            let want = case.run(&Device::flex(), DType::F32, true, ALL)?;
            let got = case.run(device, DType::BF16, false, ALL)?;
            let mut c = Comparisons::new();
            got.compare("bf16", &want, BF16_TOLERANCE, &mut c);
            c.outcome()
        }));
    }
    if *device != Device::flex() && device.supports_dtype(DType::BF16) {
        checks.push(tiles_vs_reference(device));
    }
    checks.push(partly_tracked_and_deterministic(device));
    checks.push(empty_sequence(device));
    checks
}

fn vs_reference(device: &Device) -> Check {
    Check::run("attention f32 vs the reference, odd sizes", || {
        let mut c = Comparisons::new();
        for (k, (dims, strided)) in odd_sizes().into_iter().enumerate() {
            let case = AttentionCase::new(dims, strided, 100 + k as u64);
            let want = case.run(&Device::flex(), DType::F32, true, ALL)?;
            let got = case.run(device, DType::F32, false, ALL)?;
            let what = format!("{dims:?}{}", if strided { " strided" } else { "" });
            got.compare(&what, &want, [F32_TOLERANCE; 2], &mut c);
        }
        c.outcome()
    })
}

/// bf16 inputs through the tile kernels (the check fails where a CubeCL device would run the row
/// kernels instead) against the reference in f32, and a second run bit for bit the same.
fn tiles_vs_reference(device: &Device) -> Check {
    Check::run(
        "attention bf16 tile kernels vs the reference in f32",
        || {
            #[allow(unused_mut)]
            let mut kernels = "";
            #[cfg(feature = "cube")]
            if let Some(name) = crate::cube_attention_kernels(device, DType::BF16, 16) {
                if !name.starts_with("tile") {
                    return Err(format!("bf16 with head dimension 16 runs the {name}"));
                }
                kernels = name;
            }
            let mut c = Comparisons::new();
            for (n, (dims, strided)) in tile_sizes().into_iter().enumerate() {
                let case = AttentionCase::new(dims, strided, 300 + n as u64).rounded_to_bf16();
                let want = case.run(&Device::flex(), DType::F32, true, ALL)?;
                let got = case.run(device, DType::BF16, false, ALL)?;
                let what = format!("{dims:?}{}", if strided { " strided" } else { "" });
                got.compare(&what, &want, BF16_TOLERANCE, &mut c);
                if n == 0 {
                    let again = case.run(device, DType::BF16, false, ALL)?;
                    c.require(again == got, || format!("{what}: two runs differ"));
                }
            }
            c.outcome().map(|worst| format!("{kernels}; {worst}"))
        },
    )
}

/// Two runs agree bit for bit; a run with only `k` tracked gives the same output and the same
/// `dk`, and no other gradient.
fn partly_tracked_and_deterministic(device: &Device) -> Check {
    Check::run(
        "attention deterministic bit for bit, partly tracked",
        || {
            let case = AttentionCase::new([2, 70, 4, 2, 8], false, 11);
            let first = case.run(device, DType::F32, false, ALL)?;
            let second = case.run(device, DType::F32, false, ALL)?;
            if first != second {
                return Err("two runs on the same inputs differ".into());
            }
            let only_k = case.run(device, DType::F32, false, [false, true, false])?;
            let want = [None, first.grads[1].clone(), None];
            match only_k.out == first.out && only_k.grads == want {
                true => Ok("two runs identical; only dk when only k is tracked".into()),
                false => Err("with only k tracked: a different output or gradients".into()),
            }
        },
    )
}

/// `L = 0`: an empty output, and empty gradients of the inputs' shapes.
fn empty_sequence(device: &Device) -> Check {
    Check::run("attention of an empty sequence", || {
        let device = device.clone().autodiff();
        let input = |heads| Tensor::<4>::zeros([2, 0, heads, 4], &device).require_grad();
        let (q, k, v) = (input(4), input(2), input(2));
        let out = causal_attention(q.clone(), k.clone(), v.clone(), 0.5);
        if out.dims() != [2, 0, 4, 4] {
            return Err(format!("output {:?}, expected [2, 0, 4, 4]", out.dims()));
        }
        let grads = out.sum().backward();
        for (x, name) in [(q, "q"), (k, "k"), (v, "v")] {
            let grad = x.grad(&grads).ok_or(format!("no gradient of {name}"))?;
            if grad.dims() != x.dims() {
                return Err(format!(
                    "d{name} {:?}, expected {:?}",
                    grad.dims(),
                    x.dims()
                ));
            }
        }
        Ok("empty output and gradients".into())
    })
}
