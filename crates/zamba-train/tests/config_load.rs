//! RunConfig: loading, every kind of error (named key, did-you-mean), `--set`, round trip, and
//! the paper-scale configs.

use std::path::{Path, PathBuf};
use zamba_train::config::{ConfigError, ConfigErrorKind, Device, RunConfig};
use zamba_train::schedule::ScheduleConfig;

const SMALL: &str = r#"
[run]
name = "tiny"
dir = "runs/tiny"
seed = 1

[model]
preset = "zamba-tiny"

[data]
seq_len = 64
[data.sources.web]
paths = ["shards/web"]
validation = ["shards/web-val"]
weight = 3.0
[data.sources.instruct]
paths = ["synthetic:instruct"]
validation = ["synthetic:instruct"]
weight = 1.0

[batch]
sequences = 8
micro_batch = 4

[schedule]
kind = "cosine"
peak_lr = 1e-3
min_lr = 1e-4
warmup_steps = 10

[train]
steps = 100

[checkpoint]
every = 50

[eval]
every = 25
batches = 2
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn sets(overrides: &[&str]) -> Vec<String> {
    overrides.iter().map(|s| s.to_string()).collect()
}

fn load(text: &str, overrides: &[&str]) -> Result<RunConfig, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "run.toml", text);
    RunConfig::load(&path, &sets(overrides))
}

fn err(text: &str, overrides: &[&str]) -> ConfigError {
    load(text, overrides).expect_err("the config should be rejected")
}

/// SMALL with `old` replaced by `new` (which must occur).
fn edit(old: &str, new: &str) -> String {
    assert!(SMALL.contains(old), "{old:?} not in the base config");
    SMALL.replacen(old, new, 1)
}

#[test]
fn small_config_loads_with_derived_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "run.toml", SMALL);
    let c = RunConfig::load(&path, &[]).unwrap();
    assert_eq!(c.run.name, "tiny");
    assert!(c.run.dir.is_absolute() && c.run.dir.ends_with("runs/tiny"));
    assert_eq!(c.model_config().hidden_size, 64);
    assert_eq!(c.model.preset.as_deref(), Some("zamba-tiny"));
    assert_eq!(c.global_sequences(), 8);
    assert_eq!(c.tokens_per_step(), 512);
    assert_eq!(c.grad_accum_steps(), 2);
    assert_eq!(c.total_tokens(), 51_200);
    // Paper defaults.
    assert_eq!(
        (c.optimizer.beta1, c.optimizer.beta2, c.optimizer.eps),
        (0.9, 0.95, 1e-8)
    );
    assert_eq!(
        (c.optimizer.weight_decay, c.optimizer.clip_grad_norm),
        (0.1, 1.0)
    );
    assert_eq!(c.runtime.device, Device::Cpu);
    assert_eq!(c.runtime.world_size, 1);
    // Relative shard paths are relative to the config's directory; synthetic references stay.
    let web = &c.data.sources["web"];
    assert_eq!(
        PathBuf::from(&web.paths[0]),
        std::path::absolute(dir.path().join("shards/web")).unwrap()
    );
    assert_eq!(c.data.sources["instruct"].paths[0], "synthetic:instruct");
    assert!(
        c.synthetic.is_some(),
        "synthetic sources get a [synthetic] section with defaults"
    );
    close(c.lr(0), 1e-4);
    close(c.lr(9), 1e-3);
    close(c.lr(99), 1e-4);
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-15, "{a} != {b}");
}

