//! The AdamW update of one parameter tensor as one pass over memory.
//!
//! Written with tensor ops, an update reads and writes the parameter and both moments through
//! about ten separate element-wise ops (each a full pass over the tensor, each single-threaded on
//! Flex). [`adamw_update`] does the same arithmetic, in the same order and the same `f32`
//! rounding, in one multi-threaded pass, updating the buffers in place when it owns them: on Flex
//! its results are bit-identical to [`adamw_update_reference`] (tested), so switching between the
//! two never changes a training run. On CubeCL devices it is one launch (`cube::adamw`), within
//! an ulp of the reference: CubeCL compiles each `a · b + c` as a fused multiply-add.

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, DType, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;
use rayon::prelude::*;
// Names the derives of the Cube kernel's argument expand to (see `Coefficients`).
#[cfg(feature = "cube")]
use cubecl::prelude::KernelBuilder;

use crate::dtype::expect_same_dtype;
use crate::host::{as_f32, as_f32_mut, contiguous_f32};
use crate::simd::{Isa, Lanes, SCALAR, simd_dispatch, simd_level};

/// Hyper-parameters of one AdamW update of one tensor (PyTorch's formulation, decoupled decay).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// The decoupled weight decay of this tensor (0 for parameters exempt from decay).
    pub weight_decay: f64,
    /// The number of this update, from 1 (bias correction uses `1 - beta^step`).
    pub step: u64,
    /// Every gradient element is multiplied by this first (the global-norm clipping factor).
    pub grad_scale: f64,
}

/// The `f32` constants of one update, each rounded once from its `f64` definition exactly as a
/// tensor op rounds a scalar operand; also the Cube kernel's argument (`cube/adamw`).
#[derive(Clone, Copy, Debug)]
#[cfg_attr(
    feature = "cube",
    derive(cubecl::prelude::CubeType, cubecl::prelude::CubeLaunch)
)]
pub(crate) struct Coefficients {
    pub(crate) grad_scale: f32,
    pub(crate) beta1: f32,
    pub(crate) one_minus_beta1: f32,
    pub(crate) beta2: f32,
    pub(crate) one_minus_beta2: f32,
    pub(crate) bias1: f32,
    pub(crate) bias2: f32,
    pub(crate) eps: f32,
    pub(crate) keep: f32,
    pub(crate) lr: f32,
}

impl Coefficients {
    pub(crate) fn new(h: &AdamWHyper) -> Self {
        let t = i32::try_from(h.step).unwrap_or(i32::MAX);
        Self {
            grad_scale: h.grad_scale as f32,
            beta1: h.beta1 as f32,
            one_minus_beta1: (1.0 - h.beta1) as f32,
            beta2: h.beta2 as f32,
            one_minus_beta2: (1.0 - h.beta2) as f32,
            bias1: (1.0 - h.beta1.powi(t)) as f32,
            bias2: (1.0 - h.beta2.powi(t)) as f32,
            eps: h.eps as f32,
            keep: (1.0 - h.lr * h.weight_decay) as f32,
            lr: h.lr as f32,
        }
    }
}

