//! `MANIFEST.json`: the size and blake3 hash of every file of a checkpoint, written before its
//! completion marker, so that a checkpoint whose bytes changed afterwards — bit rot, a partial
//! copy between clusters, a file truncated by a full disk — is caught before it is trained from.
//!
//! A manifest is data from disk, so it is trusted for nothing: every path must name a regular
//! file inside the checkpoint (relative, no `..`, no symbolic link on the way), sizes are
//! compared before anything is read and exactly the listed bytes are hashed, and the state
//! folders (`model/`, `optimizer/`) may hold nothing the manifest does not list.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::signals::check_interrupt;

pub const MANIFEST: &str = "MANIFEST.json";
const VERSION: u32 = 1;
/// Folders whose every file the trainer reads: nothing unlisted may be in them.
pub const STATE_FOLDERS: &[&str] = &["model", "optimizer"];
/// Files every checkpoint's manifest lists.
const REQUIRED: &[&str] = &[
    "trainer.json",
    "model/config.json",
    "model/model.safetensors",
];
/// A manifest larger than this is not one this trainer wrote.
const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// Bytes hashed between two looks at the signal state.
const HASH_CHUNK: usize = 64 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    /// Path relative to the checkpoint directory (`/`-separated) → entry.
    files: BTreeMap<String, Entry>,
}

/// The size and hash of one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub bytes: u64,
    pub blake3: String,
}

/// Hashes every file under `dir` (except `skip`, e.g. the completion marker) into
/// `dir/MANIFEST.json`; returns the entries written.
pub fn write(dir: &Path, skip: &[&str]) -> Result<BTreeMap<String, Entry>> {
    let mut files = BTreeMap::new();
    for relative in files_under(dir, Path::new(""))? {
        if relative == MANIFEST || skip.contains(&relative.as_str()) {
            continue;
        }
        let path = dir.join(&relative);
        let bytes = regular_file(&path)?.len();
        files.insert(relative, entry(&path, bytes)?);
    }
    let manifest = Manifest {
        version: VERSION,
        files,
    };
    let path = dir.join(MANIFEST);
    std::fs::write(&path, serde_json::to_string_pretty(&manifest)?)
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::File::open(&path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(manifest.files)
}

/// Checks every file listed in `dir`'s manifest, and that the state folders hold nothing else;
/// the error names each file that is missing, not a regular file inside the checkpoint, has
/// another size, or other contents.
pub fn verify(dir: &Path) -> Result<()> {
    let manifest = read(dir)?;
    let mut problems = Vec::new();
    for required in REQUIRED {
        if !manifest.files.contains_key(*required) {
            problems.push(format!("{required}: not in the manifest"));
        }
    }
    for (relative, expected) in &manifest.files {
        check_interrupt(&format!("verifying {}", dir.display()))?;
        if let Err(why) = check_entry(dir, relative, expected) {
            problems.push(format!("{relative}: {why}"));
        }
    }
    for folder in STATE_FOLDERS {
        for relative in files_under(dir, Path::new(folder)).unwrap_or_default() {
            if !manifest.files.contains_key(&relative) {
                problems.push(format!(
                    "{relative}: not in the manifest (added after the checkpoint was written)"
                ));
            }
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

fn read(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let unreadable = || {
        format!(
            "{} has no readable {MANIFEST}, so its contents cannot be verified",
            dir.display()
        )
    };
    let meta = regular_file(&path).with_context(unreadable)?;
    if meta.len() > MAX_MANIFEST_BYTES {
        bail!(
            "{}: {} bytes, more than a manifest of this trainer ({MAX_MANIFEST_BYTES} at most)",
            path.display(),
            meta.len()
        );
    }
    let text = std::fs::read_to_string(&path).with_context(unreadable)?;
    let manifest: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid checkpoint manifest", path.display()))?;
    if manifest.version != VERSION {
        bail!(
            "{}: manifest version {} is not supported (this build writes {VERSION})",
            path.display(),
            manifest.version
        );
    }
    Ok(manifest)
}

/// Why the file `relative` of checkpoint `dir` is not as its manifest entry says, if it is not.
fn check_entry(dir: &Path, relative: &str, expected: &Entry) -> Result<(), String> {
    let path = contained(dir, relative)?;
    let meta = match regular_file(&path) {
        Ok(meta) => meta,
        Err(_) if std::fs::symlink_metadata(&path).is_err() => return Err("missing".into()),
        Err(e) => return Err(format!("{e:#}")),
    };
    if meta.len() != expected.bytes {
        return Err(format!(
            "{} bytes, the manifest says {} (truncated or partially copied)",
            meta.len(),
            expected.bytes
        ));
    }
    let actual = entry(&path, expected.bytes).map_err(|e| format!("{e:#}"))?;
    if actual.blake3 != expected.blake3 {
        return Err("contents changed since it was written (blake3 differs)".into());
    }
    Ok(())
}

/// `dir/relative` if `relative` is a plain relative path and no folder on the way is a
/// symbolic link (a manifest may not point outside its checkpoint).
fn contained(dir: &Path, relative: &str) -> Result<PathBuf, String> {
    let outside = || "not a path inside the checkpoint".to_string();
    let path = Path::new(relative);
    if relative.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(outside());
    }
    let mut current = dir.to_path_buf();
    let parts: Vec<Component> = path.components().collect();
    for part in &parts[..parts.len() - 1] {
        current.push(part);
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_dir() => {}
            Ok(_) => return Err(outside()),
            Err(_) => return Err("missing".into()),
        }
    }
    Ok(dir.join(path))
}

/// The metadata of `path` if it is a regular file (not a link, a device, a pipe or a folder).
pub fn regular_file(path: &Path) -> Result<std::fs::Metadata> {
    let meta =
        std::fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.file_type().is_file() {
        bail!(
            "{} is not a regular file (a link, device, pipe or folder)",
            path.display()
        );
    }
    Ok(meta)
}

/// The entry of the first `bytes` bytes of `path` (a regular file of that size), hashed in
/// chunks so that a signal is honoured between them.
pub fn entry(path: &Path, bytes: u64) -> Result<Entry> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file.take(bytes));
    let mut hasher = blake3::Hasher::new();
    let mut chunk = vec![0u8; HASH_CHUNK];
    let mut total = 0u64;
    loop {
        let n = read_full(&mut reader, &mut chunk)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update_rayon(&chunk[..n]);
        total += n as u64;
        check_interrupt(&format!("hashing {}", path.display()))?;
    }
    if total != bytes {
        bail!(
            "{}: {total} bytes could be read, {bytes} were expected",
            path.display()
        );
    }
    Ok(Entry {
        bytes,
        blake3: hasher.finalize().to_hex().to_string(),
    })
}

/// Fills `buf` as far as `reader` goes; the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Entries under `root/prefix` (regular files and anything else but folders), as `/`-separated
/// paths relative to `root`, sorted. Symbolic links are listed, not followed.
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
