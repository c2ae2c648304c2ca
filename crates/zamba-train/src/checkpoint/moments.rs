//! AdamW moments on disk, independent of the world size that wrote them.
//!
//! `optimizer/part-RRRRR-of-WWWWW.safetensors`: one file per writing rank (one in all when every
//! rank holds all moments; one per rank under ZeRO-1). Each holds, for the parameter ranges its
//! rank owned, f32 tensors `<path>.m` and `<path>.v`; the file's metadata entry `ranges` maps each
//! parameter path to `[start, end, numel]` (a range of its flattened elements). Loading collects
//! the parts of every file, checks that each parameter is covered exactly once, and cuts out the
//! ranges the loading rank owns — so a run can resume on another world size, with or without
//! ZeRO-1.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::optim::Moments;

pub const OPTIMIZER_DIR: &str = "optimizer";
const RANGES_KEY: &str = "ranges";

/// The file name of part `part` of `parts`.
pub fn part_name(part: usize, parts: usize) -> String {
    format!("part-{part:05}-of-{parts:05}.safetensors")
}

/// The file rank `part` of `parts` writes.
pub fn part_path(checkpoint: &Path, part: usize, parts: usize) -> PathBuf {
    checkpoint.join(OPTIMIZER_DIR).join(part_name(part, parts))
}

/// Writes `moments` (this rank's) to `path`; `numel` gives each parameter's element count.
pub fn write(
    path: &Path,
    moments: &BTreeMap<String, Moments>,
    numel: &HashMap<&str, usize>,
) -> Result<()> {
    let mut ranges = BTreeMap::new();
    let mut encoded = Vec::new();
    for (param, Moments { range, m, v }) in moments {
        let total = *numel
            .get(param.as_str())
            .with_context(|| format!("moments of {param}, which is not a model parameter"))?;
        ranges.insert(param.clone(), [range.start, range.end, total]);
        for (suffix, t) in [("m", m), ("v", v)] {
            let values = t
                .clone()
                .into_data()
                .try_into_vec_as::<f32>()
                .expect("f32 moments");
            let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            encoded.push((format!("{param}.{suffix}"), values.len(), bytes));
        }
    }
    let views = encoded.iter().map(|(name, len, bytes)| {
        let view = TensorView::new(Dtype::F32, vec![*len], bytes).expect("a consistent view");
        (name.clone(), view)
    });
    let metadata = HashMap::from([(RANGES_KEY.to_string(), serde_json::to_string(&ranges)?)]);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    safetensors::serialize_to_file(views, Some(metadata), path)
        .with_context(|| format!("writing {}", path.display()))
}

/// One stored piece of a parameter's moments.
struct Piece {
    file: usize,
    range: Range<usize>,
}

