//! Each section's validation: one case per rule, each naming the key to change.

mod common;

use zamba_train::config::{ConfigError, ConfigErrorKind, RunConfig};

use common::MINIMAL_RUN as BASE;

fn load(text: &str, sets: &[&str]) -> Result<RunConfig, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    RunConfig::from_toml_str(text, dir.path(), &sets)
}

/// Each case: `--set` overrides on BASE, the key the error must name, a fragment of its message.
fn assert_rules(cases: &[(&[&str], &str, &str)]) {
    load(BASE, &[]).expect("the base config is valid");
    for (sets, key, needle) in cases {
        let e = load(BASE, sets).expect_err(&format!("{sets:?} should be rejected"));
        assert_eq!(e.key.as_deref(), Some(*key), "{sets:?}: {e}");
        assert!(
            e.message.contains(needle),
            "{sets:?}: {needle:?} not in {e}"
        );
    }
}

/// BASE with one schedule instead of the cosine one.
fn with_schedule(schedule: &str) -> String {
    let start = BASE.find("[schedule]").unwrap();
    let end = BASE.find("[train]").unwrap();
    format!("{}[schedule]\n{schedule}\n{}", &BASE[..start], &BASE[end..])
}

#[test]
fn run_and_init_rules() {
    assert_rules(&[
        (&["run.dir="], "run.dir", "is empty"),
        (&["init.from="], "init.from", "is empty"),
    ]);
}

#[test]
fn data_rules() {
    assert_rules(&[
        (
            &["data.seq_len=0"],
            "data.seq_len",
            "expected in [1, 1048576]",
        ),
        (
            &["data.shuffle_blocks=0"],
            "data.shuffle_blocks",
            "expected in [1, 65536]",
        ),
        (
            &["data.prefetch=0"],
            "data.prefetch",
            "expected in [1, 1024]",
        ),
        (
            &["data.sources.web.weight=-1.0"],
            "data.sources.web.weight",
            "expected in [0, 1000000000]",
        ),
        (
            &["data.sources.web.weight=nan"],
            "data.sources.web.weight",
            "finite",
        ),
        (
            &["data.sources.web.weight=0.0"],
            "data.sources",
            "all source weights are 0",
        ),
        (
            &["data.sources.web.paths=[]"],
            "data.sources.web.paths",
            "at least 1",
        ),
        (
            &["data.model_vocab_size=100"],
            "data.model_vocab_size",
            "model.vocab_size",
        ),
        (
            &["data.sources.web.validation=[\"synthetic:wbe\"]"],
            "data.sources.web.validation[0]",
            "unknown synthetic set",
        ),
    ]);
    let no_sources = BASE.replace(
        "[data.sources.web]\npaths = [\"synthetic:web\"]\nvalidation = [\"synthetic:web\"]\nweight = 1.0\n",
        "sources = {}\n",
    );
    let e = load(&no_sources, &[]).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("data.sources"), "{e}");
    assert!(e.message.contains("data.sources.NAME"), "{e}");
}

#[test]
fn synthetic_rules() {
    assert_rules(&[
        (
            &["synthetic.web_docs=0"],
            "synthetic.web_docs",
            "expected in [1, 1000000000]",
        ),
        (
            &["synthetic.instruct_examples=0"],
            "synthetic.instruct_examples",
            "expected in [1, 1000000000]",
        ),
        (
            &["synthetic.validation_fraction=0.0"],
            "synthetic.validation_fraction",
            "in (0, 1)",
        ),
        (
            &["synthetic.validation_fraction=1.0"],
            "synthetic.validation_fraction",
            "in (0, 1)",
        ),
        (
            &["synthetic.row_group_tokens=0"],
            "synthetic.row_group_tokens",
            "expected in [1, 4294967296]",
        ),
        (
            &["synthetic.tasks={ copy = 1, cpy = 1 }"],
            "synthetic.tasks",
            "unknown instruct task \"cpy\"; the tasks are arithmetic, sort, copy",
        ),
        (
            &["synthetic.tasks={ copy = -1, fact = 1 }"],
            "synthetic.tasks.copy",
            "is -1; expected in [0, 1000000000]",
        ),
        (
            &["synthetic.tasks={ copy = 0 }"],
            "synthetic.tasks",
            "no instruct task has a positive weight",
        ),
    ]);
    // A valid mix is kept through the saved config.
    let config = load(BASE, &["synthetic.tasks={ copy = 1, fact = 2 }"]).unwrap();
    let saved = config.to_toml_string().unwrap();
    let reloaded = RunConfig::from_toml_str(&saved, std::path::Path::new("/"), &[]).unwrap();
    assert_eq!(reloaded.synthetic, config.synthetic);
    let mix = reloaded.synthetic.unwrap().task_mix().unwrap();
    assert_eq!(mix, "copy=1,fact=2".parse().unwrap());
}

