//! The plain sections of a run config. Every struct rejects unknown keys; the doc comments and
//! `#[schemars(...)]` ranges are the reference (docs/configuration.md) and the range checks.

use super::RunConfig;
use super::error::{ConfigError, ConfigErrorKind};
use super::rules::Section;
use crate::data_parallel::{ReduceDtype, Sharding};
use crate::schedule::ScheduleConfig;
use crate::schema::{MAX_SECONDS, MAX_STEPS};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use zamba_model::{ActivationCheckpointing, Precision};

/// Names the run and where it writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// A label for the run in `--dry-run`, the saved config and sweep summaries; defaults to the
    /// last component of `dir`.
    #[serde(default)]
    pub name: String,
    /// The run's output directory (metrics.jsonl, checkpoints, resolved config). A relative path
    /// is relative to the working directory; it is made absolute when the config is loaded.
    /// Training resumes from the newest checkpoint found here.
    pub dir: PathBuf,
    /// Seed of model initialisation and of everything random in the trainer (the data order has
    /// `data.seed`).
    #[serde(default)]
    pub seed: u64,
}

impl Section for RunSection {}

/// Start from trained weights instead of a fresh initialisation (phase 2, fine-tuning). The
/// step counter, the LR schedule and the data position start at 0; only the weights (and, with
/// `load_optimizer`, AdamW's moments) come from `from`.
///
/// ```toml
/// [init]
/// # The last phase-1 checkpoint (or a transformers Zamba directory).
/// from = "runs/phase1/checkpoints/step-00000300"
/// # Fresh AdamW moments: phase 1's were accumulated under another LR and mixture.
/// load_optimizer = false
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InitSection {
    /// A checkpoint directory of this trainer or a transformers Zamba directory (config.json +
    /// safetensors). Relative to the working directory, made absolute at load; it is opened by
    /// the trainer, not when the config is loaded. Its model config must equal `[model]`.
    pub from: PathBuf,
    /// Also load AdamW's moments (only from a checkpoint of this trainer).
    #[serde(default)]
    pub load_optimizer: bool,
}

impl Section for InitSection {}

/// The most sequences in a global batch.
const MAX_SEQUENCES: usize = 1 << 24;

/// The global batch, in `tokens` or in `sequences` (exactly one), and the micro-batch that one
/// rank processes per forward/backward. Gradient accumulation is derived:
/// `sequences` = `micro_batch` × accumulation steps × `runtime.world_size`, and
/// `tokens` = `sequences` × `data.seq_len`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchSection {
    /// Global batch in tokens per optimizer step; a multiple of `data.seq_len` (alternative to
    /// `sequences`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_SEQUENCES * (1 << 20)))]
    pub tokens: Option<usize>,
    /// Global batch in sequences per optimizer step, over all ranks; a multiple of
    /// `micro_batch` × `runtime.world_size` (alternative to `tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_SEQUENCES))]
    pub sequences: Option<usize>,
    /// Sequences per forward/backward pass on one rank (bounded by memory; the result does not
    /// depend on it).
    #[schemars(range(min = 1, max = 1 << 16))]
    pub micro_batch: usize,
}

impl Section for BatchSection {
    fn validate(&self, run: &RunConfig) -> Result<(), ConfigError> {
        let seq = run.data.seq_len;
        let (key, global) = match (self.tokens, self.sequences) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "batch.tokens",
                    "give the global batch as batch.tokens or batch.sequences, not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::new(
                    ConfigErrorKind::MissingKey,
                    Some("batch.sequences".into()),
                    "missing: give the global batch as batch.sequences or batch.tokens",
                ));
            }
            (Some(t), None) if t % seq != 0 => {
                return Err(ConfigError::invalid(
                    "batch.tokens",
                    format!(
                        "{t} is not a multiple of data.seq_len = {seq}; e.g. {} or {}",
                        (t / seq).max(1) * seq,
                        (t / seq + 1) * seq
                    ),
                ));
            }
            (Some(t), None) => ("batch.tokens", t / seq),
            (None, Some(s)) => ("batch.sequences", s),
        };
        let per_pass = self.micro_batch * run.runtime.world_size;
        if global % per_pass != 0 {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "the global batch of {global} sequences is not divisible by batch.micro_batch ({}) × runtime.world_size ({}) = {per_pass}, \
                     so gradient accumulation would not be a whole number of micro-batches",
                    self.micro_batch, run.runtime.world_size
                ),
            ));
        }
        Ok(())
    }
}

