//! `MANIFEST.json`: the size and blake3 hash of every file of a checkpoint, written before its
//! completion marker, so that a checkpoint whose bytes changed afterwards — bit rot, a partial
//! copy between clusters, a file truncated by a full disk — is caught before it is trained from.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const MANIFEST: &str = "MANIFEST.json";
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    /// Path relative to the checkpoint directory (`/`-separated) → entry.
    files: BTreeMap<String, Entry>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Entry {
    bytes: u64,
    blake3: String,
}

/// Hashes every file under `dir` (except `skip`, e.g. the completion marker) into `dir/MANIFEST.json`.
pub fn write(dir: &Path, skip: &[&str]) -> Result<()> {
    let mut files = BTreeMap::new();
    for relative in files_under(dir, Path::new(""))? {
        if relative == MANIFEST || skip.contains(&relative.as_str()) {
            continue;
        }
        files.insert(relative.clone(), entry(&dir.join(&relative))?);
    }
    let text = serde_json::to_string_pretty(&Manifest {
        version: VERSION,
        files,
    })?;
    let path = dir.join(MANIFEST);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::File::open(&path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
}

/// Checks every file listed in `dir`'s manifest; the error names each file that is missing, has
/// another size, or other contents.
pub fn verify(dir: &Path) -> Result<()> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} has no readable {MANIFEST}, so its contents cannot be verified",
            dir.display()
        )
    })?;
    let manifest: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid checkpoint manifest", path.display()))?;
    if manifest.version != VERSION {
        bail!(
            "{}: manifest version {} is not supported (this build writes {VERSION})",
            path.display(),
            manifest.version
        );
    }
    let mut problems = Vec::new();
    for (relative, expected) in &manifest.files {
        let file = dir.join(relative);
        let Ok(meta) = std::fs::metadata(&file) else {
            problems.push(format!("{relative}: missing"));
            continue;
        };
        if meta.len() != expected.bytes {
            problems.push(format!(
                "{relative}: {} bytes, the manifest says {} (truncated or partially copied)",
                meta.len(),
                expected.bytes
            ));
            continue;
        }
        if entry(&file)?.blake3 != expected.blake3 {
            problems.push(format!(
                "{relative}: contents changed since it was written (blake3 differs)"
            ));
        }
    }
    if !problems.is_empty() {
        bail!(
            "checkpoint {} does not verify: {}",
            dir.display(),
            problems.join("; ")
        );
    }
    Ok(())
}

fn entry(path: &Path) -> Result<Entry> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap_rayon(path)
        .with_context(|| format!("hashing {}", path.display()))?;
    let bytes = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    Ok(Entry {
        bytes,
        blake3: hasher.finalize().to_hex().to_string(),
    })
}

/// Files under `root/prefix`, as `/`-separated paths relative to `root`, sorted.
fn files_under(root: &Path, prefix: &Path) -> Result<Vec<String>> {
    let dir = root.join(prefix);
    let mut out = Vec::new();
    for item in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let item = item?;
        let relative = prefix.join(item.file_name());
        if item.file_type()?.is_dir() {
            out.extend(files_under(root, &relative)?);
        } else {
            out.push(relative.to_string_lossy().replace('\\', "/"));
        }
    }
    out.sort();
    Ok(out)
}
