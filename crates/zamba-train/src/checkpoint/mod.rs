//! Training checkpoints: one directory per step, written under a temporary name and renamed when
//! complete, with a marker file checked on load.
//!
//! ```text
//! <run.dir>/checkpoints/step-00000100/
//!     model/config.json, model/model.safetensors   a transformers ZambaForCausalLM checkpoint (f32)
//!     optimizer/part-00000-of-00004.safetensors …  AdamW moments (and a bf16 run's f32 master
//!                                                   weights) by parameter path (see [`moments`])
//!     trainer.json                                  counters, loader state, optimizer step
//!     config.toml                                   the resolved run config
//!     MANIFEST.json                                 size and blake3 of every file above
//!     COMPLETE                                      written last
//! ```
//! The model is stored in transformers' format so that any checkpoint can be loaded by
//! transformers or used as `[init] from` of a new phase without conversion: the working weights
//! (in a bf16 run, their bf16 values, stored as f32; the f32 master weights a resume continues
//! from are in the optimizer parts). Nothing in a checkpoint depends on the world size that
//! wrote it.
//!
//! With several ranks, rank 0 writes the model, trainer state and config; the optimizer parts are
//! written by rank 0 alone, or under ZeRO-1 by every rank for the moments it owns, all ranks at
//! once. Each rank first copies what it writes to host memory ([`HostShare`]), so that the
//! writing can happen on another thread ([`background`], `checkpoint.async`). Every file is
//! fsynced, then all ranks agree that their parts are on disk, and only then does rank 0 write the
//! manifest and the marker and rename the directory into place. Loading verifies the manifest
//! ([`verify`]): a checkpoint whose bytes changed is never trained from.

pub mod background;
pub mod manifest;
pub mod moments;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use zamba_data::LoaderState;
use zamba_model::hf::{parameters_by_path, save_hf_parameters};
use zamba_model::{HostTensor, SaveDtype, ZambaConfig, ZambaModel};

use crate::data_parallel::{DataParallel, Sharding};
use crate::optim::{AdamW, AdamWParams};
use crate::rank::RankContext;

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
    /// Ranks of the run that wrote the checkpoint (informational: any world size can resume).
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!("{PREFIX}{step:08}"))
}

/// What a checkpoint holds, as one rank has it.
pub struct Snapshot<'a> {
    pub model: &'a ZambaModel,
    pub model_config: &'a ZambaConfig,
    /// This rank's AdamW state — moments, and master weights in a bf16 run — (all of it, or
    /// under ZeRO-1 the ranges it owns).
    pub optimizer: &'a AdamW,
    pub sharding: Sharding,
    pub state: &'a TrainerState,
    /// The resolved run config, as TOML.
    pub resolved_config: &'a str,
}

/// Where a checkpoint is written and where it ends up.
#[derive(Clone, Debug)]
pub struct Target {
    pub run_dir: PathBuf,
    /// `step-N.tmp`, renamed to `final_dir` when sealed.
    pub tmp: PathBuf,
    pub final_dir: PathBuf,
}

impl Target {
    pub fn of(run_dir: &Path, step: u64) -> Self {
        let final_dir = step_dir(run_dir, step);
        Self {
            run_dir: run_dir.to_path_buf(),
            tmp: final_dir.with_extension("tmp"),
            final_dir,
        }
    }
}

/// Writes a checkpoint of step `snapshot.state.step` under `run_dir` (collective: every rank
/// calls it) while the caller waits. Returns the checkpoint's directory. On an error (a full
/// disk, say) the partial `.tmp` directory is removed, earlier checkpoints are untouched, and
/// every rank returns an error. [`background`] writes one while training goes on.
pub fn save(ctx: &RankContext, run_dir: &Path, snapshot: &Snapshot) -> Result<PathBuf> {
    let target = Target::of(run_dir, snapshot.state.step);
    let result = begin(ctx, &target, snapshot).and_then(|share| {
        let written = share.write(&target.tmp);
        let parts = collect_parts(ctx, written, snapshot.sharding)?;
        let sealed = match ctx.is_main() {
            true => seal(&target, &parts),
            false => Ok(()),
        };
        ctx.agree(sealed, "sealing the checkpoint")
    });
    if result.is_err() {
        remove_partial(ctx, &target.tmp, snapshot.sharding);
    }
    result
        .map(|()| target.final_dir)
        .with_context(|| format!("writing checkpoint {}", target.tmp.display()))
}

