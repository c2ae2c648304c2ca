//! RMSNorm over the last dimension as one fused op on Burn's CubeCL backend, of `x` or of a sum
//! `x + t` (formed in registers, never written; recomputed by the backward, whose `dx` is the
//! gradient of both): the forward is one pass per row that keeps one f32 `rstd` per row; the
//! backward is one pass per row for `dx`, each cube summing `d gamma` over its fixed block of
//! rows, then one fixed-order sum over the blocks (no float atomics: bit-identical reruns).
//! Kernels in [`kernels`].
//!
//! Units per cube come from the client's limits (the CPU runtime: one unit per core; a GPU: 256),
//! so the same code runs on both.

mod kernels;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Cube, DType, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::Tensor;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise};

use super::buffers::{address_type, empty, kernel_dtype, to_dtype};

/// Units per cube, at most: eight 32-wide warps on a GPU.
const MAX_UNITS: usize = 256;
/// Cubes of one launch, at most: the rows are cut into this many blocks or fewer, each block's
/// `d gamma` summed in one cube (on a GPU, about one wave of 256-unit cubes).
const MAX_CUBES: usize = crate::RMS_NORM_CUBE_BLOCKS;

/// RMSNorm over the last dimension of `x` on a CubeCL device (see [`crate::rms_norm`]).
pub(crate) fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as CubeRmsNormBackend>::cube_rms_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        eps as f32,
    ))
}

/// RMSNorm of `x + t` on a CubeCL device (see [`crate::add_rms_norm`]).
pub(crate) fn add_rms_norm<const D: usize>(
    x: Tensor<D>,
    t: Tensor<D>,
    gamma: Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as CubeRmsNormBackend>::cube_add_rms_norm(
        x.into_dispatch(),
        t.into_dispatch(),
        gamma.into_dispatch(),
        eps as f32,
    ))
}

#[backend_extension(Cube, Autodiff)]
pub(crate) trait CubeRmsNormBackend: Backend {
    fn cube_rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, eps: f32)
    -> FloatTensor<Self>;

    fn cube_add_rms_norm(
        x: FloatTensor<Self>,
        t: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self>;
}

/// How the rows are cut: units per cube (a power of two), rows per cube and cubes.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    units: usize,
    rows_per_cube: usize,
    cubes: usize,
}

impl Geometry {
    fn of(x: &Inputs) -> Self {
        let (rows, width) = (x.rows, x.width);
        let hardware = &x.x.client.properties().hardware;
        let limit = [
            MAX_UNITS,
            hardware.max_units_per_cube as usize,
            hardware.max_cube_dim.0 as usize,
            width.next_power_of_two(),
        ]
        .into_iter()
        .min()
        .unwrap_or(1)
        .max(1);
        // The largest power of two within the limit: the reduction's tree halves it.
        let units = 1 << limit.ilog2();
        let rows_per_cube = rows.div_ceil(MAX_CUBES).max(1);
        Self {
            units,
            rows_per_cube,
            cubes: rows.div_ceil(rows_per_cube),
        }
    }
}

/// The inputs as the kernels read them (contiguous, in one float type), `x`'s rows of `width`,
/// and the dtype the op returns its output and gradients in; `t`, added to `x`, where the op
/// normalises a sum.
#[derive(Clone, Debug)]
struct Inputs {
    x: CubeTensor,
    t: Option<CubeTensor>,
    gamma: CubeTensor,
    rows: usize,
    width: usize,
    act: DType,
    dtype: DType,
    eps: f32,
}

impl Inputs {
    fn new(x: CubeTensor, t: Option<CubeTensor>, gamma: CubeTensor, eps: f32) -> Self {
        let dtype = x.dtype;
        let act = kernel_dtype(dtype);
        let readable = |t| into_contiguous(to_dtype(t, act));
        let [x, gamma] = [x, gamma].map(readable);
        let t = t.map(readable);
        let shape = x.shape();
        let width = shape[shape.num_dims() - 1];
        let rows = shape.num_elements().checked_div(width).unwrap_or(0);
        Self {
            x,
            t,
            gamma,
            rows,
            width,
            act,
            dtype,
            eps,
        }
    }

    fn elem(&self) -> cubecl::prelude::ElemType {
        dtype_to_storage_type(self.act)
    }

    /// The kernels' `t` argument: `t`, or `x` again (never read) when nothing is added.
    fn addend(&self) -> CubeTensor {
        self.t.clone().unwrap_or_else(|| self.x.clone())
    }
}

/// `y` (in the kernels' type) and, with `keep_rstd`, each row's `rstd` (`[rows]`, f32).
fn forward(x: &Inputs, keep_rstd: bool) -> (CubeTensor, Option<CubeTensor>) {
    let (rows, width) = (x.rows, x.width);
    let y = empty(&x.x, x.x.shape(), x.act);
    // Without the statistics the kernel still takes a (never written) one-element tensor.
    let rstd = empty(&x.x, [if keep_rstd { rows } else { 1 }], DType::F32);
    if rows > 0 && width > 0 {
        let g = Geometry::of(x);
        kernels::rms_norm_forward::launch(
            &x.x.client,
            CubeCount::new_1d(g.cubes as u32),
            CubeDim::new_1d(g.units as u32),
            address_type(&[&x.x, &y]),
            x.x.clone().into_tensor_arg(),
            x.addend().into_tensor_arg(),
            x.gamma.clone().into_tensor_arg(),
            y.clone().into_tensor_arg(),
            rstd.clone().into_tensor_arg(),
            x.eps,
            rows,
            g.rows_per_cube,
            width,
            g.units,
            keep_rstd,
            x.t.is_some(),
            x.elem(),
        );
    }
    (y, keep_rstd.then_some(rstd))
}

