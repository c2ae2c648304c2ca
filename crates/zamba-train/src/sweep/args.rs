//! The `sweep` subcommand's arguments.

use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct SweepArgs {
    /// The base run config.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The sweep file ([grid] and/or [zip] tables of "section.key" = [values]).
    #[arg(long, value_name = "FILE")]
    pub sweep: PathBuf,
    /// Only write the configs, a SLURM array script and run_all.sh; run nothing.
    #[arg(long)]
    pub emit: bool,
    /// Points trained at the same time (each a separate process).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Sweep directory [default: the base config's run.dir].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Override applied to every point before its own values (section.key=value).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}