#[test]
fn batch_rules() {
    assert_rules(&[
        (
            &["batch.micro_batch=0"],
            "batch.micro_batch",
            "expected in [1, 65536]",
        ),
        (
            &["batch.sequences=0"],
            "batch.sequences",
            "expected in [1, 16777216]",
        ),
        (&["batch.tokens=256"], "batch.tokens", "not both"),
        (&["batch.micro_batch=3"], "batch.sequences", "not divisible"),
        (
            &["runtime.world_size=3"],
            "batch.sequences",
            "runtime.world_size (3)",
        ),
    ]);
    let tokens = BASE.replace("sequences = 8", "tokens = 100");
    let e = load(&tokens, &[]).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("batch.tokens"));
    assert!(
        e.message
            .contains("not a multiple of data.seq_len = 32; e.g. 96 or 128"),
        "{e}"
    );
    let e = load(&BASE.replace("sequences = 8", "tokens = 0"), &[]).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("batch.tokens"), "{e}");
    let e = load(&BASE.replace("sequences = 8", ""), &[]).unwrap_err();
    assert_eq!(
        (e.kind, e.key.as_deref()),
        (ConfigErrorKind::MissingKey, Some("batch.sequences"))
    );
}

#[test]
fn optimizer_rules() {
    assert_rules(&[
        (&["optimizer.beta1=1.0"], "optimizer.beta1", "in [0, 1)"),
        (&["optimizer.beta2=-0.1"], "optimizer.beta2", "in [0, 1)"),
        (&["optimizer.eps=0.0"], "optimizer.eps", "in (0, 1]"),
        (
            &["optimizer.weight_decay=-0.1"],
            "optimizer.weight_decay",
            "in [0, 1000]",
        ),
        (
            &["optimizer.clip_grad_norm=-1.0"],
            "optimizer.clip_grad_norm",
            "in [0, 1000000000000]",
        ),
        (
            &["optimizer.clip_grad_norm=inf"],
            "optimizer.clip_grad_norm",
            "finite",
        ),
    ]);
}