/// AdamW. Norm weights, biases, `A_log`, `D` and the dt biases are never decayed; embeddings
/// only with `decay_embeddings`. The learning rate comes from `[schedule]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSection {
    /// Decay rate of the first-moment (mean) estimate.
    #[schemars(range(min = 0.0), extend("exclusiveMaximum" = 1.0))]
    pub beta1: f64,
    /// Decay rate of the second-moment (uncentred variance) estimate.
    #[schemars(range(min = 0.0), extend("exclusiveMaximum" = 1.0))]
    pub beta2: f64,
    /// Added to the square root of the second moment before dividing.
    #[schemars(extend("exclusiveMinimum" = 0.0), range(max = 1.0))]
    pub eps: f64,
    /// Decoupled weight decay (multiplied by the LR of each step); 0 turns it off.
    #[schemars(range(min = 0.0, max = 1e3))]
    pub weight_decay: f64,
    /// Also decay the (tied) embedding matrix.
    pub decay_embeddings: bool,
    /// Global gradient-norm clip; 0 turns clipping off.
    #[schemars(range(min = 0.0, max = 1e12))]
    pub clip_grad_norm: f64,
    /// ZeRO stage — what is divided over the ranks. 0: nothing; every rank keeps the optimizer
    /// state of every parameter (AdamW's two f32 moments, and with `runtime.precision = "bf16"`
    /// the f32 master weights) and gradients are all-reduced. 1: the optimizer state; each rank
    /// keeps it for ~1/`runtime.world_size` of the parameters, gradients are reduce-scattered to
    /// the rank that owns them and the updated parameters all-gathered (in bf16 under
    /// `"bf16"`); the same weights as 0. At both levels every rank holds all working parameters
    /// and their f32 gradients. Checkpoints are the same either way.
    #[schemars(with = "u8", range(max = 1))]
    pub zero: Sharding,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            decay_embeddings: false,
            clip_grad_norm: 1.0,
            zero: Sharding::Replicated,
        }
    }
}

impl Section for OptimizerSection {}

fn default_max_skips() -> usize {
    5
}
fn default_spike_window() -> usize {
    128
}

/// Length of the run and its guards against bad updates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps of this run; the schedule spans exactly these steps, and the run's tokens
    /// are `steps` × `batch.sequences` × `data.seq_len`.
    #[schemars(range(min = 1, max = MAX_STEPS))]
    pub steps: usize,
    /// Stop after this many skipped updates (non-finite loss/gradient or loss spike) in a row.
    #[serde(default = "default_max_skips")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_consecutive_skips: usize,
    /// Skip the update when the loss is more than this many standard deviations above the mean
    /// of the last `spike_window` losses; absent = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("exclusiveMinimum" = 0.0), range(max = 1e6))]
    pub spike_zscore: Option<f64>,
    /// Recent losses the spike test compares against; the test starts once the window is full
    /// (the window is saved with every checkpoint).
    #[serde(default = "default_spike_window")]
    #[schemars(range(min = 2, max = 100_000))]
    pub spike_window: usize,
    /// What the backward keeps: `"none"` (every activation) or `"layers"` (each Mamba layer and
    /// each use of the shared block keeps only its input and is recomputed in the backward:
    /// activation memory drops to about one `[micro_batch, seq_len, hidden]` tensor per layer for
    /// about one more forward pass of compute). `--dry-run` prints the estimate both ways.
    #[serde(default)]
    #[schemars(with = "String", extend("enum" = ["none", "layers"]))]
    pub activation_checkpointing: ActivationCheckpointing,
    /// Trace the optimizer steps `[first, last]` (inclusive; numbered from 0 as in
    /// metrics.jsonl): each rank writes their spans — per op class and per layer, forward,
    /// backward, recompute, gradient buckets and their communication, optimizer, checkpoint — as
    /// Chrome-trace JSON to `run.dir/traces/steps-FIRST-LAST.rank-R.json` (open it in
    /// ui.perfetto.dev or chrome://tracing), and rank 0 prints their time split by op class.
    /// While tracing, the device is synchronised at every span boundary, so the traced steps
    /// run slower; the other steps are untouched. Absent = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_steps: Option<[usize; 2]>,
}

impl Section for TrainSection {
    fn validate(&self, run: &RunConfig) -> Result<(), ConfigError> {
        let total = self.steps as u128 * run.tokens_per_step() as u128;
        if total > u64::MAX as u128 {
            return Err(ConfigError::invalid(
                "train.steps",
                format!(
                    "{} steps of {} tokens are {total} tokens, more than a 64-bit count holds",
                    self.steps,
                    run.tokens_per_step()
                ),
            ));
        }
        let Some([first, last]) = self.profile_steps else {
            return Ok(());
        };
        if first > last {
            return Err(ConfigError::invalid(
                "train.profile_steps",
                format!(
                    "is [{first}, {last}]; the first step to trace must not come after the last"
                ),
            ));
        }
        if last >= self.steps {
            return Err(ConfigError::invalid(
                "train.profile_steps",
                format!(
                    "ends at step {last}, but the run's steps are 0 to {} (train.steps = {}); trace steps within the run",
                    self.steps - 1,
                    self.steps
                ),
            ));
        }
        Ok(())
    }
}

