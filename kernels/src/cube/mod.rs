//! Products, per-head products, attention, RMSNorm, the GELU gate and the causal conv + SiLU on
//! Burn's CubeCL backend ([`ops`]): matrix products through [`gemm`] with a routine chosen for the
//! device's runtime, as one autodiff op ([`product`]); causal attention as one fused flash-style
//! op ([`attention`]); RMSNorm ([`rms_norm`]), the GELU gate ([`gelu`]), the conv ([`conv`]) and
//! the cross-entropy ([`cross_entropy`]) as fused passes; the AdamW update as one launch
//! ([`adamw`]).

mod adamw;
mod attention;
pub use attention::tile_shapes as attention_tile_shapes;
mod buffers;
mod conv;
mod cross_entropy;
mod gelu;
mod gemm;
pub(crate) mod ops;
mod product;
mod rms_norm;
