//! What the Cube ops share around their launches: the float type kernels compute in, dtype
//! conversions, output buffers and the address width of a launch.

use burn::backend::DType;
use burn::tensor::Shape;
use burn_cubecl::kernel::cast;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::ir::AddressType;

/// The float type a kernel reads and writes for inputs of `dtype`: theirs when it is f32, f16 or
/// bf16, else f32.
pub(super) fn kernel_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => dtype,
        _ => DType::F32,
    }
}

/// `t` in `dtype` (itself when it already is).
pub(super) fn to_dtype(t: CubeTensor, dtype: DType) -> CubeTensor {
    match t.dtype == dtype {
        true => t,
        false => cast(t, dtype),
    }
}

/// An uninitialised contiguous tensor on the device of `like`.
pub(super) fn empty(like: &CubeTensor, shape: impl Into<Shape>, dtype: DType) -> CubeTensor {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        dtype,
    )
}

/// The address width a launch over `tensors` needs.
pub(super) fn address_type(tensors: &[&CubeTensor]) -> AddressType {
    tensors
        .iter()
        .map(|t| t.required_address_type())
        .max()
        .unwrap_or_default()
}