/// Checkpoints in `run.dir/checkpoints/step-NNNNNNNN` (transformers weights + optimizer and
/// data state). One is always written after the last step and on SIGINT/SIGTERM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Also checkpoint every this many optimizer steps; 0 = only at the end (and on a signal).
    #[schemars(range(max = MAX_STEPS))]
    pub every: usize,
    /// Keep the newest this many checkpoints (plus those `keep_every` keeps); older ones are deleted.
    #[schemars(range(min = 1, max = MAX_STEPS))]
    pub keep_last: usize,
    /// Also keep, however old, every checkpoint whose step is a multiple of this (0 = none).
    #[schemars(range(max = MAX_STEPS))]
    pub keep_every: usize,
    /// Write checkpoints in the background: the step loop copies the state to host memory and
    /// trains on while a thread per rank writes and hashes that rank's files; rank 0 seals the
    /// checkpoint (manifest, `COMPLETE`, rename) once every rank's files are on disk, and the
    /// step boundary after that reports it. One write at a time (the next checkpoint waits for
    /// the previous one); the last checkpoint and the one on a signal are waited for before the
    /// run ends. Costs host memory for one copy of the state each rank writes. `false`: the step
    /// loop waits for the whole write. Absent: `true` when `runtime.device` is `"cuda"`, `false`
    /// on the CPU, where the writer would compete with training for the same cores and memory.
    #[serde(rename = "async", skip_serializing_if = "Option::is_none")]
    pub asynchronous: Option<bool>,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every: 1000,
            keep_last: 2,
            keep_every: 0,
            asynchronous: None,
        }
    }
}

impl Section for CheckpointSection {}

/// Held-out loss per data source, on the sources' `validation` shards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Evaluate every this many optimizer steps and after the last; 0 = never. Needs
    /// `validation` shards on at least one data source.
    #[schemars(range(max = MAX_STEPS))]
    pub every: usize,
    /// Micro-batches (of `batch.micro_batch` sequences) per source and evaluation.
    #[schemars(range(min = 1, max = 1 << 20))]
    pub batches: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            every: 0,
            batches: 8,
        }
    }
}

impl Section for EvalSection {
    fn validate(&self, run: &RunConfig) -> Result<(), ConfigError> {
        if self.every > 0 && run.data.sources.values().all(|s| s.validation.is_empty()) {
            return Err(ConfigError::invalid(
                "eval.every",
                "is set but no data source lists `validation` shards; add data.sources.NAME.validation or set eval.every = 0",
            ));
        }
        Ok(())
    }
}

/// What the run reports while it trains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    /// Write a metrics.jsonl line every this many optimizer steps.
    #[schemars(range(min = 1, max = MAX_STEPS))]
    pub every: usize,
    /// Show a progress bar (step, loss, LR, tokens/s, ETA) on stderr.
    pub progress: bool,
    /// Also write every metrics.jsonl record, and the resolved config as text, to TensorBoard
    /// event files in `run.dir/tensorboard/` (watch runs with `tensorboard --logdir runs/`).
    pub tensorboard: bool,
    /// Write the ids of the samples every step trained on (source and window of each row of the
    /// global batch) to `run.dir/samples.jsonl`, to check that resumed and restarted runs neither
    /// repeat nor skip data. Costs one small all-gather per step.
    pub sample_ids: bool,
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            every: 1,
            progress: true,
            tensorboard: true,
            sample_ids: false,
        }
    }
}

impl Section for LoggingSection {}

