//! Writing a transformers `ZambaForCausalLM` directory: `config.json`, `generation_config.json`
//! and the weights as `model.safetensors`, or as `model-0000i-of-0000n.safetensors` shards with a
//! `model.safetensors.index.json` above a size threshold (the layout `save_pretrained` writes).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use safetensors::Dtype;

use crate::config::{DtRank, ZambaConfig};
use crate::error::ModelError;
use crate::model::ZambaModel;
use crate::param_table::param_table;
use crate::weights::HostTensor;

/// Storage precision of an exported checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    Bf16,
    F16,
}

impl SaveDtype {
    fn bytes(self) -> usize {
        match self {
            SaveDtype::F32 => 4,
            SaveDtype::Bf16 | SaveDtype::F16 => 2,
        }
    }

    /// The name transformers writes in `config.json` (`dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
            SaveDtype::F16 => "float16",
        }
    }
}

/// How [`write_hf_model`] stores the weights.
#[derive(Debug, Clone, Copy)]
pub struct ExportOptions {
    pub dtype: SaveDtype,
    /// Shards are cut before a tensor would take them past this many bytes (transformers'
    /// `max_shard_size`); one shard is written as `model.safetensors`.
    pub max_shard_bytes: u64,
}

/// The model's parameters under current transformers names and layouts, the shared block once
/// (under its first hybrid layer), `lm_head` omitted (tied) — what `save_pretrained` writes.
pub fn export_hf_tensors(model: &ZambaModel, config: &ZambaConfig) -> BTreeMap<String, HostTensor> {
    hf_tensors_from(parameters_by_path(model), config)
}

/// [`export_hf_tensors`] of parameters already on the host (by module path, as
/// [`parameters_by_path`] gives them): the layout conversion alone, which needs no device.
pub fn hf_tensors_from(
    mut values: HashMap<String, HostTensor>,
    config: &ZambaConfig,
) -> BTreeMap<String, HostTensor> {
    param_table(config)
        .into_iter()
        .map(|spec| {
            let ours = values
                .remove(&spec.path)
                .unwrap_or_else(|| panic!("the model has no parameter {}", spec.path));
            (spec.hf_name, spec.layout.to_hf(ours))
        })
        .collect()
}

/// Every float parameter of `module` on the host, by module path, in the module's layout.
pub fn parameters_by_path<M: Module>(module: &M) -> HashMap<String, HostTensor> {
    struct Collect {
        path: Vec<String>,
        out: HashMap<String, HostTensor>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            let shape = value.dims().to_vec();
            let data = value
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("float parameter");
            self.out
                .insert(self.path.join("."), HostTensor::new(shape, data));
        }
    }
    let mut collect = Collect {
        path: Vec::new(),
        out: HashMap::new(),
    };
    module.visit(&mut collect);
    collect.out
}

/// `config.json` as transformers writes it: every field of `ZambaConfig`, derived values
/// resolved (`mamba_dt_rank`, `attention_hidden_size`, `attention_head_dim`, `layers_block_type`),
/// `architectures` and the storage `dtype`.
pub fn hf_config_json(config: &ZambaConfig, dtype: SaveDtype) -> serde_json::Value {
    let resolved = ZambaConfig {
        mamba_dt_rank: DtRank::Fixed(config.dt_rank()),
        attention_hidden_size: Some(config.attention_hidden_size()),
        attention_head_dim: Some(config.attention_head_dim()),
        layers_block_type: Some(config.layer_kinds()),
        ..config.clone()
    };
    let mut json = serde_json::to_value(&resolved).expect("config serializes");
    json["architectures"] = serde_json::json!(["ZambaForCausalLM"]);
    json["dtype"] = dtype.torch_name().into();
    json["use_cache"] = true.into();
    json
}

/// `generation_config.json`: the special token ids generation starts and stops with.
pub fn generation_config_json(config: &ZambaConfig) -> serde_json::Value {
    serde_json::json!({
        "_from_model_config": true,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    })
}

/// Writes `config.json`, `generation_config.json` and the weights into `dir` (which must exist).
/// Returns the weight files written.
pub fn write_hf_model(
    model: &ZambaModel,
    config: &ZambaConfig,
    dir: &Path,
    opts: ExportOptions,
) -> Result<Vec<String>, ModelError> {
    let tensors = export_hf_tensors(model, config);
    let shards = plan_shards(&tensors, opts.dtype, opts.max_shard_bytes);
    let files: Vec<String> = if shards.len() == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=shards.len())
            .map(|i| format!("model-{i:05}-of-{:05}.safetensors", shards.len()))
            .collect()
    };
    let mut weight_map = serde_json::Map::new();
    for (names, file) in shards.iter().zip(&files) {
        let part: BTreeMap<String, HostTensor> = names
            .iter()
            .map(|n| (n.clone(), tensors[n].clone()))
            .collect();
        write_safetensors(&dir.join(file), &part, opts.dtype)?;
        for name in names {
            weight_map.insert(name.clone(), file.clone().into());
        }
    }
    if files.len() > 1 {
        let total: usize = tensors
            .values()
            .map(|t| t.data.len() * opts.dtype.bytes())
            .sum();
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    write_json(
        &dir.join("config.json"),
        &hf_config_json(config, opts.dtype),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &generation_config_json(config),
    )?;
    Ok(files)
}

/// Tensor names per shard, in name order, each shard at most `max_bytes` unless one tensor alone
/// is larger.
fn plan_shards(
    tensors: &BTreeMap<String, HostTensor>,
    dtype: SaveDtype,
    max_bytes: u64,
) -> Vec<Vec<String>> {
    let mut shards: Vec<Vec<String>> = vec![Vec::new()];
    let mut size = 0u64;
    for (name, t) in tensors {
        let bytes = (t.data.len() * dtype.bytes()) as u64;
        if size > 0 && size + bytes > max_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("non-empty").push(name.clone());
        size += bytes;
    }
    shards
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value).expect("json") + "\n";
    std::fs::write(path, text).map_err(|e| ModelError::io(path, "could not write", e))
}

/// Writes `config.json` and one `model.safetensors` that transformers'
/// `ZambaForCausalLM.from_pretrained` (and [`crate::load_hf`]) reads.
pub fn save_hf(
    model: &ZambaModel,
    config: &ZambaConfig,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<(), ModelError> {
    save_hf_parameters(parameters_by_path(model), config, dir, dtype)
}

/// [`save_hf`] of parameters already on the host (as [`parameters_by_path`] gives them), so that
/// a thread without the model's device can write them.
pub fn save_hf_parameters(
    parameters: HashMap<String, HostTensor>,
    config: &ZambaConfig,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ModelError::io(dir, "could not create the output directory", e))?;
    write_safetensors(
        &dir.join("model.safetensors"),
        &hf_tensors_from(parameters, config),
        dtype,
    )?;
    write_json(&dir.join("config.json"), &hf_config_json(config, dtype))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_respect_the_size_limit_in_name_order() {
        let t = |n: usize| HostTensor::new(vec![n], vec![0.0; n]);
        let tensors: BTreeMap<String, HostTensor> = [("a", 10), ("b", 10), ("c", 30), ("d", 5)]
            .into_iter()
            .map(|(k, n)| (k.to_string(), t(n)))
            .collect();
        // f32: a 40 B, b 40 B, c 120 B (alone, over the limit), d 20 B.
        let plan = plan_shards(&tensors, SaveDtype::F32, 100);
        assert_eq!(plan, vec![vec!["a", "b"], vec!["c"], vec!["d"]]);
        assert_eq!(plan_shards(&tensors, SaveDtype::F32, 1 << 20).len(), 1);
    }
}
