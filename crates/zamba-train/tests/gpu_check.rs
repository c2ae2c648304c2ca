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
    // On CPU ranks the probe checks the collective's value; its timing is marked as meaningless.
    assert_eq!(summary["dist"]["overlap_probe"]["meaningful"], false);
    assert!(stdout.contains("collective during compute"), "{stdout}");
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
        "predict.json",
        "predict-planned.json",
        "sections.txt",
    ] {
        assert!(out.path().join(file).is_file(), "{file}");
    }
    // No GPU here: the prediction is for the datasheet's H100 SXM.
    let prediction = &summary["prediction"];
    for set in ["current", "planned"] {
        assert_eq!(prediction[set]["card"], "h100-sxm", "{prediction}");
        assert!(prediction[set]["step_seconds"].as_f64().unwrap() > 0.0);
    }
    assert!(
        stdout.contains("predicted      current kernels on h100-sxm"),
        "{stdout}"
    );
}

fn zamba_train(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_zamba-train"))
        .args(args)
        .output()
        .expect("run zamba-train")
}

/// `bench model --predict`, as the step section runs it, for `kernels`, written to `file`.
fn predict(kernels: &str, file: &Path) -> std::process::Output {
    let file = file.to_str().expect("a UTF-8 path");
    zamba_train(&[
        "bench",
        "model",
        "--device",
        "cuda",
        "--predict",
        "--card",
        "NVIDIA H100 80GB HBM3",
        "--kernels",
        kernels,
        "--preset",
        "zamba-1b",
        "--batch",
        "1",
        "--seq-len",
        "4096",
        "--precision",
        "bf16",
        "--activation-checkpointing",
        "layers",
        "--json-file",
        file,
    ])
}

