//! `zamba-train config reference | init`.

use super::reference::reference_markdown;
use super::starter::starter_config;
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use std::io::Write as _;
use std::path::PathBuf;
use zamba_model::config::PRESETS;

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the configuration reference (Markdown): every section and key with its type, range,
    /// default and meaning. docs/configuration.md is this output.
    Reference,
    /// Write a commented starter run config for a model preset; it passes --dry-run as written.
    Init {
        /// The model preset the starter is sized for.
        #[arg(long, default_value = "zamba-tiny", value_parser = clap::builder::PossibleValuesParser::new(PRESETS))]
        preset: String,
        /// Write the config here instead of to stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Overwrite FILE if it exists.
        #[arg(long, requires = "out")]
        force: bool,
    },
}

pub fn run_command(command: ConfigCommand) -> Result<()> {
    match command {
        ConfigCommand::Reference => {
            print!("{}", reference_markdown());
            Ok(())
        }
        ConfigCommand::Init { preset, out, force } => {
            let text = starter_config(&preset)?;
            let Some(path) = out else {
                print!("{text}");
                return Ok(());
            };
            // `create_new` refuses an existing file without a window between check and write.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .create_new(!force)
                .open(&path)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => bail!(
                        "{} exists; choose another --out or pass --force to overwrite it",
                        path.display()
                    ),
                    _ => Err(e).with_context(|| format!("creating {}", path.display())),
                })?;
            file.write_all(text.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "wrote {}; check it with: zamba-train --config {} --dry-run",
                path.display(),
                path.display()
            );
            Ok(())
        }
    }
}