/// The start of a checkpoint (collective): rank 0 makes the empty `.tmp` directory, and every
/// rank copies what it writes to host memory.
pub fn begin(ctx: &RankContext, target: &Target, snapshot: &Snapshot) -> Result<HostShare> {
    let prepared = match ctx.is_main() {
        true => fresh_dir(&target.tmp),
        false => Ok(()),
    };
    let share = prepared.and_then(|()| HostShare::copy(ctx, snapshot));
    ctx.agree(share, "copying the checkpoint's state to host memory")
}

fn fresh_dir(tmp: &Path) -> Result<()> {
    if tmp.exists() {
        std::fs::remove_dir_all(tmp)
            .with_context(|| format!("removing the stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(tmp).with_context(|| format!("creating {}", tmp.display()))
}

/// After a failed write: rank 0 removes the partial directory; another rank removes what it
/// wrote where rank 0 may not see it.
pub fn remove_partial(ctx: &RankContext, tmp: &Path, sharding: Sharding) {
    if ctx.is_main() {
        if tmp.exists() {
            let _ = std::fs::remove_dir_all(tmp);
        }
        return;
    }
    if let Some((part, parts)) = written_part(ctx, sharding) {
        let path = moments::part_path(tmp, part, parts);
        let _ = std::fs::remove_file(&path);
        // Only if empty: on a shared directory rank 0 removes the rest.
        let _ = std::fs::remove_dir(path.parent().unwrap_or(tmp));
        let _ = std::fs::remove_dir(tmp);
    }
}

/// The optimizer part this rank writes, `(part, parts)`, if it writes one.
fn written_part(ctx: &RankContext, sharding: Sharding) -> Option<(usize, usize)> {
    let parts = part_count(sharding, ctx.world_size);
    match sharding {
        Sharding::Zero1 => Some((ctx.rank, parts)),
        Sharding::Replicated => ctx.is_main().then_some((0, parts)),
    }
}

/// An optimizer part as its writer hashed it.
pub struct WrittenPart {
    pub rank: usize,
    /// Path relative to the checkpoint.
    pub relative: String,
    pub entry: manifest::Entry,
}

/// What rank 0 needs of the model: the parameters on the host, and the files beside them.
struct MainFiles {
    parameters: HashMap<String, HostTensor>,
    model_config: ZambaConfig,
    state: String,
    resolved_config: String,
}

/// One rank's share of a checkpoint, copied to host memory: the model, trainer state and
/// config (rank 0) and this rank's optimizer part (if it writes one). It holds no tensor of a
/// device, so any thread can write it.
pub struct HostShare {
    main: Option<MainFiles>,
    /// `(part, parts, contents)`.
    part: Option<(usize, usize, moments::EncodedPart)>,
}

impl HostShare {
    pub fn copy(ctx: &RankContext, snapshot: &Snapshot) -> Result<Self> {
        let main = match ctx.is_main() {
            true => Some(MainFiles {
                parameters: parameters_by_path(snapshot.model),
                model_config: snapshot.model_config.clone(),
                state: serde_json::to_string_pretty(snapshot.state)?,
                resolved_config: snapshot.resolved_config.to_string(),
            }),
            false => None,
        };
        let part = match written_part(ctx, snapshot.sharding) {
            Some((part, parts)) => {
                let slots = crate::data_parallel::param_slots(snapshot.model);
                let numel: HashMap<&str, usize> =
                    slots.iter().map(|s| (s.path.as_str(), s.numel)).collect();
                let optimizer = snapshot.optimizer;
                let encoded = moments::encode(&optimizer.moments, &optimizer.master, &numel)?;
                Some((part, parts, encoded))
            }
            None => None,
        };
        Ok(Self { main, part })
    }

    /// Writes this rank's files into `tmp` (which rank 0 made), each fsynced; returns the
    /// digest of its optimizer part, which rank 0 checks before sealing.
    pub fn write(self, tmp: &Path) -> Result<Option<manifest::Entry>> {
        if let Some(main) = self.main {
            main.write(tmp)?;
        }
        let Some((part, parts, encoded)) = self.part else {
            return Ok(None);
        };
        let path = moments::part_path(tmp, part, parts);
        encoded.write(&path)?;
        sync_file(&path)?;
        let bytes = manifest::regular_file(&path)?.len();
        manifest::entry(&path, bytes).map(Some)
    }
}

impl MainFiles {
    fn write(self, tmp: &Path) -> Result<()> {
        save_hf_parameters(
            self.parameters,
            &self.model_config,
            &tmp.join("model"),
            SaveDtype::F32,
        )?;
        write_synced(&tmp.join("trainer.json"), self.state.as_bytes())?;
        write_synced(&tmp.join("config.toml"), self.resolved_config.as_bytes())?;
        sync_tree(&tmp.join("model"))
    }
}

/// Once every rank has written its files (collective): fails on every rank if one failed, else
/// gathers the optimizer parts' digests, as their writers hashed them.
pub fn collect_parts(
    ctx: &RankContext,
    written: Result<Option<manifest::Entry>>,
    sharding: Sharding,
) -> Result<Vec<WrittenPart>> {
    let written = ctx.agree(written, "writing the checkpoint's files")?;
    let digests = ctx.gather_digests(written.as_ref())?;
    let parts = part_count(sharding, ctx.world_size);
    Ok(digests
        .into_iter()
        .enumerate()
        .filter_map(|(rank, entry)| {
            let part = match sharding {
                Sharding::Zero1 => rank,
                Sharding::Replicated if rank == 0 => 0,
                Sharding::Replicated => return None,
            };
            let relative = format!(
                "{}/{}",
                moments::OPTIMIZER_DIR,
                moments::part_name(part, parts)
            );
            Some(WrittenPart {
                rank,
                relative,
                entry: entry?,
            })
        })
        .collect())
}

/// How many optimizer parts a checkpoint written by `world` ranks has.
fn part_count(sharding: Sharding, world: usize) -> usize {
    match sharding {
        Sharding::Zero1 => world,
        Sharding::Replicated => 1,
    }
}

/// Rank 0, once every rank's files are durably on disk: the manifest — after checking that
/// every optimizer part is in it, as its writer hashed it — then the marker and the rename
/// into place.
pub fn seal(target: &Target, parts: &[WrittenPart]) -> Result<()> {
    let (tmp, final_dir) = (target.tmp.as_path(), target.final_dir.as_path());
    sync_tree(tmp)?;
    let entries = manifest::write(tmp, &[COMPLETE])?;
    for part in parts {
        match entries.get(&part.relative) {
            None => bail!(
                "{}, written by rank {}, is not in {} as rank 0 sees it: the ranks do not share run.dir \
                 (a data-parallel run needs one run directory that every rank sees)",
                part.relative,
                part.rank,
                tmp.display()
            ),
            Some(seen) if *seen != part.entry => bail!(
                "{}, written by rank {}, is not what rank {} wrote ({} bytes, blake3 {}; rank 0 reads {} bytes, blake3 {})",
                part.relative,
                part.rank,
                part.rank,
                part.entry.bytes,
                part.entry.blake3,
                seen.bytes,
                seen.blake3
            ),
            Some(_) => {}
        }
    }
    let expected: Vec<&str> = parts.iter().map(|p| p.relative.as_str()).collect();
    if let Some(extra) = entries
        .keys()
        .find(|k| k.starts_with(moments::OPTIMIZER_DIR) && !expected.contains(&k.as_str()))
    {
        bail!(
            "{extra} in {} was written by no rank of this run",
            tmp.display()
        );
    }
    write_synced(&tmp.join(COMPLETE), b"")?;
    sync_dir(tmp)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(final_dir)
            .with_context(|| format!("removing the older {}", final_dir.display()))?;
    }
    std::fs::rename(tmp, final_dir)
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    sync_dir(&checkpoints_dir(&target.run_dir))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    sync_file(path)
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
}

/// fsyncs every file and directory under `dir`, `dir` last.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            sync_file(&path)?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Complete checkpoints of a run, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    Ok(step_dirs(run_dir)?
        .into_iter()
        .filter(|(_, path, complete)| *complete && path.extension().is_none())
        .map(|(step, path, _)| (step, path))
        .collect())
}

