//! The `#[cube]` kernels of the GELU gate (kept apart from Burn's names: `cubecl::prelude` has
//! its own `Tensor` and `Float`). One unit per element of contiguous tensors; inputs read in
//! their float type `F`, the arithmetic f32, outputs written in `F`.

use cubecl::prelude::*;

/// `erf(x)`, Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7), the CPU kernel's formula; odd
/// in `x`.
#[cube]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0f32 / (1.0f32 + 0.327_591_1f32 * a);
    let mut p = 1.061_405_4f32;
    p = p * t - 1.453_152f32;
    p = p * t + 1.421_413_8f32;
    p = p * t - 0.284_496_74f32;
    p = p * t + 0.254_829_6f32;
    let e = 1.0f32 - p * t * (-(a * a)).exp();
    select(x < 0.0f32, -e, e)
}

/// `(gelu(g), gelu'(g))` of the exact GELU `g · Φ(g)`: `Φ(g) = (1 + erf(g / √2)) / 2`,
/// `gelu'(g) = Φ(g) + g · φ(g)`, `φ(g) = exp(−g² / 2) / √(2π)`.
#[cube]
fn gelu_and_grad(g: f32) -> (f32, f32) {
    let cdf = 0.5f32 * (1.0f32 + erf(g * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5f32 * g * g).exp() * 0.398_942_3f32;
    (g * cdf, cdf + g * pdf)
}

/// `out = gelu(gate) · up`.
#[cube(launch, address_type = "dynamic")]
pub(super) fn gelu_mul_forward<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    out: &mut Tensor<F>,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i < out.len() {
        let (value, _) = gelu_and_grad(f32::cast_from(gate[i]));
        out[i] = F::cast_from(value * f32::cast_from(up[i]));
    }
}

/// `d gate = dout · up · gelu'(gate)`, `d up = dout · gelu(gate)`, in one pass.
#[cube(launch, address_type = "dynamic")]
pub(super) fn gelu_mul_backward<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    dout: &Tensor<F>,
    dgate: &mut Tensor<F>,
    dup: &mut Tensor<F>,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i < dgate.len() {
        let (value, slope) = gelu_and_grad(f32::cast_from(gate[i]));
        let d = f32::cast_from(dout[i]);
        dgate[i] = F::cast_from(d * f32::cast_from(up[i]) * slope);
        dup[i] = F::cast_from(d * value);
    }
}
