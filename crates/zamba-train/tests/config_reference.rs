//! The configuration reference cannot drift: docs/configuration.md equals what the config types
//! generate, every example in it and every file in configs/ passes `--dry-run`, and
//! `config init` writes starters that do too.

use std::path::{Path, PathBuf};
use std::process::Command;
use zamba_model::config::PRESETS;
use zamba_train::config::{
    ConfigErrorKind, REGENERATE, RunConfig, StarterStyle, reference_markdown, render_starter,
    schema_of, starter_config,
};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What `--dry-run` does short of plotting: load, validate, and build the summary.
fn dry_run(text: &str) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    RunConfig::from_toml_str(text, dir.path(), &[])
        .map(|c| c.summary())
        .map_err(|e| format!("{e}\n--- config ---\n{text}"))
}

#[test]
fn committed_reference_is_current() {
    let path = repo_root().join("docs/configuration.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = reference_markdown();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(generated.lines().count()));
        panic!(
            "docs/configuration.md is out of date with the config types (first difference at line {}).\n\
             Regenerate it with:\n    {REGENERATE}",
            line + 1
        );
    }
}

/// Every key, in every section, schedule kind and `[data.sources.NAME]` table, has a doc
/// comment: a key added without one fails here, not silently in the reference.
#[test]
fn every_key_is_documented() {
    fn visit(schema: &serde_json::Value, path: &str, undocumented: &mut Vec<String>) {
        for alt in ["anyOf", "oneOf"] {
            for variant in schema
                .get(alt)
                .and_then(|a| a.as_array())
                .into_iter()
                .flatten()
            {
                visit(variant, path, undocumented);
            }
        }
        if let Some(entry) = schema.get("additionalProperties").filter(|v| v.is_object()) {
            visit(entry, &format!("{path}.NAME"), undocumented);
        }
        let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) else {
            return;
        };
        for (key, property) in properties {
            let key_path = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            let tag = property.get("const").is_some();
            let documented = property
                .get("description")
                .and_then(|d| d.as_str())
                .is_some_and(|d| !d.trim().is_empty());
            if !documented && !tag {
                undocumented.push(key_path.clone());
            }
            visit(property, &key_path, undocumented);
        }
    }
    let mut undocumented = Vec::new();
    visit(&schema_of::<RunConfig>(), "", &mut undocumented);
    assert!(
        undocumented.is_empty(),
        "keys without a doc comment (the reference would have no description): {undocumented:?}"
    );
}

/// The ```toml blocks of a Markdown text.
fn toml_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// `fragment`'s sections replace the same sections of `base` (a `[schedule]` example swaps the
/// whole schedule).
fn merge(base: &str, fragment: &str) -> String {
    let mut table: toml::Table = toml::from_str(base).unwrap();
    let fragment: toml::Table = toml::from_str(fragment).unwrap();
    for (section, value) in fragment {
        table.insert(section, value);
    }
    toml::to_string(&table).unwrap()
}

#[test]
fn every_example_in_the_reference_passes_dry_run() {
    let reference = reference_markdown();
    let blocks = toml_blocks(&reference);
    let base = render_starter("zamba-tiny", StarterStyle::RequiredOnly).unwrap();
    assert_eq!(blocks[0], base, "the first example is the minimal config");
    // One per schedule kind and one for [init], besides the minimal config.
    let fragments = &blocks[1..];
    for kind in ["constant", "cosine", "wsd", "anneal"] {
        assert!(
            fragments
                .iter()
                .any(|b| b.contains(&format!("kind = \"{kind}\""))),
            "no example for schedule kind {kind}"
        );
    }
    assert!(fragments.iter().any(|b| b.contains("[init]")));
    dry_run(&base).unwrap();
    for fragment in fragments {
        let summary = dry_run(&merge(&base, fragment)).unwrap();
        if fragment.contains("[init]") {
            assert!(summary.contains("init         weights from"), "{summary}");
        }
    }
}

#[test]
fn every_config_in_configs_passes_dry_run() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo_root().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let config = RunConfig::load(&path, &[])
                .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));
            assert!(config.summary().contains("LR schedule"));
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} configs found");
}

