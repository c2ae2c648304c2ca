//! `zamba-train generate`: continue a prompt with a checkpoint or an exported model, decoding
//! recurrently (constant work per token in the Mamba layers, a key/value cache for the shared
//! attention).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use zamba_model::generate::{GenerateOptions, SamplingParams, generate};
use zamba_model::{Precision, load_hf};

use crate::artifacts::{ModelSource, tokenizer_for};
use crate::device::{DeviceChoice, device_for};
use crate::export::with_tokenizer_ids;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A checkpoint, a run directory (its newest checkpoint) or an exported/transformers directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// cpu, cuda, cuda:N or cube-cpu (see runtime.device).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 = greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Sample only among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probability reaches p.
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The model's tokenizer.json (default: the one beside the weights or of the run's data).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
    };
    sampling.validate().map_err(anyhow::Error::msg)?;
    let source = ModelSource::resolve(&args.checkpoint)?;
    let device = device_for(args.device, 0, Precision::Fp32)?;
    let (config, model) = load_hf(&source.model_dir, &device)
        .with_context(|| format!("loading {}", source.description))?;
    let files = tokenizer_for(&source, &config, args.tokenizer.as_deref())?;
    let config = with_tokenizer_ids(&config, &files)?;
    let tokenizer = files.tokenizer()?;
    // The tokenizer's own template adds what precedes a text (BOS, or the document separator).
    let prompt = tokenizer
        .encode(args.prompt.as_str(), true)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
        .get_ids()
        .to_vec();
    if prompt.is_empty() {
        bail!(
            "the prompt is empty and the tokenizer adds no start token; give a non-empty --prompt"
        );
    }
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        seed: args.seed,
        stop_tokens: config.eos_token_id.into_iter().collect(),
    };
    let started = Instant::now();
    let continuation = generate(&model, &[prompt.clone()], &opts).remove(0);
    let secs = started.elapsed().as_secs_f64();
    let text = tokenizer
        .decode(&continuation, true)
        .map_err(|e| anyhow::anyhow!("decoding the continuation: {e}"))?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{text}")?;
    stdout.flush()?;
    eprintln!(
        "{} prompt + {} new tokens in {secs:.2} s ({:.1} tokens/s), {}",
        prompt.len(),
        continuation.len(),
        (prompt.len() + continuation.len()) as f64 / secs.max(1e-9),
        source.description
    );
    Ok(())
}
