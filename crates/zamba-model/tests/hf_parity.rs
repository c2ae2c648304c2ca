//! Our model against logits computed by transformers' `ZambaForCausalLM` (fixtures written by
//! scripts/make_hf_fixture.py), and every checkpoint layout the loader accepts or rejects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Gradients, Int, Tensor, TensorData};
use zamba_model::hf::{HfCheckpoint, export_hf_tensors, write_safetensors};
use zamba_model::{HostTensor, SaveDtype, ZambaConfig, ZambaModel, load_hf, next_token_loss};

const FIXTURES: [&str; 2] = ["zamba-tiny-h2", "zamba-tiny-h1"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

struct Expected {
    tokens: Vec<i64>,
    logits: Vec<Vec<f32>>,
    loss: f64,
}

fn expected(dir: &Path) -> Expected {
    let tokens: Vec<i64> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokens.json")).unwrap()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let logits = serde_json::from_value(json["logits"].clone()).unwrap();
    Expected {
        tokens,
        logits,
        loss: json["loss"].as_f64().unwrap(),
    }
}

/// (logits rows, loss) of `model` on `tokens`.
fn run(model: &ZambaModel, tokens: &[i64], device: &Device) -> (Vec<Vec<f32>>, f64) {
    let n = tokens.len();
    let input = Tensor::<2, Int>::from_data(TensorData::new(tokens.to_vec(), vec![1, n]), device);
    let logits = model.forward(input.clone());
    let loss = next_token_loss(logits.clone(), input).into_scalar::<f32>() as f64;
    let vocab = logits.dims()[2];
    let flat = logits.into_data().try_to_vec::<f32>().unwrap();
    (flat.chunks(vocab).map(|r| r.to_vec()).collect(), loss)
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn logits_and_loss_equal_transformers() {
    let device = Device::flex();
    for name in FIXTURES {
        let dir = fixture(name);
        let exp = expected(&dir);
        let (_, model) = load_hf(&dir, &device).unwrap();
        let (logits, loss) = run(&model, &exp.tokens, &device);
        let diff = max_abs_diff(&logits, &exp.logits);
        assert!(diff <= 1e-4, "{name}: max |logit difference| = {diff}");
        assert!(
            (loss - exp.loss).abs() <= 1e-5,
            "{name}: loss {loss} vs transformers {}",
            exp.loss
        );
    }
}

/// Every tensor of the fixture checkpoint, as stored.
fn fixture_tensors(dir: &Path) -> BTreeMap<String, HostTensor> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, HostTensor::new(view.shape().to_vec(), data))
        })
        .collect()
}

/// Writes `tensors` as a checkpoint dir next to the fixture's config.json.
fn write_variant(
    base: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    dtype: SaveDtype,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(base.join("config.json"), dir.path().join("config.json")).unwrap();
    write_safetensors(&dir.path().join("model.safetensors"), tensors, dtype).unwrap();
    dir
}

fn logits_of(dir: &Path) -> Result<Vec<Vec<f32>>, String> {
    let device = Device::flex();
    let exp = expected(&fixture(FIXTURES[0]));
    let (_, model) = load_hf(dir, &device).map_err(|e| e.to_string())?;
    Ok(run(&model, &exp.tokens, &device).0)
}

fn shared_keys(tensors: &BTreeMap<String, HostTensor>) -> Vec<String> {
    tensors
        .keys()
        .filter(|k| k.contains(".shared_transf."))
        .cloned()
        .collect()
}

