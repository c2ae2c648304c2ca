//! A GPU cost model of one training step: for a model config, batch shape, precision,
//! recomputation setting and card, the FLOPs and HBM bytes of every op class, its predicted time
//! (a roofline: `max(FLOPs / (peak × fraction), bytes / (bandwidth × fraction))`, plus a fixed
//! cost per kernel launch), and the step's predicted time, tokens/s and MFU. No GPU is needed and
//! no model is built (`zamba-train bench model --device cuda --predict`). docs/performance.md
//! explains what it counts, the fractions and what it ignores.
//!
//! Two kernel sets are modelled: [`Kernels::Planned`] (the GPU step's design target: cuBLASLt
//! GEMMs, a mamba-ssm-class scan, flash attention, fused element-wise kernels, a multi-tensor
//! AdamW) and [`Kernels::Current`] (the Cube path as it is: the fused attention's tile kernels on
//! the tensor cores in bf16 (its row kernels on the CUDA cores in f32), fused RMSNorm, GELU-gate, conv and cross-entropy kernels, AdamW one launch per
//! tensor, the other element-wise ops one kernel per tensor op, weights cast per call).

pub mod card;
mod ops;
mod render;

use std::fmt;
use std::str::FromStr;

use zamba_model::params::FlopsPerToken;
use zamba_model::{ActivationCheckpointing, Precision, ZambaConfig};
use zamba_trace::Category;

pub use card::{CARDS, Card};
pub use ops::OpCost;

/// One training step's shape: a model, `micro_batches` micro-batches of `batch × seq_len`
/// tokens (gradients accumulated, one AdamW update), how it runs.
#[derive(Clone, Copy, Debug)]
pub struct Workload<'a> {
    pub config: &'a ZambaConfig,
    pub batch: usize,
    pub seq_len: usize,
    pub micro_batches: usize,
    pub precision: Precision,
    pub checkpointing: ActivationCheckpointing,
}

impl Workload<'_> {
    /// Tokens of the step (every micro-batch).
    pub fn tokens(&self) -> f64 {
        (self.micro_batches * self.batch * self.seq_len) as f64
    }

    /// The step's model FLOPs: `FlopsPerToken::train` × tokens (the MFU convention).
    pub fn model_flops(&self) -> f64 {
        FlopsPerToken::of(self.config, self.seq_len).train() * self.tokens()
    }
}

/// Which kernels the step runs (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    Planned,
    Current,
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kernels::Planned => "planned",
            Kernels::Current => "current",
        })
    }
}

impl FromStr for Kernels {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "planned" => Ok(Kernels::Planned),
            "current" => Ok(Kernels::Current),
            _ => Err(format!(
                "unknown kernel set {s:?}; expected \"planned\" (cuBLASLt, fused kernels) or \
                 \"current\" (the Cube path as it is)"
            )),
        }
    }
}

/// The fraction of a card's datasheet peak each kind of work reaches, and the cost of a launch.
/// docs/performance.md justifies every default.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fractions {
    /// Dense GEMMs, of the tensor-core peak.
    pub gemm: f64,
    /// Attention's products, of the tensor-core peak.
    pub attention: f64,
    /// Element-wise arithmetic (the scan), of the CUDA cores' f32 peak.
    pub vector: f64,
    /// Memory-bound kernels, of the HBM bandwidth.
    pub memory: f64,
    /// The selective scan's HBM traffic, of the HBM bandwidth.
    pub scan_memory: f64,
    /// Microseconds of GPU time per kernel launch beyond its roofline time.
    pub launch_us: f64,
}

impl Fractions {
    pub fn of(kernels: Kernels) -> Self {
        match kernels {
            Kernels::Planned => Self {
                gemm: 0.80,
                attention: 0.35,
                vector: 0.35,
                memory: 0.80,
                scan_memory: 0.45,
                launch_us: 2.0,
            },
            Kernels::Current => Self {
                gemm: 0.35,
                attention: 0.15,
                vector: 0.35,
                memory: 0.70,
                scan_memory: 0.45,
                launch_us: 5.0,
            },
        }
    }

