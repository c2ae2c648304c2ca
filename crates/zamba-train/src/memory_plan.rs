//! Whether a run fits its devices, decided from the config before anything is allocated: the
//! memory one rank needs (the training state as [`crate::data_parallel`] lays it out, one
//! micro-batch's activations, the communication buffers) against the memory of its device.
//! `--dry-run` prints it as one line; the trainer and `--dry-run` refuse a run that does not
//! fit, saying which change would make it fit.

use anyhow::{Result, bail};
use zamba_model::memory::ActivationMemory;
use zamba_model::param_table::param_table;
use zamba_model::{ActivationCheckpointing, Precision};

use crate::config::{Device, RunConfig};
use crate::data_parallel::{
    ReduceDtype, Sharding, StateBytes, bucket_capacity, bucket_slots, communication_bytes,
};
use crate::device::attention_kernel;

/// The share of a device's memory the estimate may use. The rest is for what it does not
/// count: the CUDA context and NCCL's buffers (about 1 GB), the allocator's fragmentation, the
/// data loader's host memory on CPU devices.
pub const USABLE_FRACTION: f64 = 0.9;

/// Device memory assumed where it cannot be read (a dry run away from the GPU): an H100's.
pub const DEFAULT_DEVICE_GB: f64 = 80.0;

/// The choices of a run config that set its memory per rank.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryChoices {
    pub precision: Precision,
    pub sharding: Sharding,
    pub micro_batch: usize,
    pub checkpointing: ActivationCheckpointing,
    pub transport: ReduceDtype,
}

impl MemoryChoices {
    pub fn of(c: &RunConfig) -> Self {
        Self {
            precision: c.runtime.precision,
            sharding: c.optimizer.zero,
            micro_batch: c.batch.micro_batch,
            checkpointing: c.train.activation_checkpointing,
            transport: c.dist.grad_reduce_dtype,
        }
    }
}

/// Estimated bytes one rank holds at its peak.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankMemory {
    pub state: StateBytes,
    /// One micro-batch's activations at the backward's peak.
    pub activations: f64,
    /// The collectives' buffers of the largest bucket.
    pub communication: f64,
}

impl RankMemory {
    pub fn of(c: &RunConfig, choices: MemoryChoices) -> Self {
        let model = c.model_config();
        let world = c.runtime.world_size;
        let numels: Vec<usize> = param_table(model)
            .iter()
            .map(|p| p.shape().iter().product())
            .collect();
        let num_params: usize = numels.iter().sum();
        let bucket_bytes = (c.dist.bucket_mb * (1 << 20) as f64) as usize;
        let largest_bucket = bucket_slots(&numels, bucket_capacity(bucket_bytes))
            .into_iter()
            .map(|slots| numels[slots].iter().sum::<usize>())
            .max()
            .unwrap_or(0);
        let activations = ActivationMemory::of(
            model,
            choices.micro_batch,
            c.data.seq_len,
            choices.precision,
            choices.checkpointing,
            attention_kernel(c.runtime.device),
        );
        Self {
            state: StateBytes::per_param(choices.precision, choices.sharding, world)
                .times(num_params as u64),
            activations: activations.peak(),
            communication: communication_bytes(largest_bucket, choices.transport, world),
        }
    }

    pub fn total(&self) -> f64 {
        self.state.total() + self.activations + self.communication
    }
}

/// The memory of one rank's device, and where the figure comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceMemory {
    pub bytes: f64,
    pub source: String,
}

impl DeviceMemory {
    /// `runtime.device_memory_gb`, else the device's own: a CUDA device's total memory (80 GB
    /// where it cannot be read), or on the CPU the host's memory divided by the
    /// `ranks_on_host` ranks that share it.
    pub fn of(c: &RunConfig, ranks_on_host: usize) -> Self {
        if let Some(gb) = c.runtime.device_memory_gb {
            return Self {
                bytes: gb * 1e9,
                source: "runtime.device_memory_gb".into(),
            };
        }
        match c.runtime.device {
            Device::Cuda(index) => match zamba_dist::cuda_device_memory(index) {
                Some(bytes) => Self {
                    bytes: bytes as f64,
                    source: format!("cuda:{index}'s memory"),
                },
                None => Self {
                    bytes: DEFAULT_DEVICE_GB * 1e9,
                    source: format!(
                        "cuda:{index}'s memory cannot be read here, {DEFAULT_DEVICE_GB} GB assumed; set runtime.device_memory_gb"
                    ),
                },
            },
            Device::Cpu | Device::CubeCpu => {
                let ranks = ranks_on_host.max(1);
                match host_memory_bytes() {
                    Some(bytes) => Self {
                        bytes: bytes as f64 / ranks as f64,
                        source: match ranks {
                            1 => "the host's memory".into(),
                            n => format!("the host's memory shared by {n} ranks"),
                        },
                    },
                    None => Self {
                        bytes: DEFAULT_DEVICE_GB * 1e9,
                        source: format!(
                            "the host's memory cannot be read, {DEFAULT_DEVICE_GB} GB assumed; set runtime.device_memory_gb"
                        ),
                    },
                }
            }
        }
    }

    pub fn usable(&self) -> f64 {
        USABLE_FRACTION * self.bytes
    }
}

/// The host's memory (Linux `MemTotal`).
fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A run's memory per rank against its device.
pub struct Fit {
    pub memory: RankMemory,
    pub device: DeviceMemory,
}

fn gb(bytes: f64) -> String {
    format!("{:.2} GB", bytes / 1e9)
}