#[test]
fn accepted_layouts_give_the_same_logits() {
    let base = fixture(FIXTURES[0]);
    let exp = expected(&base);
    let config = ZambaConfig::from_json_file(&base.join("config.json")).unwrap();
    let hybrid = config.hybrid_layers();
    let stored = fixture_tensors(&base);
    let shared = shared_keys(&stored);
    assert!(!shared.is_empty());

    // Shared block stored once per hybrid layer (identical copies) and lm_head present.
    let mut copies = stored.clone();
    for key in &shared {
        let (_, inner) = key.split_once(".shared_transf.").unwrap();
        for h in &hybrid {
            copies.insert(
                format!("model.layers.{h}.shared_transf.{inner}"),
                stored[key].clone(),
            );
        }
    }
    copies.insert(
        "lm_head.weight".into(),
        stored["model.embed_tokens.weight"].clone(),
    );
    let dir = write_variant(&base, &copies, SaveDtype::F32);
    assert!(max_abs_diff(&logits_of(dir.path()).unwrap(), &exp.logits) <= 1e-4);

    // Older hub layout: model.block.* and model.linear_layers.{j}.
    let mut old = BTreeMap::new();
    for (key, t) in &stored {
        let renamed = if let Some((_, inner)) = key.split_once(".shared_transf.") {
            format!("model.block.{inner}")
        } else if let Some(j) = hybrid
            .iter()
            .position(|h| *key == format!("model.layers.{h}.linear.weight"))
        {
            format!("model.linear_layers.{j}.weight")
        } else {
            key.clone()
        };
        old.insert(renamed, t.clone());
    }
    let dir = write_variant(&base, &old, SaveDtype::F32);
    assert!(max_abs_diff(&logits_of(dir.path()).unwrap(), &exp.logits) <= 1e-4);

    // A bare ZambaModel state dict (no "model." prefix).
    let bare: BTreeMap<_, _> = stored
        .iter()
        .map(|(k, t)| (k.strip_prefix("model.").unwrap().to_string(), t.clone()))
        .collect();
    let dir = write_variant(&base, &bare, SaveDtype::F32);
    assert!(max_abs_diff(&logits_of(dir.path()).unwrap(), &exp.logits) <= 1e-4);

    // bf16 and f16 storage: the weights are rounded, so the logits move a little, not a lot.
    for (dtype, tol) in [(SaveDtype::Bf16, 0.1), (SaveDtype::F16, 0.02)] {
        let dir = write_variant(&base, &stored, dtype);
        let diff = max_abs_diff(&logits_of(dir.path()).unwrap(), &exp.logits);
        assert!(diff > 0.0 && diff < tol, "{dtype:?}: {diff}");
    }
}

