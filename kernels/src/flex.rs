//! The CPU kernel ([`crate::cpu`]) behind the scan's kernel interface on Flex: tensors in and out
//! of the plain `f32` buffers it works on.

use std::sync::Arc;

use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::ops::FloatTensorOps;
use burn::backend::{Bytes, DType, Flex, FloatDType};
use burn::tensor::Shape;

use crate::cpu::{self, Dims, Inputs};
use crate::op::ScanKernel;

/// The eight inputs as contiguous `f32` Flex tensors (converted only when they are not already),
/// with the dtype each arrived in so outputs and gradients can be given back in it.
#[derive(Clone, Debug)]
pub(crate) struct FlexInputs {
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

/// A contiguous `f32` tensor with the same values; no copy when `t` already is one.
fn contiguous_f32(t: FlexTensor) -> FlexTensor {
    let t = match t.dtype() {
        DType::F32 => t,
        _ => Flex::float_cast(t, FloatDType::F32),
    };
    match t.is_contiguous() {
        true => t,
        false => t.to_contiguous(),
    }
}

/// The elements of a tensor made by [`contiguous_f32`].
fn as_f32(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("contiguous_f32 produces contiguous f32 tensors")
}

/// A Flex tensor owning `data` (no copy), cast to `dtype` if that is not `f32`.
fn from_f32(data: Vec<f32>, shape: Shape, dtype: DType) -> FlexTensor {
    let t = FlexTensor::new(
        Bytes::from_elems(data),
        Layout::contiguous(shape),
        DType::F32,
    );
    match dtype {
        DType::F32 => t,
        other => Flex::float_cast(t, FloatDType::from(other)),
    }
}

impl ScanKernel for Flex {
    type Inputs = FlexInputs;
    type Checkpoints = Arc<Vec<f32>>;

    fn prepare(inputs: [FlexTensor; 8]) -> FlexInputs {
        FlexInputs::new(inputs)
    }

    fn forward(x: &FlexInputs, keep_checkpoints: bool) -> (FlexTensor, Option<Arc<Vec<f32>>>) {
        let (out, checkpoints) = cpu::forward(&x.slices(), x.dims, keep_checkpoints);
        (x.output(out), keep_checkpoints.then(|| Arc::new(checkpoints)))
    }

    fn backward(x: &FlexInputs, checkpoints: &Arc<Vec<f32>>, dout: FlexTensor) -> [FlexTensor; 8] {
        let dout = contiguous_f32(dout);
        let g = cpu::backward(&x.slices(), x.dims, checkpoints, as_f32(&dout));
        let computed = [g.u, g.delta, g.a, g.b, g.c, g.d, g.z, g.delta_bias];
        let grads: Vec<FlexTensor> = computed
            .into_iter()
            .zip(x.tensors.iter().zip(x.dtypes))
            .map(|(grad, (input, dtype))| from_f32(grad, input.layout().shape().clone(), dtype))
            .collect();
        grads.try_into().expect("eight gradients")
    }
}
