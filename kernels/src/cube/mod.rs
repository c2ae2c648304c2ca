//! Products, per-head products and attention on Burn's CubeCL backend ([`ops`]): matrix products
//! through [`gemm`] with a routine chosen for the device's runtime, as one autodiff op
//! ([`product`]); causal attention as one fused flash-style op ([`attention`]).

mod attention;
mod gemm;
pub(crate) mod ops;
mod product;
