//! The training loop: `zamba-train --config FILE.toml`. Phase 1 and phase 2 (annealing) are the
//! same loop with different configs. Read top to bottom: set-up, where the run starts from, the
//! step loop (micro-batches → global-norm clip → AdamW), evaluation, checkpoints.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use zamba_data::{Batch, MixtureLoader};
use zamba_model::params::FlopsPerToken;
use zamba_model::{Execution, RandomInit, ZambaConfig, ZambaModel, cross_entropy};

use crate::checkpoint::{self, TrainerState};
use crate::config::{RunConfig, TrainSection};
use crate::device::device_for;
use crate::optim::{AdamW, AdamWParams, clip_factor, global_grad_norm};
use crate::plot::METRICS_FILE;

/// Written into `run.dir` when the run has completed all its steps (sweeps skip such runs).
pub const DONE_FILE: &str = "DONE";

pub struct TrainOptions {
    pub config: PathBuf,
    pub overrides: Vec<String>,
    /// Resume from this checkpoint instead of the newest one in the run dir.
    pub resume: Option<PathBuf>,
    /// Resume even if the data sources changed since the checkpoint.
    pub allow_data_change: bool,
}

/// What the run starts from.
struct Start {
    model: ZambaModel,
    optimizer: AdamW,
    state: Option<TrainerState>,
    description: String,
}

