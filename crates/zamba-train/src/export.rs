//! `zamba-train export-hf`: a checkpoint → a directory that transformers loads with
//! `ZambaForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` (and so
//! lm-evaluation-harness with `--model hf --model_args pretrained=dir`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::{Args, ValueEnum};
use zamba_model::hf::{ExportOptions, write_hf_model};
use zamba_model::{SaveDtype, ZambaConfig, load_hf};

use crate::artifacts::{ModelSource, TokenizerFiles, tokenizer_for};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportDtype {
    Bf16,
    F32,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A checkpoint (run.dir/checkpoints/step-N), a run directory (its newest checkpoint) or a
    /// transformers directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output directory; must not exist or be empty (see --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Storage precision of the weights.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: ExportDtype,
    /// The tokenizer.json the model was trained with (default: found through the run's data).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Largest weight file before the weights are sharded, e.g. 5GB, 500MB (transformers'
    /// `max_shard_size`).
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,
    /// Replace a non-empty --out.
    #[arg(long)]
    pub force: bool,
}

/// "5GB", "500MB", "2GiB", "1000000" → bytes (decimal units as in transformers, binary with `i`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 5GB, 500MB or 1000000"))?;
    let scale: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use B, KB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    let bytes = number * scale;
    if !(bytes >= 1.0) {
        return Err(format!(
            "{text:?}: the shard size must be at least one byte"
        ));
    }
    Ok(bytes as u64)
}

pub fn run(args: ExportArgs) -> Result<()> {
    check_out_dir(&args.out, args.force)?;
    let source = ModelSource::resolve(&args.checkpoint)?;
    let device = Device::flex();
    let (config, model) = load_hf(&source.model_dir, &device)
        .with_context(|| format!("loading {}", source.description))?;
    let tokenizer = tokenizer_for(&source, &config, args.tokenizer.as_deref())?;
    let config = with_tokenizer_ids(&config, &tokenizer)?;
    let dtype = match args.dtype {
        ExportDtype::Bf16 => SaveDtype::Bf16,
        ExportDtype::F32 => SaveDtype::F32,
    };
    let opts = ExportOptions {
        dtype,
        max_shard_bytes: args.max_shard_size,
    };
    let files = write_atomically(&args.out, args.force, |dir| {
        let files = write_hf_model(&model, &config, dir, opts)?;
        write_tokenizer(dir, &tokenizer)?;
        Ok(files)
    })?;
    eprintln!(
        "exported {} ({} parameters, {}) to {}: {} weight file(s), tokenizer from {}",
        source.description,
        model.num_params(),
        dtype.torch_name(),
        args.out.display(),
        files.len(),
        tokenizer.origin
    );
    Ok(())
}

/// The model config with the special token ids of the tokenizer it is exported with (they decide
/// where transformers' `generate` starts and stops), checking that every token id fits the model.
pub fn with_tokenizer_ids(config: &ZambaConfig, tokenizer: &TokenizerFiles) -> Result<ZambaConfig> {
    let vocab = tokenizer.tokenizer()?.get_vocab_size(true);
    if vocab > config.vocab_size {
        bail!(
            "the tokenizer from {} has {vocab} tokens but the model only {}; this is not the model's tokenizer",
            tokenizer.origin,
            config.vocab_size
        );
    }
    let eos = tokenizer.special_id("eos_token").with_context(|| {
        format!(
            "the tokenizer from {} names no eos_token in its tokenizer_config.json",
            tokenizer.origin
        )
    })?;
    Ok(ZambaConfig {
        bos_token_id: tokenizer.special_id("bos_token"),
        eos_token_id: Some(eos),
        pad_token_id: tokenizer.special_id("pad_token").or(config.pad_token_id),
        ..config.clone()
    })
}

fn write_tokenizer(dir: &Path, tokenizer: &TokenizerFiles) -> Result<()> {
    std::fs::write(dir.join("tokenizer.json"), &tokenizer.tokenizer_json)?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tokenizer.tokenizer_config)? + "\n",
    )?;
    Ok(())
}

fn check_out_dir(out: &Path, force: bool) -> Result<()> {
    let non_empty = out.is_dir()
        && std::fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .next()
            .is_some();
    if out.exists() && !out.is_dir() {
        bail!("--out {} exists and is not a directory", out.display());
    }
    if non_empty && !force {
        bail!(
            "--out {} is not empty; choose another directory or pass --force to replace it",
            out.display()
        );
    }
    Ok(())
}

/// Writes into a fresh sibling directory, then moves it into place: readers never see a partial
/// export, and a failed export leaves `out` as it was.
fn write_atomically<T>(
    out: &Path,
    force: bool,
    write: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    check_out_dir(out, force)?;
    let name = out
        .file_name()
        .with_context(|| format!("--out {} has no directory name", out.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = write(&tmp).and_then(|value| {
        sync_dir_files(&tmp)?;
        Ok(value)
    });
    let value = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if out.exists() {
        let old = parent.join(format!(".{name}.replaced-{}", std::process::id()));
        std::fs::rename(out, &old)
            .with_context(|| format!("moving the old {} aside", out.display()))?;
        std::fs::rename(&tmp, out)
            .with_context(|| format!("moving the export into {}", out.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    } else {
        std::fs::rename(&tmp, out)
            .with_context(|| format!("moving the export into {}", out.display()))?;
    }
    Ok(value)
}

fn sync_dir_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        std::fs::File::open(entry?.path())?.sync_all()?;
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("1.5kb"), Ok(1500));
        assert!(parse_size("5XB").unwrap_err().contains("unit"));
        assert!(parse_size("big").is_err());
        assert!(parse_size("0").is_err());
    }
}
