//! The CPU kernel ([`super::cpu`]) behind the scan's kernel interface on Flex: tensors in and out
//! of the plain `f32` buffers it works on.

use std::sync::Arc;

use burn::backend::flex::FlexTensor;
use burn::backend::{DType, Flex};

use super::ScanShape;
use super::cpu::{self, Inputs};
use super::op::{ScanKernel, ScanTensors};
use crate::host::{as_f32, contiguous_f32, from_f32};

/// The eight inputs as contiguous `f32` Flex tensors (converted only when they are not already),
/// with the dtype each arrived in so outputs and gradients can be given back in it.
#[derive(Clone, Debug)]
pub(crate) struct FlexInputs {
    tensors: [FlexTensor; 8],
    dtypes: [DType; 8],
    dims: ScanShape,
}

impl FlexInputs {
    fn new(tensors: [FlexTensor; 8]) -> Self {
        let dtypes = tensors.each_ref().map(|t| t.dtype());
        let tensors = tensors.map(contiguous_f32);
        let shapes = tensors.each_ref().map(|t| t.layout().shape());
        let dims = ScanShape::of_inputs(shapes.map(|s| s.as_slice()));
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

impl ScanKernel for Flex {
    type Inputs = FlexInputs;
    type Checkpoints = Arc<Vec<f32>>;

    fn prepare(inputs: ScanTensors<Flex>) -> FlexInputs {
        FlexInputs::new(inputs.into_array())
    }

    fn forward(x: &FlexInputs, keep_checkpoints: bool) -> (FlexTensor, Option<Arc<Vec<f32>>>) {
        let (out, checkpoints) = cpu::forward(&x.slices(), x.dims, keep_checkpoints);
        (
            x.output(out),
            keep_checkpoints.then(|| Arc::new(checkpoints)),
        )
    }

    fn backward(
        x: &FlexInputs,
        checkpoints: &Arc<Vec<f32>>,
        dout: FlexTensor,
    ) -> ScanTensors<Flex> {
        let dout = contiguous_f32(dout);
        let g = cpu::backward(&x.slices(), x.dims, checkpoints, as_f32(&dout));
        let computed = [g.u, g.delta, g.a, g.b, g.c, g.d, g.z, g.delta_bias];
        let grads: Vec<FlexTensor> = computed
            .into_iter()
            .zip(x.tensors.iter().zip(x.dtypes))
            .map(|(grad, (input, dtype))| from_f32(grad, input.layout().shape().clone(), dtype))
            .collect();
        ScanTensors::from_array(grads.try_into().expect("eight gradients"))
    }
}
