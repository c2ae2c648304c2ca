//! The causal depthwise convolution + SiLU as one fused op on Burn's CubeCL backend: one pass
//! forward (reads `x`, writes the output; keeps nothing but its inputs), one backward pass that
//! recomputes the pre-activations and writes `dx` and each chunk of steps' weight and bias sums,
//! then one fixed-order sum over batch and chunks (no float atomics: bit-identical reruns).
//! Kernels in [`kernels`].

mod kernels;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Cube, DType, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::Tensor;
use burn_cubecl::kernel::{into_contiguous, untile};
use burn_cubecl::tensor::CubeTensor;
use cubecl::client::Client;
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise};

use super::buffers::{address_type, empty, kernel_dtype, to_dtype};

/// Steps of a lane per unit of the backward: its weight and bias sums are written per chunk.
const CHUNK: usize = crate::CONV_CUBE_CHUNK;

/// `silu(causal_depthwise_conv(x) + bias)` on a CubeCL device (see
/// [`crate::causal_conv1d_silu`]).
pub(crate) fn causal_conv1d_silu(x: Tensor<3>, weight: Tensor<2>, bias: Tensor<1>) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as CubeConvBackend>::cube_causal_conv1d_silu(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    ))
}

#[backend_extension(Cube, Autodiff)]
pub(crate) trait CubeConvBackend: Backend {
    fn cube_causal_conv1d_silu(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// The inputs as the kernels read them (`x` at its strides, the parameters contiguous, in one
/// float type) and the dtype the op returns its output and gradients in.
#[derive(Clone, Debug)]
struct Inputs {
    x: CubeTensor,
    weight: CubeTensor,
    bias: CubeTensor,
    act: DType,
    dtype: DType,
}

impl Inputs {
    fn new(x: CubeTensor, weight: CubeTensor, bias: CubeTensor) -> Self {
        let dtype = x.dtype;
        let act = kernel_dtype(dtype);
        let [weight, bias] = [weight, bias].map(|t| into_contiguous(to_dtype(t, act)));
        Self {
            x: untile(to_dtype(x, act)),
            weight,
            bias,
            act,
            dtype,
        }
    }

    /// Batch, channels, steps and taps.
    fn dims(&self) -> [usize; 4] {
        let [batch, channels, len] = self.x.shape().dims::<3>();
        [batch, channels, len, self.weight.shape()[1]]
    }

    fn client(&self) -> &Client {
        &self.x.client
    }

    fn elem(&self) -> cubecl::prelude::ElemType {
        dtype_to_storage_type(self.act)
    }
}

/// A launch of one unit per item of `items`.
fn per_item(client: &Client, items: usize) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new(client, items);
    (
        calculate_cube_count_elemwise(client, items, cube_dim),
        cube_dim,
    )
}

/// The output, in the inputs' dtype.
fn forward(x: &Inputs) -> CubeTensor {
    let [batch, channels, len, taps] = x.dims();
    let out = empty(&x.x, [batch, channels, len], x.act);
    let elements = batch * channels * len;
    if elements > 0 {
        let (count, cube_dim) = per_item(x.client(), elements);
        kernels::conv_forward::launch(
            x.client(),
            count,
            cube_dim,
            address_type(&[&x.x, &out]),
            x.x.clone().into_tensor_arg(),
            x.weight.clone().into_tensor_arg(),
            x.bias.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            taps,
            x.elem(),
        );
    }
    to_dtype(out, x.dtype)
}

/// `[dx, d weight, d bias]` in the inputs' dtype.
fn backward(x: &Inputs, dout: CubeTensor) -> [CubeTensor; 3] {
    let [batch, channels, len, taps] = x.dims();
    let dout = into_contiguous(to_dtype(dout, x.act));
    let dx = empty(&x.x, [batch, channels, len], x.act);
    let dweight = empty(&x.x, [channels, taps], x.act);
    let dbias = empty(&x.x, [channels], x.act);
    let chunks = len.div_ceil(CHUNK);
    let units = batch * channels * chunks;
    let partials = empty(&x.x, [units.max(1), taps + 1], DType::F32);
    if units > 0 {
        let (count, cube_dim) = per_item(x.client(), units);
        kernels::conv_backward::launch(
            x.client(),
            count,
            cube_dim,
            address_type(&[&x.x, &dout, &dx, &partials]),
            x.x.clone().into_tensor_arg(),
            x.weight.clone().into_tensor_arg(),
            x.bias.clone().into_tensor_arg(),
            dout.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            partials.clone().into_tensor_arg(),
            chunks,
            CHUNK,
            taps,
            x.elem(),
        );
    }
    if channels > 0 {
        let (count, cube_dim) = per_item(x.client(), channels * (taps + 1));
        kernels::sum_partials::launch(
            x.client(),
            count,
            cube_dim,
            address_type(&[&partials]),
            partials.into_tensor_arg(),
            dweight.clone().into_tensor_arg(),
            dbias.clone().into_tensor_arg(),
            batch,
            chunks,
            taps,
            x.elem(),
        );
    }
    [dx, dweight, dbias].map(|t| to_dtype(t, x.dtype))
}

impl CubeConvBackend for Cube {
    fn cube_causal_conv1d_silu(x: CubeTensor, weight: CubeTensor, bias: CubeTensor) -> CubeTensor {
        forward(&Inputs::new(x, weight, bias))
    }
}

#[derive(Debug)]
struct ConvBackward;

impl Backward<Cube, 3> for ConvBackward {
    /// The inputs as the kernels read them.
    type State = Inputs;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let _span = zamba_trace::span(
            zamba_trace::Category::Elementwise,
            "causal conv + silu backward",
        );
        let dout = grads.consume::<Cube>(&ops.node);
        let computed = backward(&ops.state, dout);
        for (parent, grad) in ops.parents.into_iter().zip(computed) {
            if let Some(node) = parent {
                grads.register::<Cube>(node.id, grad);
            }
        }
    }
}

impl<C: CheckpointStrategy> CubeConvBackend for Autodiff<Cube, C> {
    fn cube_causal_conv1d_silu(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [(x, gx), (weight, gw), (bias, gb)] = [x, weight, bias].map(|t| t.into_parts());
        let inputs = Inputs::new(x, weight, bias);
        let out = forward(&inputs);
        match ConvBackward
            .prepare::<C>([gx, gw, gb])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(inputs, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}