#[test]
fn train_checkpoint_eval_logging_runtime_rules() {
    assert_rules(&[
        (
            &["train.steps=0"],
            "train.steps",
            "expected in [1, 4294967296]",
        ),
        (
            &["train.max_consecutive_skips=0"],
            "train.max_consecutive_skips",
            "in [1, 1000000]",
        ),
        (
            &["train.spike_zscore=0.0"],
            "train.spike_zscore",
            "in (0, 1000000]",
        ),
        (
            &["train.spike_window=1"],
            "train.spike_window",
            "in [2, 100000]",
        ),
        (
            &["checkpoint.keep_last=0"],
            "checkpoint.keep_last",
            "in [1, ",
        ),
        (&["eval.batches=0"], "eval.batches", "in [1, "),
        (&["logging.every=0"], "logging.every", "in [1, "),
        (&["runtime.threads=0"], "runtime.threads", "in [1, 4096]"),
        (&["runtime.world_size=0"], "runtime.world_size", "in [1, "),
        (
            &["runtime.peak_gflops=0.0"],
            "runtime.peak_gflops",
            "in (0, ",
        ),
        (
            &["dist.signal_grace_s=0.0"],
            "dist.signal_grace_s",
            "in (0, 86400]",
        ),
        (
            &[
                "train.steps=4294967296",
                "batch.sequences=16777216",
                "data.seq_len=2048",
            ],
            "train.steps",
            "more than a 64-bit count holds",
        ),
        (
            &["optimizer.zero=2"],
            "optimizer.zero",
            "ZeRO stage 2 is not supported",
        ),
        (&["runtime.device=tpu"], "runtime.device", "cuda:N"),
        (
            &["train.profile_steps=[12, 10]"],
            "train.profile_steps",
            "must not come after the last",
        ),
        (
            &["train.steps=20", "train.profile_steps=[10, 20]"],
            "train.profile_steps",
            "the run's steps are 0 to 19",
        ),
        (
            &["train.profile_steps=[10]"],
            "train.profile_steps",
            "length 2",
        ),
    ]);
    load(BASE, &["train.steps=20", "train.profile_steps=[10, 19]"]).unwrap();
    let no_validation = BASE.replace("validation = [\"synthetic:web\"]\n", "");
    let e = load(&no_validation, &["eval.every=10"]).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("eval.every"));
    assert!(e.message.contains("validation"), "{e}");
    load(&no_validation, &["eval.every=0"]).unwrap();
}

#[test]
fn range_errors_say_what_the_key_is() {
    let e = load(BASE, &["train.steps=0"]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`train.steps`: is 0; expected in [1, 4294967296] (optimizer steps of this run) (from --set train.steps=0)"
    );
}