/// Checkpoint directories of a run that are not complete — interrupted writes, with no
/// completion marker — oldest first.
pub fn incomplete(run_dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(step_dirs(run_dir)?
        .into_iter()
        .filter(|(_, path, complete)| !complete || path.extension().is_some())
        .map(|(_, path, _)| path)
        .collect())
}

/// Every `step-N` (and `step-N.tmp`) directory: (step, path, whether it has its marker).
fn step_dirs(run_dir: &Path) -> Result<Vec<(u64, PathBuf, bool)>> {
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
            .map(|s| s.strip_suffix(".tmp").unwrap_or(s))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let complete = path.join(COMPLETE).exists();
        found.push((step, path, complete));
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

/// A loaded checkpoint, without its optimizer state (see [`load_optimizer`]).
pub struct Loaded {
    pub model_config: ZambaConfig,
    pub model: ZambaModel,
    pub state: TrainerState,
    pub resolved_config: String,
}

/// Whether `dir` is a training checkpoint (as opposed to a plain transformers directory).
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join("trainer.json").exists()
}

/// Checks that `dir` is a complete checkpoint whose files are exactly as written; the error
/// says what is wrong: no such directory, not a checkpoint, an interrupted write, or every file
/// that changed.
pub fn verify(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{}: no such checkpoint directory", dir.display())
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        Ok(meta) if !meta.is_dir() => bail!("{} is not a checkpoint directory", dir.display()),
        Ok(_) => {}
    }
    if !dir.join(COMPLETE).exists() {
        if !is_checkpoint(dir) && !dir.join(manifest::MANIFEST).exists() {
            bail!(
                "{} is not a zamba-train checkpoint (no trainer.json, {}, or {COMPLETE})",
                dir.display(),
                manifest::MANIFEST
            );
        }
        bail!(
            "{} is not a complete checkpoint (no {COMPLETE} marker: it was interrupted while being written); \
             use an earlier checkpoint",
            dir.display()
        );
    }
    manifest::verify(dir)
}