#[test]
fn unknown_keys_name_the_key_and_suggest_the_close_one() {
    let e = err(&edit("[batch]", "[optimizer]\nbeta3 = 0.9\n\n[batch]"), &[]);
    assert_eq!(e.kind, ConfigErrorKind::UnknownKey);
    assert_eq!(e.key.as_deref(), Some("optimizer.beta3"));
    assert_eq!(e.did_you_mean.as_deref(), Some("optimizer.beta2"));
    let text = e.to_string();
    assert!(
        text.contains("run.toml") && text.contains("did you mean `optimizer.beta2`?"),
        "{text}"
    );

    let e = err(&edit("[batch]", "[optimiser]\nbeta1 = 0.9\n\n[batch]"), &[]);
    assert_eq!(
        (e.key.as_deref(), e.did_you_mean.as_deref()),
        (Some("optimiser"), Some("optimizer"))
    );

    let e = err(&edit("warmup_steps = 10", "warmup_step = 10"), &[]);
    assert_eq!(
        (e.key.as_deref(), e.did_you_mean.as_deref()),
        (Some("schedule.warmup_step"), Some("schedule.warmup_steps"))
    );

    let e = err(&edit("weight = 3.0", "wieght = 3.0"), &[]);
    assert_eq!(e.key.as_deref(), Some("data.sources.web.wieght"));
    assert_eq!(e.did_you_mean.as_deref(), Some("data.sources.web.weight"));

    let e = err(
        &edit(
            "preset = \"zamba-tiny\"",
            "preset = \"zamba-tiny\"\nhiden_size = 32",
        ),
        &[],
    );
    assert_eq!(
        (e.key.as_deref(), e.did_you_mean.as_deref()),
        (Some("model.hiden_size"), Some("model.hidden_size"))
    );

    let e = err(
        &edit("preset = \"zamba-tiny\"", "preset = \"zamba-tinny\""),
        &[],
    );
    assert_eq!(
        (e.key.as_deref(), e.did_you_mean.as_deref()),
        (Some("model.preset"), Some("\"zamba-tiny\""))
    );

    let e = err(&edit("kind = \"cosine\"", "kind = \"cosin\""), &[]);
    assert_eq!(
        (e.key.as_deref(), e.did_you_mean.as_deref()),
        (Some("schedule.kind"), Some("\"cosine\""))
    );

    let e = err(&edit("every = 50", "every = 50\nkeep_lst = 2"), &[]);
    assert_eq!(
        (e.key.as_deref(), e.did_you_mean.as_deref()),
        (Some("checkpoint.keep_lst"), Some("checkpoint.keep_last"))
    );

    // Nothing close: no suggestion, but the expected keys are listed.
    let e = err(&edit("[batch]", "[optimizer]\nzzzzzz = 1\n\n[batch]"), &[]);
    assert_eq!(e.did_you_mean, None);
    assert!(e.message.contains("`beta2`"), "{}", e.message);
}

#[test]
fn wrong_types_name_the_key_and_the_expected_type() {
    let e = err(&edit("micro_batch = 4", "micro_batch = \"four\""), &[]);
    assert_eq!(
        (e.kind, e.key.as_deref()),
        (ConfigErrorKind::WrongType, Some("batch.micro_batch"))
    );
    assert!(
        e.message.contains("expected a non-negative integer"),
        "{}",
        e.message
    );

    let e = err(&edit("peak_lr = 1e-3", "peak_lr = \"high\""), &[]);
    assert_eq!(
        (e.kind, e.key.as_deref()),
        (ConfigErrorKind::WrongType, Some("schedule.peak_lr"))
    );
    assert!(e.message.contains("expected a number"), "{}", e.message);

    let e = err(
        &edit(
            "preset = \"zamba-tiny\"",
            "preset = \"zamba-tiny\"\nhidden_size = \"big\"",
        ),
        &[],
    );
    assert_eq!(
        (e.kind, e.key.as_deref()),
        (ConfigErrorKind::WrongType, Some("model.hidden_size"))
    );

    let e = err(&edit("every = 25", "every = true"), &[]);
    assert_eq!(
        (e.kind, e.key.as_deref()),
        (ConfigErrorKind::WrongType, Some("eval.every"))
    );

    let e = err(&format!("{SMALL}\n[runtime]\ndevice = \"gpu\"\n"), &[]);
    assert_eq!(e.key.as_deref(), Some("runtime.device"));
    assert!(e.message.contains("cuda:N"), "{}", e.message);

    let e = err(&format!("{SMALL}\n[runtime]\npeak_gflops = -5.0\n"), &[]);
    assert_eq!(e.key.as_deref(), Some("runtime.peak_gflops"));
    assert!(load(&format!("{SMALL}\n[runtime]\npeak_gflops = 50.0\n"), &[]).is_ok());
}