fn collect(checkpoint: &Path, numel: &HashMap<&str, usize>, expect_all: bool) -> Result<Parts> {
    let dir = checkpoint.join(OPTIMIZER_DIR);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("listing {}", dir.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !expect_all => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    files.retain(|p| p.extension().is_some_and(|e| e == "safetensors"));
    files.sort();
    let maps = files
        .iter()
        .map(|p| {
            super::manifest::regular_file(p)?;
            let file =
                std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            // SAFETY: nothing in this program writes a sealed checkpoint's files (checkpoints
            // are written under a temporary name and renamed into place; pruning only unlinks,
            // which a mapping outlives), and the maps live only while `check` or `read` runs.
            // Another program rewriting the files meanwhile is the caveat of any mapped file.
            unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("mapping {}", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;

    let mut pieces: BTreeMap<String, Vec<Piece>> = BTreeMap::new();
    for (i, (path, bytes)) in files.iter().zip(&maps).enumerate() {
        for (param, [start, end, total]) in ranges_of(path, bytes)? {
            match numel.get(param.as_str()) {
                None => bail!(
                    "{}: moments of {param}, which this model does not have; the checkpoint belongs to another architecture",
                    path.display()
                ),
                Some(&n) if n != total || start >= end || end > n => bail!(
                    "{}: moments of {param} cover elements {start}..{end} of {total}, but the parameter has {n}",
                    path.display()
                ),
                Some(_) => {}
            }
            pieces.entry(param).or_default().push(Piece {
                file: i,
                range: start..end,
            });
        }
    }
    for (param, parts) in &mut pieces {
        parts.sort_by_key(|p| p.range.start);
        let mut next = 0;
        for p in parts.iter() {
            if p.range.start != next {
                bail!(
                    "{}: the moments of {param} {} at element {next} (pieces in {})",
                    dir.display(),
                    if p.range.start < next {
                        "overlap"
                    } else {
                        "have a gap"
                    },
                    files[p.file].display()
                );
            }
            next = p.range.end;
        }
        if next != numel[param.as_str()] {
            bail!(
                "{}: the moments of {param} stop at element {next} of {}; a part file is missing",
                dir.display(),
                numel[param.as_str()]
            );
        }
    }

    if expect_all && let Some(param) = numel.keys().filter(|p| !pieces.contains_key(**p)).min() {
        bail!(
            "{}: no AdamW moments for {param}; the checkpoint is incomplete",
            dir.display()
        );
    }
    Ok(Parts {
        files,
        maps,
        pieces,
    })
}

/// The optimizer parts of a checkpoint, mapped, and where each parameter's moments are.
struct Parts {
    files: Vec<PathBuf>,
    maps: Vec<memmap2::Mmap>,
    pieces: BTreeMap<String, Vec<Piece>>,
}

/// Checks that the optimizer parts in `checkpoint` fit the model whose parameters (path →
/// element count) `numel` lists — see [`read`] — without reading the moments.
pub fn check(checkpoint: &Path, numel: &HashMap<&str, usize>, expect_all: bool) -> Result<()> {
    collect(checkpoint, numel, expect_all).map(drop)
}

/// Reads the moments of `wanted` (parameter path → element range) from every part in
/// `checkpoint`; `numel` lists every parameter of the model with its element count. Errors name
/// the file and parameter: a part that is not valid, a parameter the model does not have, one
/// whose pieces overlap or leave a gap, and — when `expect_all` (the optimizer has taken a step)
/// — a parameter without moments.
pub fn read(
    checkpoint: &Path,
    numel: &HashMap<&str, usize>,
    wanted: &[(String, Range<usize>)],
    expect_all: bool,
    device: &Device,
) -> Result<BTreeMap<String, Moments>> {
    let Parts {
        files,
        maps,
        pieces,
    } = collect(checkpoint, numel, expect_all)?;
    let mut moments = BTreeMap::new();
    for (param, range) in wanted {
        let Some(parts) = pieces.get(param) else {
            continue;
        };
        let read_half = |suffix: &str| -> Result<Tensor<1>> {
            let mut out = vec![0f32; range.len()];
            for p in parts {
                let (lo, hi) = (p.range.start.max(range.start), p.range.end.min(range.end));
                if lo >= hi {
                    continue;
                }
                let st = SafeTensors::deserialize(&maps[p.file]).with_context(|| {
                    format!(
                        "{} is not a valid safetensors file",
                        files[p.file].display()
                    )
                })?;
                let name = format!("{param}.{suffix}");
                let view = st.tensor(&name).with_context(|| {
                    format!("{}: tensor {name} is missing", files[p.file].display())
                })?;
                if view.dtype() != Dtype::F32 || view.shape() != [p.range.len()] {
                    bail!(
                        "{}: {name} is {:?} {:?}; expected F32 [{}]",
                        files[p.file].display(),
                        view.dtype(),
                        view.shape(),
                        p.range.len()
                    );
                }
                let data = &view.data()[(lo - p.range.start) * 4..(hi - p.range.start) * 4];
                for (o, b) in out[lo - range.start..hi - range.start]
                    .iter_mut()
                    .zip(data.chunks_exact(4))
                {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Ok(Tensor::from_data(
                TensorData::new(out, vec![range.len()]),
                device,
            ))
        };
        let (m, v) = (read_half("m")?, read_half("v")?);
        moments.insert(
            param.clone(),
            Moments {
                range: range.clone(),
                m,
                v,
            },
        );
    }
    Ok(moments)
}

fn ranges_of(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, [usize; 3]>> {
    let (_, metadata) = SafeTensors::read_metadata(bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let text = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(RANGES_KEY))
        .with_context(|| {
            format!(
                "{}: no `{RANGES_KEY}` metadata; not an optimizer part",
                path.display()
            )
        })?;
    serde_json::from_str(text).with_context(|| {
        format!(
            "{}: the `{RANGES_KEY}` metadata is not valid",
            path.display()
        )
    })
}
