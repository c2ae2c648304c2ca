//! The model's products: their FLOPs, bytes and launches, and (today's kernels) the casts of
//! their weights.

use super::{OpCost, Shape};
use crate::cost_model::{Kernels, OpClass};

/// A family of products `[t, k] · [k, n]`, `groups` of them per use (per-head weights), `uses`
/// per step.
pub(super) struct Gemm {
    class: OpClass,
    groups: fn(&Shape) -> f64,
    k: fn(&Shape) -> f64,
    n: fn(&Shape) -> f64,
    uses: fn(&Shape) -> f64,
    /// Inside a layer block (recomputed with `"layers"`); the LM head is not.
    in_block: bool,
    /// Kernels per forward (in_proj: two halves; q, k, v: three).
    launches: f64,
}

const fn one(_: &Shape) -> f64 {
    1.0
}

/// The model's products (`zamba_model::model`); their FLOPs sum to `FlopsPerToken::matmul`.
pub(super) const GEMMS: [Gemm; 10] = [
    gemm_family(
        OpClass::GemmInProj,
        one,
        |s| s.d,
        |s| 2.0 * s.di,
        |s| s.layers,
        2.0,
    ),
    gemm_family(
        OpClass::GemmXProj,
        |s| s.h,
        |s| s.p,
        |s| s.r + 2.0 * s.n,
        |s| s.layers,
        1.0,
    ),
    gemm_family(
        OpClass::GemmDtProj,
        |s| s.h,
        |s| s.r,
        |s| s.p,
        |s| s.layers,
        1.0,
    ),
    gemm_family(
        OpClass::GemmOutProj,
        one,
        |s| s.di,
        |s| s.d,
        |s| s.layers,
        1.0,
    ),
    gemm_family(
        OpClass::GemmQkv,
        one,
        |s| s.a,
        |s| s.a + 2.0 * s.kv,
        |s| s.uses,
        3.0,
    ),
    gemm_family(OpClass::GemmOProj, one, |s| s.a, |s| s.d, |s| s.uses, 1.0),
    gemm_family(
        OpClass::GemmGateUp,
        one,
        |s| s.d,
        |s| 2.0 * s.i,
        |s| s.uses,
        2.0,
    ),
    gemm_family(OpClass::GemmDown, one, |s| s.i, |s| s.d, |s| s.uses, 1.0),
    gemm_family(
        OpClass::GemmHybridLinear,
        one,
        |s| s.d,
        |s| s.d,
        |s| s.uses,
        1.0,
    ),
    Gemm {
        class: OpClass::GemmHead,
        groups: one,
        k: |s| s.d,
        n: |s| s.v,
        uses: one,
        in_block: false,
        launches: 1.0,
    },
];

const fn gemm_family(
    class: OpClass,
    groups: fn(&Shape) -> f64,
    k: fn(&Shape) -> f64,
    n: fn(&Shape) -> f64,
    uses: fn(&Shape) -> f64,
    launches: f64,
) -> Gemm {
    Gemm {
        class,
        groups,
        k,
        n,
        uses,
        in_block: true,
        launches,
    }
}

impl Gemm {
    fn forwards(&self, s: &Shape) -> f64 {
        if self.in_block { s.forwards } else { 1.0 }
    }

    /// Weight elements per use.
    fn weights(&self, s: &Shape) -> f64 {
        (self.groups)(s) * (self.k)(s) * (self.n)(s)
    }
}

/// Forward `Y = X·W`; backward `dX = dY·Wᵀ` and `dW = Xᵀ·dY`, each reading its operands once and
/// writing its result once. Planned: the weight's bf16 copy is read (made by the optimizer),
/// `dW` written in f32. Current: the weight is cast per call (see [`weight_casts`]) and `dW`
/// comes out in the compute type.
pub(super) fn gemm(g: &Gemm, s: &Shape, kernels: Kernels) -> OpCost {
    let (groups, k, n, uses) = ((g.groups)(s), (g.k)(s), (g.n)(s), (g.uses)(s));
    let forward_flops = 2.0 * s.t * k * n * groups * uses;
    let forwards = g.forwards(s);
    let (x, y, weights) = (s.t * k * groups, s.t * n * groups, g.weights(s));
    let weight_grad = match kernels {
        Kernels::Planned => 4.0,
        Kernels::Current => s.e,
    };
    let forward_bytes = (x + y) * s.e + weights * s.e;
    let backward_bytes = (y + x) * s.e + weights * s.e + (x + y) * s.e + weights * weight_grad;
    OpCost {
        model_flops: 3.0 * forward_flops,
        flops: (forwards + 2.0) * forward_flops,
        bytes: uses * (forwards * forward_bytes + backward_bytes),
        launches: uses * (forwards * g.launches + 2.0 * g.launches),
        ..OpCost::new(g.class)
    }
}

/// Current kernels in bf16: the products get bf16 weights as they are (the optimizer writes that
/// working copy once per step, beside the f32 master) and write bf16 weight gradients, which the
/// backward sums over a weight's uses; each is cast to f32 once per micro-batch to be accumulated.
pub(super) fn weight_casts(s: &Shape, kernels: Kernels) -> OpCost {
    let mut cost = OpCost::new(OpClass::WeightCasts);
    if kernels == Kernels::Planned || s.cast == 0.0 {
        return cost;
    }
    for g in &GEMMS {
        cost.bytes += g.weights(s) * s.cast;
        cost.launches += 1.0;
    }
    cost
}