/// Data parallelism across ranks (see docs/distributed.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DistSection {
    /// Gradients are averaged over the ranks in flat buckets of up to this many MiB (f32): a few
    /// large collectives per optimizer step instead of one per parameter.
    #[schemars(extend("exclusiveMinimum" = 0.0), range(max = 65_536.0))]
    pub bucket_mb: f64,
    /// Seconds a collective (or the rendezvous) waits for the slowest rank; past it every rank
    /// fails with a message naming the rank(s) that died or hang, and the run exits non-zero.
    /// It must exceed the longest time one rank works while the others wait (a checkpoint, an
    /// evaluation).
    #[schemars(extend("exclusiveMinimum" = 0.0), range(max = MAX_SECONDS))]
    pub timeout_s: f64,
    /// After SIGINT/SIGTERM, seconds a rank keeps waiting in a collective of the step for the
    /// other ranks (which got the signal too and come to checkpoint); past it the rank gives up
    /// on them (a hung rank) and exits without a checkpoint of this step. Checkpoint writes are
    /// not cut short by a first signal; a second signal stops every wait at once.
    #[schemars(extend("exclusiveMinimum" = 0.0), range(max = MAX_SECONDS))]
    pub signal_grace_s: f64,
    /// Float type gradients travel in between ranks: `"f32"`, or `"bf16"` (half the bytes on the
    /// wire; each rank's contribution and the reduced value are rounded to bf16 once). Either
    /// way gradients are summed over micro-batches in f32 before and read back into f32 on the
    /// rank that applies them.
    #[schemars(with = "String", extend("enum" = ["f32", "bf16"]))]
    pub grad_reduce_dtype: ReduceDtype,
    /// Reduce gradients on a communication thread while the backward of the step's last
    /// micro-batch goes on, each bucket as soon as its gradients are final (with
    /// `runtime.activation_checkpointing = "layers"`; without it the reduction starts when the
    /// backward ends). `false` reduces after the backward. The results are the same bit for bit.
    pub overlap_grad_reduce: bool,
}

impl Default for DistSection {
    fn default() -> Self {
        Self {
            bucket_mb: 25.0,
            timeout_s: 300.0,
            signal_grace_s: 10.0,
            grad_reduce_dtype: ReduceDtype::F32,
            overlap_grad_reduce: true,
        }
    }
}

impl Section for DistSection {}

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

/// Most compute threads a process may ask for (`runtime.threads`, `RAYON_NUM_THREADS`).
pub const MAX_THREADS: usize = 4096;

/// The machine: device, CPU threads, data-parallel ranks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSection {
    /// `"cpu"` (Burn's Flex backend), `"cuda:N"` (`"cuda"` = `"cuda:0"`; a build with
    /// `--features cuda`) or `"cube-cpu"` (the CubeCL CPU runtime, which runs the GPU kernels on
    /// the CPU; a build with `--features cube-cpu`).
    #[schemars(with = "String")]
    pub device: Device,
    /// Float type of matmuls and activations: `"fp32"`, or `"bf16"` mixed precision: bf16
    /// working parameters on every rank, f32 master weights and AdamW state (sharded with
    /// `optimizer.zero = 1`), gradients summed in f32; f32 norm statistics, residual stream,
    /// scan state, softmax and loss (see `zamba_model::Precision`). Emulated on CPU devices
    /// (bf16 numerics, f32 speed).
    #[schemars(with = "String", extend("enum" = ["fp32", "bf16"]))]
    pub precision: Precision,
    /// CPU threads for the compute pool; absent = all cores.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_THREADS))]
    pub threads: Option<usize>,
    /// Data-parallel ranks sharing the global batch (see `[batch]`). Under `zamba-train launch`,
    /// torchrun or SLURM the launcher's world size is used (this key must then be 1 or equal to
    /// it); on the CPU without a launcher, a world size above 1 runs the ranks as threads of one
    /// process.
    #[schemars(range(min = 1, max = 1 << 20))]
    pub world_size: usize,
    /// Peak GFLOP/s of one device, for the MFU column of metrics.jsonl (e.g. 989000 for an H100's
    /// dense bf16). Absent: on CPU the f32 GEMM peak of the fastest library on the machine is
    /// measured at start (as `zamba-train bench peak` does, at the step's shapes: under a
    /// second); on GPUs MFU is not logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("exclusiveMinimum" = 0.0), range(max = 1e9))]
    pub peak_gflops: Option<f64>,
    /// Memory of one rank's device in GB (10⁹ bytes). A run whose estimated memory per rank
    /// (`--dry-run`'s `memory/rank total` line) exceeds 90% of it is refused before anything is
    /// allocated. Absent: a CUDA device's own memory (80 where it cannot be read, e.g. a dry run
    /// on a machine without the GPU); on the CPU the host's memory divided by the ranks on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("exclusiveMinimum" = 0.0), range(max = 1e6))]
    pub device_memory_gb: Option<f64>,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            precision: Precision::Fp32,
            threads: None,
            world_size: 1,
            peak_gflops: None,
            device_memory_gb: None,
        }
    }
}

impl Section for RuntimeSection {}

/// The rules of each schedule kind live with the kinds, in `crate::schedule`.
impl Section for ScheduleConfig {
    fn validate(&self, run: &RunConfig) -> Result<(), ConfigError> {
        ScheduleConfig::validate(self, run.train.steps)
            .map_err(|e| ConfigError::invalid(format!("schedule.{}", e.field), e.message))
    }
}
