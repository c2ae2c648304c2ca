//! Hugging Face transformers checkpoints: load a `ZambaForCausalLM` directory (`config.json` +
//! `model.safetensors` or a sharded `model.safetensors.index.json`); writing one is in
//! [`crate::hf_export`] (re-exported here).
//!
//! Accepted layouts:
//! - the current one (`model.layers.{i}.shared_transf.*`, `model.layers.{i}.linear.weight`,
//!   `model.layers.{i}.mamba_decoder.*` for hybrid layers), with the shared block stored once or
//!   once per hybrid layer (copies must be identical);
//! - the older hub one (`model.block.*` for the shared block, `model.linear_layers.{j}.weight`
//!   for the j-th hybrid layer's projection);
//! - keys with or without the `model.` prefix; `lm_head.weight` present (must equal the tied
//!   embedding) or absent. bf16, f16, f32 and f64 tensors are converted to f32.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::ZambaConfig;
use crate::error::ModelError;
use crate::model::ZambaModel;
use crate::weights::{HostTensor, Init, WeightSource};

pub use crate::hf_export::{
    ExportOptions, SaveDtype, export_hf_tensors, hf_config_json, hf_tensors_from,
    parameters_by_path, save_hf, save_hf_parameters, write_hf_model, write_safetensors,
};

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the mmapped file.
    start: usize,
    end: usize,
}

/// An opened transformers checkpoint directory, serving tensors by name.
pub struct HfCheckpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
    used: HashSet<String>,
    hybrid_layers: Vec<usize>,
}

/// Loads a transformers Zamba checkpoint directory into a model on `device`.
pub fn load_hf(dir: &Path, device: &Device) -> Result<(ZambaConfig, ZambaModel), ModelError> {
    let config = ZambaConfig::from_json_file(&dir.join("config.json"))?;
    let mut checkpoint = HfCheckpoint::open(dir, &config)?;
    let model = ZambaModel::from_source(&config, &mut checkpoint, device)?;
    checkpoint.finish()?;
    Ok((config, model))
}