pub fn train(opts: &TrainOptions) -> Result<()> {
    let config = RunConfig::load(&opts.config, &opts.overrides)?;
    if config.runtime.world_size != 1 {
        bail!(
            "runtime.world_size = {}: data-parallel training is not available yet; set runtime.world_size = 1",
            config.runtime.world_size
        );
    }
    let run_dir = config.run.dir.clone();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("creating the run directory {}", run_dir.display()))?;
    if let Some(threads) = config.runtime.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("setting the number of CPU threads (runtime.threads)")?;
    }
    let device = device_for(config.runtime.device, config.runtime.precision)?.autodiff();
    let model_config = config.model_config().clone();
    let resolved = config.to_toml_string()?;
    std::fs::write(run_dir.join("config.toml"), &resolved)?;

    // ---- where the run starts from -------------------------------------------------------
    let adamw = AdamWParams {
        beta1: config.optimizer.beta1,
        beta2: config.optimizer.beta2,
        eps: config.optimizer.eps,
        weight_decay: config.optimizer.weight_decay,
        decay_embeddings: config.optimizer.decay_embeddings,
    };
    let start = starting_point(&config, opts, &model_config, adamw, &device)?;
    eprintln!("{}", start.description);
    let Start {
        mut model,
        mut optimizer,
        state,
        ..
    } = start;
    model = model.with_execution(Execution {
        precision: config.runtime.precision,
        checkpointing: config.train.activation_checkpointing,
    });

    // ---- data ----------------------------------------------------------------------------
    let data = config.resolve_data()?;
    let global_rows = config.global_sequences();
    let mut loader = MixtureLoader::new(
        &data,
        0,
        config.runtime.world_size.max(1),
        global_rows,
        state.as_ref().map(|s| s.loader.clone()),
        opts.allow_data_change,
    )?;
    let mut state = state.unwrap_or_else(|| TrainerState {
        step: 0,
        tokens: 0,
        consecutive_skips: 0,
        total_skips: 0,
        loss_window: Vec::new(),
        optimizer_step: 0,
        loader: loader.state(),
    });

    let mut metrics = MetricsLog::open(&run_dir.join(METRICS_FILE), state.step)?;
    let stop = stop_flag()?;

    let steps = config.train.steps as u64;
    let micro = config.batch.micro_batch;
    let accum = config.grad_accum_steps();
    let seq_len = data.seq_len;
    let tokens_per_step = config.tokens_per_step() as u64;
    let train_flops = FlopsPerToken::of(&model_config, seq_len).train();
    let progress = progress_bar(config.logging.progress, steps, state.step);
    let run_start = Instant::now();
    let tokens_at_start = state.tokens;
    let mut last_loss = f64::NAN;

    // ---- the step loop ---------------------------------------------------------------------
    while state.step < steps {
        let step = state.step;
        let lr = config.lr(step as usize);
        let t0 = Instant::now();
        let batch = loader.next_batch()?;

        // Micro-batches: each loss is the micro-batch mean divided by the number of micro-batches,
        // so the summed gradient is the gradient of the global-batch mean.
        let mut accumulator = GradientsAccumulator::new();
        let mut loss_sum = 0.0;
        for m in 0..accum {
            let (inputs, targets) = micro_batch(&batch, m * micro, micro, &device);
            let loss = cross_entropy(model.forward(inputs), targets) / accum as f64;
            loss_sum += loss.clone().into_scalar::<f32>() as f64;
            accumulator.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
        }
        let grads = accumulator.grads();
        let grad_norm = global_grad_norm(&model, &grads);

        let skip = skip_reason(loss_sum, grad_norm, &state.loss_window, &config.train);
        if let Some(reason) = &skip {
            state.consecutive_skips += 1;
            state.total_skips += 1;
            progress.println(format!("step {step}: update skipped ({reason})"));
            if state.consecutive_skips as usize >= config.train.max_consecutive_skips {
                bail!(
                    "{} updates in a row were skipped (last: {reason}); stopping. The last good checkpoint in {} is intact; \
                     lower the learning rate or check the data before resuming",
                    state.consecutive_skips,
                    checkpoint::checkpoints_dir(&run_dir).display()
                );
            }
        } else {
            let scale = clip_factor(grad_norm, config.optimizer.clip_grad_norm);
            model = optimizer.step(model, &grads, lr, scale);
            state.consecutive_skips = 0;
            push_window(&mut state.loss_window, loss_sum, config.train.spike_window);
            last_loss = loss_sum;
        }
        state.step += 1;
        state.tokens += tokens_per_step;
        state.optimizer_step = optimizer.step;
        let secs = t0.elapsed().as_secs_f64();
        let tok_s = tokens_per_step as f64 / secs;

        metrics.step(serde_json::json!({
            "step": step,
            "tokens": state.tokens,
            "loss": finite(loss_sum),
            "lr": lr,
            "grad_norm": finite(grad_norm),
            "tokens_per_sec": tok_s,
            "gflops": train_flops * tok_s / 1e9,
            "mfu": config.runtime.peak_gflops.map(|peak| train_flops * tok_s / 1e9 / peak),
            "skipped": skip.is_some(),
        }))?;
        progress.set_position(state.step);
        progress.set_message(format!("loss {loss_sum:.4} lr {lr:.2e} {tok_s:.0} tok/s"));

        if config.eval.every > 0
            && (state.step % config.eval.every as u64 == 0 || state.step == steps)
        {
            let losses = evaluate(&model, &loader, config.eval.batches, micro, &device)?;
            if !losses.is_empty() {
                let text: Vec<String> = losses.iter().map(|(s, l)| format!("{s} {l:.4}")).collect();
                progress.println(format!("step {step}: eval {}", text.join(", ")));
                metrics.step(serde_json::json!({"eval": true, "step": step, "tokens": state.tokens, "loss": losses}))?;
            }
        }

        state.loader = loader.state();
        let interrupted = stop.swap(false, Ordering::SeqCst);
        let every = config.checkpoint.every as u64;
        if interrupted || state.step == steps || (every > 0 && state.step % every == 0) {
            let dir = checkpoint::save(
                &run_dir,
                &model,
                &model_config,
                &optimizer,
                &state,
                &resolved,
            )?;
            checkpoint::prune(
                &run_dir,
                config.checkpoint.keep_last,
                config.checkpoint.keep_every as u64,
            )?;
            progress.println(format!("step {step}: checkpoint {}", dir.display()));
        }
        if interrupted {
            progress.abandon_with_message("interrupted");
            eprintln!(
                "interrupted after step {step}: checkpoint written; run the same command to resume"
            );
            return Ok(());
        }
    }
    progress.finish();
    std::fs::write(run_dir.join(DONE_FILE), format!("{}\n", state.step))?;
    let elapsed = run_start.elapsed().as_secs_f64();
    eprintln!(
        "done: {} steps, {} tokens, final train loss {:.4}, {} skipped updates, {:.0} tokens/s this session; metrics in {}",
        state.step,
        state.tokens,
        last_loss,
        state.total_skips,
        (state.tokens - tokens_at_start) as f64 / elapsed.max(1e-9),
        run_dir.join(METRICS_FILE).display()
    );
    Ok(())
}