#[test]
fn missing_keys_and_syntax_errors() {
    let e = err(&edit("steps = 100", ""), &[]);
    assert_eq!(
        (e.kind, e.key.as_deref()),
        (ConfigErrorKind::MissingKey, Some("train.steps"))
    );
    let e = err(&edit("kind = \"cosine\"", ""), &[]);
    assert_eq!(
        (e.kind, e.key.as_deref()),
        (ConfigErrorKind::MissingKey, Some("schedule.kind"))
    );
    let e = err("[run\ndir = 3", &[]);
    assert_eq!(e.kind, ConfigErrorKind::Syntax);
    assert!(e.to_string().contains("line 1"), "{e}");
    let e = RunConfig::load(Path::new("/nonexistent/run.toml"), &[]).unwrap_err();
    assert_eq!(e.kind, ConfigErrorKind::Read);
    assert!(e.to_string().contains("/nonexistent/run.toml"));
}

#[test]
fn batch_must_divide_into_micro_batches() {
    let e = err(&edit("sequences = 8", "sequences = 10"), &[]);
    assert_eq!(
        (e.kind, e.key.as_deref()),
        (ConfigErrorKind::Invalid, Some("batch.sequences"))
    );
    assert!(
        e.message.contains("batch.micro_batch") && e.message.contains("runtime.world_size"),
        "{}",
        e.message
    );

    let e = err(&format!("{SMALL}\n[runtime]\nworld_size = 3\n"), &[]);
    assert_eq!(e.key.as_deref(), Some("batch.sequences"));

    let e = err(&edit("sequences = 8", "tokens = 1000"), &[]);
    assert_eq!(e.key.as_deref(), Some("batch.tokens"));
    assert!(e.message.contains("data.seq_len"), "{}", e.message);

    let c = load(&edit("sequences = 8", "tokens = 1024"), &[]).unwrap();
    assert_eq!((c.global_sequences(), c.grad_accum_steps()), (16, 4));

    let e = err(&edit("sequences = 8", "sequences = 8\ntokens = 512"), &[]);
    assert_eq!(e.key.as_deref(), Some("batch.tokens"));
    let e = err(&edit("sequences = 8", ""), &[]);
    assert_eq!(
        (e.kind, e.key.as_deref()),
        (ConfigErrorKind::MissingKey, Some("batch.sequences"))
    );
}

#[test]
fn inconsistent_values_are_rejected() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "warmup_steps = 10",
            "warmup_steps = 500",
            "schedule.warmup_steps",
        ),
        ("min_lr = 1e-4", "min_lr = 1e-2", "schedule.min_lr"),
        ("peak_lr = 1e-3", "peak_lr = -1e-3", "schedule.peak_lr"),
        ("steps = 100", "steps = 0", "train.steps"),
        ("weight = 3.0", "weight = -1.0", "data.sources.web.weight"),
        ("seq_len = 64", "seq_len = 0", "data.seq_len"),
        (
            "[batch]",
            "[optimizer]\nbeta2 = 1.5\n\n[batch]",
            "optimizer.beta2",
        ),
        (
            "[batch]",
            "[optimizer]\nclip_grad_norm = -1.0\n\n[batch]",
            "optimizer.clip_grad_norm",
        ),
        (
            "paths = [\"synthetic:instruct\"]",
            "paths = [\"synthetic:instrct\"]",
            "data.sources.instruct.paths[0]",
        ),
        (
            "preset = \"zamba-tiny\"",
            "preset = \"zamba-tiny\"\nn_mamba_heads = 3",
            "model.n_mamba_heads",
        ),
    ];
    for (old, new, key) in cases {
        let e = err(&edit(old, new), &[]);
        assert_eq!(e.key.as_deref(), Some(*key), "{new}: {e}");
    }
    let e = err(
        &edit(
            "paths = [\"synthetic:instruct\"]",
            "paths = [\"synthetic:instrct\"]",
        ),
        &[],
    );
    assert_eq!(e.did_you_mean.as_deref(), Some("\"synthetic:instruct\""));
    // Evaluation needs held-out data.
    let no_validation = SMALL
        .replace("validation = [\"shards/web-val\"]\n", "")
        .replace("validation = [\"synthetic:instruct\"]\n", "");
    let e = err(&no_validation, &[]);
    assert_eq!(e.key.as_deref(), Some("eval.every"));
    load(&no_validation, &["eval.every=0"]).unwrap();
    // The data's model_vocab_size must agree with the model.
    let e = err(
        &edit("seq_len = 64", "seq_len = 64\nmodel_vocab_size = 1000"),
        &[],
    );
    assert_eq!(e.key.as_deref(), Some("data.model_vocab_size"));
}

