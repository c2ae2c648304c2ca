//! The optimizer state on disk — AdamW moments, and the f32 master weights of a bf16 run —
//! independent of the world size that wrote it.
//!
//! `optimizer/part-RRRRR-of-WWWWW.safetensors`: one file per writing rank (one in all when every
//! rank holds all of the state; one per rank under ZeRO-1). Each holds, for the parameter ranges
//! its rank owned, f32 tensors `<path>.m` and `<path>.v` (once the optimizer has taken a step) and
//! `<path>.master` (bf16 runs); the file's metadata entry `ranges` maps each parameter path to
//! `[start, end, numel]` (a range of its flattened elements), and `contents` lists which of
//! `master`, `m`, `v` it holds (absent: `m` and `v`). Loading collects the parts of every file,
//! checks that each parameter is covered exactly once, and cuts out the ranges the loading rank
//! owns — so a run can resume on another world size, with or without ZeRO-1.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::optim::{Master, Moments};

pub const OPTIMIZER_DIR: &str = "optimizer";
const RANGES_KEY: &str = "ranges";
const CONTENTS_KEY: &str = "contents";
const MASTER: &str = "master";
/// What a part holds when its metadata does not say (the moments only).
const MOMENTS_ONLY: [&str; 2] = ["m", "v"];

/// The file name of part `part` of `parts`.
pub fn part_name(part: usize, parts: usize) -> String {
    format!("part-{part:05}-of-{parts:05}.safetensors")
}

/// The file rank `part` of `parts` writes.
pub fn part_path(checkpoint: &Path, part: usize, parts: usize) -> PathBuf {
    checkpoint.join(OPTIMIZER_DIR).join(part_name(part, parts))
}

/// Writes this rank's `moments` and `master` weights to `path`; `numel` gives each parameter's
/// element count.
pub fn write(
    path: &Path,
    moments: &BTreeMap<String, Moments>,
    master: &BTreeMap<String, Master>,
    numel: &HashMap<&str, usize>,
) -> Result<()> {
    encode(moments, master, numel)?.write(path)
}

/// A rank's optimizer part, copied to host memory: what [`write`] stores, ready to be written
/// by a thread that has no access to the device.
pub struct EncodedPart {
    /// (tensor name, elements, little-endian f32 bytes), in name order.
    tensors: Vec<(String, usize, Vec<u8>)>,
    metadata: HashMap<String, String>,
}

/// Copies this rank's `moments` and `master` weights to the host; `numel` gives each
/// parameter's element count.
pub fn encode(
    moments: &BTreeMap<String, Moments>,
    master: &BTreeMap<String, Master>,
    numel: &HashMap<&str, usize>,
) -> Result<EncodedPart> {
    let mut ranges = BTreeMap::new();
    let mut tensors = Vec::new();
    let mut store =
        |param: &String, range: &Range<usize>, suffix: &str, t: &Tensor<1>| -> Result<()> {
            let total = *numel.get(param.as_str()).with_context(|| {
                format!("optimizer state of {param}, which is not a model parameter")
            })?;
            let entry = [range.start, range.end, total];
            if *ranges.entry(param.clone()).or_insert(entry) != entry {
                bail!("the master weights and moments of {param} cover different elements");
            }
            let values = t
                .clone()
                .into_data()
                .try_into_vec_as::<f32>()
                .expect("f32 optimizer state");
            let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            tensors.push((format!("{param}.{suffix}"), values.len(), bytes));
            Ok(())
        };
    for (param, Master { range, value }) in master {
        store(param, range, MASTER, value)?;
    }
    for (param, Moments { range, m, v }) in moments {
        store(param, range, "m", m)?;
        store(param, range, "v", v)?;
    }
    let mut contents = Vec::new();
    if !master.is_empty() {
        contents.push(MASTER);
    }
    if !moments.is_empty() || master.is_empty() {
        contents.extend(MOMENTS_ONLY);
    }
    let metadata = HashMap::from([
        (RANGES_KEY.to_string(), serde_json::to_string(&ranges)?),
        (CONTENTS_KEY.to_string(), serde_json::to_string(&contents)?),
    ]);
    Ok(EncodedPart { tensors, metadata })
}

