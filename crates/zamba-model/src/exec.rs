//! How the forward pass runs, apart from the weights: the float type of matmuls and activations,
//! and what autodiff keeps for the backward.

use std::fmt;
use std::str::FromStr;

use burn::nn::Linear;
use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// The float type of matmuls and activations.
///
/// `Bf16` is mixed precision: the parameters stay f32 (the master weights AdamW updates) and are
/// cast to bf16 where a matmul or an elementwise op uses them (both matmul operands are cast:
/// Burn does not promote dtypes), so their gradients arrive in f32. RMSNorm statistics, the
/// residual stream (as mamba-ssm's `residual_in_fp32`), the scan's state, the logits' softmax and
/// the loss stay f32; attention runs on bf16 inputs with f32 softmax statistics and sums (on
/// CubeCL devices, the flash-style op of `zamba_kernels::causal_attention`). On CPU backends bf16
/// is emulated (computed in f32, rounded to bf16): it gives bf16's numerics, not its speed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

impl Precision {
    /// The compute type: what the products, the scan's activations and attention run in.
    pub fn dtype(self) -> DType {
        match self {
            Precision::Fp32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// What autodiff keeps for the backward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActivationCheckpointing {
    /// Every op keeps what its backward needs.
    #[default]
    None,
    /// Each Mamba layer and each use of the shared block keeps only its inputs and is recomputed
    /// in the backward (about one more forward pass of compute).
    Layers,
}

/// The execution options of a [`crate::ZambaModel`] (see [`crate::ZambaModel::with_execution`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Execution {
    pub precision: Precision,
    pub checkpointing: ActivationCheckpointing,
}

macro_rules! text_enum {
    ($ty:ty, $what:literal, $($variant:path => $name:literal),+) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $($variant => $name),+ })
            }
        }

        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($name => Ok($variant),)+
                    _ => Err(format!(
                        concat!("unknown ", $what, " {:?}; expected one of {}"),
                        s,
                        [$(concat!("\"", $name, "\"")),+].join(", ")
                    )),
                }
            }
        }
    };
}

text_enum!(Precision, "precision", Precision::Fp32 => "fp32", Precision::Bf16 => "bf16");
text_enum!(
    ActivationCheckpointing,
    "activation checkpointing",
    ActivationCheckpointing::None => "none",
    ActivationCheckpointing::Layers => "layers"
);

/// The compute type of one forward pass, with the casts [`Precision`] describes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Compute {
    dtype: DType,
}

impl Compute {
    pub(crate) fn new(precision: Precision) -> Self {
        Self {
            dtype: precision.dtype(),
        }
    }

    /// `t` in the compute type (unchanged if it already is).
    pub(crate) fn cast<const D: usize>(self, t: Tensor<D>) -> Tensor<D> {
        to(t, self.dtype)
    }

    /// `x · W (+ b)` with both operands in the compute type (direct GEMMs on the CPU, see
    /// [`zamba_kernels::linear`]).
    pub(crate) fn linear<const D: usize>(self, layer: &Linear, x: Tensor<D>) -> Tensor<D> {
        let y = zamba_kernels::linear(self.cast(x), self.cast(layer.weight.val()));
        match &layer.bias {
            Some(bias) => y + self.cast(bias.val()).unsqueeze(),
            None => y,
        }
    }

    /// `x · W` for the two halves of `layer`'s output columns (no bias), each `[B, d_out / 2, L]`
    /// (see [`zamba_kernels::linear_channels_first`]).
    pub(crate) fn channels_first_halves(self, layer: &Linear, x: Tensor<3>) -> [Tensor<3>; 2] {
        debug_assert!(layer.bias.is_none(), "no bias on the split projection");
        let weight = self.cast(layer.weight.val());
        let [d_in, d_out] = weight.dims();
        let x = self.cast(x);
        [0..d_out / 2, d_out / 2..d_out].map(|columns| {
            zamba_kernels::linear_channels_first(
                x.clone(),
                weight.clone().slice([0..d_in, columns]),
            )
        })
    }
}

/// `t` in f32: the residual stream and normalisation statistics.
pub(crate) fn f32<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    to(t, DType::F32)
}

fn to<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    match t.dtype() == dtype {
        true => t,
        false => t.cast(dtype),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_list_the_choices() {
        for p in [Precision::Fp32, Precision::Bf16] {
            assert_eq!(p.to_string().parse::<Precision>(), Ok(p));
        }
        for c in [
            ActivationCheckpointing::None,
            ActivationCheckpointing::Layers,
        ] {
            assert_eq!(c.to_string().parse::<ActivationCheckpointing>(), Ok(c));
        }
        let e = "fp16".parse::<Precision>().unwrap_err();
        assert_eq!(
            e,
            "unknown precision \"fp16\"; expected one of \"fp32\", \"bf16\""
        );
    }
}
