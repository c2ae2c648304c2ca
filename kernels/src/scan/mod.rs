//! The selective scan: its autodiff op (`op`), the CPU kernel (`cpu`) and its Flex binding
//! (`flex`), the CubeCL kernels (`cube`) and the tensor-op reference (`reference`).

pub(crate) mod cpu;
#[cfg(feature = "cube")]
pub(crate) mod cube;
mod flex;
pub(crate) mod op;
pub(crate) mod reference;
