//! The `data` subcommands as a standalone program, until `zamba-train data …` wires them in:
//! `cargo run -p zamba-data --example data_cli -- tokenize --tokenizer byte --out OUT INPUT...`

use clap::Parser;
use zamba_data::DataCommand;

#[derive(Parser)]
#[command(name = "data", about = "zamba-train data pipeline")]
struct Cli {
    #[command(subcommand)]
    command: DataCommand,
}

fn main() -> anyhow::Result<()> {
    zamba_data::run(Cli::parse().command)
}
