//! `zamba-train eval`: held-out loss and perplexity per source of a run's data (or of tokenized
//! directories), and exact-match accuracy on the synthetic instruct set, as a table and JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use zamba_data::{DataConfig, MixtureLoader, SourceConfig};
use zamba_model::{Precision, ZambaModel, load_hf};

use crate::artifacts::{ModelSource, tokenizer_for};
use crate::config::{RunConfig, synthetic_set};
use crate::device::{DeviceChoice, device_for};
use crate::eval::{
    ExactMatch, SourceLoss, Tally, exact_match, held_out_loss, synthetic_instruct_examples,
};
use crate::export::with_tokenizer_ids;

/// Questions decoded together (rows of one recurrent decoder).
const EXACT_MATCH_BATCH: usize = 64;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A checkpoint, a run directory (its newest checkpoint) or a transformers directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// cpu, cuda, cuda:N or cube-cpu (see runtime.device).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Run config whose sources' validation sets are evaluated (default: the checkpoint's own).
    #[arg(long, conflicts_with = "data")]
    pub config: Option<PathBuf>,
    /// Tokenized directories to evaluate instead (each one a source, named after the directory).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Sequence length with --data (default: the checkpoint's run's).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// At most this many batches per source (default: the whole held-out set).
    #[arg(long)]
    pub max_batches: Option<usize>,
    /// Held-out synthetic instruct questions to answer greedily (0: none).
    #[arg(long, default_value_t = 256)]
    pub exact_match: usize,
    /// The model's tokenizer.json, for exact match (default: found with the weights or the run's data).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub checkpoint: String,
    pub sources: BTreeMap<String, SourceLoss>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<ExactMatch>,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let source = ModelSource::resolve(&args.checkpoint)?;
    let run_config = match &args.config {
        Some(path) => Some(RunConfig::load(path, &[])?),
        None => source.run.clone(),
    };
    let data = data_config(&args, run_config.as_ref())?;
    let device = device_for(args.device, 0, Precision::Fp32)?;
    let (model_config, model) = load_hf(&source.model_dir, &device)
        .with_context(|| format!("loading {}", source.description))?;
    let data = DataConfig {
        model_vocab_size: Some(model_config.vocab_size as u32),
        prefetch: 1,
        ..data
    };
    let loader = MixtureLoader::new(&data, 0, 1, args.batch_size, None, true)?;
    let mut report = EvalReport {
        checkpoint: source.description.clone(),
        sources: BTreeMap::new(),
        exact_match: None,
    };
    for name in loader.validation_sources() {
        let windows = loader.validation(&name, args.batch_size)?.windows();
        let total = args
            .max_batches
            .map_or(windows, |b| windows.min((b * args.batch_size) as u64));
        let bar = progress_bar(total, &format!("{name}: held-out loss"));
        let loss = held_out_loss(
            &model,
            &loader,
            &name,
            args.batch_size,
            args.max_batches,
            &bar,
        )?;
        bar.finish_and_clear();
        report.sources.insert(name, loss);
    }
    if args.exact_match > 0
        && let Some(section) = instruct_section(run_config.as_ref(), args.data.is_empty())
    {
        let examples = synthetic_instruct_examples(section, args.exact_match);
        let files = tokenizer_for(&source, &model_config, args.tokenizer.as_deref())?;
        let eos = with_tokenizer_ids(&model_config, &files)?
            .eos_token_id
            .expect("the tokenizer names its eos token");
        let bar = progress_bar(examples.len() as u64, "instruct: exact match");
        report.exact_match = Some(exact_match(
            &model,
            &files.tokenizer()?,
            eos,
            &examples,
            EXACT_MATCH_BATCH,
            &bar,
        )?);
        bar.finish_and_clear();
    }
    print_report(&report, &model);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// The data to evaluate: `--data` directories, else the run config's sources.
fn data_config(args: &EvalArgs, run: Option<&RunConfig>) -> Result<DataConfig> {
    if args.data.is_empty() {
        let Some(run) = run else {
            bail!(
                "nothing to evaluate on: {} is not a zamba-train checkpoint with a run config; \
                 pass --config RUN.toml or --data TOKENIZED_DIR",
                args.checkpoint.display()
            );
        };
        return run.resolve_data();
    }
    let seq_len = args
        .seq_len
        .or(run.map(|r| r.data.seq_len))
        .context("--data needs --seq-len (the checkpoint has no run config to take it from)")?;
    let mut sources = BTreeMap::new();
    for dir in &args.data {
        let name = source_name(dir);
        let path = dir.to_string_lossy().into_owned();
        let config = SourceConfig {
            paths: vec![path.clone()],
            weight: 1.0,
            validation: vec![path],
        };
        if sources.insert(name.clone(), config).is_some() {
            bail!("two --data directories are both named {name:?}; give them distinct names");
        }
    }
    Ok(DataConfig {
        sources,
        seq_len,
        seed: 0,
        shuffle_blocks: 1,
        prefetch: 1,
        model_vocab_size: None,
    })
}

fn source_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// The synthetic settings when the run evaluates on the synthetic instruct set.
fn instruct_section(
    run: Option<&RunConfig>,
    using_run_data: bool,
) -> Option<&crate::config::SyntheticSection> {
    let run = run.filter(|_| using_run_data)?;
    let has_instruct = run
        .data
        .sources
        .values()
        .flat_map(|s| &s.validation)
        .any(|p| synthetic_set(p) == Some("instruct"));
    run.synthetic.as_ref().filter(|_| has_instruct)
}

fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

fn print_report(report: &EvalReport, model: &ZambaModel) {
    println!("{} ({} parameters)", report.checkpoint, model.num_params());
    println!(
        "{:<20} {:>10} {:>12} {:>12}",
        "source", "loss", "perplexity", "tokens"
    );
    for (name, s) in &report.sources {
        println!(
            "{name:<20} {:>10.4} {:>12.3} {:>12}",
            s.loss, s.perplexity, s.tokens
        );
    }
    if let Some(em) = &report.exact_match {
        println!(
            "exact match (greedy) {:>11} {:>9}  95% CI (Wilson)",
            "correct", "accuracy"
        );
        let rows = std::iter::once(("all", &em.overall))
            .chain(em.by_task.iter().map(|(task, t)| (task.as_str(), t)));
        for (task, t) in rows {
            println!("  {task:<18} {}", tally_row(t));
        }
    }
}

/// `correct/examples  accuracy  [low, high]`, in percent.
fn tally_row(t: &Tally) -> String {
    format!(
        "{:>11} {:>8.1}%  [{:.1}%, {:.1}%]",
        format!("{}/{}", t.correct, t.examples),
        100.0 * t.accuracy,
        100.0 * t.ci95.low,
        100.0 * t.ci95.high
    )
}