#[test]
fn set_overrides_apply_and_are_checked() {
    let c = load(
        SMALL,
        &[
            "optimizer.weight_decay=0.0",
            "train.steps=200",
            "run.dir=runs/other",
            "data.sources.web.weight=2",
            "schedule.peak_lr=3e-3",
            "runtime.device=cuda:1",
            "init.from=runs/phase1/checkpoints/step-100",
        ],
    )
    .unwrap();
    assert_eq!(c.optimizer.weight_decay, 0.0);
    assert_eq!(c.train.steps, 200);
    assert!(c.run.dir.ends_with("runs/other"));
    assert_eq!(c.run.name, "tiny");
    assert_eq!(c.data.sources["web"].weight, 2.0);
    assert_eq!(c.schedule.peak_lr(), 3e-3);
    assert_eq!(c.runtime.device, Device::Cuda(1));
    let init = c.init.as_ref().unwrap();
    assert!(
        init.from.is_absolute()
            && init.from.ends_with("runs/phase1/checkpoints/step-100")
            && !init.load_optimizer
    );

    // A whole schedule can be swapped from the command line.
    let c = load(SMALL, &["schedule.kind=wsd", "schedule.decay_fraction=0.2"]).unwrap();
    assert!(matches!(c.schedule, ScheduleConfig::Wsd(_)));

    let e = err(SMALL, &["optimizer.beta3=0.9"]);
    assert_eq!(
        (e.kind, e.key.as_deref()),
        (ConfigErrorKind::UnknownKey, Some("optimizer.beta3"))
    );
    assert_eq!(e.did_you_mean.as_deref(), Some("optimizer.beta2"));
    assert_eq!(e.from_override.as_deref(), Some("optimizer.beta3=0.9"));
    assert!(e.to_string().contains("--set optimizer.beta3=0.9"), "{e}");

    let e = err(SMALL, &["optimzer.beta1=0.8"]);
    assert_eq!(
        (e.key.as_deref(), e.did_you_mean.as_deref()),
        (Some("optimzer"), Some("optimizer"))
    );
    assert_eq!(e.from_override.as_deref(), Some("optimzer.beta1=0.8"));

    let e = err(SMALL, &["train.steps=many"]);
    assert_eq!(
        (e.kind, e.key.as_deref()),
        (ConfigErrorKind::WrongType, Some("train.steps"))
    );
    assert_eq!(e.from_override.as_deref(), Some("train.steps=many"));

    let e = err(SMALL, &["batch.micro_batch=3"]);
    assert_eq!(
        (e.key.as_deref(), e.from_override),
        (Some("batch.sequences"), None)
    );

    for bad in ["train.steps", "=3", "steps=3", "train..steps=3"] {
        assert_eq!(
            err(SMALL, &[bad]).kind,
            ConfigErrorKind::BadOverride,
            "{bad}"
        );
    }
    let e = err(SMALL, &["train.steps.x=3"]);
    assert_eq!(
        (e.kind, e.key.as_deref()),
        (ConfigErrorKind::BadOverride, Some("train.steps"))
    );
}