#[test]
fn sharded_checkpoint_loads() {
    let base = fixture(FIXTURES[0]);
    let exp = expected(&base);
    let stored = fixture_tensors(&base);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(base.join("config.json"), dir.path().join("config.json")).unwrap();
    let (mut first, mut second) = (BTreeMap::new(), BTreeMap::new());
    for (i, (key, t)) in stored.into_iter().enumerate() {
        if i % 2 == 0 {
            first.insert(key, t)
        } else {
            second.insert(key, t)
        };
    }
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", &first),
        ("model-00002-of-00002.safetensors", &second),
    ] {
        write_safetensors(&dir.path().join(file), part, SaveDtype::F32).unwrap();
        for key in part.keys() {
            weight_map.insert(key.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert!(max_abs_diff(&logits_of(dir.path()).unwrap(), &exp.logits) <= 1e-4);
}

#[test]
fn bad_checkpoints_are_errors_naming_the_tensor() {
    let base = fixture(FIXTURES[0]);
    let config = ZambaConfig::from_json_file(&base.join("config.json")).unwrap();
    let stored = fixture_tensors(&base);
    let shared = shared_keys(&stored);
    let hybrid = config.hybrid_layers();

    let mut missing = stored.clone();
    missing.remove("model.layers.0.mamba.A_log");
    let err = logits_of(write_variant(&base, &missing, SaveDtype::F32).path()).unwrap_err();
    assert!(
        err.contains("missing tensor model.layers.0.mamba.A_log"),
        "{err}"
    );

    let mut extra = stored.clone();
    extra.insert(
        "model.layers.99.mamba.D".into(),
        HostTensor::new(vec![1], vec![0.0]),
    );
    let err = logits_of(write_variant(&base, &extra, SaveDtype::F32).path()).unwrap_err();
    assert!(
        err.contains("unexpected tensor") && err.contains("model.layers.99.mamba.D"),
        "{err}"
    );

    let mut misshaped = stored.clone();
    misshaped.insert(
        "model.final_layernorm.weight".into(),
        HostTensor::new(vec![3], vec![1.0; 3]),
    );
    let err = logits_of(write_variant(&base, &misshaped, SaveDtype::F32).path()).unwrap_err();
    assert!(
        err.contains("model.final_layernorm.weight") && err.contains("shape [3]"),
        "{err}"
    );

    let mut differing = stored.clone();
    let key = &shared[0];
    let (_, inner) = key.split_once(".shared_transf.").unwrap();
    let mut changed = stored[key].clone();
    changed.data[0] += 1.0;
    differing.insert(
        format!("model.layers.{}.shared_transf.{inner}", hybrid[1]),
        changed,
    );
    let err = logits_of(write_variant(&base, &differing, SaveDtype::F32).path()).unwrap_err();
    assert!(err.contains("differ") && err.contains(inner), "{err}");

    let mut untied = stored.clone();
    let mut head = stored["model.embed_tokens.weight"].clone();
    head.data[5] += 0.5;
    untied.insert("lm_head.weight".into(), head);
    let err = logits_of(write_variant(&base, &untied, SaveDtype::F32).path()).unwrap_err();
    assert!(err.contains("lm_head.weight"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    std::fs::copy(base.join("config.json"), empty.path().join("config.json")).unwrap();
    let err = logits_of(empty.path()).unwrap_err();
    assert!(err.contains("no model.safetensors"), "{err}");

    let truncated = write_variant(&base, &stored, SaveDtype::F32);
    let file = truncated.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = logits_of(truncated.path()).unwrap_err();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn export_writes_back_exactly_what_was_loaded() {
    let device = Device::flex();
    for name in FIXTURES {
        let dir = fixture(name);
        let (config, model) = load_hf(&dir, &device).unwrap();
        let exported = export_hf_tensors(&model, &config);
        let stored = fixture_tensors(&dir);
        assert_eq!(
            exported.keys().collect::<Vec<_>>(),
            stored.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (key, t) in &stored {
            assert_eq!(&exported[key], t, "{name}: {key}");
        }
        // And the exported checkpoint loads into the same model.
        let out = tempfile::tempdir().unwrap();
        zamba_model::save_hf(&model, &config, out.path(), SaveDtype::F32).unwrap();
        let mut checkpoint = HfCheckpoint::open(out.path(), &config).unwrap();
        let again = ZambaModel::from_source(&config, &mut checkpoint, &device).unwrap();
        checkpoint.finish().unwrap();
        let tokens = expected(&dir).tokens;
        assert_eq!(
            run(&again, &tokens, &device).0,
            run(&model, &tokens, &device).0
        );
    }
}

/// Maps each parameter to its gradient.
struct ToGradient<'a>(&'a Gradients);

impl ModuleMapper for ToGradient<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let grad = param
            .val()
            .grad(self.0)
            .expect("every parameter receives a gradient");
        Param::from_tensor(grad)
    }
}

/// Gradient norms of the loss against the ones transformers computed (`grad_norms` in the
/// fixture): checks the backward pass of every kind of parameter, including the shared block
/// (summed over its uses) and the embedding's padding row.
#[test]
fn gradient_norms_equal_transformers() {
    let device = Device::flex().autodiff();
    for name in FIXTURES {
        let dir = fixture(name);
        let exp = expected(&dir);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let reference: BTreeMap<String, f64> =
            serde_json::from_value(json["grad_norms"].clone()).unwrap();
        let (config, model) = load_hf(&dir, &device).unwrap();
        let n = exp.tokens.len();
        let input =
            Tensor::<2, Int>::from_data(TensorData::new(exp.tokens.clone(), vec![1, n]), &device);
        let grads = next_token_loss(model.forward(input.clone()), input).backward();
        // Replace every parameter by its gradient and export under transformers' names: the
        // export's layout changes (transposes, de-interleaving) keep norms unchanged.
        let grad_model = model.map(&mut ToGradient(&grads));
        let ours = export_hf_tensors(&grad_model, &config);
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (key, grad) in ours {
            let got = grad
                .data
                .iter()
                .map(|&g| (g as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let want = reference[&key];
            let rel = (got - want).abs() / want.max(1e-12);
            assert!(
                rel <= 1e-3,
                "{name}: |grad {key}| = {got}, transformers {want} (relative error {rel})"
            );
        }
    }
}