/// `[dx, d gamma]` in the inputs' dtype, from the forward's `rstd`.
fn backward(x: &Inputs, rstd: &CubeTensor, dy: CubeTensor) -> [CubeTensor; 2] {
    let (rows, width) = (x.rows, x.width);
    let dy = into_contiguous(to_dtype(dy, x.act));
    let dx = empty(&x.x, x.x.shape(), x.act);
    let dgamma = empty(&x.x, [width], x.act);
    if width > 0 {
        let client = &x.x.client;
        let g = Geometry::of(x);
        let blocks = if rows > 0 { g.cubes } else { 0 };
        let partials = empty(&x.x, [blocks.max(1), width], DType::F32);
        if rows > 0 {
            kernels::rms_norm_backward::launch(
                client,
                CubeCount::new_1d(g.cubes as u32),
                CubeDim::new_1d(g.units as u32),
                address_type(&[&x.x, &dy, &dx]),
                x.x.clone().into_tensor_arg(),
                x.addend().into_tensor_arg(),
                x.gamma.clone().into_tensor_arg(),
                rstd.clone().into_tensor_arg(),
                dy.into_tensor_arg(),
                dx.clone().into_tensor_arg(),
                partials.clone().into_tensor_arg(),
                rows,
                g.rows_per_cube,
                width,
                g.units,
                x.t.is_some(),
                x.elem(),
            );
        }
        let cube_dim = CubeDim::new(client, width);
        kernels::sum_partials::launch(
            client,
            calculate_cube_count_elemwise(client, width, cube_dim),
            cube_dim,
            address_type(&[&partials]),
            partials.into_tensor_arg(),
            dgamma.clone().into_tensor_arg(),
            blocks,
            x.elem(),
        );
    }
    [dx, dgamma].map(|t| to_dtype(t, x.dtype))
}

impl CubeRmsNormBackend for Cube {
    fn cube_rms_norm(x: CubeTensor, gamma: CubeTensor, eps: f32) -> CubeTensor {
        untracked_forward(&Inputs::new(x, None, gamma, eps))
    }

    fn cube_add_rms_norm(x: CubeTensor, t: CubeTensor, gamma: CubeTensor, eps: f32) -> CubeTensor {
        untracked_forward(&Inputs::new(x, Some(t), gamma, eps))
    }
}

/// What the backward needs: the inputs as the kernels read them and each row's `rstd`.
#[derive(Clone, Debug)]
struct RmsNormState {
    inputs: Inputs,
    rstd: CubeTensor,
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Cube, 2> for RmsNormBackward {
    type State = RmsNormState;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let _span = zamba_trace::span(zamba_trace::Category::Norm, "rms norm backward");
        let dy = grads.consume::<Cube>(&ops.node);
        let RmsNormState { inputs, rstd } = ops.state;
        let computed = backward(&inputs, &rstd, dy);
        for (parent, grad) in ops.parents.into_iter().zip(computed) {
            if let Some(node) = parent {
                grads.register::<Cube>(node.id, grad);
            }
        }
    }
}

#[derive(Debug)]
struct AddRmsNormBackward;

impl Backward<Cube, 3> for AddRmsNormBackward {
    type State = RmsNormState;

    /// `x` and `t` share the sum's gradient.
    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let _span = zamba_trace::span(zamba_trace::Category::Norm, "add + rms norm backward");
        let dy = grads.consume::<Cube>(&ops.node);
        let RmsNormState { inputs, rstd } = ops.state;
        let [dsum, dgamma] = backward(&inputs, &rstd, dy);
        for (parent, grad) in ops.parents.into_iter().zip([dsum.clone(), dsum, dgamma]) {
            if let Some(node) = parent {
                grads.register::<Cube>(node.id, grad);
            }
        }
    }
}

/// The output in the inputs' dtype, and the state its backward needs.
fn tracked_forward(inputs: Inputs) -> (CubeTensor, RmsNormState) {
    let (y, rstd) = forward(&inputs, true);
    let rstd = rstd.expect("a forward asked for the statistics keeps them");
    (to_dtype(y, inputs.dtype), RmsNormState { inputs, rstd })
}

/// The output in the inputs' dtype, without statistics.
fn untracked_forward(inputs: &Inputs) -> CubeTensor {
    to_dtype(forward(inputs, false).0, inputs.dtype)
}

impl<C: CheckpointStrategy> CubeRmsNormBackend for Autodiff<Cube, C> {
    fn cube_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        let [(x, gx), (gamma, gg)] = [x, gamma].map(|t| t.into_parts());
        let inputs = Inputs::new(x, None, gamma, eps);
        match RmsNormBackward
            .prepare::<C>([gx, gg])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, state) = tracked_forward(inputs);
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(untracked_forward(&inputs)),
        }
    }

    fn cube_add_rms_norm(
        x: FloatTensor<Self>,
        t: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f32,
    ) -> FloatTensor<Self> {
        let [(x, gx), (t, gt), (gamma, gg)] = [x, t, gamma].map(|t| t.into_parts());
        let inputs = Inputs::new(x, Some(t), gamma, eps);
        match AddRmsNormBackward
            .prepare::<C>([gx, gt, gg])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, state) = tracked_forward(inputs);
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(untracked_forward(&inputs)),
        }
    }
}
