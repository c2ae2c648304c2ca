//! `logits` and `params`: look at a model without training it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::{Int, Tensor, TensorData};
use clap::Args;
use zamba_model::params::{FlopsPerToken, ParamCounts};
use zamba_model::{Precision, ZambaConfig, load_hf, next_token_loss};

use zamba_train::device::{DeviceChoice, device_for};

#[derive(Args)]
pub struct LogitsArgs {
    /// transformers checkpoint directory (config.json + model.safetensors[.index.json]).
    #[arg(long)]
    hf: PathBuf,
    /// JSON array of token ids.
    #[arg(long)]
    tokens: PathBuf,
    /// Output JSON: {"logits": [[f32; vocab]; T], "loss": f64}.
    #[arg(long)]
    out: PathBuf,
    /// cpu, cuda, cuda:N or cube-cpu (see runtime.device).
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
}

pub fn logits(args: LogitsArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.tokens)
        .with_context(|| format!("could not read the tokens file {}", args.tokens.display()))?;
    let tokens: Vec<i64> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON array of token ids, e.g. [1, 415, 2]",
            args.tokens.display()
        )
    })?;
    let device = device_for(args.device, 0, Precision::Fp32)?;
    let (config, model) = load_hf(&args.hf, &device)?;
    if tokens.len() < 2 {
        bail!(
            "{}: need at least 2 tokens to compute a next-token loss, got {}",
            args.tokens.display(),
            tokens.len()
        );
    }
    if let Some((pos, id)) = tokens
        .iter()
        .enumerate()
        .find(|(_, t)| **t < 0 || **t as usize >= config.vocab_size)
    {
        bail!(
            "{}: token {id} at position {pos} is outside the model's vocabulary (0..{})",
            args.tokens.display(),
            config.vocab_size
        );
    }
    let n = tokens.len();
    let input = Tensor::<2, Int>::from_data(TensorData::new(tokens, vec![1, n]), &device);
    let logits = model.forward(input.clone());
    let loss = next_token_loss(logits.clone(), input).into_scalar::<f32>() as f64;
    let flat = logits
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading logits: {e:?}"))?;
    let rows: Vec<&[f32]> = flat.chunks(config.vocab_size).collect();
    let json = serde_json::json!({ "logits": rows, "loss": loss });
    std::fs::write(&args.out, serde_json::to_string(&json)?)
        .with_context(|| format!("could not write {}", args.out.display()))?;
    eprintln!(
        "wrote logits [{n}, {}] and loss {loss:.6} to {}",
        config.vocab_size,
        args.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct ParamsArgs {
    /// A named preset (zamba-7b, zamba-tiny, zamba-bench).
    #[arg(long, conflicts_with = "hf")]
    preset: Option<String>,
    /// A transformers checkpoint directory (only its config.json is read).
    #[arg(long)]
    hf: Option<PathBuf>,
    /// Sequence length for the FLOPs-per-token estimate (default: max_position_embeddings).
    #[arg(long)]
    seq_len: Option<usize>,
}

pub fn params(args: ParamsArgs) -> Result<()> {
    let config = match (&args.preset, &args.hf) {
        (Some(name), None) => ZambaConfig::preset(name)?,
        (None, Some(dir)) => ZambaConfig::from_json_file(&dir.join("config.json"))?,
        _ => bail!("give one of --preset NAME or --hf DIR"),
    };
    let counts = ParamCounts::of(&config);
    let total = counts.total();
    let row = |name: &str, n: u64| {
        println!(
            "{name:<34} {n:>15}  {:>6.2}%",
            100.0 * n as f64 / total as f64
        );
    };
    row("embedding (tied with lm_head)", counts.embedding);
    row(
        &format!("mamba mixers ({} layers)", config.num_hidden_layers),
        counts.mamba,
    );
    row("rms norms (per layer + final)", counts.norms);
    row("shared attention+MLP block", counts.shared_block);
    row(
        &format!("hybrid projections ({})", config.hybrid_layers().len()),
        counts.hybrid_linears,
    );
    println!("{:<34} {total:>15}", "total");
    let seq = args.seq_len.unwrap_or(config.max_position_embeddings);
    let flops = FlopsPerToken::of(&config, seq);
    println!(
        "forward FLOPs/token at seq {seq}: {:.4e} (matmul {:.4e}, attention {:.4e}, scan+conv {:.4e}); training ≈ 3×",
        flops.forward(),
        flops.matmul,
        flops.attention,
        flops.scan
    );
    Ok(())
}