/// `bench report` on a fixture folder (tests/fixtures/gpu-check-out: a traced step's split) with
/// the cost model's predictions for the same run: per op-class group, the measured time beside
/// both predictions; the trace's structural categories count as "other".
#[test]
fn report_puts_the_prediction_beside_the_traced_step() {
    let out = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpu-check-out");
    for file in ["sections.txt", "env.json", "step.json"] {
        std::fs::copy(fixture.join(file), out.path().join(file)).unwrap();
    }
    for (kernels, file) in [
        ("current", "predict.json"),
        ("planned", "predict-planned.json"),
    ] {
        let run = predict(kernels, &out.path().join(file));
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    let run = zamba_train(&["bench", "report", "--dir", out.path().to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let summary = json(&out.path().join("summary.json"));
    let (current, planned) = (
        json(&out.path().join("predict.json")),
        json(&out.path().join("predict-planned.json")),
    );
    let p = &summary["prediction"];
    assert_eq!(p["current"]["card"], "h100-sxm");
    assert_eq!(p["current"]["mfu"], current["mfu"]);
    assert_eq!(p["planned"]["step_seconds"], planned["step_seconds"]);
    assert!(planned["mfu"].as_f64().unwrap() > current["mfu"].as_f64().unwrap());
    assert_eq!(p["traced_step_seconds"], 1.0);
    assert_eq!(p["measured_step_seconds"], 0.8);
    let group = |name: &str| {
        p["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["group"] == name)
            .unwrap_or_else(|| panic!("group {name} in {p}"))
            .clone()
    };
    let gemm = group("gemm");
    assert_eq!(
        (
            gemm["measured_seconds"].as_f64(),
            gemm["measured_share"].as_f64()
        ),
        (Some(0.4), Some(0.4))
    );
    assert_eq!(gemm["current_seconds"], current["group_seconds"]["gemm"]);
    assert_eq!(gemm["planned_seconds"], planned["group_seconds"]["gemm"]);
    // layer 0.06 + recompute 0.04 + backward 0.02: what no op span covers.
    let other = group("other")["measured_seconds"].as_f64().unwrap();
    assert!((other - 0.12).abs() < 1e-12, "{other}");
    let measured: f64 = p["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["measured_seconds"].as_f64())
        .sum();
    assert!((measured - 1.0).abs() < 1e-12, "{measured}");
    let predicted: f64 = p["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["current_seconds"].as_f64())
        .sum();
    let step = current["step_seconds"].as_f64().unwrap();
    assert!(
        (predicted / step - 1.0).abs() < 1e-12,
        "{predicted} vs {step}"
    );
    assert!(
        stdout.contains("predicted      planned kernels on h100-sxm"),
        "{stdout}"
    );
    let gemm_row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("gemm "))
        .expect("a gemm row");
    assert!(
        gemm_row.contains("400.0") && gemm_row.contains("40.0%"),
        "{gemm_row}"
    );
}

#[test]
fn predict_refuses_bad_input_with_the_fix() {
    let run = zamba_train(&["bench", "model", "--device", "cpu", "--predict"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && stderr.contains("pass --device cuda"),
        "{stderr}"
    );
    let run = zamba_train(&[
        "bench",
        "model",
        "--device",
        "cuda",
        "--predict",
        "--card",
        "rtx-4090",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && stderr.contains("h100-sxm"),
        "{stderr}"
    );
    let run = zamba_train(&[
        "bench",
        "model",
        "--device",
        "cuda",
        "--predict",
        "--fractions",
        "gemm=2",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && stderr.contains("out of range"),
        "{stderr}"
    );
    let run = zamba_train(&["bench", "model", "--card", "h200"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && stderr.contains("--predict"),
        "{stderr}"
    );
}

#[test]
fn a_bundle_with_the_nvrtc_twin_times_it_beside_the_step() {
    // A bundle folder holding the binary and its twin (here the same binary twice).
    let bundle = tempfile::tempdir().unwrap();
    let binary = bin_dir().join("zamba-train");
    for name in ["zamba-train", "zamba-train-nvrtc"] {
        std::os::unix::fs::symlink(&binary, bundle.path().join(name)).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let smoke = |sections: &[&str]| {
        Command::new("bash")
            .arg(script())
            .args(["--smoke", "--bin"])
            .arg(bundle.path())
            .arg("--out")
            .arg(out.path())
            .args(sections)
            .output()
            .expect("run gpu-check.sh")
    };
    let run = smoke(&["step", "nvrtc"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    let summary = json(&out.path().join("summary.json"));
    let twin = &summary["step_nvrtc"];
    assert!(twin["tokens_per_sec"].as_f64().unwrap() > 0.0, "{summary}");
    assert!(stdout.contains("NVRTC kernels"), "{stdout}");

    // Without the twin, asking for its section fails that section and says how to get it.
    std::fs::remove_file(bundle.path().join("zamba-train-nvrtc")).unwrap();
    let run = smoke(&["nvrtc"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(!run.status.success());
    assert!(stdout.contains("gpu-bundle.sh --with-nvrtc"), "{stdout}");
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

/// Without a CUDA toolkit, the check stands pip's libdevice and CUDA headers (a Python
/// environment's nvidia/cuda_nvcc and nvidia/cuda_runtime) in for one: CUDA_PATH becomes a folder
/// of links to them, and the env section lists both.
#[test]
fn pips_libdevice_and_headers_stand_in_for_a_toolkit() {
    let site = tempfile::tempdir().unwrap();
    let libdevice = site
        .path()
        .join("nvidia/cuda_nvcc/nvvm/libdevice/libdevice.10.bc");
    let header = site.path().join("nvidia/cuda_runtime/include/cuda_bf16.h");
    for file in [&libdevice, &header] {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, b"stand-in").unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(script())
        .args(["--smoke", "env", "--bin"])
        .arg(bin_dir())
        .arg("--out")
        .arg(out.path())
        .env("PYTHONPATH", site.path())
        .env_remove("CUDA_PATH")
        .env_remove("CUDA_HOME")
        .output()
        .expect("run gpu-check.sh");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}");
    let libraries: Vec<String> = json(&out.path().join("env.json"))["libraries"]
        .as_array()
        .expect("libraries")
        .iter()
        .map(|l| l.as_str().unwrap_or_default().to_string())
        .collect();
    let listed = |name: &str, path: &Path| {
        libraries
            .iter()
            .any(|l| l.starts_with(name) && l.ends_with(&path.display().to_string()))
    };
    // A machine with a real toolkit finds that first; this one (CI) has none.
    if Path::new("/usr/local/cuda/nvvm/libdevice/libdevice.10.bc").exists() {
        return;
    }
    assert!(listed("libdevice", &libdevice), "{libraries:?}");
    assert!(listed("headers", &header), "{libraries:?}");
    let toolkit = out.path().join("cuda-toolkit");
    assert_eq!(
        std::fs::read(toolkit.join("nvvm/libdevice/libdevice.10.bc")).unwrap(),
        b"stand-in"
    );
    assert!(toolkit.join("include/cuda_bf16.h").is_file());
    assert!(
        stdout.contains(&format!("CUDA_PATH={}", toolkit.display())),
        "{stdout}"
    );
}