/// Loads the model and trainer state of a checkpoint directory (verify it first with [`verify`]).
pub fn load(dir: &Path, device: &Device) -> Result<Loaded> {
    if !dir.join(COMPLETE).exists() {
        bail!(
            "{} is not a complete checkpoint (no {COMPLETE} marker: it was interrupted while being written); \
             use an earlier checkpoint",
            dir.display()
        );
    }
    let (model_config, model) = zamba_model::load_hf(&dir.join("model"), device)?;
    let state = read_state(dir)?;
    let resolved_config = std::fs::read_to_string(dir.join("config.toml")).unwrap_or_default();
    Ok(Loaded {
        model_config,
        model,
        state,
        resolved_config,
    })
}

/// The trainer state of a checkpoint.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join("trainer.json");
    manifest::regular_file(&path)?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid trainer state", path.display()))
}

/// The AdamW state of a checkpoint for the parameter ranges this rank owns under `dp`: moments,
/// and the master weights of a bf16 run (which [`DataParallel::prepare`] puts to use). Every
/// parameter must have moments once the optimizer has taken a step (`optimizer_step > 0`), and
/// the checkpoint must hold no state for parameters the model does not have.
pub fn load_optimizer(
    dir: &Path,
    params: AdamWParams,
    optimizer_step: u64,
    dp: &DataParallel,
    device: &Device,
) -> Result<AdamW> {
    let numel: HashMap<&str, usize> = dp
        .slots()
        .iter()
        .map(|s| (s.path.as_str(), s.numel))
        .collect();
    let wanted: Vec<_> = dp
        .segments()
        .iter()
        .map(|s| (dp.path(s).to_string(), s.range.clone()))
        .collect();
    let state = moments::read(dir, &numel, &wanted, optimizer_step > 0, device)?;
    let mut optimizer = AdamW::new(params);
    optimizer.step = optimizer_step;
    optimizer.moments = state.moments;
    optimizer.master = state.master;
    Ok(optimizer)
}
