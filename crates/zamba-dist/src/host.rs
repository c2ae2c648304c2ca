//! Host-side copies of the flat tensors the CPU communicators exchange.

use burn::tensor::{DType, Device, Tensor, TensorData};
use half::bf16;

use crate::DistError;

/// Element types the communicators carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    pub(crate) fn of(tensor: &Tensor<1>, op: &str) -> Result<Self, DistError> {
        match tensor.dtype() {
            DType::F32 => Ok(Dtype::F32),
            DType::BF16 => Ok(Dtype::Bf16),
            other => Err(DistError::Invalid(format!(
                "{op}: tensors must be f32 or bf16, got {other:?}"
            ))),
        }
    }
}

/// One rank's contribution to a collective, or its result.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Payload {
    /// Ranks that only receive (broadcast, non-root) and barriers send nothing.
    Empty,
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    Bytes(Vec<u8>),
}

impl Payload {
    /// Copies a flat tensor to the host. Blocks until the device has computed it.
    pub(crate) fn from_tensor(tensor: Tensor<1>, op: &str) -> Result<Self, DistError> {
        let dtype = Dtype::of(&tensor, op)?;
        let data = tensor.into_data();
        let host = match dtype {
            Dtype::F32 => data.try_into_vec::<f32>().map(Payload::F32),
            Dtype::Bf16 => data.try_into_vec::<bf16>().map(Payload::Bf16),
        };
        host.map_err(|e| DistError::Invalid(format!("{op}: reading the tensor: {e:?}")))
    }

    /// A flat tensor on `device` holding these values, in their own dtype.
    pub(crate) fn into_tensor(self, device: &Device, op: &str) -> Result<Tensor<1>, DistError> {
        let (data, dtype) = match self {
            Payload::F32(v) => {
                let n = v.len();
                (TensorData::new(v, [n]), DType::F32)
            }
            Payload::Bf16(v) => {
                let n = v.len();
                (TensorData::new(v, [n]), DType::BF16)
            }
            Payload::Empty | Payload::Bytes(_) => {
                return Err(DistError::Invalid(format!(
                    "{op}: internal error: expected tensor values, got {}",
                    self.describe()
                )));
            }
        };
        Ok(Tensor::from_data(data, (device, dtype)))
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Payload::Empty => "nothing".into(),
            Payload::F32(v) => format!("{} f32 values", v.len()),
            Payload::Bf16(v) => format!("{} bf16 values", v.len()),
            Payload::Bytes(v) => format!("{} bytes", v.len()),
        }
    }
}