/// Set by SIGINT/SIGTERM; the loop checks it after each step. The handler is process-wide and can
/// be installed once, so it is shared by every run of the process.
fn stop_flag() -> Result<&'static AtomicBool> {
    static STOP: OnceLock<Result<&'static AtomicBool, String>> = OnceLock::new();
    let installed = STOP.get_or_init(|| {
        let flag: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
            .map(|()| flag)
            .map_err(|e| format!("installing the SIGINT/SIGTERM handler: {e}"))
    });
    installed.clone().map_err(anyhow::Error::msg)
}

/// Resume (newest checkpoint or `--resume`), `[init] from` (a new phase from earlier weights), or
/// a fresh initialisation — in that order of precedence.
fn starting_point(
    config: &RunConfig,
    opts: &TrainOptions,
    model_config: &ZambaConfig,
    adamw: AdamWParams,
    device: &Device,
) -> Result<Start> {
    let resume = match &opts.resume {
        Some(path) => Some(path.clone()),
        None => checkpoint::list(&config.run.dir)?.pop().map(|(_, p)| p),
    };
    if let Some(dir) = resume {
        let loaded = checkpoint::load(&dir, adamw, device)?;
        ensure_same_model(&loaded.model_config, model_config, &dir)?;
        let description = format!(
            "resuming from {} (step {}, {} tokens): weights, AdamW moments, data position and counters restored",
            dir.display(),
            loaded.state.step,
            loaded.state.tokens
        );
        return Ok(Start {
            model: loaded.model,
            optimizer: loaded.optimizer,
            state: Some(loaded.state),
            description,
        });
    }
    if let Some(init) = &config.init {
        let from = &init.from;
        if checkpoint::is_checkpoint(from) {
            let loaded = checkpoint::load(from, adamw, device)?;
            ensure_same_model(&loaded.model_config, model_config, from)?;
            let mut optimizer = AdamW::new(adamw);
            let moments = if init.load_optimizer {
                optimizer.moments = loaded.optimizer.moments;
                optimizer.step = loaded.optimizer.step;
                "and AdamW moments"
            } else {
                "(AdamW moments NOT loaded: fresh optimizer state)"
            };
            let description = format!(
                "initialised from {} (its step {}): model weights {moments}; step counter 0, LR from this config's \
                 schedule, data from this config's mixture — nothing else taken from the old run",
                from.display(),
                loaded.state.step
            );
            return Ok(Start {
                model: loaded.model,
                optimizer,
                state: None,
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
        return Ok(Start {
            model,
            optimizer: AdamW::new(adamw),
            state: None,
            description,
        });
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
        optimizer: AdamW::new(adamw),
        state: None,
    })
}

/// The architecture of loaded weights must be the one the config describes.
fn ensure_same_model(loaded: &ZambaConfig, configured: &ZambaConfig, source: &Path) -> Result<()> {
    let shape = |c: &ZambaConfig| {
        (
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            c.layer_kinds(),
            c.n_mamba_heads,
            c.mamba_d_state,
            c.mamba_expand,
            c.dt_rank(),
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size,
        )
    };
    if shape(loaded) != shape(configured) {
        bail!(
            "the weights in {} are of a different architecture than [model] describes \
             (loaded: hidden {}, {} layers, vocab {}; configured: hidden {}, {} layers, vocab {}); \
             make [model] match the checkpoint",
            source.display(),
            loaded.hidden_size,
            loaded.num_hidden_layers,
            loaded.vocab_size,
            configured.hidden_size,
            configured.num_hidden_layers,
            configured.vocab_size
        );
    }
    Ok(())
}

/// Rows `[start, start + rows)` of the batch as `[rows, seq_len]` input and target tensors.
fn micro_batch(
    batch: &Batch,
    start: usize,
    rows: usize,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let l = batch.seq_len;
    let take = |v: &[u32]| {
        let ids: Vec<i64> = v[start * l..(start + rows) * l]
            .iter()
            .map(|&t| t as i64)
            .collect();
        Tensor::<2, Int>::from_data(TensorData::new(ids, vec![rows, l]), device)
    };
    (take(&batch.inputs), take(&batch.targets))
}

/// Why the update of a step must be skipped, if it must.
/// The spike test needs a full window of `spike_window` recent losses.
fn skip_reason(loss: f64, grad_norm: f64, window: &[f64], train: &TrainSection) -> Option<String> {
    if !loss.is_finite() || !grad_norm.is_finite() {
        return Some(format!(
            "non-finite loss {loss} or gradient norm {grad_norm}"
        ));
    }
    let threshold = train.spike_zscore?;
    if window.len() < train.spike_window.max(2) {
        return None;
    }
    let n = window.len() as f64;
    let mean = window.iter().sum::<f64>() / n;
    let std = (window.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let z = (loss - mean) / std.max(1e-12);
    (z > threshold).then(|| {
        format!(
            "loss spike: {loss:.4} is {z:.1} standard deviations above the last {} steps",
            window.len()
        )
    })
}

fn push_window(window: &mut Vec<f64>, loss: f64, size: usize) {
    window.push(loss);
    if window.len() > size.max(1) {
        window.remove(0);
    }
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Mean held-out loss per source over up to `batches` batches, on a model without autodiff.
fn evaluate(
    model: &ZambaModel,
    loader: &MixtureLoader,
    batches: usize,
    rows: usize,
    device: &Device,
) -> Result<BTreeMap<String, f64>> {
    let model = model.valid();
    let device = device.clone().without_autodiff();
    let mut losses = BTreeMap::new();
    for source in loader.validation_sources() {
        let (mut total, mut count) = (0.0, 0usize);
        for batch in loader.validation(&source, rows)?.take(batches) {
            let batch = batch?;
            let (inputs, targets) = micro_batch(&batch, 0, batch.rows, &device);
            total += cross_entropy(model.forward(inputs), targets).into_scalar::<f32>() as f64
                * batch.rows as f64;
            count += batch.rows;
        }
        if count > 0 {
            losses.insert(source, total / count as f64);
        }
    }
    Ok(losses)
}

fn progress_bar(enabled: bool, steps: u64, position: u64) -> ProgressBar {
    let bar = if enabled {
        ProgressBar::new(steps)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(position);
    bar
}

/// `metrics.jsonl`, appended line by line. On resume, lines of steps at or after the resumed step
/// (written after the checkpoint by the interrupted run) are dropped first, so the file reads as
/// one uninterrupted run.
struct MetricsLog {
    file: std::fs::File,
}

impl MetricsLog {
    fn open(path: &Path, resume_step: u64) -> Result<Self> {
        if path.exists() {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                        .is_some_and(|s| s < resume_step)
                })
                .collect();
            let mut body = kept.join("\n");
            if !body.is_empty() {
                body.push('\n');
            }
            std::fs::write(path, body).with_context(|| format!("rewriting {}", path.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file })
    }

    fn step(&mut self, line: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{line}").context("writing metrics.jsonl")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(spike_zscore: Option<f64>, spike_window: usize) -> TrainSection {
        TrainSection {
            steps: 10,
            max_consecutive_skips: 3,
            spike_zscore,
            spike_window,
            activation_checkpointing: Default::default(),
        }
    }

    #[test]
    fn non_finite_steps_are_skipped() {
        let t = section(None, 4);
        assert!(
            skip_reason(f64::NAN, 1.0, &[], &t)
                .unwrap()
                .contains("non-finite")
        );
        assert!(
            skip_reason(2.0, f64::INFINITY, &[], &t)
                .unwrap()
                .contains("non-finite")
        );
        assert_eq!(skip_reason(2.0, 1.0, &[], &t), None);
    }

    #[test]
    fn spikes_are_skipped_only_with_a_full_window() {
        let t = section(Some(6.0), 4);
        let window = [2.0, 2.1, 1.9, 2.0];
        assert!(
            skip_reason(5.0, 1.0, &window, &t)
                .unwrap()
                .contains("loss spike")
        );
        assert_eq!(skip_reason(2.2, 1.0, &window, &t), None);
        assert_eq!(
            skip_reason(5.0, 1.0, &window[..3], &t),
            None,
            "window not full yet"
        );
        assert_eq!(
            skip_reason(5.0, 1.0, &window, &section(None, 4)),
            None,
            "spike skip off"
        );
        let mut w = window.to_vec();
        push_window(&mut w, 3.0, 4);
        assert_eq!(w, vec![2.1, 1.9, 2.0, 3.0]);
    }
}
