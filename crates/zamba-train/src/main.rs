//! `zamba-train`: pretraining Zamba hybrid language models.
//!
//! `zamba-train --config FILE.toml` trains (phase 1 or an annealing phase, by config);
//! the subcommands inspect models, prepare data, plot, sweep and benchmark.

mod bench;
mod inspect;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use zamba_train::config::RunConfig;
use zamba_train::train::{TrainOptions, train};

#[derive(Parser)]
#[command(
    name = "zamba-train",
    version,
    about = "Pretrain Zamba hybrid Mamba/attention language models"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(Args)]
struct TrainArgs {
    /// Run config (TOML). Training resumes from the newest checkpoint in run.dir if there is one.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config value: --set section.key=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Print the resolved config, sizes, token counts and the LR schedule; do not train.
    #[arg(long)]
    dry_run: bool,
    /// Resume from this checkpoint directory instead of the newest one in run.dir.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Resume even though the data sources differ from the checkpoint's.
    #[arg(long)]
    allow_data_change: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Train (same as the top-level --config form).
    Train(TrainArgs),
    /// Tokenize data, train a tokenizer, generate synthetic data.
    #[command(subcommand)]
    Data(zamba_data::DataCommand),
    /// Plot loss / eval loss / LR curves of one or several runs.
    Plot(zamba_train::plot::PlotArgs),
    /// Run (or emit as a SLURM array) a grid of config overrides.
    Sweep(zamba_train::sweep::SweepArgs),
    /// Logits and loss of a transformers Zamba checkpoint on a token sequence, as JSON.
    Logits(inspect::LogitsArgs),
    /// Parameter count by component of a preset or a checkpoint's config.
    Params(inspect::ParamsArgs),
    /// Benchmarks: the model's training step, the scan op, the machine's matmul peak.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn run_train(args: TrainArgs) -> Result<()> {
    let Some(config) = args.config else {
        anyhow::bail!(
            "no command given: use `zamba-train --config FILE.toml` to train, or see `zamba-train --help`"
        );
    };
    if args.dry_run {
        let resolved = RunConfig::load(&config, &args.overrides)?;
        println!("{}", resolved.summary());
        std::fs::create_dir_all(&resolved.run.dir)?;
        let plot = resolved.run.dir.join("lr_schedule.svg");
        zamba_train::plot::plot_schedule(&resolved.schedule, resolved.train.steps, &plot)?;
        println!("LR schedule plotted to {}", plot.display());
        return Ok(());
    }
    train(&TrainOptions {
        config,
        overrides: args.overrides,
        resume: args.resume,
        allow_data_change: args.allow_data_change,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run_train(cli.train),
        Some(Command::Train(args)) => run_train(args),
        Some(Command::Data(cmd)) => zamba_data::run(cmd),
        Some(Command::Plot(args)) => zamba_train::plot::run(args),
        Some(Command::Sweep(args)) => zamba_train::sweep::run(args),
        Some(Command::Logits(args)) => inspect::logits(args),
        Some(Command::Params(args)) => inspect::params(args),
        Some(Command::Bench(cmd)) => bench::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
