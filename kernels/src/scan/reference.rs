//! The scan written with plain Burn tensor ops, a handful of ops per time step. Differentiable on
//! any backend through Burn's own autodiff; the test oracle, and the path taken on devices without
//! the fused kernel.

use burn::tensor::Tensor;
use burn::tensor::activation::{silu, softplus};

use super::ScanInputs;

/// Expands per-group rows `[batch, groups, 1, state]` to per-channel rows `[batch, channels, state]`.
fn per_channel(rows: Tensor<4>, channels: usize) -> Tensor<3> {
    let [batch, groups, _, state] = rows.dims();
    rows.expand([batch, groups, channels / groups, state])
        .reshape([batch, channels, state])
}

/// The scan of [`super::selective_scan_reference`] (shapes already checked).
pub(crate) fn scan(x: ScanInputs) -> Tensor<3> {
    let ScanInputs {
        u,
        delta,
        a,
        b,
        c,
        d,
        z,
        delta_bias,
    } = x;
    let [batch, channels, len] = u.dims();
    let state = a.dims()[1];
    // Burn's softplus: log1p(exp(x)), and x above 20, like mamba-ssm.
    let dt = softplus(delta + delta_bias.reshape([1, channels, 1]), 1.0);
    let du = dt.clone() * u.clone();
    let a = a.unsqueeze_dim::<3>(0);
    let mut s = Tensor::<3>::zeros([batch, channels, state], (&u.device(), u.dtype()));
    let mut ys = Vec::with_capacity(len);
    for t in 0..len {
        let decay = (dt.clone().narrow(2, t, 1) * a.clone()).exp();
        let b_t = per_channel(b.clone().narrow(2, t, 1), channels);
        let c_t = per_channel(c.clone().narrow(2, t, 1), channels);
        s = decay * s + du.clone().narrow(2, t, 1) * b_t;
        ys.push((s.clone() * c_t).sum_dim(2));
    }
    let y = Tensor::cat(ys, 2) + d.reshape([1, channels, 1]) * u;
    y * silu(z)
}
