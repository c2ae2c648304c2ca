//! The plain sections of a run config. Every struct rejects unknown keys.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use zamba_model::{ActivationCheckpointing, Precision};

/// `[run]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Shown in logs and plots; defaults to the last component of `dir`.
    #[serde(default)]
    pub name: String,
    /// The run's output directory (metrics.jsonl, checkpoints, resolved config). A relative path
    /// is relative to the working directory; it is made absolute when the config is loaded.
    pub dir: PathBuf,
    /// Seed of model initialisation and of everything random in the trainer (the data order has `data.seed`).
    #[serde(default)]
    pub seed: u64,
}

/// `[init]`: start from trained weights instead of a fresh initialisation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitSection {
    /// A phase-1 checkpoint directory or a transformers Zamba directory (config.json +
    /// safetensors). Relative to the working directory, made absolute at load; it is opened by
    /// the trainer, not when the config is loaded.
    pub from: PathBuf,
    /// Also load AdamW's moments (only from a checkpoint of this trainer).
    #[serde(default)]
    pub load_optimizer: bool,
}

/// `[batch]`: the global batch in `tokens` or in `sequences` (exactly one), and the micro-batch
/// that one rank processes per forward/backward; gradient accumulation is derived.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequences: Option<usize>,
    /// Sequences per forward/backward pass on one rank.
    pub micro_batch: usize,
}

fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.1
}
fn default_clip() -> f64 {
    1.0
}

/// `[optimizer]`: AdamW. Norm weights, biases, A_log, D and dt biases are never decayed;
/// embeddings only with `decay_embeddings`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSection {
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default)]
    pub decay_embeddings: bool,
    /// Global gradient-norm clip; 0 turns clipping off.
    #[serde(default = "default_clip")]
    pub clip_grad_norm: f64,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        Self {
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
            weight_decay: default_weight_decay(),
            decay_embeddings: false,
            clip_grad_norm: default_clip(),
        }
    }
}

fn default_max_skips() -> usize {
    5
}
fn default_spike_window() -> usize {
    128
}

/// `[train]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps of this run (the schedule spans exactly these steps).
    pub steps: usize,
    /// Stop after this many skipped updates (non-finite loss/gradient or loss spike) in a row.
    #[serde(default = "default_max_skips")]
    pub max_consecutive_skips: usize,
    /// Skip the update when the loss is more than this many standard deviations above the mean
    /// of the last `spike_window` losses; absent = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spike_zscore: Option<f64>,
    #[serde(default = "default_spike_window")]
    pub spike_window: usize,
    /// What the backward keeps: `"none"` (every activation) or `"layers"` (each Mamba layer and
    /// each use of the shared block keeps only its input and is recomputed in the backward:
    /// activation memory drops to about one `[micro_batch, seq_len, hidden]` tensor per layer for
    /// about one more forward pass of compute). `--dry-run` prints the estimate both ways.
    #[serde(default)]
    pub activation_checkpointing: ActivationCheckpointing,
}

fn default_keep_last() -> usize {
    2
}

/// `[checkpoint]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Checkpoint every this many optimizer steps; 0 = only at the end of the run (and on SIGINT/SIGTERM).
    pub every: usize,
    /// Keep the newest this many checkpoints…
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// …plus every checkpoint whose step is a multiple of this (0 = none).
    #[serde(default)]
    pub keep_every: usize,
}

fn default_eval_batches() -> usize {
    8
}

/// `[eval]`: held-out loss per data source (the sources' `validation` shards).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Evaluate every this many optimizer steps; 0 = never.
    #[serde(default)]
    pub every: usize,
    /// Micro-batches (of `batch.micro_batch` sequences) per source and evaluation.
    #[serde(default = "default_eval_batches")]
    pub batches: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            every: 0,
            batches: default_eval_batches(),
        }
    }
}

fn default_one() -> usize {
    1
}
fn default_true() -> bool {
    true
}

/// `[logging]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    /// Write a metrics.jsonl line every this many optimizer steps.
    #[serde(default = "default_one")]
    pub every: usize,
    /// Show a progress bar on the terminal.
    #[serde(default = "default_true")]
    pub progress: bool,
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            every: 1,
            progress: true,
        }
    }
}

/// Where the model runs: `"cpu"` (Burn's Flex backend), `"cuda:N"` (`"cuda"` = `"cuda:0"`; a
/// build with `--features cuda`) or `"cube-cpu"` (Burn's CubeCL CPU runtime, which runs the GPU
/// kernels on the CPU; a build with `--features cube-cpu`). See `crate::device`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
    CubeCpu,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::CubeCpu => write!(f, "cube-cpu"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "unknown device {s:?}; expected \"cpu\", \"cuda\", \"cuda:N\" (e.g. \"cuda:0\") or \"cube-cpu\""
            )
        };
        match s {
            "cpu" => Ok(Device::Cpu),
            "cube-cpu" => Ok(Device::CubeCpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(bad),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `[runtime]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    #[serde(default)]
    pub device: Device,
    /// Float type of matmuls and activations: `"fp32"`, or `"bf16"` mixed precision (f32 master
    /// weights and AdamW state; f32 norm statistics, residual stream, scan state, softmax and
    /// loss; see `zamba_model::Precision`). Emulated on CPU devices (bf16 numerics, f32 speed).
    #[serde(default)]
    pub precision: Precision,
    /// CPU threads for the compute pool; absent = all cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Data-parallel ranks sharing the global batch.
    #[serde(default = "default_one")]
    pub world_size: usize,
    /// Peak GFLOP/s of one device, for the MFU column of metrics.jsonl (e.g. 989000 for an H100's
    /// dense bf16; `zamba-train bench peak` measures a CPU's f32 peak). Absent: MFU is not logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_gflops: Option<f64>,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            precision: Precision::Fp32,
            threads: None,
            world_size: 1,
            peak_gflops: None,
        }
    }
}