#[test]
fn schedule_rules_per_kind() {
    let cases: &[(&str, &str, &str)] = &[
        // Shared by every kind: the warmup fits the run.
        (
            "kind = \"constant\"\nlr = 1e-3\nwarmup_steps = 101",
            "schedule.warmup_steps",
            "train.steps",
        ),
        (
            "kind = \"cosine\"\npeak_lr = 1e-3\nwarmup_steps = 100",
            "schedule.warmup_steps",
            "decay",
        ),
        (
            "kind = \"constant\"\nlr = 0.0",
            "schedule.lr",
            "in (0, 1000]",
        ),
        (
            "kind = \"cosine\"\npeak_lr = -1e-3",
            "schedule.peak_lr",
            "in (0, 1000]",
        ),
        (
            "kind = \"cosine\"\npeak_lr = 1e-3\nmin_lr = -1e-4",
            "schedule.min_lr",
            "in [0, 1000]",
        ),
        (
            "kind = \"cosine\"\npeak_lr = 1e-3\nmin_lr = 1e-2",
            "schedule.min_lr",
            "must go down",
        ),
        (
            "kind = \"wsd\"\npeak_lr = 1e-3",
            "schedule.decay_steps",
            "decay_steps or decay_fraction",
        ),
        (
            "kind = \"wsd\"\npeak_lr = 1e-3\ndecay_steps = 10\ndecay_fraction = 0.1",
            "schedule.decay_fraction",
            "not both",
        ),
        (
            "kind = \"wsd\"\npeak_lr = 1e-3\ndecay_steps = 0",
            "schedule.decay_steps",
            "in [1, 4294967296]",
        ),
        (
            "kind = \"wsd\"\npeak_lr = 1e-3\ndecay_fraction = 1.5",
            "schedule.decay_fraction",
            "in (0, 1]",
        ),
        (
            "kind = \"wsd\"\npeak_lr = 1e-3\nwarmup_steps = 50\ndecay_steps = 60",
            "schedule.decay_steps",
            "exceed",
        ),
        (
            "kind = \"wsd\"\npeak_lr = 1e-3\ndecay_steps = 10\ndecay_shape = \"exponential\"",
            "schedule.min_lr",
            "exponential",
        ),
        (
            "kind = \"wsd\"\npeak_lr = 1e-3\ndecay_steps = 10\ndecay_shape = \"sqrt\"",
            "schedule.decay_shape",
            "1-sqrt",
        ),
        (
            "kind = \"anneal\"\nstart_lr = 1e-2\npeak_lr = 1e-3\nwarmup_steps = 10\ndecay = \"linear\"",
            "schedule.start_lr",
            "go up",
        ),
        (
            "kind = \"anneal\"\nstart_lr = 1e-4\npeak_lr = 1e-3\nwarmup_steps = 1\ndecay = \"linear\"",
            "schedule.warmup_steps",
            "at least 2",
        ),
        (
            "kind = \"anneal\"\nstart_lr = 1e-4\npeak_lr = 1e-3\nwarmup_steps = 10",
            "schedule.half_life_steps",
            "missing",
        ),
        (
            "kind = \"anneal\"\nstart_lr = 1e-4\npeak_lr = 1e-3\nwarmup_steps = 10\nhalf_life_steps = 5\ndecay_rate = 0.9",
            "schedule.decay_rate",
            "not both",
        ),
        (
            "kind = \"anneal\"\nstart_lr = 1e-4\npeak_lr = 1e-3\nwarmup_steps = 10\ndecay = \"cosine\"\nhalf_life_steps = 5",
            "schedule.half_life_steps",
            "only applies",
        ),
        (
            "kind = \"anneal\"\nstart_lr = 1e-4\npeak_lr = 1e-3\nwarmup_steps = 10\ndecay_rate = 1.0",
            "schedule.decay_rate",
            "in (0, 1)",
        ),
        (
            "kind = \"anneal\"\nstart_lr = 1e-4\npeak_lr = 1e-3\nwarmup_steps = 10\nhalf_life_steps = 0.0",
            "schedule.half_life_steps",
            "in (0, 4294967296]",
        ),
        (
            "kind = \"anneal\"\nstart_lr = 1e-4\npeak_lr = 1e-3\nwarmup_steps = 10\nfinal_lr = 1e-2\ndecay = \"linear\"",
            "schedule.final_lr",
            "must go down",
        ),
    ];
    for (schedule, key, needle) in cases {
        let e = load(&with_schedule(schedule), &[]).expect_err(schedule);
        assert_eq!(e.key.as_deref(), Some(*key), "{schedule}: {e}");
        assert!(
            e.message.contains(needle),
            "{schedule}: {needle:?} not in {e}"
        );
    }
    for valid in [
        "kind = \"constant\"\nlr = 1e-3",
        "kind = \"wsd\"\npeak_lr = 1e-3\nmin_lr = 1e-5\ndecay_fraction = 0.2\ndecay_shape = \"exponential\"",
        "kind = \"anneal\"\nstart_lr = 1e-4\npeak_lr = 1e-3\nwarmup_steps = 10\ndecay_rate = 0.9",
    ] {
        load(&with_schedule(valid), &[]).unwrap_or_else(|e| panic!("{valid}: {e}"));
    }
}

#[test]
fn checkpoints_are_written_in_the_background_by_default_on_gpus_only() {
    let resolved = |sets: &[&str]| load(BASE, sets).unwrap().checkpoint_async();
    assert!(!resolved(&[]), "the CPU default");
    assert!(resolved(&["runtime.device=cuda"]));
    assert!(resolved(&["runtime.device=cuda:1"]));
    assert!(!resolved(&[
        "runtime.device=cuda",
        "checkpoint.async=false"
    ]));
    assert!(resolved(&["checkpoint.async=true"]));
    // The resolved config keeps the choice as given: absent stays absent.
    let text = load(BASE, &[]).unwrap().to_toml_string().unwrap();
    assert!(!text.contains("async"), "{text}");
    let text = load(BASE, &["checkpoint.async=true"])
        .unwrap()
        .to_toml_string()
        .unwrap();
    assert!(text.contains("async = true"), "{text}");
    let e = load(BASE, &["checkpoint.async=3"]).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("checkpoint.async"), "{e}");
}