impl EncodedPart {
    /// Writes the part as one safetensors file at `path` (creating its folder).
    pub fn write(&self, path: &Path) -> Result<()> {
        let views = self.tensors.iter().map(|(name, len, bytes)| {
            let view = TensorView::new(Dtype::F32, vec![*len], bytes).expect("a consistent view");
            (name.clone(), view)
        });
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        safetensors::serialize_to_file(views, Some(self.metadata.clone()), path)
            .with_context(|| format!("writing {}", path.display()))
    }
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
    let mut contents: Option<(Vec<String>, usize)> = None;
    for (i, (path, bytes)) in files.iter().zip(&maps).enumerate() {
        let (ranges, held) = metadata_of(path, bytes)?;
        // A rank that owned nothing wrote no state: its part says nothing about the others'.
        if !ranges.is_empty() {
            match &contents {
                None => contents = Some((held, i)),
                Some((first, j)) if *first != held => bail!(
                    "{} holds {} but {} holds {}: the parts are not of one checkpoint",
                    path.display(),
                    held.join(", "),
                    files[*j].display(),
                    first.join(", ")
                ),
                Some(_) => {}
            }
        }
        for (param, [start, end, total]) in ranges {
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

    let contents = contents.map_or_else(|| MOMENTS_ONLY.map(String::from).to_vec(), |(c, _)| c);
    let has_moments = contents.iter().any(|c| c == "m");
    if expect_all
        && let Some(param) = numel
            .keys()
            .filter(|p| !has_moments || !pieces.contains_key(**p))
            .min()
    {
        bail!(
            "{}: no AdamW moments for {param}; the checkpoint is incomplete",
            dir.display()
        );
    }
    Ok(Parts {
        files,
        maps,
        pieces,
        contents,
    })
}

/// The optimizer parts of a checkpoint, mapped, where each parameter's state is, and which
/// tensors the parts hold (`master`, `m`, `v`).
struct Parts {
    files: Vec<PathBuf>,
    maps: Vec<memmap2::Mmap>,
    pieces: BTreeMap<String, Vec<Piece>>,
    contents: Vec<String>,
}

/// Checks that the optimizer parts in `checkpoint` fit the model whose parameters (path →
/// element count) `numel` lists — see [`read`] — without reading the moments.
pub fn check(checkpoint: &Path, numel: &HashMap<&str, usize>, expect_all: bool) -> Result<()> {
    collect(checkpoint, numel, expect_all).map(drop)
}

/// The optimizer state of `wanted` (parameter path → element range) read from every part in
/// `checkpoint`: AdamW moments, and master weights where the parts hold them.
#[derive(Debug, Default)]
pub struct OptimizerState {
    pub moments: BTreeMap<String, Moments>,
    pub master: BTreeMap<String, Master>,
}

/// Reads the optimizer state of `wanted` (parameter path → element range) from every part in
/// `checkpoint`; `numel` lists every parameter of the model with its element count. Errors name
/// the file and parameter: a part that is not valid, a parameter the model does not have, one
/// whose pieces overlap or leave a gap, parts that hold different tensors, and — when
/// `expect_all` (the optimizer has taken a step) — a parameter without moments.
pub fn read(
    checkpoint: &Path,
    numel: &HashMap<&str, usize>,
    wanted: &[(String, Range<usize>)],
    expect_all: bool,
    device: &Device,
) -> Result<OptimizerState> {
    let parts = collect(checkpoint, numel, expect_all)?;
    let holds = |what: &str| parts.contents.iter().any(|c| c == what);
    let mut state = OptimizerState::default();
    for (param, range) in wanted {
        if !parts.pieces.contains_key(param) {
            continue;
        }
        let read = |suffix: &str| parts.read(param, suffix, range, device);
        if holds(MASTER) {
            let value = read(MASTER)?;
            let range = range.clone();
            state.master.insert(param.clone(), Master { range, value });
        }
        if holds("m") {
            let (m, v) = (read("m")?, read("v")?);
            let range = range.clone();
            state.moments.insert(param.clone(), Moments { range, m, v });
        }
    }
    Ok(state)
}

impl Parts {
    /// Elements `range` of `<param>.<suffix>`, put together from the pieces that cover them.
    fn read(
        &self,
        param: &str,
        suffix: &str,
        range: &Range<usize>,
        device: &Device,
    ) -> Result<Tensor<1>> {
        let mut out = vec![0f32; range.len()];
        for p in &self.pieces[param] {
            let (lo, hi) = (p.range.start.max(range.start), p.range.end.min(range.end));
            if lo >= hi {
                continue;
            }
            let file = self.files[p.file].display();
            let st = SafeTensors::deserialize(&self.maps[p.file])
                .with_context(|| format!("{file} is not a valid safetensors file"))?;
            let name = format!("{param}.{suffix}");
            let view = st
                .tensor(&name)
                .with_context(|| format!("{file}: tensor {name} is missing"))?;
            if view.dtype() != Dtype::F32 || view.shape() != [p.range.len()] {
                bail!(
                    "{file}: {name} is {:?} {:?}; expected F32 [{}]",
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
    }
}

/// Each parameter path's `[start, end, numel]` in a part.
type Ranges = BTreeMap<String, [usize; 3]>;

/// Every parameter's range in a part (metadata `ranges`), and which tensors it holds per range
/// (metadata `contents`).
fn metadata_of(path: &Path, bytes: &[u8]) -> Result<(Ranges, Vec<String>)> {
    let (_, metadata) = SafeTensors::read_metadata(bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let metadata = metadata.metadata().as_ref();
    let entry = |key: &str| metadata.and_then(|m| m.get(key));
    let ranges = ranges_of(path, entry(RANGES_KEY))?;
    let contents = match entry(CONTENTS_KEY) {
        None => MOMENTS_ONLY.map(String::from).to_vec(),
        Some(text) => serde_json::from_str(text).with_context(|| {
            format!(
                "{}: the `{CONTENTS_KEY}` metadata is not valid",
                path.display()
            )
        })?,
    };
    Ok((ranges, contents))
}

fn ranges_of(path: &Path, text: Option<&String>) -> Result<Ranges> {
    let text = text.with_context(|| {
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