impl HfCheckpoint {
    pub fn open(dir: &Path, config: &ZambaConfig) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let shard_names: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index)
                .map_err(|e| ModelError::io(&index, "could not read the shard index", e))?;
            let parsed: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::checkpoint(&index, format!("not valid JSON: {e}")))?;
            let map = parsed
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::checkpoint(&index, "has no \"weight_map\" object"))?;
            let mut names: Vec<String> = map
                .values()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    ModelError::checkpoint(&index, "weight_map values must be file names")
                })?;
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::checkpoint(
                dir,
                "no model.safetensors or model.safetensors.index.json found (PyTorch .bin checkpoints are not supported; \
                 re-save with save_pretrained(safe_serialization=True))",
            ));
        };

        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for path in shard_names {
            let file = File::open(&path)
                .map_err(|e| ModelError::io(&path, "could not open the shard", e))?;
            // SAFETY: the mapping is read-only and nothing in this program writes into an
            // existing file (exports go to a fresh directory renamed into place; a replaced one
            // is only unlinked, which a mapping outlives). Another program rewriting the shard
            // meanwhile is the caveat of any mapped file, which we cannot guard against.
            let mmap = unsafe { Mmap::map(&file) }
                .map_err(|e| ModelError::io(&path, "could not mmap the shard", e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                ModelError::checkpoint(&path, format!("not a valid safetensors file: {e}"))
            })?;
            let data_start = 8 + header_len;
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                let entry = Entry {
                    file: files.len(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + start,
                    end: data_start + end,
                };
                if entry.end > mmap.len() {
                    return Err(ModelError::checkpoint(
                        &path,
                        format!("tensor {name} extends past the end of the file (truncated?)"),
                    ));
                }
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(ModelError::checkpoint(
                        &path,
                        format!("tensor {name} appears in more than one shard"),
                    ));
                }
            }
            files.push((path, mmap));
        }

        // A bare `ZambaModel` state dict has no `model.` prefix.
        if !entries.keys().any(|k| k.starts_with("model.")) {
            entries = entries
                .into_iter()
                .map(|(k, v)| {
                    if k == "lm_head.weight" {
                        (k, v)
                    } else {
                        (format!("model.{k}"), v)
                    }
                })
                .collect();
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            entries,
            used: HashSet::new(),
            hybrid_layers: config.hybrid_layers(),
        })
    }

    /// Every name a tensor may be stored under, the canonical (current transformers) name first.
    fn candidates(&self, name: &str) -> Vec<String> {
        let mut names = vec![name.to_string()];
        let Some(rest) = name.strip_prefix("model.layers.") else {
            return names;
        };
        let Some((layer, suffix)) = rest.split_once('.') else {
            return names;
        };
        let Ok(layer) = layer.parse::<usize>() else {
            return names;
        };
        if let Some(inner) = suffix.strip_prefix("shared_transf.") {
            names.extend(
                self.hybrid_layers
                    .iter()
                    .filter(|&&h| h != layer)
                    .map(|h| format!("model.layers.{h}.shared_transf.{inner}")),
            );
            names.push(format!("model.block.{inner}"));
        } else if suffix == "linear.weight"
            && let Some(j) = self.hybrid_layers.iter().position(|&h| h == layer)
        {
            names.push(format!("model.linear_layers.{j}.weight"));
        }
        names
    }

    fn read(&self, name: &str) -> Result<HostTensor, ModelError> {
        let entry = &self.entries[name];
        let (path, mmap) = &self.files[entry.file];
        let bytes = &mmap[entry.start..entry.end];
        let data = decode(bytes, entry.dtype).ok_or_else(|| {
            ModelError::checkpoint(
                path,
                format!(
                    "tensor {name} has dtype {:?}; expected bf16, f16, f32 or f64",
                    entry.dtype
                ),
            )
        })?;
        let numel: usize = entry.shape.iter().product();
        if data.len() != numel {
            return Err(ModelError::checkpoint(
                path,
                format!(
                    "tensor {name}: {} values for shape {:?}",
                    data.len(),
                    entry.shape
                ),
            ));
        }
        Ok(HostTensor::new(entry.shape.clone(), data))
    }

    /// Checks that nothing in the checkpoint was left unused (a tied `lm_head.weight` must equal
    /// the embedding).
    pub fn finish(mut self) -> Result<(), ModelError> {
        if self.entries.contains_key("lm_head.weight") {
            let head = self.read("lm_head.weight")?;
            let embed = self.read("model.embed_tokens.weight")?;
            if head != embed {
                return Err(ModelError::checkpoint(
                    &self.dir,
                    "lm_head.weight differs from model.embed_tokens.weight, but Zamba ties them (tie_word_embeddings)",
                ));
            }
            self.used.insert("lm_head.weight".into());
        }
        let mut unexpected: Vec<&String> = self
            .entries
            .keys()
            .filter(|k| !self.used.contains(*k))
            .collect();
        if !unexpected.is_empty() {
            unexpected.sort();
            let shown: Vec<_> = unexpected.iter().take(10).map(|s| s.as_str()).collect();
            return Err(ModelError::checkpoint(
                &self.dir,
                format!(
                    "{} unexpected tensor(s) that the config does not account for: {}{} (does config.json match the weights?)",
                    unexpected.len(),
                    shown.join(", "),
                    if unexpected.len() > 10 { ", …" } else { "" }
                ),
            ));
        }
        Ok(())
    }
}

impl WeightSource for HfCheckpoint {
    fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        _init: Init,
    ) -> Result<HostTensor, ModelError> {
        let candidates = self.candidates(name);
        let present: Vec<String> = candidates
            .iter()
            .filter(|c| self.entries.contains_key(*c))
            .cloned()
            .collect();
        let Some(first) = present.first() else {
            return Err(ModelError::checkpoint(
                &self.dir,
                format!(
                    "missing tensor {name} (looked for: {})",
                    candidates.join(", ")
                ),
            ));
        };
        let mut value: Option<HostTensor> = None;
        for key in &present {
            let found = &self.entries[key].shape;
            if found != shape {
                return Err(ModelError::checkpoint(
                    &self.dir,
                    format!("tensor {key} has shape {found:?}, expected {shape:?} for this config"),
                ));
            }
            let t = self.read(key)?;
            match &value {
                None => value = Some(t),
                Some(v) if *v != t => {
                    return Err(ModelError::checkpoint(
                        &self.dir,
                        format!("{key} and {first} are copies of the one shared tensor but differ"),
                    ));
                }
                Some(_) => {}
            }
            self.used.insert(key.clone());
        }
        Ok(value.expect("at least one candidate is present"))
    }
}

fn decode(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}
