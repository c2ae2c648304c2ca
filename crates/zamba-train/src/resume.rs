//! Where a run starts from: a checkpoint of its own (`--resume DIR`, else the newest one in
//! `run.dir` that the trainer accepts), `[init] from` (a new phase from earlier weights), or a
//! fresh initialisation. Rank 0 chooses; every rank loads the same.
//!
//! A checkpoint is accepted when its manifest verifies, its trainer state reads, its model is
//! the configured architecture and its optimizer parts cover the model's parameters exactly.
//! Without `--resume`, a checkpoint that is refused for any of these is skipped with the reason
//! and the next older one is tried.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use zamba_model::param_table::param_table;
use zamba_model::{RandomInit, ZambaConfig, ZambaModel};

use crate::checkpoint::{self, TrainerState, moments};
use crate::config::RunConfig;
use crate::rank::RankContext;

/// What the run starts from (the optimizer state is loaded once the parameter layout is known).
pub struct Start {
    pub model: ZambaModel,
    pub state: Option<TrainerState>,
    /// A checkpoint whose AdamW moments to restore, and its optimizer step.
    pub moments_from: Option<(PathBuf, u64)>,
    pub description: String,
}

/// The checkpoint to resume from, decided by rank 0 and the same on every rank.
pub fn agreed_resume_dir(
    ctx: &RankContext,
    config: &RunConfig,
    requested: Option<&Path>,
) -> Result<Option<PathBuf>> {
    let choice = match ctx.is_main() {
        true => resume_dir(config, requested).map(|dir| {
            let text = dir.map(|d| d.to_string_lossy().into_owned());
            Some(text.unwrap_or_default().into_bytes())
        }),
        false => Ok(None),
    };
    let choice = ctx.agree(choice, "choosing the checkpoint to resume from")?;
    let bytes = ctx.comm.broadcast_bytes(choice, 0)?;
    let text = String::from_utf8(bytes).context("the resume path from rank 0 is not UTF-8")?;
    Ok((!text.is_empty()).then(|| PathBuf::from(text)))
}

/// `--resume` (which must be accepted), else the newest accepted checkpoint of the run; says
/// which newer ones were skipped and why.
fn resume_dir(config: &RunConfig, requested: Option<&Path>) -> Result<Option<PathBuf>> {
    if let Some(dir) = requested {
        accept(dir, config).context("refusing to resume from it (--resume)")?;
        return Ok(Some(dir.to_path_buf()));
    }
    let run_dir = &config.run.dir;
    for dir in checkpoint::incomplete(run_dir)? {
        eprintln!(
            "warning: skipping {}: no completion marker (a checkpoint write that was interrupted)",
            dir.display()
        );
    }
    let mut refused = 0;
    for (_, dir) in checkpoint::list(run_dir)?.into_iter().rev() {
        match accept(&dir, config) {
            Ok(()) => {
                if refused > 0 {
                    eprintln!(
                        "warning: skipped {refused} newer checkpoint(s) (see above); resuming from {}",
                        dir.display()
                    );
                }
                return Ok(Some(dir));
            }
            Err(e) => {
                eprintln!("warning: skipping {}: {e:#}", dir.display());
                refused += 1;
            }
        }
    }
    if refused > 0 {
        bail!(
            "no checkpoint in {} can be resumed from (see the warnings above); restore one, or move the checkpoints \
             away to start afresh",
            checkpoint::checkpoints_dir(run_dir).display()
        );
    }
    Ok(None)
}

/// Whether the trainer can resume from `dir` with `config`: every check short of loading.
fn accept(dir: &Path, config: &RunConfig) -> Result<()> {
    checkpoint::verify(dir)?;
    let state = checkpoint::read_state(dir)?;
    let saved = ZambaConfig::from_json_file(&dir.join("model/config.json"))?;
    ensure_same_model(&saved, config.model_config(), dir)?;
    let table = param_table(config.model_config());
    let numel = table
        .iter()
        .map(|p| (p.path.as_str(), p.shape().iter().product()))
        .collect();
    moments::check(dir, &numel, state.optimizer_step > 0)
}

/// Resume (from `resume`), `[init] from` (a new phase from earlier weights), or a fresh
/// initialisation — in that order of precedence.
pub fn starting_point(
    config: &RunConfig,
    resume: Option<PathBuf>,
    device: &Device,
) -> Result<Start> {
    let model_config = config.model_config();
    if let Some(dir) = resume {
        let loaded = checkpoint::load(&dir, device)?;
        ensure_same_model(&loaded.model_config, model_config, &dir)?;
        let description = format!(
            "resuming from {} (step {}, {} tokens, written by {} rank(s)): weights, AdamW moments, data position and counters restored",
            dir.display(),
            loaded.state.step,
            loaded.state.tokens,
            loaded.state.world_size
        );
        let optimizer_step = loaded.state.optimizer_step;
        return Ok(Start {
            model: loaded.model,
            state: Some(loaded.state),
            moments_from: Some((dir, optimizer_step)),
            description,
        });
    }
    if config.init.is_some() {
        return initialised_from(config, device);
    }
    let model =
        ZambaModel::from_source(model_config, &mut RandomInit::new(config.run.seed), device)?;
    Ok(Start {
        description: format!(
            "fresh model: {} parameters, initialised with seed {}",
            model.num_params(),
            config.run.seed
        ),
        model,
        state: None,
        moments_from: None,
    })
}

