//! `bench decode`: recurrent decoding time per token against the prefix length.

use std::time::Instant;

use anyhow::{Result, bail};
use burn::tensor::Device;
use clap::Args;
use zamba_model::{RandomInit, ZambaConfig, ZambaModel, random_tokens};

use super::time;

#[derive(Args)]
pub struct DecodeArgs {
    #[arg(long, default_value = "zamba-bench")]
    preset: String,
    /// Prefix lengths at which decoding is measured (ascending).
    #[arg(long, value_delimiter = ',', default_value = "16,128,512,1024,2048")]
    prefix: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Decode steps measured at each prefix length.
    #[arg(long, default_value_t = 32)]
    steps: usize,
}

/// One decoder walks through the prefix lengths: it is fed up to each length, then `steps` decode
/// steps are timed (logits read back to the host each step, as generation does). For contrast,
/// the time of one full forward over the prefix — what re-running the prefix per token would
/// cost — is measured too.
pub(super) fn run(a: &DecodeArgs) -> Result<()> {
    if a.prefix.is_empty() || a.prefix.windows(2).any(|w| w[0] >= w[1]) || a.steps == 0 {
        bail!("--prefix must be ascending lengths and --steps at least 1");
    }
    let config = ZambaConfig::preset(&a.preset)?;
    let device = Device::flex();
    let model = ZambaModel::from_source(&config, &mut RandomInit::new(0), &device)?;
    let last = *a.prefix.last().expect("non-empty");
    let mut decoder = model.decoder(a.batch, last + a.steps * a.prefix.len());
    let token = |i: usize| vec![(i * 7919 % config.vocab_size) as u32; a.batch];
    println!(
        "decode {} ({} parameters), batch {}, {} steps per point",
        a.preset,
        model.num_params(),
        a.batch,
        a.steps
    );
    println!(
        "{:>8} {:>12} {:>14} {:>26}",
        "prefix", "ms/token", "tokens/s", "full forward of prefix (ms)"
    );
    for &prefix in &a.prefix {
        while decoder.len() < prefix {
            let _ = decoder.step(&token(decoder.len())).into_data();
        }
        let t = Instant::now();
        for _ in 0..a.steps {
            let _ = decoder.step(&token(decoder.len())).into_data();
        }
        let per_step = t.elapsed().as_secs_f64() / a.steps as f64;
        let tokens = random_tokens(0, config.vocab_size, [a.batch, prefix], &device);
        let forward = time(1, || {
            let _ = model.forward(tokens.clone()).into_data();
        });
        println!(
            "{prefix:>8} {:>12.3} {:>14.1} {:>26.1}",
            per_step * 1e3,
            a.batch as f64 / per_step,
            forward.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
