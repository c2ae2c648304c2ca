//! The GELU gate `gelu(gate) · up` as one fused op on Burn's CubeCL backend: one element-wise
//! pass forward (reads `gate` and `up`, writes the product), one backward (reads both and the
//! output gradient, writes both gradients; `erf` recomputed rather than `gelu(gate)` kept).
//! Kernels in [`kernels`].

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
use cubecl::{CubeDim, calculate_cube_count_elemwise};

use super::buffers::{address_type, empty, kernel_dtype, to_dtype};

/// `gelu(gate) · up` on a CubeCL device (see [`crate::gelu_mul`]).
pub(crate) fn gelu_mul<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as CubeGeluMulBackend>::cube_gelu_mul(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

#[backend_extension(Cube, Autodiff)]
pub(crate) trait CubeGeluMulBackend: Backend {
    fn cube_gelu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// `gate` and `up` as the kernels read them (contiguous, in one float type) and the dtype the
/// op returns its output and gradients in.
#[derive(Clone, Debug)]
struct Inputs {
    gate: CubeTensor,
    up: CubeTensor,
    act: DType,
    dtype: DType,
}

impl Inputs {
    fn new(gate: CubeTensor, up: CubeTensor) -> Self {
        let dtype = gate.dtype;
        let act = kernel_dtype(dtype);
        let [gate, up] = [gate, up].map(|t| into_contiguous(to_dtype(t, act)));
        Self {
            gate,
            up,
            act,
            dtype,
        }
    }

    fn elements(&self) -> usize {
        self.gate.shape().num_elements()
    }

    /// One unit per element.
    fn launch_dims(&self) -> (cubecl::CubeCount, CubeDim) {
        let client = &self.gate.client;
        let cube_dim = CubeDim::new(client, self.elements());
        let count = calculate_cube_count_elemwise(client, self.elements(), cube_dim);
        (count, cube_dim)
    }

    fn empty_like(&self) -> CubeTensor {
        empty(&self.gate, self.gate.shape(), self.act)
    }

    fn elem(&self) -> cubecl::prelude::ElemType {
        dtype_to_storage_type(self.act)
    }
}

/// `gelu(gate) · up` in the inputs' dtype.
fn forward(x: &Inputs) -> CubeTensor {
    let out = x.empty_like();
    if x.elements() > 0 {
        let (count, cube_dim) = x.launch_dims();
        kernels::gelu_mul_forward::launch(
            &x.gate.client,
            count,
            cube_dim,
            address_type(&[&x.gate, &x.up, &out]),
            x.gate.clone().into_tensor_arg(),
            x.up.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            x.elem(),
        );
    }
    to_dtype(out, x.dtype)
}

/// `[d gate, d up]` in the inputs' dtype.
fn backward(x: &Inputs, dout: CubeTensor) -> [CubeTensor; 2] {
    let dout = into_contiguous(to_dtype(dout, x.act));
    let (dgate, dup) = (x.empty_like(), x.empty_like());
    if x.elements() > 0 {
        let (count, cube_dim) = x.launch_dims();
        kernels::gelu_mul_backward::launch(
            &x.gate.client,
            count,
            cube_dim,
            address_type(&[&x.gate, &x.up, &dout, &dgate, &dup]),
            x.gate.clone().into_tensor_arg(),
            x.up.clone().into_tensor_arg(),
            dout.into_tensor_arg(),
            dgate.clone().into_tensor_arg(),
            dup.clone().into_tensor_arg(),
            x.elem(),
        );
    }
    [dgate, dup].map(|t| to_dtype(t, x.dtype))
}

impl CubeGeluMulBackend for Cube {
    fn cube_gelu_mul(gate: CubeTensor, up: CubeTensor) -> CubeTensor {
        forward(&Inputs::new(gate, up))
    }
}

#[derive(Debug)]
struct GeluMulBackward;

impl Backward<Cube, 2> for GeluMulBackward {
    /// `gate` and `up` as the kernels read them.
    type State = Inputs;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let _span = zamba_trace::span(zamba_trace::Category::Elementwise, "gelu · up backward");
        let dout = grads.consume::<Cube>(&ops.node);
        let computed = backward(&ops.state, dout);
        for (parent, grad) in ops.parents.into_iter().zip(computed) {
            if let Some(node) = parent {
                grads.register::<Cube>(node.id, grad);
            }
        }
    }
}

impl<C: CheckpointStrategy> CubeGeluMulBackend for Autodiff<Cube, C> {
    fn cube_gelu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let [(gate, gg), (up, gu)] = [gate, up].map(|t| t.into_parts());
        let inputs = Inputs::new(gate, up);
        let out = forward(&inputs);
        match GeluMulBackward
            .prepare::<C>([gg, gu])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(inputs, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}
