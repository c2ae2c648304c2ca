//! Products, per-head products, attention, RMSNorm and the GELU gate on Burn's CubeCL backend
//! ([`ops`]): matrix products through [`gemm`] with a routine chosen for the device's runtime,
//! as one autodiff op ([`product`]); causal attention as one fused flash-style op
//! ([`attention`]); RMSNorm ([`rms_norm`]) and the GELU gate ([`gelu`]) as fused passes.

mod attention;
mod buffers;
mod gelu;
mod gemm;
pub(crate) mod ops;
mod product;
mod rms_norm;
