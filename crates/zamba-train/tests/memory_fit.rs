//! Memory per rank that the dry run can be trusted on: the estimate's arithmetic against a hand
//! computation, the shipped 7B configs (and every starter) fitting an 80 GB GPU with headroom, a
//! run that cannot fit refused — by `--dry-run` and by the trainer — with what to change, before
//! anything is written, and `bench model --world` measuring each rank's state on the heap
//! within the estimate.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::MINIMAL_RUN;
use zamba_model::memory::{ActivationMemory, AttentionKernel};
use zamba_model::{ActivationCheckpointing, Precision};
use zamba_train::config::RunConfig;
use zamba_train::data_parallel::{Sharding, StateBytes};
use zamba_train::memory_plan::{Fit, MemoryChoices, RankMemory, USABLE_FRACTION};
use zamba_train::train::{TrainOptions, train};

const BIN: &str = env!("CARGO_BIN_EXE_zamba-train");

fn repo_config(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs")
        .join(name)
}

fn overrides(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn bytes_per_parameter_follow_the_optimizer_layout() {
    let per = |p, s, w| {
        let b = StateBytes::per_param(p, s, w);
        [b.params, b.grads, b.master, b.moments]
    };
    // f32: the parameters are the master weights; moments sharded under ZeRO-1.
    assert_eq!(
        per(Precision::Fp32, Sharding::Replicated, 8),
        [4.0, 4.0, 0.0, 8.0]
    );
    assert_eq!(
        per(Precision::Fp32, Sharding::Zero1, 8),
        [4.0, 4.0, 0.0, 1.0]
    );
    // bf16: bf16 working parameters, f32 gradients, f32 master weights + moments (sharded).
    assert_eq!(
        per(Precision::Bf16, Sharding::Replicated, 8),
        [2.0, 4.0, 4.0, 8.0]
    );
    assert_eq!(
        per(Precision::Bf16, Sharding::Zero1, 8),
        [2.0, 4.0, 0.5, 1.0]
    );
    assert_eq!(
        per(Precision::Bf16, Sharding::Zero1, 1),
        [2.0, 4.0, 4.0, 8.0]
    );
}

#[test]
fn the_estimate_of_zamba_7b_on_128_ranks_matches_a_hand_computation() {
    let set = overrides(&["runtime.device_memory_gb=80", "batch.micro_batch=1"]);
    let c = RunConfig::load(&repo_config("zamba-7b-phase1.toml"), &set).unwrap();
    assert_eq!(
        (c.runtime.world_size, c.optimizer.zero, c.runtime.precision),
        (128, Sharding::Zero1, Precision::Bf16)
    );
    let m = RankMemory::of(&c, MemoryChoices::of(&c));
    // 7,232,490,496 parameters: bf16 working copies (2 B) and f32 gradients (4 B) on every rank,
    // f32 master weights (4 B) and two f32 moments (8 B) divided over 128 ranks.
    let n = 7_232_490_496.0;
    assert_eq!(m.state.params, 2.0 * n);
    assert_eq!(m.state.grads, 4.0 * n);
    assert_eq!(m.state.master, 4.0 * n / 128.0);
    assert_eq!(m.state.moments, 8.0 * n / 128.0);
    // The largest bucket is the embedding, 32000 × 3712, bigger than 25 MiB: its f32 gradients
    // flat (4 B), in the f32 transport (4 B) and the all-reduced result (4 B).
    assert_eq!(m.communication, 32000.0 * 3712.0 * 12.0);
    let activations = ActivationMemory::of(
        c.model_config(),
        1,
        4096,
        Precision::Bf16,
        ActivationCheckpointing::Layers,
        AttentionKernel::Flash,
    );
    assert_eq!(m.activations, activations.peak());
    let total = 2.0 * n + 4.0 * n + 12.0 * n / 128.0 + 1_425_408_000.0 + activations.peak();
    assert!((m.total() - total).abs() < 1.0, "{} vs {total}", m.total());
    // bf16 transport: the flat f32 bucket, then 2 B each for its copy and the result.
    let bf16 = RankMemory::of(
        &c,
        MemoryChoices {
            transport: zamba_train::data_parallel::ReduceDtype::Bf16,
            ..MemoryChoices::of(&c)
        },
    );
    assert_eq!(bf16.communication, 32000.0 * 3712.0 * 8.0);
}

/// `zamba-train --dry-run` of `config` with `set` (run.dir in `dir`): (exit code, stdout, stderr).
fn dry_run(config: &Path, dir: &Path, set: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(config).arg("--dry-run");
    cmd.args(["--set", &format!("run.dir={}", dir.join("run").display())]);
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

fn memory_line(stdout: &str) -> &str {
    stdout
        .lines()
        .find(|l| l.starts_with("memory/rank  total"))
        .unwrap_or_else(|| panic!("no memory/rank total line in\n{stdout}"))
}

#[test]
fn the_shipped_7b_configs_fit_an_80_gb_gpu_with_headroom() {
    for name in ["zamba-7b-phase1.toml", "zamba-7b-anneal.toml"] {
        let tmp = tempfile::tempdir().unwrap();
        let (code, stdout, stderr) = dry_run(
            &repo_config(name),
            tmp.path(),
            &["runtime.device_memory_gb=80"],
        );
        assert_eq!(code, Some(0), "{name}: {stderr}");
        let line = memory_line(&stdout);
        assert!(
            line.contains("fits in") && line.contains("80.00 GB"),
            "{line}"
        );
        let c = RunConfig::load(
            &repo_config(name),
            &overrides(&["runtime.device_memory_gb=80"]),
        )
        .unwrap();
        let fit = Fit::of(&c, 1);
        // Headroom: 10 GB below the 90% the check allows, i.e. 18 GB below the device's 80.
        assert!(
            fit.memory.total() < USABLE_FRACTION * 80e9 - 10e9,
            "{name}: {line}"
        );
    }
}

fn tiny_config(dir: &Path) -> PathBuf {
    let path = dir.join("run.toml");
    let text = MINIMAL_RUN.replace("runs/rules", &dir.join("run").display().to_string());
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_run_that_cannot_fit_is_refused_with_what_to_change_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(tmp.path());
    let c = RunConfig::load(&config, &overrides(&["batch.micro_batch=4"])).unwrap();
    let at = |micro_batch| {
        let choices = MemoryChoices {
            micro_batch,
            ..MemoryChoices::of(&c)
        };
        RankMemory::of(&c, choices).total()
    };
    // A device between what micro-batches of 4 and of 2 need.
    let device_gb = (at(4) + at(2)) / 2.0 / USABLE_FRACTION / 1e9;
    let memory = format!("runtime.device_memory_gb={device_gb}");
    let set = ["batch.micro_batch=4", memory.as_str()];

    let (code, stdout, stderr) = dry_run(&config, tmp.path(), &set);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(memory_line(&stdout).contains("DOES NOT FIT"), "{stdout}");
    assert!(
        stderr.contains("does not fit its device")
            && stderr.contains("batch.micro_batch = 2")
            && !stderr.contains("panicked"),
        "{stderr}"
    );
    assert!(!tmp.path().join("run").exists(), "the dry run wrote");

    let refused = train(&TrainOptions {
        config: config.clone(),
        overrides: overrides(&set),
        resume: None,
        allow_data_change: false,
    })
    .unwrap_err();
    let text = format!("{refused:#}");
    assert!(
        text.contains("does not fit its device") && text.contains("batch.micro_batch = 2"),
        "{text}"
    );
    assert!(!tmp.path().join("run").exists(), "the refused run wrote");

    // The same config fits with the suggested micro-batch.
    let fitting = ["batch.micro_batch=2", memory.as_str()];
    let (code, stdout, stderr) = dry_run(&config, tmp.path(), &fitting);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(memory_line(&stdout).contains("fits in"), "{stdout}");
}

#[test]
fn every_presets_starter_fits_an_80_gb_device() {
    for preset in zamba_model::config::PRESETS {
        let text = zamba_train::config::starter_config(preset).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let set = overrides(&["runtime.device_memory_gb=80"]);
        let c = RunConfig::from_toml_str(&text, dir.path(), &set).unwrap();
        let fit = Fit::of(&c, c.runtime.world_size);
        fit.check(&c)
            .unwrap_or_else(|e| panic!("the {preset} starter: {e:#}"));
    }
}

#[test]
fn bench_model_world_measures_each_ranks_state_within_the_estimate() {
    let out = Command::new(BIN)
        .args(["bench", "model", "--preset", "zamba-tiny", "--world", "2"])
        .args(["--batch", "2", "--seq-len", "32", "--steps", "1"])
        .args(["--zero", "--precision", "bf16"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("training state per rank"))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    // World 2 under ZeRO-1 in bf16: master weights and moments halved, parameters and gradients
    // not; each line's measured and estimated MB agree within the stated tolerance.
    assert!(
        lines[1].contains("world 2") && lines[1].contains("tolerance ±5%"),
        "{stdout}"
    );
    for line in &lines {
        let (measured, estimate) = (mb_of(line, "per rank "), mb_of(line, "estimate "));
        assert!((measured / estimate - 1.0).abs() <= 0.05, "{line}");
    }
    let master = |line| mb_of(line, "master weights ");
    assert!(
        (master(lines[0]) - 2.0 * master(lines[1])).abs() <= 0.1,
        "{stdout}"
    );
}

fn mb_of(line: &str, after: &str) -> f64 {
    let rest = &line[line.find(after).unwrap() + after.len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}
