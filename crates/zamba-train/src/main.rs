//! `zamba-train`: pretraining Zamba hybrid language models.

mod bench;
mod inspect;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "zamba-train", version, about = "Pretrain Zamba hybrid Mamba/attention language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Logits and loss of a transformers Zamba checkpoint on a token sequence, as JSON.
    Logits(inspect::LogitsArgs),
    /// Parameter count by component of a preset or a checkpoint's config.
    Params(inspect::ParamsArgs),
    /// Benchmarks (CPU): the model's training step, the scan op, the machine's matmul peak.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Logits(args) => inspect::logits(args),
        Command::Params(args) => inspect::params(args),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
