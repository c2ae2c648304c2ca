//! The Zamba hybrid Mamba/attention language model (Zyphra, arXiv 2405.16712) in Burn,
//! numerically the same model as Hugging Face transformers' `ZambaForCausalLM`.

pub mod config;
pub mod decode;
pub mod device_checks;
pub mod error;
pub mod exec;
pub mod generate;
pub mod gradient_hook;
pub mod hf;
pub mod hf_export;
pub mod loss;
pub mod memory;
pub mod model;
pub mod param_table;
pub mod params;
mod recompute;
pub mod weights;

pub use config::{LayerKind, ZambaConfig};
pub use error::ModelError;
pub use exec::{ActivationCheckpointing, Execution, Precision};
pub use hf::{SaveDtype, load_hf, save_hf};
pub use loss::{IGNORE_INDEX, cross_entropy, next_token_loss};
pub use model::ZambaModel;
pub use weights::{HostTensor, Init, RandomInit, WeightSource, random_tokens};
