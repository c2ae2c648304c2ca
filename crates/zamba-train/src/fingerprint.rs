//! What every rank of a job must agree on, compared at the rendezvous (see
//! `zamba_dist::Fingerprint`): the binary, the resolved run config except the keys that may
//! differ between ranks, the model's parameter table, and the contents of the data.

use anyhow::{Context, Result};
use zamba_data::loader::config::{TokenizerCheck, resolve_shards};
use zamba_dist::Fingerprint;
use zamba_model::param_table::param_table;

use crate::config::{RunConfig, synthetic_set};

/// Keys that may differ between ranks, with why.
const RANK_LOCAL: &[&str] = &[
    // Proven shared at start (each node may mount it under another path).
    "run.dir",
    // Node-local caches; their contents follow from the other [synthetic] keys.
    "synthetic.cache_dir",
    // Where each node keeps its copy of the data: the contents are compared instead.
    "data.sources.*.paths",
    "data.sources.*.validation",
    // Per-node resources and rank 0's own reporting.
    "runtime.threads",
    "runtime.peak_gflops",
    "logging.progress",
];

/// The fingerprint of this rank's view of the run `config` describes.
pub fn of(config: &RunConfig) -> Result<Fingerprint> {
    let mut fingerprint = Fingerprint::new();
    fingerprint.push("zamba-train binary", binary()?);
    let table = toml::Value::try_from(config).context("the run config as TOML")?;
    flatten("", &table, &mut fingerprint);
    for p in param_table(config.model_config()) {
        let shape = p.shape();
        fingerprint.push(format!("model parameter {}", p.path), format!("{shape:?}"));
    }
    data(config, &mut fingerprint)?;
    Ok(fingerprint)
}

/// The version and the blake3 of the running executable: two builds of one version may still
/// compute differently.
fn binary() -> Result<String> {
    let exe = std::env::current_exe().context("finding the running executable")?;
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap_rayon(&exe)
        .with_context(|| format!("hashing {}", exe.display()))?;
    Ok(format!(
        "version {}, blake3 {}",
        env!("CARGO_PKG_VERSION"),
        hasher.finalize().to_hex()
    ))
}

fn is_rank_local(key: &str) -> bool {
    RANK_LOCAL
        .iter()
        .any(|pattern| match pattern.split_once(".*.") {
            Some((head, tail)) => key
                .strip_prefix(head)
                .and_then(|rest| rest.strip_prefix('.'))
                .and_then(|rest| rest.rsplit_once('.'))
                .is_some_and(|(_, field)| field == tail || field.starts_with(&format!("{tail}["))),
            None => key == *pattern || key.starts_with(&format!("{pattern}.")),
        })
}

/// Every leaf of `value` as `a.b[2] = value`, in the config's order.
fn flatten(key: &str, value: &toml::Value, out: &mut Fingerprint) {
    if is_rank_local(key) {
        return;
    }
    match value {
        toml::Value::Table(table) => {
            for (name, item) in table {
                let child = if key.is_empty() {
                    name.clone()
                } else {
                    format!("{key}.{name}")
                };
                flatten(&child, item, out);
            }
        }
        toml::Value::Array(items) if items.iter().any(|i| i.is_table()) => {
            for (i, item) in items.iter().enumerate() {
                flatten(&format!("{key}[{i}]"), item, out);
            }
        }
        toml::Value::String(text) => out.push(key, text.clone()),
        other => out.push(key, other.to_string()),
    }
}

/// Per data source: the synthetic sets it names (their contents follow from `[synthetic]`), or
/// the shards it resolves to, by name and blake3 as their manifests record them.
fn data(config: &RunConfig, out: &mut Fingerprint) -> Result<()> {
    for (name, source) in &config.data.sources {
        for (split, paths) in [("paths", &source.paths), ("validation", &source.validation)] {
            let key = format!("data.sources.{name}.{split} (contents)");
            let (synthetic, files): (Vec<&String>, Vec<&String>) =
                paths.iter().partition(|p| synthetic_set(p).is_some());
            let mut parts: Vec<String> = synthetic.iter().map(|p| p.to_string()).collect();
            if !files.is_empty() {
                let files: Vec<String> = files.into_iter().cloned().collect();
                let shards = resolve_shards(name, &files, &mut TokenizerCheck::default())
                    .with_context(|| format!("data source {name:?}"))?;
                let mut hasher = blake3::Hasher::new();
                for shard in &shards {
                    let file = shard.path.file_name().unwrap_or_default().to_string_lossy();
                    hasher.update(format!("{file} {}\n", shard.info.blake3).as_bytes());
                }
                parts.push(format!(
                    "{} shard(s), blake3 {}",
                    shards.len(),
                    hasher.finalize().to_hex()
                ));
            }
            out.push(key, parts.join(", "));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_local_keys_are_recognised() {
        for key in [
            "run.dir",
            "runtime.threads",
            "data.sources.web.paths",
            "data.sources.web.paths[1]",
            "data.sources.my.source.validation",
            "synthetic.cache_dir",
        ] {
            assert!(is_rank_local(key), "{key}");
        }
        for key in [
            "run.name",
            "data.seq_len",
            "data.sources.web.weight",
            "runtime.device",
            "batch.sequences",
        ] {
            assert!(!is_rank_local(key), "{key}");
        }
    }
}