/// One AdamW step: returns the updated `(theta, m, v)`. All four tensors are flat and of the
/// same length; `m` and `v` start at zero; `grad` may be in another float type than the others
/// (bf16 gradients of f32 parameters: widened exactly). With `g = grad · grad_scale`:
///
/// ```text
/// m ← β1·m + (1-β1)·g        v ← β2·v + (1-β2)·g²
/// θ ← θ·(1 - lr·wd) - lr · (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + eps)
/// ```
///
/// One fused pass on Flex devices and one launch on CubeCL devices (features `cuda`,
/// `cube-cpu`; f32 state, `cube::adamw`); the tensor-op formulation
/// ([`adamw_update_reference`]) on every other device. Flex's results are the reference's bit
/// for bit; the CubeCL kernel's are within an ulp of them (fused multiply-adds; see
/// [`crate::device_checks`]).
///
/// # Panics
/// If the four lengths differ.
pub fn adamw_update(
    theta: Tensor<1>,
    grad: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    hyper: &AdamWHyper,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    check_lengths(&theta, &grad, &m, &v);
    #[cfg(feature = "cube")]
    if crate::on_cube(&theta.device()) {
        let ([theta, m, v], _) = crate::cube::ops::adamw_update([theta, grad, m, v], hyper, None);
        return (theta, m, v);
    }
    let grad = grad.cast(theta.dtype());
    if !crate::on_flex(&theta.device()) {
        return adamw_update_reference(theta, grad, m, v, hyper);
    }
    // The update is never differentiated: run it on the inner backend whatever device the
    // tensors (e.g. moments restored onto an autodiff device) come from.
    let (theta, m, v) = <Dispatch as AdamWBackend>::adamw_update(
        theta.inner().into_dispatch(),
        grad.inner().into_dispatch(),
        m.inner().into_dispatch(),
        v.inner().into_dispatch(),
        *hyper,
    );
    (
        Tensor::from_dispatch(theta),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}

/// [`adamw_update`] that also returns the updated `theta` rounded to `working` (the bf16
/// working copy of f32 master weights): on CubeCL devices written by the same launch, elsewhere
/// cast after the update. The same values either way.
pub fn adamw_update_with_working(
    theta: Tensor<1>,
    grad: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    hyper: &AdamWHyper,
    working: DType,
) -> (Tensor<1>, Tensor<1>, Tensor<1>, Tensor<1>) {
    #[cfg(feature = "cube")]
    if crate::on_cube(&theta.device()) {
        check_lengths(&theta, &grad, &m, &v);
        let ([theta, m, v], copy) =
            crate::cube::ops::adamw_update([theta, grad, m, v], hyper, Some(working));
        let copy = copy.expect("the kernel writes the working copy it is asked for");
        return (theta, m, v, copy);
    }
    let (theta, m, v) = adamw_update(theta, grad, m, v, hyper);
    let copy = theta.clone().cast(working);
    (theta, m, v, copy)
}

/// [`adamw_update`] written with tensor ops (any backend): the definition the fused pass matches
/// bit for bit.
pub fn adamw_update_reference(
    theta: Tensor<1>,
    grad: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    hyper: &AdamWHyper,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    check_lengths(&theta, &grad, &m, &v);
    let grad = grad.cast(theta.dtype());
    let h = hyper;
    let t = i32::try_from(h.step).unwrap_or(i32::MAX);
    let g = grad * h.grad_scale;
    let m = m * h.beta1 + g.clone() * (1.0 - h.beta1);
    let v = v * h.beta2 + g.square() * (1.0 - h.beta2);
    let denom = (v.clone() / (1.0 - h.beta2.powi(t))).sqrt() + h.eps;
    let theta = theta * (1.0 - h.lr * h.weight_decay)
        - (m.clone() / (1.0 - h.beta1.powi(t))) / denom * h.lr;
    (theta, m, v)
}

fn check_lengths(theta: &Tensor<1>, grad: &Tensor<1>, m: &Tensor<1>, v: &Tensor<1>) {
    expect_same_dtype(
        "adamw_update",
        &[("theta", theta.dtype()), ("m", m.dtype()), ("v", v.dtype())],
    );
    let lengths = [theta, grad, m, v].map(|t| t.dims()[0]);
    assert!(
        lengths.iter().all(|&n| n == lengths[0]),
        "adamw_update: theta, grad, m and v must have the same length, got {lengths:?}"
    );
}

#[backend_extension(Flex)]
pub(crate) trait AdamWBackend: Backend {
    fn adamw_update(
        theta: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        hyper: AdamWHyper,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

impl AdamWBackend for Flex {
    fn adamw_update(
        theta: FlexTensor,
        grad: FlexTensor,
        m: FlexTensor,
        v: FlexTensor,
        hyper: AdamWHyper,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (dtypes, shape) = (
            [&theta, &m, &v].map(|t| t.dtype()),
            theta.layout().shape().clone(),
        );
        let [mut theta, grad, mut m, mut v] = [theta, grad, m, v].map(contiguous_f32);
        update(
            &Coefficients::new(&hyper),
            as_f32_mut(&mut theta),
            as_f32(&grad),
            as_f32_mut(&mut m),
            as_f32_mut(&mut v),
        );
        let back = |t: FlexTensor, dtype| crate::host::cast_back(t, shape.clone(), dtype);
        (
            back(theta, dtypes[0]),
            back(m, dtypes[1]),
            back(v, dtypes[2]),
        )
    }
}

/// Elements per parallel task: large enough to amortize scheduling, small enough to balance.
const PIECE: usize = 1 << 14;

fn update(c: &Coefficients, theta: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) {
    theta
        .par_chunks_mut(PIECE)
        .zip(grad.par_chunks(PIECE))
        .zip(m.par_chunks_mut(PIECE).zip(v.par_chunks_mut(PIECE)))
        .for_each(|((theta, grad), (m, v))| update_piece(c, theta, grad, m, v));
}

simd_dispatch!(fn update_piece(
    c: &Coefficients, theta: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32])
    = update_generic, level = simd_level());

/// Whole vectors with `V`, the tail with scalars: both do the same `f32` operations (no FMA), so
/// the result does not depend on the vector width.
#[inline(always)]
fn update_generic<V: Lanes>(
    isa: Isa<V>,
    c: &Coefficients,
    theta: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    let split = theta.len() - theta.len() % V::WIDTH;
    update_range(isa, c, 0..split, theta, grad, m, v);
    update_range(SCALAR, c, split..theta.len(), theta, grad, m, v);
}

#[inline(always)]
fn update_range<V: Lanes>(
    isa: Isa<V>,
    c: &Coefficients,
    range: std::ops::Range<usize>,
    theta: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    let s = |x| isa.splat(x);
    for i in range.step_by(V::WIDTH) {
        let g = isa.load(&grad[i..]) * s(c.grad_scale);
        let m_new = isa.load(&m[i..]) * s(c.beta1) + g * s(c.one_minus_beta1);
        let v_new = isa.load(&v[i..]) * s(c.beta2) + (g * g) * s(c.one_minus_beta2);
        let denom = (v_new / s(c.bias2)).sqrt() + s(c.eps);
        let step = (m_new / s(c.bias1)) / denom * s(c.lr);
        (isa.load(&theta[i..]) * s(c.keep) - step).store(&mut theta[i..]);
        m_new.store(&mut m[i..]);
        v_new.store(&mut v[i..]);
    }
}
