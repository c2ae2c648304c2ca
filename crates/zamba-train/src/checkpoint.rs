//! Training checkpoints: one directory per step, written under a temporary name and renamed when
//! complete, with a marker file checked on load.
//!
//! ```text
//! <run.dir>/checkpoints/step-00000100/
//!     model/config.json, model/model.safetensors   a transformers ZambaForCausalLM checkpoint (f32)
//!     optimizer.safetensors                         AdamW moments, "<param path>.m" / ".v"
//!     trainer.json                                  counters, loader state, optimizer step
//!     config.toml                                   the resolved run config
//!     COMPLETE                                      written last
//! ```
//! The model is stored in transformers' format so that any checkpoint can be loaded by
//! transformers or used as `[init] from` of a new phase without conversion.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use zamba_data::LoaderState;
use zamba_model::hf::write_safetensors;
use zamba_model::{HostTensor, SaveDtype, ZambaConfig, ZambaModel, save_hf};

use crate::optim::{AdamW, AdamWParams, Moments};

const COMPLETE: &str = "COMPLETE";
const PREFIX: &str = "step-";

/// Everything besides weights that the next step depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed (the next step to run).
    pub step: u64,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Updates skipped for a non-finite or spiking loss, in a row at save time and in total.
    pub consecutive_skips: u32,
    pub total_skips: u64,
    /// Recent losses for the spike detector (oldest first).
    pub loss_window: Vec<f64>,
    pub optimizer_step: u64,
    pub loader: LoaderState,
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!("{PREFIX}{step:08}"))
}

/// Writes a checkpoint atomically: a `.tmp` directory, the marker last, then a rename.
pub fn save(
    run_dir: &Path,
    model: &ZambaModel,
    model_config: &ZambaConfig,
    optimizer: &AdamW,
    state: &TrainerState,
    resolved_config: &str,
) -> Result<PathBuf> {
    let final_dir = step_dir(run_dir, state.step);
    let tmp = final_dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing the stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    save_hf(model, model_config, &tmp.join("model"), SaveDtype::F32)?;
    let moments: BTreeMap<String, HostTensor> = optimizer
        .moments
        .iter()
        .flat_map(|(path, Moments { m, v })| {
            [
                (format!("{path}.m"), host(m)),
                (format!("{path}.v"), host(v)),
            ]
        })
        .collect();
    write_safetensors(&tmp.join("optimizer.safetensors"), &moments, SaveDtype::F32)?;
    std::fs::write(
        tmp.join("trainer.json"),
        serde_json::to_string_pretty(state)?,
    )?;
    std::fs::write(tmp.join("config.toml"), resolved_config)?;
    sync_dir(&tmp)?;
    std::fs::write(tmp.join(COMPLETE), b"")?;
    sync_dir(&tmp)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    sync_dir(&checkpoints_dir(run_dir))?;
    Ok(final_dir)
}

fn host(t: &Tensor<1>) -> HostTensor {
    let data = t
        .clone()
        .into_data()
        .try_to_vec::<f32>()
        .expect("optimizer moments are f32");
    HostTensor::new(vec![data.len()], data)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Complete checkpoints of a run, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = checkpoints_dir(run_dir);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(step) = name
            .strip_prefix(PREFIX)
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if path.join(COMPLETE).exists() {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Deletes all but the last `keep_last` checkpoints, sparing every `keep_every`-th step.
pub fn prune(run_dir: &Path, keep_last: usize, keep_every: u64) -> Result<()> {
    let all = list(run_dir)?;
    let cut = all.len().saturating_sub(keep_last.max(1));
    for (step, path) in &all[..cut] {
        if keep_every > 0 && step % keep_every == 0 {
            continue;
        }
        std::fs::remove_dir_all(path)
            .with_context(|| format!("removing old checkpoint {}", path.display()))?;
    }
    Ok(())
}

/// A loaded checkpoint.
pub struct Loaded {
    pub model_config: ZambaConfig,
    pub model: ZambaModel,
    pub optimizer: AdamW,
    pub state: TrainerState,
    pub resolved_config: String,
}

/// Whether `dir` is a training checkpoint (as opposed to a plain transformers directory).
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join("trainer.json").exists()
}

/// Loads a complete checkpoint directory.
pub fn load(dir: &Path, optimizer_params: AdamWParams, device: &Device) -> Result<Loaded> {
    if !dir.join(COMPLETE).exists() {
        bail!(
            "{} is not a complete checkpoint (no {COMPLETE} marker: it was interrupted while being written); \
             use an earlier checkpoint",
            dir.display()
        );
    }
    let (model_config, model) = zamba_model::load_hf(&dir.join("model"), device)?;
    let state: TrainerState = serde_json::from_str(
        &std::fs::read_to_string(dir.join("trainer.json"))
            .with_context(|| format!("reading {}/trainer.json", dir.display()))?,
    )
    .with_context(|| {
        format!(
            "{}/trainer.json is not a valid trainer state",
            dir.display()
        )
    })?;
    let resolved_config = std::fs::read_to_string(dir.join("config.toml")).unwrap_or_default();
    let mut optimizer = AdamW::new(optimizer_params);
    optimizer.step = state.optimizer_step;
    optimizer.moments = load_moments(&dir.join("optimizer.safetensors"), device)?;
    Ok(Loaded {
        model_config,
        model,
        optimizer,
        state,
        resolved_config,
    })
}

fn load_moments(path: &Path, device: &Device) -> Result<BTreeMap<String, Moments>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let mut halves: BTreeMap<String, (Option<Tensor<1>>, Option<Tensor<1>>)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let n = data.len();
        let t = Tensor::<1>::from_data(TensorData::new(data, vec![n]), device);
        let (param, which) = name
            .rsplit_once('.')
            .with_context(|| format!("{}: unexpected tensor {name}", path.display()))?;
        let entry = halves.entry(param.to_string()).or_default();
        match which {
            "m" => entry.0 = Some(t),
            "v" => entry.1 = Some(t),
            _ => bail!("{}: unexpected tensor {name}", path.display()),
        }
    }
    halves
        .into_iter()
        .map(|(p, (m, v))| match (m, v) {
            (Some(m), Some(v)) => Ok((p, Moments { m, v })),
            _ => bail!("{}: moments of {p} are incomplete", path.display()),
        })
        .collect()
}
