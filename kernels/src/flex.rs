//! The scan as a Burn backend extension: the Flex forward, and the autodiff wrapper whose backward
//! node calls the fused backward of [`crate::cpu`].

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, DType, Flex};
use burn::backend::{Dispatch, backend_extension};

use crate::cpu::{self, Dims, Inputs};
use crate::host::{as_f32, contiguous_f32, from_f32};

/// The fused scan. Routed by `Dispatch` to Flex (inference) or `Autodiff<Flex, _>` (training);
/// other backends never reach it (see [`crate::selective_scan`]).
#[backend_extension(Flex, Autodiff)]
pub(crate) trait SelectiveScanBackend: Backend {
    #[allow(clippy::too_many_arguments)]
    fn selective_scan(
        u: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        d: FloatTensor<Self>,
        z: FloatTensor<Self>,
        delta_bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// Entry point used by [`crate::selective_scan`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn fused(
    u: burn::tensor::Tensor<3>,
    delta: burn::tensor::Tensor<3>,
    a: burn::tensor::Tensor<2>,
    b: burn::tensor::Tensor<4>,
    c: burn::tensor::Tensor<4>,
    d: burn::tensor::Tensor<1>,
    z: burn::tensor::Tensor<3>,
    delta_bias: burn::tensor::Tensor<1>,
) -> burn::tensor::Tensor<3> {
    burn::tensor::Tensor::from_dispatch(<Dispatch as SelectiveScanBackend>::selective_scan(
        u.into_dispatch(),
        delta.into_dispatch(),
        a.into_dispatch(),
        b.into_dispatch(),
        c.into_dispatch(),
        d.into_dispatch(),
        z.into_dispatch(),
        delta_bias.into_dispatch(),
    ))
}

/// The eight inputs as contiguous `f32` Flex tensors (converted only when they are not already),
/// with the dtype each arrived in so outputs and gradients can be given back in it.
#[derive(Clone, Debug)]
struct FlexInputs {
    tensors: [FlexTensor; 8],
    dtypes: [DType; 8],
    dims: Dims,
}

impl FlexInputs {
    fn new(tensors: [FlexTensor; 8]) -> Self {
        let dtypes = tensors.each_ref().map(|t| t.dtype());
        let tensors = tensors.map(contiguous_f32);
        let shapes = tensors.each_ref().map(|t| t.layout().shape());
        let dims = Dims::new(shapes.map(|s| s.as_slice()));
        Self {
            tensors,
            dtypes,
            dims,
        }
    }

    fn slices(&self) -> Inputs<'_> {
        let [u, delta, a, b, c, d, z, delta_bias] = self.tensors.each_ref().map(as_f32);
        Inputs {
            u,
            delta,
            a,
            b,
            c,
            d,
            z,
            delta_bias,
        }
    }

    /// Wraps the forward output, in the dtype `u` came in.
    fn output(&self, out: Vec<f32>) -> FlexTensor {
        from_f32(
            out,
            self.tensors[0].layout().shape().clone(),
            self.dtypes[0],
        )
    }
}

impl SelectiveScanBackend for Flex {
    fn selective_scan(
        u: FlexTensor,
        delta: FlexTensor,
        a: FlexTensor,
        b: FlexTensor,
        c: FlexTensor,
        d: FlexTensor,
        z: FlexTensor,
        delta_bias: FlexTensor,
    ) -> FlexTensor {
        let x = FlexInputs::new([u, delta, a, b, c, d, z, delta_bias]);
        let (out, _) = cpu::forward(&x.slices(), x.dims, false);
        x.output(out)
    }
}

/// What the backward needs: the inputs (shared, not copied) and the chunk-boundary states.
#[derive(Clone, Debug)]
struct ScanState {
    inputs: FlexInputs,
    checkpoints: Arc<Vec<f32>>,
}

#[derive(Debug)]
struct ScanBackward;

impl Backward<Flex, 8> for ScanBackward {
    type State = ScanState;

    fn backward(
        self,
        ops: Ops<Self::State, 8>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let dout = contiguous_f32(grads.consume::<Flex>(&ops.node));
        let ScanState {
            inputs,
            checkpoints,
        } = ops.state;
        let g = cpu::backward(&inputs.slices(), inputs.dims, &checkpoints, as_f32(&dout));
        let computed = [g.u, g.delta, g.a, g.b, g.c, g.d, g.z, g.delta_bias];
        for ((parent, grad), (input, dtype)) in ops
            .parents
            .into_iter()
            .zip(computed)
            .zip(inputs.tensors.iter().zip(inputs.dtypes))
        {
            if let Some(node) = parent {
                let grad = from_f32(grad, input.layout().shape().clone(), dtype);
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

impl<C: CheckpointStrategy> SelectiveScanBackend for Autodiff<Flex, C> {
    fn selective_scan(
        u: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        d: FloatTensor<Self>,
        z: FloatTensor<Self>,
        delta_bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let parts = [u, delta, a, b, c, d, z, delta_bias].map(|t| t.into_parts());
        let [p0, p1, p2, p3, p4, p5, p6, p7] = parts;
        let (tensors, guards) = (
            [p0.0, p1.0, p2.0, p3.0, p4.0, p5.0, p6.0, p7.0],
            [p0.1, p1.1, p2.1, p3.1, p4.1, p5.1, p6.1, p7.1],
        );
        let inputs = FlexInputs::new(tensors);
        // Compute bound: the backward must never rerun the forward through the checkpointer; it
        // recomputes from its own chunk checkpoints instead.
        match ScanBackward.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, checkpoints) = cpu::forward(&inputs.slices(), inputs.dims, true);
                let out = inputs.output(out);
                let state = ScanState {
                    inputs,
                    checkpoints: Arc::new(checkpoints),
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => {
                let (out, _) = cpu::forward(&inputs.slices(), inputs.dims, false);
                prep.finish(inputs.output(out))
            }
        }
    }
}
