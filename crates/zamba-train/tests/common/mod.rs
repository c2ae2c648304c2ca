//! Shared by the trainer's end-to-end tests: a tiny run config on synthetic data, and readers of
//! what a run leaves behind.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use zamba_train::train::TrainOptions;

/// A tiny run on the synthetic web set, generated into `dir/cache` on first use.
pub fn write_config(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let cache = dir.join("cache");
    let text = format!(
        r#"
[run]
name = "{name}"
dir = "{run}"
seed = 7

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
web_docs = 600
instruct_examples = 600
validation_fraction = 0.1

[data]
seq_len = 64
seed = 3

[data.sources.web]
paths = ["synthetic:web"]
validation = ["synthetic:web"]
weight = 1.0

[batch]
sequences = 8
micro_batch = 4

[checkpoint]
every = 3
keep_last = 10

[eval]
every = 3
batches = 1

[logging]
progress = false
{extra}
"#,
        run = dir.join(name).display(),
        cache = cache.display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

pub fn options(config: PathBuf) -> TrainOptions {
    TrainOptions {
        config,
        overrides: Vec::new(),
        resume: None,
        allow_data_change: false,
    }
}

/// (step, loss bits) of every step line of a run.
pub fn step_losses(run_dir: &Path) -> Vec<(u64, Option<u64>)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval").is_none() && v.get("checkpoint").is_none())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().map(f64::to_bits),
            )
        })
        .collect()
}

pub const SCHEDULE: &str = r#"
[schedule]
kind = "cosine"
peak_lr = 5e-3
min_lr = 5e-4
warmup_steps = 2
"#;

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The smallest valid run config (nothing is generated or opened when it is loaded): the base
/// that config tests change one key of.
pub const MINIMAL_RUN: &str = r#"
[run]
dir = "runs/rules"
[model]
preset = "zamba-tiny"
[data]
seq_len = 32
[data.sources.web]
paths = ["synthetic:web"]
validation = ["synthetic:web"]
weight = 1.0
[batch]
sequences = 8
micro_batch = 2
[schedule]
kind = "cosine"
peak_lr = 1e-3
min_lr = 1e-4
warmup_steps = 10
[train]
steps = 100
"#;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The output of `child`, which must exit within `limit` (a hang fails the test).
pub fn finish(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The trainer on `config` with `sets` (`--set KEY=VALUE` each) under a 64 KiB limit on the size
/// of a file (RLIMIT_FSIZE, as a full disk would: writes fail, the process is not killed).
pub fn train_on_a_full_disk(config: &Path, sets: &[&str]) -> Output {
    let sets: String = sets.iter().map(|s| format!(" --set '{s}'")).collect();
    Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -f 64; trap '' XFSZ; exec '{}' --config '{}'{sets}",
            env!("CARGO_BIN_EXE_zamba-train"),
            config.display()
        ))
        .output()
        .unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every weight of a checkpoint's model, flat, in name order.
pub fn weights(checkpoint: &Path) -> Vec<f32> {
    let bytes = std::fs::read(checkpoint.join("model/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    names
        .iter()
        .flat_map(|n| {
            st.tensor(n)
                .unwrap()
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<_>>()
        })
        .collect()
}