#[test]
fn resolved_toml_round_trips_to_an_equal_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "run.toml", SMALL);
    let original = RunConfig::load(
        &path,
        &sets(&[
            "init.from=ckpt",
            "train.spike_zscore=6.0",
            "runtime.threads=2",
            "batch.micro_batch=2",
        ]),
    )
    .unwrap();
    let text = original.to_toml_string().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let saved = write(elsewhere.path(), "resolved.toml", &text);
    let reloaded = RunConfig::load(&saved, &[]).unwrap();
    assert_eq!(reloaded, original, "resolved config:\n{text}");
    // The saved model section carries every resolved field, not just the preset.
    assert!(
        text.contains("hidden_size = 64") && text.contains("preset = \"zamba-tiny\""),
        "{text}"
    );

    // Every schedule kind survives the trip.
    let wsd = RunConfig::load(
        &path,
        &sets(&[
            "schedule.kind=wsd",
            "schedule.decay_steps=20",
            "schedule.decay_shape=1-sqrt",
        ]),
    )
    .unwrap();
    let again = RunConfig::load(
        &write(elsewhere.path(), "wsd.toml", &wsd.to_toml_string().unwrap()),
        &[],
    )
    .unwrap();
    assert_eq!(again, wsd);
    let anneal_text = edit(
        "kind = \"cosine\"\npeak_lr = 1e-3\nmin_lr = 1e-4",
        "kind = \"anneal\"\nstart_lr = 1e-5\npeak_lr = 1e-3\nfinal_lr = 0.0\ndecay_rate = 0.95",
    );
    let anneal = RunConfig::load(&write(dir.path(), "anneal.toml", &anneal_text), &[]).unwrap();
    let again = RunConfig::load(
        &write(
            elsewhere.path(),
            "anneal.toml",
            &anneal.to_toml_string().unwrap(),
        ),
        &[],
    )
    .unwrap();
    assert_eq!(again, anneal);
}

fn repo_config(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs")
        .join(name)
}

#[test]
fn paper_scale_configs_load_and_validate() {
    let p1 = RunConfig::load(&repo_config("zamba-7b-phase1.toml"), &[]).unwrap();
    let an = RunConfig::load(&repo_config("zamba-7b-anneal.toml"), &[]).unwrap();
    for c in [&p1, &an] {
        assert_eq!(
            zamba_model::params::ParamCounts::of(c.model_config()).total(),
            7_232_490_496
        );
        assert_eq!(c.data.seq_len, 4096);
        assert_eq!(c.tokens_per_step(), 512 * 4096);
        assert_eq!(
            (
                c.optimizer.beta1,
                c.optimizer.beta2,
                c.optimizer.weight_decay,
                c.optimizer.clip_grad_norm
            ),
            (0.9, 0.95, 0.1, 1.0)
        );
        // Micro-batches of 1 on 128 ranks: what fits an 80 GB GPU (tests/memory_fit.rs).
        assert_eq!(c.grad_accum_steps(), 4);
        assert_eq!(
            c.optimizer.zero,
            zamba_train::data_parallel::Sharding::Zero1
        );
    }
    assert!(matches!(p1.schedule, ScheduleConfig::Cosine(_)));
    let ScheduleConfig::Anneal(a) = &an.schedule else {
        panic!("the anneal config must use the anneal schedule")
    };
    assert!((a.peak_lr - 0.75 * p1.schedule.peak_lr()).abs() < 1e-15);
    assert_eq!(an.train.steps, 25_156);
    assert_eq!(an.lr(0), a.start_lr);
    assert_eq!(an.lr(an.train.steps - 1), 0.0);
    assert!(an.init.as_ref().is_some_and(|i| !i.load_optimizer));
    // 60% replay of the phase-1 sources, 40% new data.
    let weights: f64 = an
        .data
        .sources
        .iter()
        .filter(|(n, _)| p1.data.sources.contains_key(*n))
        .map(|(_, s)| s.weight)
        .sum();
    let total: f64 = an.data.sources.values().map(|s| s.weight).sum();
    assert!(
        (weights / total - 0.6).abs() < 1e-9,
        "replay share {}",
        weights / total
    );

    let summary = an.summary();
    for needle in [
        "7.23 B",
        "2097152 tokens per step",
        "gradient accumulation 4",
        "FLOPs/token",
        "memory/rank  total",
        "end of warmup",
        "last step",
        "init",
    ] {
        assert!(
            summary.contains(needle),
            "{needle:?} missing in:\n{summary}"
        );
    }
}
