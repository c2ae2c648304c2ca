//! A tiny trained checkpoint through export-hf, eval and generate.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use zamba_model::{ZambaModel, load_hf};
use zamba_train::device::DeviceChoice;
use zamba_train::eval::{Z_95, wilson_interval};
use zamba_train::eval_cmd::{EvalArgs, run as eval};
use zamba_train::export::{ExportArgs, ExportDtype, run as export};
use zamba_train::generate::{GenerateArgs, run as generate};
use zamba_train::train::{TrainOptions, train};

/// Trains 2 steps of a tiny model on synthetic web + instruct data; returns the run dir.
fn tiny_run(dir: &Path) -> PathBuf {
    let run = dir.join("run");
    let config = format!(
        r#"
[run]
name = "eco"
dir = "{run}"
seed = 1

[model]
preset = "zamba-tiny"
hidden_size = 32
intermediate_size = 64
num_attention_heads = 2
num_key_value_heads = 2
vocab_size = 264
pad_token_id = 258

[synthetic]
cache_dir = "{cache}"
web_docs = 400
instruct_examples = 400
validation_fraction = 0.1

[data]
seq_len = 64
seed = 3

[data.sources.web]
paths = ["synthetic:web"]
validation = ["synthetic:web"]
weight = 0.5

[data.sources.instruct]
paths = ["synthetic:instruct"]
validation = ["synthetic:instruct"]
weight = 0.5

[batch]
sequences = 4
micro_batch = 4

[schedule]
kind = "constant"
lr = 1e-3
warmup_steps = 0

[train]
steps = 2

[checkpoint]
every = 2

[eval]
every = 0

[logging]
progress = false
"#,
        run = run.display(),
        cache = dir.join("cache").display(),
    );
    let path = dir.join("eco.toml");
    std::fs::write(&path, config).unwrap();
    train(&TrainOptions {
        config: path,
        overrides: Vec::new(),
        resume: None,
        allow_data_change: false,
    })
    .unwrap();
    run
}

fn logits(model: &ZambaModel, tokens: &[i64]) -> Vec<f32> {
    let device = Device::flex();
    let input = Tensor::<2, Int>::from_data(
        TensorData::new(tokens.to_vec(), vec![1, tokens.len()]),
        &device,
    );
    model
        .forward(input)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap()
}

fn export_args(checkpoint: &Path, out: &Path, dtype: ExportDtype) -> ExportArgs {
    ExportArgs {
        checkpoint: checkpoint.to_path_buf(),
        out: out.to_path_buf(),
        dtype,
        tokenizer: None,
        max_shard_size: 5_000_000_000,
        force: false,
    }
}