    /// These fractions with `spec`'s replaced: `name=value` pairs separated by commas, e.g.
    /// `gemm=0.7,launch_us=3`.
    pub fn with_overrides(mut self, spec: &str) -> Result<Self, String> {
        for pair in spec.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, value) = pair.split_once('=').ok_or_else(|| {
                format!("--fractions: {pair:?} is not name=value (e.g. gemm=0.7)")
            })?;
            let value: f64 = value
                .trim()
                .parse()
                .map_err(|_| format!("--fractions: {name}={value:?}: the value is not a number"))?;
            let slot = match name.trim() {
                "gemm" => &mut self.gemm,
                "attention" => &mut self.attention,
                "vector" => &mut self.vector,
                "memory" => &mut self.memory,
                "scan_memory" => &mut self.scan_memory,
                "launch_us" => &mut self.launch_us,
                other => {
                    return Err(format!(
                        "--fractions: unknown name {other:?}; expected gemm, attention, vector, \
                         memory, scan_memory or launch_us"
                    ));
                }
            };
            let valid = match name.trim() {
                "launch_us" => value >= 0.0 && value.is_finite(),
                _ => value > 0.0 && value <= 1.0,
            };
            if !valid {
                return Err(format!(
                    "--fractions: {name}={value} is out of range (fractions are in (0, 1], \
                     launch_us ≥ 0)"
                ));
            }
            *slot = value;
        }
        Ok(self)
    }
}

/// The op classes of a step, each counted by [`ops`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpClass {
    GemmInProj,
    GemmXProj,
    GemmDtProj,
    GemmOutProj,
    GemmQkv,
    GemmOProj,
    GemmGateUp,
    GemmDown,
    GemmHybridLinear,
    GemmHead,
    Attention,
    ScanForward,
    ScanBackward,
    CausalConv,
    GeluGate,
    RmsNorm,
    OtherElementwise,
    WeightCasts,
    CrossEntropy,
    GradientAccumulation,
    Optimizer,
}

/// Which ceilings bound an op class's work (see [`Fractions`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    Gemm,
    Attention,
    Scan,
    Vector,
}

impl OpClass {
    pub fn name(self) -> &'static str {
        match self {
            OpClass::GemmInProj => "gemm mamba in_proj",
            OpClass::GemmXProj => "gemm mamba x_proj",
            OpClass::GemmDtProj => "gemm mamba dt_proj",
            OpClass::GemmOutProj => "gemm mamba out_proj",
            OpClass::GemmQkv => "gemm attention q/k/v",
            OpClass::GemmOProj => "gemm attention o_proj",
            OpClass::GemmGateUp => "gemm mlp gate/up",
            OpClass::GemmDown => "gemm mlp down",
            OpClass::GemmHybridLinear => "gemm hybrid linear",
            OpClass::GemmHead => "gemm lm head",
            OpClass::Attention => "attention (QK^T, softmax, AV)",
            OpClass::ScanForward => "selective scan forward",
            OpClass::ScanBackward => "selective scan backward",
            OpClass::CausalConv => "causal conv + SiLU",
            OpClass::GeluGate => "GELU gate",
            OpClass::RmsNorm => "RMSNorm",
            OpClass::OtherElementwise => "element-wise: residual, casts, embedding",
            OpClass::WeightCasts => "weight-gradient casts bf16 -> f32",
            OpClass::CrossEntropy => "cross-entropy",
            OpClass::GradientAccumulation => "gradient accumulation",
            OpClass::Optimizer => "optimizer (AdamW)",
        }
    }

    /// The column of a traced step's split this class's time falls in.
    pub fn group(self) -> Group {
        match self {
            OpClass::Attention => Group::Attention,
            OpClass::ScanForward | OpClass::ScanBackward => Group::Scan,
            OpClass::CausalConv | OpClass::GeluGate => Group::Elementwise,
            OpClass::RmsNorm => Group::Norm,
            OpClass::OtherElementwise | OpClass::WeightCasts | OpClass::GradientAccumulation => {
                Group::Other
            }
            OpClass::CrossEntropy => Group::Loss,
            OpClass::Optimizer => Group::Optimizer,
            _ => Group::Gemm,
        }
    }

    fn rate(self) -> Rate {
        match self.group() {
            Group::Gemm => Rate::Gemm,
            Group::Attention => Rate::Attention,
            Group::Scan => Rate::Scan,
            _ => Rate::Vector,
        }
    }
}