/// The recipe demonstration of docs/recipe.md: each config passes the binary's `--dry-run`, and
/// the three hold together as the comparison needs. Their outcome is measured in docs/recipe.md,
/// not here.
#[test]
fn recipe_demo_configs_pass_dry_run_and_hold_together() {
    let names = [
        "recipe-demo-phase1.toml",
        "recipe-demo-anneal.toml",
        "recipe-demo-continue.toml",
    ];
    let path = |name: &str| repo_root().join("configs").join(name);
    let [phase1, anneal, control] = names.map(|name| RunConfig::load(&path(name), &[]).unwrap());
    let last_phase1_lr = phase1.lr(phase1.train.steps - 1);
    let same = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b;
    let phase1_checkpoint = phase1
        .run
        .dir
        .join(format!("checkpoints/step-{:08}", phase1.train.steps));
    for run in [&anneal, &control] {
        // Same model, data and batch shape, starting from phase 1's last checkpoint.
        assert_eq!(run.model_config(), phase1.model_config());
        assert_eq!(run.synthetic, phase1.synthetic);
        assert_eq!(run.data.seq_len, phase1.data.seq_len);
        assert_eq!(run.tokens_per_step(), phase1.tokens_per_step());
        assert_eq!(run.init.as_ref().unwrap().from, phase1_checkpoint);
        assert!(same(run.lr(0), last_phase1_lr), "{}", run.run.name);
    }
    // The control trains on as many tokens as the anneal.
    assert_eq!(anneal.total_tokens(), control.total_tokens());
    // Every run measures held-out loss on both sources, so all three can be compared.
    let instruct_share = |run: &RunConfig| {
        let sources = &run.data.sources;
        assert!(sources.values().all(|s| !s.validation.is_empty()));
        sources["instruct"].weight / sources.values().map(|s| s.weight).sum::<f64>()
    };
    assert_eq!(instruct_share(&phase1), 0.0);
    assert_eq!(instruct_share(&control), 0.0);
    let replay = 1.0 - instruct_share(&anneal);
    assert!((0.5..=0.7).contains(&replay), "replay {replay}");
    // The anneal re-warms to 0.75 × phase 1's peak and decays; the control holds phase 1's final LR.
    let peak = |run: &RunConfig| (0..run.train.steps).map(|s| run.lr(s)).fold(0.0, f64::max);
    assert!(same(peak(&anneal), 0.75 * peak(&phase1)));
    assert!(anneal.lr(anneal.train.steps - 1) < last_phase1_lr);
    assert!((0..control.train.steps).all(|s| same(control.lr(s), last_phase1_lr)));

    let dir = tempfile::tempdir().unwrap();
    for name in names {
        let dry = Command::new(env!("CARGO_BIN_EXE_zamba-train"))
            .args(["--config", path(name).to_str().unwrap(), "--dry-run"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&dry.stdout);
        assert!(
            dry.status.success() && stdout.contains("LR schedule"),
            "{name}: {stdout}{}",
            String::from_utf8_lossy(&dry.stderr)
        );
    }
}

/// Uncomments every `# [section]` header and `# key = value` line that shows a default, except
/// in `[init]` and `[synthetic]` (absent = not used, rather than defaults).
fn uncomment_defaults(text: &str) -> String {
    let mut section = String::new();
    let mut out = String::new();
    for line in text.lines() {
        let bare = line.strip_prefix("# ").unwrap_or(line);
        if bare.starts_with('[') && bare.ends_with(']') {
            section = bare.to_owned();
        }
        let is_key = bare.split_once(" = ").is_some_and(|(k, v)| {
            k.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !v.starts_with('<')
        });
        let switch_on = line.starts_with("# ")
            && section != "[init]"
            && section != "[synthetic]"
            && (is_key || bare == section);
        out.push_str(if switch_on { bare } else { line });
        out.push('\n');
    }
    out
}

#[test]
fn starters_load_for_every_preset() {
    for preset in PRESETS {
        let text = starter_config(preset).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = RunConfig::from_toml_str(&text, dir.path(), &[])
            .unwrap_or_else(|e| panic!("the {preset} starter does not load: {e}\n{text}"));
        assert_eq!(config.model.preset.as_deref(), Some(*preset));
        // Commented-out keys and sections show the defaults: switching them on changes nothing.
        let uncommented = uncomment_defaults(&text);
        for line in [
            "\n[optimizer]\n",
            "\nbeta1 = 0.9\n",
            "\n[logging]\n",
            "\nspike_window = 128\n",
        ] {
            assert!(
                uncommented.contains(line),
                "{line:?} not switched on:\n{uncommented}"
            );
        }
        let again = RunConfig::from_toml_str(&uncommented, dir.path(), &[])
            .unwrap_or_else(|e| panic!("{preset}: {e}\n{uncommented}"));
        assert_eq!(again, config);
        // Every section appears, used or commented out.
        for section in ["[run]", "[init]", "[optimizer]", "[logging]", "[runtime]"] {
            assert!(text.contains(section), "{preset}: {section} missing");
        }
    }
    assert!(starter_config("zamba-70b").is_err());
}

#[test]
fn sections_with_defaults_may_be_left_out_and_required_ones_are_named() {
    let minimal = render_starter("zamba-tiny", StarterStyle::RequiredOnly).unwrap();
    for optional in [
        "[checkpoint]",
        "[eval]",
        "[optimizer]",
        "[logging]",
        "[runtime]",
        "[init]",
    ] {
        assert!(
            !minimal.contains(optional),
            "{optional} in the minimal config"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let c = RunConfig::from_toml_str(&minimal, dir.path(), &[]).unwrap();
    assert_eq!(
        (
            c.checkpoint.every,
            c.checkpoint.keep_last,
            c.checkpoint.keep_every
        ),
        (1000, 2, 0)
    );
    assert_eq!(
        (c.eval.every, c.logging.every, c.runtime.world_size),
        (0, 1, 1)
    );
    let table: toml::Table = toml::from_str(&minimal).unwrap();
    for section in ["run", "model", "data", "batch", "schedule", "train"] {
        let mut without = table.clone();
        without.remove(section);
        let e = RunConfig::from_toml_str(&toml::to_string(&without).unwrap(), dir.path(), &[])
            .expect_err(section);
        assert_eq!(
            (e.kind, e.key.as_deref()),
            (ConfigErrorKind::MissingKey, Some(section)),
            "{e}"
        );
    }
}

#[test]
fn config_init_writes_a_starter_that_passes_dry_run_and_never_overwrites() {
    let exe = env!("CARGO_BIN_EXE_zamba-train");
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(exe)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let init = run(&[
        "config",
        "init",
        "--preset",
        "zamba-tiny",
        "--out",
        "run.toml",
    ]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let written = std::fs::read_to_string(dir.path().join("run.toml")).unwrap();
    assert_eq!(written, starter_config("zamba-tiny").unwrap());

    let dry = run(&["--config", "run.toml", "--dry-run"]);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let stdout = String::from_utf8_lossy(&dry.stdout);
    assert!(stdout.contains("== Run \"zamba-tiny\""), "{stdout}");
    assert!(dir.path().join("runs/zamba-tiny/lr_schedule.svg").exists());

    // An existing file is refused, and left as it was.
    std::fs::write(dir.path().join("run.toml"), "# mine\n").unwrap();
    let again = run(&[
        "config",
        "init",
        "--preset",
        "zamba-bench",
        "--out",
        "run.toml",
    ]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("run.toml")).unwrap(),
        "# mine\n"
    );
    let forced = run(&[
        "config",
        "init",
        "--preset",
        "zamba-bench",
        "--out",
        "run.toml",
        "--force",
    ]);
    assert!(forced.status.success());
    assert!(
        std::fs::read_to_string(dir.path().join("run.toml"))
            .unwrap()
            .contains("zamba-bench")
    );

    let bad = run(&["config", "init", "--preset", "zamba-70b"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("zamba-tiny"));

    let reference = run(&["config", "reference"]);
    assert!(reference.status.success());
    assert_eq!(
        String::from_utf8_lossy(&reference.stdout),
        reference_markdown()
    );
}
