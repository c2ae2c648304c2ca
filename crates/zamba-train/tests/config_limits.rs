//! Every numeric key has a range the code can represent: values beyond it are config errors
//! naming the key (in `--dry-run` too), and no value within it makes loading, the `--dry-run`
//! summary or the LR schedule panic.

mod common;

use std::process::Command;

use serde_json::Value as Json;
use zamba_train::config::{RunConfig, schema_of};

use common::MINIMAL_RUN as BASE;

/// Keys every value of whose type is valid.
const UNBOUNDED: &[&str] = &["run.seed", "data.seed", "synthetic.seed"];

/// A numeric key of the run config and the bounds its schema declares.
struct NumericKey {
    path: String,
    integer: bool,
    lower: Option<f64>,
    upper: Option<f64>,
}

fn numeric_keys() -> Vec<NumericKey> {
    fn visit(schema: &Json, path: &str, out: &mut Vec<NumericKey>) {
        for key in ["oneOf", "anyOf"] {
            if let Some(alternatives) = schema.get(key).and_then(Json::as_array) {
                for alternative in alternatives {
                    visit(alternative, path, out);
                }
            }
        }
        if let Some(entry) = schema.get("additionalProperties") {
            visit(entry, &format!("{path}.web"), out);
        }
        let types: Vec<&str> = match schema.get("type") {
            Some(Json::String(t)) => vec![t.as_str()],
            Some(Json::Array(ts)) => ts.iter().filter_map(Json::as_str).collect(),
            _ => Vec::new(),
        };
        if types.contains(&"integer") || types.contains(&"number") {
            let bound = |names: [&str; 2]| names.iter().find_map(|n| schema.get(*n)?.as_f64());
            out.push(NumericKey {
                path: path.to_string(),
                integer: types.contains(&"integer"),
                lower: bound(["minimum", "exclusiveMinimum"]),
                upper: bound(["maximum", "exclusiveMaximum"]),
            });
        }
        if let Some(properties) = schema.get("properties").and_then(Json::as_object) {
            for (key, property) in properties {
                let child = match path {
                    "" => key.clone(),
                    _ => format!("{path}.{key}"),
                };
                visit(property, &child, out);
            }
        }
    }
    let mut keys = Vec::new();
    visit(&schema_of::<RunConfig>(), "", &mut keys);
    keys
}

fn load(sets: &[String]) -> Result<RunConfig, zamba_train::config::ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    RunConfig::from_toml_str(BASE, dir.path(), sets)
}

#[test]
fn every_numeric_key_has_a_lower_and_an_upper_bound() {
    let keys = numeric_keys();
    assert!(keys.len() > 50, "the walk found {} keys", keys.len());
    let unbounded: Vec<&str> = keys
        .iter()
        .filter(|k| !UNBOUNDED.contains(&k.path.as_str()))
        .filter(|k| k.lower.is_none() || k.upper.is_none())
        .map(|k| k.path.as_str())
        .collect();
    assert!(unbounded.is_empty(), "keys without a range: {unbounded:?}");
}

#[test]
fn a_value_beyond_its_range_is_an_error_naming_the_key() {
    let e = load(&["dist.timeout_s=1e19".into()]).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("dist.timeout_s"), "{e}");
    assert!(e.message.contains("expected in (0, 86400]"), "{e}");
    for (set, key) in [
        ("train.steps=100000000000000", "train.steps"),
        ("model.hidden_size=100000000000", "model.hidden_size"),
        ("data.seq_len=100000000", "data.seq_len"),
        ("runtime.threads=1000000000", "runtime.threads"),
    ] {
        let e = load(&[set.into()]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some(key), "{set}: {e}");
    }
}

#[test]
fn no_value_within_the_ranges_panics() {
    load(&[]).expect("the base config is valid");
    for key in numeric_keys() {
        let mut values = vec![key.lower.unwrap_or(0.0), key.upper.unwrap_or(1e18)];
        if let (Some(lower), Some(upper)) = (key.lower, key.upper) {
            values.push(lower + (upper - lower) / 2.0);
        }
        for value in values {
            let text = match key.integer {
                true => format!("{}", value as i64),
                false => format!("{value:e}"),
            };
            let set = format!("{}={text}", key.path);
            let outcome = std::panic::catch_unwind(|| {
                if let Ok(config) = load(std::slice::from_ref(&set)) {
                    let _ = config.summary();
                    let last = config.train.steps - 1;
                    for step in [0, last / 2, last] {
                        assert!(config.lr(step).is_finite(), "{set}: lr({step})");
                    }
                }
            });
            assert!(outcome.is_ok(), "--set {set} panicked");
        }
    }
}

#[test]
fn dry_run_refuses_an_unrepresentable_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("run.toml");
    let text = BASE.replace("runs/rules", &dir.path().join("run").display().to_string());
    std::fs::write(&config, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_zamba-train"))
        .arg("--config")
        .arg(&config)
        .args(["--dry-run", "--set", "dist.timeout_s=1e19"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`dist.timeout_s`: is 10000000000000000000")
            && !stderr.contains("panicked"),
        "{stderr}"
    );
}