/// Op classes as a traced step splits time (`zamba_trace::Category` of the op spans); what no
/// op span covers (Burn's own element-wise ops, casts, gradient sums) is [`Group::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Group {
    Gemm,
    Scan,
    Attention,
    Norm,
    Elementwise,
    Loss,
    Optimizer,
    Other,
}

impl Group {
    pub const ALL: [Group; 8] = [
        Group::Gemm,
        Group::Scan,
        Group::Attention,
        Group::Norm,
        Group::Elementwise,
        Group::Loss,
        Group::Optimizer,
        Group::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Group::Gemm => "gemm",
            Group::Scan => "scan",
            Group::Attention => "attention",
            Group::Norm => "norm",
            Group::Elementwise => "elementwise",
            Group::Loss => "loss",
            Group::Optimizer => "optimizer",
            Group::Other => "other",
        }
    }

    /// The group a trace category's exclusive time belongs to.
    pub fn of_category(category: Category) -> Group {
        match category {
            Category::Gemm => Group::Gemm,
            Category::Scan => Group::Scan,
            Category::Attention => Group::Attention,
            Category::Norm => Group::Norm,
            Category::Elementwise => Group::Elementwise,
            Category::Loss => Group::Loss,
            Category::Optimizer => Group::Optimizer,
            _ => Group::Other,
        }
    }
}

/// What bounds an op class's predicted time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    Compute,
    Memory,
    Launches,
}

/// One op class's cost and predicted time.
#[derive(Clone, Copy, Debug)]
pub struct OpTime {
    pub cost: OpCost,
    pub seconds: f64,
    pub bound: Bound,
}

/// The cost model's answer for one workload, card and kernel set.
#[derive(Clone, Debug)]
pub struct Prediction {
    pub card: Card,
    pub kernels: Kernels,
    pub fractions: Fractions,
    pub tokens: f64,
    /// `FlopsPerToken::train` × tokens.
    pub model_flops: f64,
    pub ops: Vec<OpTime>,
}

impl Prediction {
    pub fn step_seconds(&self) -> f64 {
        self.ops.iter().map(|o| o.seconds).sum()
    }

    pub fn tokens_per_second(&self) -> f64 {
        self.tokens / self.step_seconds()
    }

    /// Model FLOPs per second over the card's dense bf16 peak.
    pub fn mfu(&self) -> f64 {
        self.model_flops / self.step_seconds() / self.card.bf16_flops()
    }

    /// Predicted seconds of the op classes in `group`.
    pub fn group_seconds(&self, group: Group) -> f64 {
        let in_group = self.ops.iter().filter(|o| o.cost.class.group() == group);
        in_group.map(|o| o.seconds).sum()
    }
}

/// Predicts one step of `workload` on `card` with `kernels` at `fractions`.
pub fn predict(
    workload: &Workload,
    card: Card,
    kernels: Kernels,
    fractions: Fractions,
) -> Prediction {
    let ops = ops::count(workload, kernels)
        .into_iter()
        .map(|cost| time(cost, &card, &fractions, workload.precision))
        .collect();
    Prediction {
        card,
        kernels,
        fractions,
        tokens: workload.tokens(),
        model_flops: workload.model_flops(),
        ops,
    }
}

/// The roofline time of `cost` plus its launches. An op with fewer blocks than the card has SMs
/// reaches only that share of the card's rates.
fn time(cost: OpCost, card: &Card, f: &Fractions, precision: Precision) -> OpTime {
    let share = cost
        .blocks
        .map_or(1.0, |blocks| (blocks / card.sms as f64).min(1.0));
    let (peak, compute_fraction, memory_fraction) = match cost.rate {
        Rate::Gemm => (card.tensor_flops(precision), f.gemm, f.memory),
        Rate::Attention => (card.tensor_flops(precision), f.attention, f.memory),
        Rate::Scan => (card.vector_flops(), f.vector, f.scan_memory),
        Rate::Vector => (card.vector_flops(), f.vector, f.memory),
    };
    let compute = cost.flops / (peak * compute_fraction * share);
    let memory = cost.bytes / (card.bandwidth() * memory_fraction * share);
    let launches = cost.launches * f.launch_us * 1e-6;
    let bound = if launches > compute.max(memory) {
        Bound::Launches
    } else if compute >= memory {
        Bound::Compute
    } else {
        Bound::Memory
    };
    OpTime {
        cost,
        seconds: compute.max(memory) + launches,
        bound,
    }
}

#[cfg(test)]
mod tests;
