//! The `--dry-run` report of a run config.

use super::RunConfig;
use crate::device::attention_kernel;
use crate::memory_plan::Fit;
use std::fmt::Write as _;
use zamba_model::ActivationCheckpointing;
use zamba_model::memory::ActivationMemory;
use zamba_model::params::{FlopsPerToken, ParamCounts};

/// 1234567 → "1.23 M" (decimal units, as in token and parameter counts).
pub fn human_count(n: f64) -> String {
    let (v, unit) = match n.abs() {
        x if x >= 1e15 => (n / 1e15, " P"),
        x if x >= 1e12 => (n / 1e12, " T"),
        x if x >= 1e9 => (n / 1e9, " B"),
        x if x >= 1e6 => (n / 1e6, " M"),
        x if x >= 1e3 => (n / 1e3, " K"),
        _ => (n, ""),
    };
    if unit.is_empty() {
        format!("{v}")
    } else {
        format!("{v:.2}{unit}")
    }
}

/// Per-rank memory: the total against the device (see [`crate::memory_plan`]), and one
/// micro-batch's activations with and without recomputation.
fn memory_lines(c: &RunConfig) -> String {
    let gb = |b: f64| match b >= 1e9 {
        true => format!("{:.2} GB", b / 1e9),
        false => format!("{:.1} MB", b / 1e6),
    };
    let mut out = String::new();
    // Without a launcher, CPU ranks are threads of one process on this host.
    let _ = writeln!(out, "{}", Fit::of(c, c.runtime.world_size).line(c));
    let activations = |k| {
        let m = ActivationMemory::of(
            c.model_config(),
            c.batch.micro_batch,
            c.data.seq_len,
            c.runtime.precision,
            k,
            attention_kernel(c.runtime.device),
        );
        gb(m.peak())
    };
    let _ = writeln!(
        out,
        "memory/rank  activations of one micro-batch ({}, estimate): {} without recomputation, {} with train.activation_checkpointing = \"layers\" (configured: \"{}\")",
        c.runtime.precision,
        activations(ActivationCheckpointing::None),
        activations(ActivationCheckpointing::Layers),
        c.train.activation_checkpointing,
    );
    out
}

pub(super) fn summary(c: &RunConfig) -> String {
    let mut out = String::new();
    let model = c.model_config();
    let params = ParamCounts::of(model);
    let flops = FlopsPerToken::of(model, c.data.seq_len);
    let tokens_per_step = c.tokens_per_step() as f64;
    let total_tokens = c.total_tokens() as f64;

    let _ = writeln!(out, "== Resolved config ==");
    match c.to_toml_string() {
        Ok(text) => out.push_str(&text),
        Err(e) => {
            let _ = writeln!(out, "(cannot print: {e})");
        }
    }
    let _ = writeln!(
        out,
        "\n== Run {:?} → {} ==",
        c.run.name,
        c.run.dir.display()
    );
    let preset = c.model.preset.as_deref().unwrap_or("transformers defaults");
    let _ = writeln!(
        out,
        "model        {preset}: {} layers (hybrid at {:?}), hidden {}, vocab {}",
        model.num_hidden_layers,
        model.hybrid_layers(),
        model.hidden_size,
        model.vocab_size
    );
    let _ = writeln!(
        out,
        "parameters   {} ({}): embedding {}, mamba {}, shared block {}, hybrid linears {}, norms {}",
        human_count(params.total() as f64),
        params.total(),
        human_count(params.embedding as f64),
        human_count(params.mamba as f64),
        human_count(params.shared_block as f64),
        human_count(params.hybrid_linears as f64),
        human_count(params.norms as f64)
    );
    if let Some(init) = &c.init {
        let _ = writeln!(
            out,
            "init         weights from {} ({} optimizer state); step counter, LR and data position start fresh",
            init.from.display(),
            if init.load_optimizer {
                "with"
            } else {
                "without"
            }
        );
    }
    let weights = c.data.normalised_weights();
    let mixture: Vec<String> = c
        .data
        .sources
        .keys()
        .zip(&weights)
        .map(|(n, w)| format!("{n} {:.1}%", 100.0 * w))
        .collect();
    let _ = writeln!(
        out,
        "data         seq_len {}, mixture {}",
        c.data.seq_len,
        mixture.join(", ")
    );
    let _ = writeln!(
        out,
        "batch        {} sequences × {} = {} tokens per step; micro-batch {} × world {} → gradient accumulation {}",
        c.global_sequences(),
        c.data.seq_len,
        c.tokens_per_step(),
        c.batch.micro_batch,
        c.runtime.world_size,
        c.grad_accum_steps()
    );
    let _ = writeln!(
        out,
        "training     {} steps → {} tokens ({})",
        c.train.steps,
        c.total_tokens(),
        human_count(total_tokens)
    );
    let _ = writeln!(
        out,
        "FLOPs/token  forward {} (matmul {}, attention {}, scan {}); training ≈ 3× = {}",
        human_count(flops.forward()),
        human_count(flops.matmul),
        human_count(flops.attention),
        human_count(flops.scan),
        human_count(flops.train())
    );
    let _ = writeln!(
        out,
        "FLOPs        {:.3e} per step, {:.3e} for the run (training)",
        flops.train() * tokens_per_step,
        flops.train() * total_tokens
    );
    let o = &c.optimizer;
    let _ = writeln!(
        out,
        "optimizer    AdamW β=({}, {}), eps {:e}, weight decay {}{}, clip {}",
        o.beta1,
        o.beta2,
        o.eps,
        o.weight_decay,
        if o.decay_embeddings {
            " (embeddings too)"
        } else {
            ""
        },
        if o.clip_grad_norm > 0.0 {
            format!("{}", o.clip_grad_norm)
        } else {
            "off".into()
        }
    );
    out.push_str(&memory_lines(c));
    let _ = writeln!(
        out,
        "checkpoints  every {} steps ({}), keep last {}{}; eval every {} steps",
        c.checkpoint.every,
        if c.checkpoint_async() {
            "written in the background"
        } else {
            "the step loop waits for each"
        },
        c.checkpoint.keep_last,
        if c.checkpoint.keep_every > 0 {
            format!(" + every {}", c.checkpoint.keep_every)
        } else {
            String::new()
        },
        c.eval.every
    );
    out.push_str(&c.schedule.summary(c.train.steps));
    out
}
