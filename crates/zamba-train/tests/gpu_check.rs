//! scripts/gpu-check.sh against the binary this build just made: `--smoke` runs every section at
//! tiny sizes on the best device the binary finds (here the CPU) and ends with the report, so the
//! script cannot rot between GPU windows; without `--smoke` and without a GPU it refuses at once.

use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/gpu-check.sh")
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_zamba-train"))
        .parent()
        .expect("the binary's folder")
        .to_path_buf()
}

fn json(path: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn smoke_mode_runs_every_section_and_reports() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(script())
        .args(["--smoke", "--bin"])
        .arg(bin_dir())
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("run gpu-check.sh");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "gpu-check.sh --smoke failed:\n{stdout}\n{stderr}"
    );

    let summary = json(&out.path().join("summary.json"));
    let sections: Vec<(String, String)> = summary["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .map(|s| {
            let field = |k: &str| s[k].as_str().unwrap_or_default().to_string();
            (field("name"), field("outcome"))
        })
        .collect();
    let names: Vec<&str> = sections.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["env", "kernels", "model", "peak", "step", "scan", "dist"]
    );
    for (name, outcome) in &sections {
        assert_eq!(outcome, "ok", "section {name}");
    }
    assert_eq!(summary["smoke"], true);
    for group in ["kernels", "model"] {
        let checks = &summary["checks"][group];
        assert!(checks["passed"].as_u64().unwrap() > 0, "{group}: {checks}");
        assert_eq!(checks["failed"], 0, "{group}");
    }
    assert!(summary["gemm_peak_gflops"]["ours"].as_f64().unwrap() > 0.0);
    assert!(summary["step"]["tokens_per_sec"].as_f64().unwrap() > 0.0);
    let split = summary["step"]["split"]
        .as_array()
        .expect("the traced step's split");
    let categories: Vec<&str> = split
        .iter()
        .filter_map(|c| c["category"].as_str())
        .collect();
    for class in ["gemm", "scan", "attention", "optimizer"] {
        assert!(categories.contains(&class), "{class} in {categories:?}");
    }
    let shares: f64 = split.iter().filter_map(|c| c["share"].as_f64()).sum();
    assert!(
        (shares - 1.0).abs() < 1e-6,
        "the split covers the step: {shares}"
    );
    assert!(summary["scan"]["copy_gbps"].as_f64().unwrap() > 0.0);
    assert_eq!(summary["dist"]["checked"], true);
    // The table is the end of the output; everything written stays in the output folder.
    assert!(
        stdout.contains("bf16 GEMM") && stdout.contains("MFU"),
        "{stdout}"
    );
    for file in [
        "env.json",
        "kernels.json",
        "model.json",
        "step.json",
        "sections.txt",
    ] {
        assert!(out.path().join(file).is_file(), "{file}");
    }
}

#[test]
fn without_a_gpu_the_full_check_refuses_at_once() {
    if cfg!(feature = "cuda") {
        return; // a CUDA build may be on a GPU machine, where the real check would run
    }
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(script())
        .arg("--bin")
        .arg(bin_dir())
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("run gpu-check.sh");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("no CUDA device found") && stderr.contains("--smoke"),
        "{stderr}"
    );
    assert!(
        !out.path().join("sections.txt").exists(),
        "nothing ran before the refusal"
    );
}
