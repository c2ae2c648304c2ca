//! The `#[cube]` kernel of the AdamW update (kept apart from Burn's names: `cubecl::prelude` has
//! its own `Tensor` and `Float`).

use cubecl::prelude::*;

use crate::adamw::Coefficients;

/// One element per unit, with `g = grad · grad_scale`:
///
/// ```text
/// m ← β1·m + (1−β1)·g        v ← β2·v + (1−β2)·g²
/// θ ← θ·keep − ((m / bias1) / (sqrt(v / bias2) + eps)) · lr
/// ```
///
/// in the order and f32 rounding of the tensor-op definition (one operation per rounding, no
/// fused multiply-add written). `theta`, `m`, `v` are read from the inputs and written to the
/// outputs (which may be the same buffers: each element is read before it is written); the
/// gradient is read in its float type `G`; with `write_working`, `θ` rounded to `W` (the bf16
/// working copy of an f32 master) is written too.
#[allow(clippy::too_many_arguments)]
#[cube(launch, address_type = "dynamic")]
pub(super) fn adamw_update<G: Float, W: Float>(
    theta: &Tensor<f32>,
    grad: &Tensor<G>,
    m: &Tensor<f32>,
    v: &Tensor<f32>,
    theta_out: &mut Tensor<f32>,
    m_out: &mut Tensor<f32>,
    v_out: &mut Tensor<f32>,
    working: &mut Tensor<W>,
    c: Coefficients,
    #[comptime] write_working: bool,
    #[define(G, W)] _dtypes: [ElemType; 2],
) {
    let i = ABSOLUTE_POS;
    if i < theta_out.len() {
        let g = f32::cast_from(grad[i]) * c.grad_scale;
        let m_new = m[i] * c.beta1 + g * c.one_minus_beta1;
        let v_new = v[i] * c.beta2 + (g * g) * c.one_minus_beta2;
        let denom = (v_new / c.bias2).sqrt() + c.eps;
        let step = (m_new / c.bias1) / denom * c.lr;
        let updated = theta[i] * c.keep - step;
        theta_out[i] = updated;
        m_out[i] = m_new;
        v_out[i] = v_new;
        if write_working {
            working[i] = W::cast_from(updated);
        }
    }
}
