//! Hugging Face transformers checkpoints: load a `ZambaForCausalLM` directory (`config.json` +
//! `model.safetensors` or a sharded `model.safetensors.index.json`) and write one back.
//!
//! Accepted layouts:
//! - the current one (`model.layers.{i}.shared_transf.*`, `model.layers.{i}.linear.weight`,
//!   `model.layers.{i}.mamba_decoder.*` for hybrid layers), with the shared block stored once or
//!   once per hybrid layer (copies must be identical);
//! - the older hub one (`model.block.*` for the shared block, `model.linear_layers.{j}.weight`
//!   for the j-th hybrid layer's projection);
//! - keys with or without the `model.` prefix; `lm_head.weight` present (must equal the tied
//!   embedding) or absent. bf16, f16, f32 and f64 tensors are converted to f32.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::ZambaConfig;
use crate::error::ModelError;
use crate::model::ZambaModel;
use crate::weights::{HostTensor, Init, WeightSource};

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
            // SAFETY: the file is opened read-only; a concurrent writer would be a user error we
            // cannot guard against, as with any mmapped checkpoint.
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

/// The model's parameters under current transformers names and layouts, the shared block once
/// (under its first hybrid layer), `lm_head` omitted (tied) — what `save_pretrained` writes.
pub fn export_hf_tensors(model: &ZambaModel, config: &ZambaConfig) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    let host = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().expect("f32 parameter");
    let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| {
        out.insert(name, HostTensor::new(shape, data));
    };
    let linear = |l: &burn::nn::Linear| {
        let [i, o] = l.weight.dims();
        HostTensor::new(vec![i, o], host(l.weight.val().reshape([i * o]))).transposed()
    };
    let flat = |t: Tensor<1>| host(t);
    let e = &model.embed_tokens.weight;
    put(
        "model.embed_tokens.weight".into(),
        e.dims().to_vec(),
        flat(e.val().flatten(0, 1)),
    );
    let hybrid = config.hybrid_layers();
    for (i, layer) in model.layers.iter().enumerate() {
        let is_hybrid = layer.hybrid_linear.is_some();
        let prefix = if is_hybrid {
            format!("model.layers.{i}.mamba_decoder")
        } else {
            format!("model.layers.{i}")
        };
        put(
            format!("{prefix}.input_layernorm.weight"),
            vec![config.hidden_size],
            flat(layer.input_layernorm.gamma.val()),
        );
        let m = &layer.mamba;
        let mp = format!("{prefix}.mamba");
        // Re-interleave in_proj: ours [d, 2D] with [x | z] columns → rows 2c (x_c), 2c+1 (z_c).
        let w = linear(&m.in_proj); // [2D, d] in [x | z] row order
        let [two_di, d] = [w.shape[0], w.shape[1]];
        let di = two_di / 2;
        let mut inter = vec![0.0; two_di * d];
        for ch in 0..di {
            for half in 0..2 {
                let src = (half * di + ch) * d;
                let dst = (2 * ch + half) * d;
                inter[dst..dst + d].copy_from_slice(&w.data[src..src + d]);
            }
        }
        put(format!("{mp}.in_proj.weight"), vec![two_di, d], inter);
        let [di_, k] = m.conv_weight.dims();
        put(
            format!("{mp}.conv1d.weight"),
            vec![di_, 1, k],
            flat(m.conv_weight.val().flatten(0, 1)),
        );
        put(
            format!("{mp}.conv1d.bias"),
            vec![di_],
            flat(m.conv_bias.val()),
        );
        put(
            format!("{mp}.x_proj_weight"),
            m.x_proj_weight.dims().to_vec(),
            flat(m.x_proj_weight.val().flatten(0, 2)),
        );
        put(
            format!("{mp}.dt_proj_weight"),
            m.dt_proj_weight.dims().to_vec(),
            flat(m.dt_proj_weight.val().flatten(0, 2)),
        );
        put(
            format!("{mp}.dt_proj_bias"),
            m.dt_proj_bias.dims().to_vec(),
            flat(m.dt_proj_bias.val().flatten(0, 1)),
        );
        put(
            format!("{mp}.A_log"),
            m.a_log.dims().to_vec(),
            flat(m.a_log.val().flatten(0, 2)),
        );
        put(
            format!("{mp}.D"),
            m.d_skip.dims().to_vec(),
            flat(m.d_skip.val().flatten(0, 1)),
        );
        let out_proj = linear(&m.out_proj);
        put(
            format!("{mp}.out_proj.weight"),
            out_proj.shape.clone(),
            out_proj.data,
        );
        if let Some(l) = &layer.hybrid_linear {
            let w = linear(l);
            put(
                format!("model.layers.{i}.linear.weight"),
                w.shape.clone(),
                w.data,
            );
        }
    }
    let s = &model.shared;
    let sp = format!(
        "model.layers.{}.shared_transf",
        hybrid.first().copied().unwrap_or(0)
    );
    put(
        format!("{sp}.input_layernorm.weight"),
        s.input_layernorm.gamma.dims().to_vec(),
        flat(s.input_layernorm.gamma.val()),
    );
    put(
        format!("{sp}.pre_ff_layernorm.weight"),
        s.pre_ff_layernorm.gamma.dims().to_vec(),
        flat(s.pre_ff_layernorm.gamma.val()),
    );
    for (name, l) in [
        ("self_attn.q_proj", &s.q_proj),
        ("self_attn.k_proj", &s.k_proj),
        ("self_attn.v_proj", &s.v_proj),
        ("self_attn.o_proj", &s.o_proj),
        ("feed_forward.gate_proj", &s.gate_proj),
        ("feed_forward.up_proj", &s.up_proj),
        ("feed_forward.down_proj", &s.down_proj),
    ] {
        let w = linear(l);
        put(format!("{sp}.{name}.weight"), w.shape.clone(), w.data);
    }
    put(
        "model.final_layernorm.weight".into(),
        vec![config.hidden_size],
        flat(model.final_layernorm.gamma.val()),
    );
    out
}

/// Storage precision of an exported checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    Bf16,
    F16,
}

/// Writes `config.json` and `model.safetensors` that transformers' `ZambaForCausalLM.from_pretrained`
/// (and [`load_hf`]) reads.
pub fn save_hf(
    model: &ZambaModel,
    config: &ZambaConfig,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ModelError::io(dir, "could not create the output directory", e))?;
    write_safetensors(
        &dir.join("model.safetensors"),
        &export_hf_tensors(model, config),
        dtype,
    )?;
    let mut json = serde_json::to_value(config).expect("config serializes");
    json["architectures"] = serde_json::json!(["ZambaForCausalLM"]);
    json["layers_block_type"] =
        serde_json::to_value(config.layer_kinds()).expect("kinds serialize");
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).expect("json"))
        .map_err(|e| ModelError::io(&path, "could not write", e))
}

/// Writes host tensors as one safetensors file in the given precision.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    dtype: SaveDtype,
) -> Result<(), ModelError> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let bytes = match dtype {
                SaveDtype::F32 => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                SaveDtype::Bf16 => t
                    .data
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
                SaveDtype::F16 => t
                    .data
                    .iter()
                    .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
            };
            (name.clone(), t.shape.clone(), bytes)
        })
        .collect();
    let st_dtype = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::Bf16 => Dtype::BF16,
        SaveDtype::F16 => Dtype::F16,
    };
    let views: Vec<(String, safetensors::tensor::TensorView)> = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
                .expect("consistent view");
            (name.clone(), view)
        })
        .collect();
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| ModelError::checkpoint(path, format!("could not write safetensors: {e}")))
}