#[test]
fn a_trained_checkpoint_exports_evaluates_and_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tiny_run(tmp.path());
    let checkpoint = run.join("checkpoints/step-00000002");
    let device = Device::flex();
    let (_, trained) = load_hf(&checkpoint.join("model"), &device).unwrap();
    let tokens: Vec<i64> = "<|user|>\nWhat is 2 + 2?\n"
        .bytes()
        .map(i64::from)
        .collect();
    let want = logits(&trained, &tokens);

    // f32: the exported weights give exactly the checkpoint's logits.
    let f32_dir = tmp.path().join("export-f32");
    export(export_args(&run, &f32_dir, ExportDtype::F32)).unwrap();
    let (config, exported) = load_hf(&f32_dir, &device).unwrap();
    assert_eq!(logits(&exported, &tokens), want);
    for file in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(f32_dir.join(file).is_file(), "{file}");
    }
    // The byte tokenizer's special ids, not the Mistral defaults of the model config.
    assert_eq!(
        (
            config.bos_token_id,
            config.eos_token_id,
            config.pad_token_id
        ),
        (Some(256), Some(257), Some(258))
    );
    let tokenizer = tokenizers::Tokenizer::from_file(f32_dir.join("tokenizer.json")).unwrap();
    let encoded = tokenizer.encode("héllo", true).unwrap().get_ids().to_vec();
    assert_eq!(encoded, [257u32, 104, 195, 169, 108, 108, 111]);
    let tokenizer_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(f32_dir.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tokenizer_config["eos_token"], "</s>");
    assert!(
        tokenizer_config["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|assistant|>")
    );

    // bf16, sharded: the same logits up to bf16 rounding of the weights.
    let bf16_dir = tmp.path().join("export-bf16");
    export(ExportArgs {
        max_shard_size: 20_000,
        ..export_args(&checkpoint, &bf16_dir, ExportDtype::Bf16)
    })
    .unwrap();
    assert!(bf16_dir.join("model.safetensors.index.json").is_file());
    assert!(
        bf16_dir.join("model-00001-of-00002.safetensors").is_file()
            || std::fs::read_dir(&bf16_dir).unwrap().count() > 6
    );
    let (_, rounded) = load_hf(&bf16_dir, &device).unwrap();
    let got = logits(&rounded, &tokens);
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = want.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    assert!(
        diff > 0.0 && diff < 0.02 * scale.max(1.0),
        "bf16 max |Δlogit| {diff} (logits up to {scale})"
    );

    // An existing non-empty --out is refused and left alone, unless --force.
    let err = export(export_args(&run, &f32_dir, ExportDtype::Bf16))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        logits(&load_hf(&f32_dir, &device).unwrap().1, &tokens),
        want
    );
    export(ExportArgs {
        force: true,
        ..export_args(&run, &f32_dir, ExportDtype::Bf16)
    })
    .unwrap();
    assert_eq!(logits(&load_hf(&f32_dir, &device).unwrap().1, &tokens), got);

    // eval: loss per source, exact match on the instruct set, as JSON.
    let report = tmp.path().join("eval.json");
    eval(EvalArgs {
        device: DeviceChoice::Cpu,
        checkpoint: run.clone(),
        config: None,
        data: Vec::new(),
        seq_len: None,
        batch_size: 4,
        max_batches: Some(2),
        exact_match: 6,
        tokenizer: None,
        out: Some(report.clone()),
    })
    .unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    for source in ["web", "instruct"] {
        let s = &json["sources"][source];
        let loss = s["loss"].as_f64().unwrap();
        assert!(loss > 0.0 && loss < 10.0, "{source}: {loss}");
        assert!((s["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6 * loss.exp());
        assert_eq!(s["tokens"], 2 * 4 * 64);
    }
    // Exact match overall and per task type, each with its Wilson interval.
    let em = &json["exact_match"];
    let count = |tally: &serde_json::Value, key: &str| tally[key].as_u64().unwrap() as usize;
    assert_eq!(count(&em["overall"], "examples"), 6);
    let by_task = em["by_task"].as_object().unwrap();
    assert!(!by_task.is_empty());
    for key in ["examples", "correct"] {
        let per_task: usize = by_task.values().map(|t| count(t, key)).sum();
        assert_eq!(per_task, count(&em["overall"], key), "{key}");
    }
    for tally in std::iter::once(&em["overall"]).chain(by_task.values()) {
        let interval = wilson_interval(count(tally, "correct"), count(tally, "examples"), Z_95);
        assert_eq!(tally["ci95"]["low"].as_f64().unwrap(), interval.low);
        assert_eq!(tally["ci95"]["high"].as_f64().unwrap(), interval.high);
    }

    // generate from the checkpoint and from the export.
    for source in [run.clone(), f32_dir.clone()] {
        generate(GenerateArgs {
            device: DeviceChoice::Cpu,
            checkpoint: source,
            prompt: "<|user|>\nRepeat exactly: abc\n<|assistant|>\n".into(),
            max_new_tokens: 8,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            tokenizer: None,
        })
        .unwrap();
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = export(export_args(
        tmp.path(),
        &tmp.path().join("out"),
        ExportDtype::F32,
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("neither a zamba-train checkpoint"), "{err}");
    assert!(!tmp.path().join("out").exists());
    let err = generate(GenerateArgs {
        device: DeviceChoice::Cpu,
        checkpoint: tmp.path().to_path_buf(),
        prompt: "x".into(),
        max_new_tokens: 1,
        temperature: -1.0,
        top_k: None,
        top_p: None,
        seed: 0,
        tokenizer: None,
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("--temperature"), "{err}");
}