impl Fit {
    pub fn of(c: &RunConfig, ranks_on_host: usize) -> Self {
        Self {
            memory: RankMemory::of(c, MemoryChoices::of(c)),
            device: DeviceMemory::of(c, ranks_on_host),
        }
    }

    pub fn fits(&self) -> bool {
        self.memory.total() <= self.device.usable()
    }

    /// `memory/rank total … GB (…): fits …` — what `--dry-run` prints.
    pub fn line(&self, c: &RunConfig) -> String {
        let m = &self.memory;
        let s = &m.state;
        let sharded = match c.optimizer.zero {
            Sharding::Zero1 => format!("divided over {} ranks", c.runtime.world_size),
            Sharding::Replicated => "on every rank".into(),
        };
        let verdict = match self.fits() {
            true => "fits in",
            false => "DOES NOT FIT in",
        };
        let spare = match self.fits() {
            true => format!(
                ", {} to spare",
                gb(self.device.usable() - self.memory.total())
            ),
            false => String::new(),
        };
        format!(
            "memory/rank  total {} = parameters {} ({}) + gradients {} (f32) + master weights {} + AdamW moments {} \
             (optimizer state {sharded}) + activations {} (micro-batch {}, {}) + communication buffers {} \
             (estimate); {verdict} {} usable ({:.0}% of {}: {}){spare}",
            gb(m.total()),
            gb(s.params),
            c.runtime.precision,
            gb(s.grads),
            gb(s.master),
            gb(s.moments),
            gb(m.activations),
            c.batch.micro_batch,
            c.train.activation_checkpointing,
            gb(m.communication),
            gb(self.device.usable()),
            100.0 * USABLE_FRACTION,
            gb(self.device.bytes),
            self.device.source,
        )
    }

    /// An error that says why the run does not fit and which changes would make it fit.
    pub fn check(&self, c: &RunConfig) -> Result<()> {
        if self.fits() {
            return Ok(());
        }
        let changes = fitting_changes(c, self.device.usable());
        bail!(
            "the run does not fit its device: it needs an estimated {} per rank, more than the {} usable \
             ({:.0}% of {}: {}).\n{}\nTo make it fit: {}",
            gb(self.memory.total()),
            gb(self.device.usable()),
            100.0 * USABLE_FRACTION,
            gb(self.device.bytes),
            self.device.source,
            self.line(c),
            changes
        )
    }
}

/// The changes of one memory choice that make the run fit `usable` bytes (each with its total),
/// or all of them together, or what is left.
fn fitting_changes(c: &RunConfig, usable: f64) -> String {
    let current = MemoryChoices::of(c);
    let mut all = current;
    let mut options: Vec<(String, MemoryChoices)> = Vec::new();
    if let Some(m) = smaller_micro_batch(c, usable) {
        options.push((
            format!("batch.micro_batch = {m} (more gradient accumulation, the same results)"),
            MemoryChoices {
                micro_batch: m,
                ..current
            },
        ));
        all.micro_batch = m;
    }
    if current.sharding == Sharding::Replicated && c.runtime.world_size > 1 {
        let zero = MemoryChoices {
            sharding: Sharding::Zero1,
            ..current
        };
        options.push((
            "optimizer.zero = 1 (shard the optimizer state)".into(),
            zero,
        ));
        all.sharding = Sharding::Zero1;
    }
    if current.checkpointing == ActivationCheckpointing::None {
        let layers = MemoryChoices {
            checkpointing: ActivationCheckpointing::Layers,
            ..current
        };
        options.push((
            "train.activation_checkpointing = \"layers\" (recompute each layer in the backward)"
                .into(),
            layers,
        ));
        all.checkpointing = ActivationCheckpointing::Layers;
    }
    if current.precision == Precision::Fp32 {
        let bf16 = MemoryChoices {
            precision: Precision::Bf16,
            ..current
        };
        options.push(("runtime.precision = \"bf16\"".into(), bf16));
        all.precision = Precision::Bf16;
    }
    let total = |choices| RankMemory::of(c, choices).total();
    let fitting: Vec<String> = options
        .iter()
        .filter(|(_, choices)| total(*choices) <= usable)
        .map(|(what, choices)| format!("{what} → {}", gb(total(*choices))))
        .collect();
    if !fitting.is_empty() {
        return format!("{}.", fitting.join("; or "));
    }
    let together = options.iter().map(|(what, _)| what.as_str());
    let together = together.collect::<Vec<_>>().join(" and ");
    match options.is_empty() {
        false if total(all) <= usable => format!("{together}, together → {}.", gb(total(all))),
        _ => format!(
            "no change of micro-batch, sharding, recomputation or precision is enough (the smallest is {}): \
             use more ranks with optimizer.zero = 1, a shorter data.seq_len, a smaller model or a device with \
             more memory (runtime.device_memory_gb, if the device has more than assumed).",
            gb(total(all))
        ),
    }
}

/// The largest micro-batch below the configured one that divides the batch and makes the run
/// fit, else the smallest valid one (if smaller than the configured).
fn smaller_micro_batch(c: &RunConfig, usable: f64) -> Option<usize> {
    let per_rank = c.global_sequences() / c.runtime.world_size.max(1);
    let valid: Vec<usize> = (1..c.batch.micro_batch)
        .rev()
        .filter(|m| per_rank.is_multiple_of(*m))
        .collect();
    let fits = |m: usize| {
        let choices = MemoryChoices {
            micro_batch: m,
            ..MemoryChoices::of(c)
        };
        RankMemory::of(c, choices).total() <= usable
    };
    valid
        .iter()
        .copied()
        .find(|&m| fits(m))
        .or(valid.last().copied())
}
