//! The execution keys of a run config: `runtime.device` (including `"cube-cpu"`),
//! `runtime.precision`, `train.activation_checkpointing`, and the activation-memory line of
//! `--dry-run`.

use zamba_model::{ActivationCheckpointing, Precision};
use zamba_train::config::{ConfigError, Device, RunConfig};

const BASE: &str = r#"
[run]
dir = "runs/exec"

[model]
preset = "zamba-tiny"

[data]
seq_len = 64
[data.sources.web]
paths = ["synthetic:web"]
weight = 1.0

[batch]
sequences = 4
micro_batch = 2

[schedule]
kind = "constant"
lr = 1e-3

[train]
steps = 10

[checkpoint]
every = 0
"#;

fn load(text: &str, overrides: &[&str]) -> Result<RunConfig, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    std::fs::write(&path, text).unwrap();
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    RunConfig::load(&path, &overrides)
}

#[test]
fn defaults_are_fp32_without_recomputation_on_the_cpu() {
    let c = load(BASE, &[]).unwrap();
    assert_eq!(c.runtime.device, Device::Cpu);
    assert_eq!(c.runtime.precision, Precision::Fp32);
    assert_eq!(
        c.train.activation_checkpointing,
        ActivationCheckpointing::None
    );
}

#[test]
fn keys_parse_from_the_file_and_from_overrides_and_round_trip() {
    let text = format!(
        "{}\n[runtime]\ndevice = \"cube-cpu\"\nprecision = \"bf16\"\n",
        BASE.replace(
            "steps = 10",
            "steps = 10\nactivation_checkpointing = \"layers\""
        )
    );
    let c = load(&text, &[]).unwrap();
    assert_eq!(c.runtime.device, Device::CubeCpu);
    assert_eq!(c.runtime.precision, Precision::Bf16);
    assert_eq!(
        c.train.activation_checkpointing,
        ActivationCheckpointing::Layers
    );
    let again = load(&c.to_toml_string().unwrap(), &[]).unwrap();
    assert_eq!(again.runtime, c.runtime);
    assert_eq!(again.train, c.train);

    let c = load(
        BASE,
        &[
            "runtime.precision=bf16",
            "train.activation_checkpointing=layers",
            "runtime.device=cuda:3",
        ],
    )
    .unwrap();
    assert_eq!(c.runtime.precision, Precision::Bf16);
    assert_eq!(
        c.train.activation_checkpointing,
        ActivationCheckpointing::Layers
    );
    assert_eq!(c.runtime.device, Device::Cuda(3));
}

#[test]
fn bad_values_name_the_key_and_the_choices() {
    let cases = [
        ("runtime.precision=fp16", "runtime.precision", "bf16"),
        (
            "train.activation_checkpointing=layer",
            "train.activation_checkpointing",
            "layers",
        ),
        ("runtime.device=gpu", "runtime.device", "cube-cpu"),
    ];
    for (set, key, choice) in cases {
        let e = load(BASE, &[set]).expect_err(set);
        assert_eq!(e.key.as_deref(), Some(key), "{set}: {e}");
        assert!(e.to_string().contains(choice), "{set}: {e}");
    }
}

#[test]
fn dry_run_estimates_activation_memory_both_ways() {
    let c = load(BASE, &["runtime.precision=bf16"]).unwrap();
    let summary = c.summary();
    let line = summary
        .lines()
        .find(|l| l.contains("activations of one micro-batch"))
        .expect("a memory line");
    assert!(
        line.contains("bf16") && line.contains("without recomputation") && line.contains("layers"),
        "{line}"
    );
}
