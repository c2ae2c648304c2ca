//! The AdamW update on a device against its tensor-op definition ([`adamw_update_reference`]),
//! on the same device and on the CPU (Flex): `theta`, `m` and `v` after a few steps, the bf16
//! working copy of the same pass, bf16 gradients.
//!
//! Both sides write the same f32 operations in the same order, yet the kernel's results are not
//! bit-identical to the tensor ops' on `cube-cpu`: about a third of the values differ in their
//! last bit after three steps, because CubeCL's instruction combiner (cubecl-opt's
//! `InstCombine`, run for every target) turns each `a · b + c` of the kernel into one fused
//! multiply-add, where the tensor ops round the product first. The check allows [`TOLERANCE`], a
//! few f32 roundings of the update's terms, and reports the worst error.

use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::check::{Check, Comparisons, Rng};
use crate::{AdamWHyper, adamw_update, adamw_update_reference, adamw_update_with_working};

/// Lengths: one element, no multiple of any vector width or cube size, several cubes.
pub fn odd_lengths() -> Vec<usize> {
    vec![1, 33, 4099, 70_001]
}

/// Relative error allowed (to the largest value): a few f32 roundings (2^-24 each) of the
/// update's terms.
pub const TOLERANCE: f64 = 1e-6;

/// The hyper-parameters of step `step` (from 1): decay on even steps, clipping on.
fn hyper(step: u64) -> AdamWHyper {
    AdamWHyper {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: if step.is_multiple_of(2) { 0.1 } else { 0.0 },
        step,
        grad_scale: 0.7,
    }
}

/// Which update a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Update {
    Fused,
    Reference,
}

/// `[theta, m, v]` after three updates of `n` parameters from a fixed random start, with
/// gradients in `grad_dtype`, on `device`. On the fused path an alias of `theta` is kept alive
/// on odd steps and must not change (the kernel updates in place only unshared buffers).
fn steps(
    update: Update,
    n: usize,
    grad_dtype: DType,
    device: &Device,
) -> Result<[Vec<f32>; 3], String> {
    let mut rng = Rng::new(42 + n as u64);
    let flat = |values: Vec<f32>| Tensor::<1>::from_data(TensorData::new(values, [n]), device);
    let mut theta = flat(rng.vec(n, -1.0, 1.0));
    let (mut m, mut v) = (flat(vec![0.0; n]), flat(vec![0.0; n]));
    for step in 1..=3u64 {
        let grad = flat(rng.vec(n, -3.0, 3.0)).cast(grad_dtype);
        let alias = (update == Update::Fused && step % 2 == 1).then(|| theta.clone());
        let before = alias.clone().map(values);
        (theta, m, v) = match update {
            Update::Fused => adamw_update(theta, grad, m, v, &hyper(step)),
            Update::Reference => {
                adamw_update_reference(theta, grad.cast(DType::F32), m, v, &hyper(step))
            }
        };
        if alias.map(values) != before {
            return Err(format!("n = {n}: the update wrote into a shared buffer"));
        }
    }
    Ok([theta, m, v].map(values))
}

fn values(t: Tensor<1>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 values")
}

/// Compares `got` with `want` within [`TOLERANCE`].
fn compare(what: String, got: &[f32], want: &[f32], c: &mut Comparisons) {
    c.close(what, got, want, TOLERANCE);
}

/// Every AdamW check on `device`.
pub fn adamw_checks(device: &Device) -> Vec<Check> {
    let mut checks = vec![vs_reference(device, DType::F32)];
    if device.supports_dtype(DType::BF16) {
        checks.push(vs_reference(device, DType::BF16));
        checks.push(working_copy(device));
    }
    checks
}

/// Three updates, fused against the reference on this device and on the CPU.
fn vs_reference(device: &Device, grad_dtype: DType) -> Check {
    let name = match grad_dtype {
        DType::F32 => "adamw vs the reference, odd lengths".to_string(),
        other => format!("adamw with {other:?} gradients vs the reference"),
    };
    Check::run(name, || {
        let mut c = Comparisons::new();
        for n in odd_lengths() {
            let got = steps(Update::Fused, n, grad_dtype, device)?;
            let here = steps(Update::Reference, n, grad_dtype, device)?;
            let cpu = steps(Update::Reference, n, grad_dtype, &Device::flex())?;
            for (k, name) in ["theta", "m", "v"].iter().enumerate() {
                compare(format!("n = {n} {name}"), &got[k], &here[k], &mut c);
                let what = format!("n = {n} {name} vs the CPU");
                compare(what, &got[k], &cpu[k], &mut c);
            }
        }
        c.outcome()
    })
}

/// The bf16 working copy written by the update's pass is `theta` rounded to bf16, and the
/// update is the same as without it (on the autodiff device too, where the trainer's tensors
/// may live).
fn working_copy(device: &Device) -> Check {
    Check::run("adamw writes the bf16 working copy in its pass", || {
        let mut c = Comparisons::new();
        for (n, device) in [(4099, device.clone()), (33, device.clone().autodiff())] {
            let mut rng = Rng::new(7);
            let flat = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [n]), &device);
            let [theta, grad, m] = [-1.0, -3.0, -0.1].map(|lo| flat(rng.vec(n, lo, -lo)));
            let v = flat(rng.vec(n, 0.0, 0.5));
            let args = || (theta.clone(), grad.clone(), m.clone(), v.clone());
            let (t, g, m0, v0) = args();
            let (theta1, m1, v1, copy) =
                adamw_update_with_working(t, g, m0, v0, &hyper(4), DType::BF16);
            c.require(copy.dtype() == DType::BF16, || {
                format!("the working copy is {:?}", copy.dtype())
            });
            let (t, g, m0, v0) = args();
            let want = adamw_update(t, g, m0, v0, &hyper(4));
            let rounded = values(want.0.clone().cast(DType::BF16));
            let copy = values(copy);
            let same = copy
                .iter()
                .zip(&rounded)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            c.require(same, || {
                format!("n = {n}: the copy is not theta rounded to bf16")
            });
            for (name, got, want) in [
                ("theta", theta1, want.0),
                ("m", m1, want.1),
                ("v", v1, want.2),
            ] {
                let what = format!("n = {n} {name} with the copy");
                let same = values(got) == values(want);
                c.require(same, || {
                    format!("{what}: another update than without the copy")
                });
            }
        }
        c.outcome()
            .map(|_| "the copy is theta rounded to bf16; the update unchanged".into())
    })
}
