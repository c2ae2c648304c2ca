//! `zamba-train`: pretraining Zamba hybrid language models.
//!
//! `zamba-train --config FILE.toml` trains (phase 1 or an annealing phase, by config);
//! the subcommands inspect models, prepare data, plot, sweep and benchmark.

mod bench;
mod inspect;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use zamba_train::config::RunConfig;
use zamba_train::memory_plan::Fit;
use zamba_train::restart::TrainJob;
use zamba_train::train::{TrainOptions, train};

/// Counts heap bytes for the memory figures of `bench model` (and anything else that asks).
#[global_allocator]
static ALLOCATOR: zamba_train::memory::CountingAlloc = zamba_train::memory::CountingAlloc;

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
    /// Run configs: print the reference of every key, or write a commented starter config.
    #[command(subcommand)]
    Config(zamba_train::config::ConfigCommand),
    /// Run (or emit as a SLURM array) a grid of config overrides.
    Sweep(zamba_train::sweep::SweepArgs),
    /// Logits and loss of a transformers Zamba checkpoint on a token sequence, as JSON.
    Logits(inspect::LogitsArgs),
    /// Parameter count by component of a preset or a checkpoint's config.
    Params(inspect::ParamsArgs),
    /// Benchmarks: the model's training step, the scan op, the machine's matmul peak.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Start this node's ranks of a data-parallel job (torchrun-style):
    /// `launch --nproc-per-node 8 -- --config run.toml`.
    Launch(zamba_dist::launch::LaunchArgs),
    /// Inspect training checkpoints.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Export a checkpoint as a transformers directory (weights, config, tokenizer).
    ExportHf(zamba_train::export::ExportArgs),
    /// Continue a prompt with a checkpoint or an exported model.
    Generate(zamba_train::generate::GenerateArgs),
    /// Held-out loss/perplexity per source and exact-match accuracy of a checkpoint.
    Eval(zamba_train::eval_cmd::EvalArgs),
    /// Check the fused kernels and the model on a device against the CPU (what the tests check),
    /// e.g. `selftest --device cuda` on a new machine.
    Selftest(zamba_train::selftest::SelftestArgs),
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// Check that checkpoints are complete and every file is as written (size and blake3 against
    /// the checkpoint's MANIFEST.json), e.g. after copying a run between clusters.
    Verify {
        /// Checkpoint directories (`<run.dir>/checkpoints/step-…`).
        #[arg(required = true, value_name = "DIR")]
        dirs: Vec<PathBuf>,
    },
}

fn run_checkpoint(cmd: CheckpointCommand) -> Result<()> {
    let CheckpointCommand::Verify { dirs } = cmd;
    let mut failed = 0;
    for dir in &dirs {
        match zamba_train::checkpoint::verify(dir) {
            Ok(()) => println!("ok      {}", dir.display()),
            Err(e) => {
                println!("FAILED  {e:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} checkpoint(s) do not verify", dirs.len());
    }
    Ok(())
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
        // Refused here as the trainer would refuse it, before anything is written.
        Fit::of(&resolved, resolved.runtime.world_size).check(&resolved)?;
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

/// `launch`: the ranks' run config is loaded and checked at the job's world size first (one
/// error here rather than one per rank), and its device decides how many ranks this node can
/// run: one per GPU, or one per core for CPU ranks. The launcher restarts a training job on
/// fewer nodes only where the config keeps its global batch.
fn run_launch(args: zamba_dist::launch::LaunchArgs) -> Result<()> {
    use zamba_dist::launch::{NodeCapacity, OpaqueJob};
    let rank_cli =
        Cli::try_parse_from(std::iter::once("zamba-train".into()).chain(args.args.clone()));
    let train_args = match rank_cli {
        Ok(Cli {
            command: None,
            train,
        })
        | Ok(Cli {
            command: Some(Command::Train(train)),
            ..
        }) => Some(train),
        _ => None,
    };
    let Some((path, overrides, resume)) =
        train_args.and_then(|t| t.config.map(|c| (c, t.overrides, t.resume.is_some())))
    else {
        // Not a training run: whatever the node has most of.
        let capacity = [NodeCapacity::gpus(0), NodeCapacity::cpu_cores()]
            .into_iter()
            .max_by_key(|c| c.ranks)
            .expect("two capacities");
        zamba_dist::launch::run(&args, &capacity, &OpaqueJob(args.args.clone()))?;
        return Ok(());
    };
    let config = RunConfig::load(&path, &overrides)?;
    let capacity = match config.runtime.device {
        zamba_train::config::Device::Cuda(first) => NodeCapacity::gpus(first),
        _ => NodeCapacity::cpu_cores(),
    };
    args.check_capacity(&capacity)?;
    let world = args.nnodes.max.saturating_mul(args.nproc_per_node);
    let mut sized = config.clone();
    sized.runtime.world_size = world;
    let job = TrainJob::new(config, args.args.clone(), resume, args.is_elastic())?;
    job.batch_on(world)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("{} with {world} ranks", path.display()))?;
    // Each rank checks again when it starts (a restart on fewer ranks holds more state each).
    Fit::of(&sized, args.nproc_per_node).check(&sized)?;
    if args.is_elastic() {
        eprintln!("{}", job.node_counts(args.nnodes, args.nproc_per_node));
    }
    zamba_dist::launch::run(&args, &capacity, &job)?;
    Ok(())
}

fn main() -> ExitCode {
    zamba_train::memory::retain_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        None => run_train(cli.train),
        Some(Command::Train(args)) => run_train(args),
        Some(Command::Data(cmd)) => zamba_data::run(cmd),
        Some(Command::Plot(args)) => zamba_train::plot::run(args),
        Some(Command::Config(cmd)) => zamba_train::config::run_command(cmd),
        Some(Command::Sweep(args)) => zamba_train::sweep::run(args),
        Some(Command::Logits(args)) => inspect::logits(args),
        Some(Command::Params(args)) => inspect::params(args),
        Some(Command::Bench(cmd)) => bench::run(cmd),
        Some(Command::Launch(args)) => run_launch(args),
        Some(Command::Checkpoint(cmd)) => run_checkpoint(cmd),
        Some(Command::ExportHf(args)) => zamba_train::export::run(args),
        Some(Command::Generate(args)) => zamba_train::generate::run(args),
        Some(Command::Eval(args)) => zamba_train::eval_cmd::run(args),
        Some(Command::Selftest(args)) => zamba_train::selftest::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