/// `[init] from`: weights (and optionally moments) of a checkpoint, or a transformers model.
fn initialised_from(config: &RunConfig, device: &Device) -> Result<Start> {
    let init = config.init.as_ref().expect("an [init] section");
    let from = &init.from;
    let model_config = config.model_config();
    if checkpoint::is_checkpoint(from) {
        checkpoint::verify(from).context("refusing to initialise from it ([init] from)")?;
        let loaded = checkpoint::load(from, device)?;
        ensure_same_model(&loaded.model_config, model_config, from)?;
        let (moments_from, moments) = if init.load_optimizer {
            (
                Some((from.clone(), loaded.state.optimizer_step)),
                "and AdamW moments",
            )
        } else {
            (None, "(AdamW moments NOT loaded: fresh optimizer state)")
        };
        let description = format!(
            "initialised from {} (its step {}): model weights {moments}; step counter 0, LR from this config's \
             schedule, data from this config's mixture — nothing else taken from the old run",
            from.display(),
            loaded.state.step
        );
        return Ok(Start {
            model: loaded.model,
            state: None,
            moments_from,
            description,
        });
    }
    if init.load_optimizer {
        bail!(
            "init.load_optimizer = true, but {} is a transformers checkpoint, which has no optimizer state; \
             set init.load_optimizer = false or point init.from at a zamba-train checkpoint",
            from.display()
        );
    }
    let (hf_config, model) = zamba_model::load_hf(from, device)?;
    ensure_same_model(&hf_config, model_config, from)?;
    let description = format!(
        "initialised from transformers checkpoint {}: model weights only; fresh optimizer, step 0, this config's schedule and data",
        from.display()
    );
    Ok(Start {
        model,
        state: None,
        moments_from: None,
        description,
    })
}

type Describe = fn(&ZambaConfig) -> String;

/// The `[model]` keys that decide the shapes of the weights, as the config resolves them.
const ARCHITECTURE: &[(&str, Describe)] = &[
    ("vocab_size", |c| c.vocab_size.to_string()),
    ("hidden_size", |c| c.hidden_size.to_string()),
    ("num_hidden_layers", |c| c.num_hidden_layers.to_string()),
    ("intermediate_size", |c| c.intermediate_size.to_string()),
    ("num_attention_heads", |c| c.num_attention_heads.to_string()),
    ("num_key_value_heads", |c| c.num_key_value_heads.to_string()),
    ("attention_head_dim", |c| c.attention_head_dim().to_string()),
    ("n_mamba_heads", |c| c.n_mamba_heads.to_string()),
    ("mamba_d_state", |c| c.mamba_d_state.to_string()),
    ("mamba_d_conv", |c| c.mamba_d_conv.to_string()),
    ("mamba_expand", |c| c.mamba_expand.to_string()),
    ("mamba_dt_rank", |c| c.dt_rank().to_string()),
    ("mamba_conv_bias", |c| c.mamba_conv_bias.to_string()),
    ("mamba_proj_bias", |c| c.mamba_proj_bias.to_string()),
    (
        "the layer layout (attn_layer_period, attn_layer_offset, layers_block_type)",
        |c| format!("{:?}", c.layer_kinds()),
    ),
];

/// The architecture of loaded weights must be the one the config describes; the error names
/// every `[model]` key that differs, with both values.
pub fn ensure_same_model(
    loaded: &ZambaConfig,
    configured: &ZambaConfig,
    source: &Path,
) -> Result<()> {
    let differences: Vec<String> = ARCHITECTURE
        .iter()
        .filter(|(_, value)| value(loaded) != value(configured))
        .map(|(key, value)| {
            format!(
                "model.{key} is {} there but {} in the config",
                value(loaded),
                value(configured)
            )
        })
        .collect();
    if !differences.is_empty() {
        bail!(
            "the weights in {} are of a different architecture than [model] describes: {}; make [model] match the checkpoint",
            source.display(),
            differences.join("; ")
        );
    }
    let shapes = |c: &ZambaConfig| -> Vec<(String, Vec<usize>)> {
        param_table(c)
            .into_iter()
            .map(|p| {
                let shape = p.shape();
                (p.path, shape)
            })
            .collect()
    };
    if let Some((ours, theirs)) = shapes(configured)
        .into_iter()
        .zip(shapes(loaded))
        .find(|(a, b)| a != b)
    {
        bail!(
            "the weights in {} do not fit [model]: parameter {} is {:?} there, but [model] makes {} {:?}",
            source.display(),
            theirs.0,
            theirs.1,
            ours.0,
            ours.1
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_different_architecture_names_the_key_and_both_values() {
        let configured = ZambaConfig::preset("zamba-tiny").unwrap();
        let mut loaded = configured.clone();
        loaded.num_attention_heads *= 2;
        loaded.num_key_value_heads = loaded.num_attention_heads;
        loaded.attention_head_dim = Some(configured.attention_head_dim() / 2);
        let e = format!(
            "{:#}",
            ensure_same_model(&loaded, &configured, Path::new("ckpt")).unwrap_err()
        );
        let heads = format!(
            "model.num_attention_heads is {} there but {} in the config",
            loaded.num_attention_heads, configured.num_attention_heads
        );
        assert!(e.contains(&heads), "{e}");
        assert!(e.contains("model.attention_head_dim"), "{e}");
        assert!(!e.contains("model.hidden_size"), "{e}");
        ensure_same_model(&configured, &configured.clone(), Path::new("ckpt")).unwrap();
    }
}
