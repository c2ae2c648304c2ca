//! `bench report --dir OUT`: the one-screen summary of a GPU check (scripts/gpu-check.sh), from
//! the JSON its sections wrote into OUT; also written as OUT/summary.json.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use zamba_trace::Category;
use zamba_train::cost_model::{Card, Group};

#[derive(Args)]
pub struct ReportArgs {
    /// The GPU check's output folder.
    #[arg(long)]
    dir: PathBuf,
}

/// One section's line of OUT/sections.txt: name, seconds, outcome.
struct Section {
    name: String,
    seconds: u64,
    outcome: String,
}

fn sections(dir: &Path) -> Result<Vec<Section>> {
    let path = dir.join("sections.txt");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (written by gpu-check.sh)", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, '\t');
            Some(Section {
                name: parts.next()?.to_string(),
                seconds: parts.next()?.parse().ok()?,
                outcome: parts.next()?.to_string(),
            })
        })
        .collect())
}

/// A section's JSON, `Null` where it wrote none (it failed or did not run).
fn read_json(dir: &Path, section: &str) -> Value {
    std::fs::read_to_string(dir.join(format!("{section}.json")))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(Value::Null)
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

pub(super) fn run(a: &ReportArgs) -> Result<()> {
    let sections = sections(&a.dir)?;
    let env = read_json(&a.dir, "env");
    let peak = read_json(&a.dir, "peak");
    let step = read_json(&a.dir, "step");
    let scan = read_json(&a.dir, "scan");
    let gpu = env["gpu"].as_str().unwrap_or("none").to_string();
    let card = Card::from_smi_name(&gpu);
    let measured_peak = [num(&peak["ours_gflops"]), num(&peak["torch_gflops"])]
        .into_iter()
        .flatten()
        .fold(None, |best: Option<f64>, v| {
            Some(best.map_or(v, |b| b.max(v)))
        });
    let achieved = num(&step["model_gflops"]);
    let mfu = |peak: Option<f64>| achieved.zip(peak).map(|(a, p)| a / p);
    let datasheet_peak = card.map(|c| c.bf16_flops() / 1e9);
    // The same run with the kernels compiled by NVRTC (the nvrtc section), where it ran.
    let nvrtc = read_json(&a.dir, "step-nvrtc");
    let step_nvrtc = match nvrtc.is_null() {
        true => Value::Null,
        false => {
            let achieved = num(&nvrtc["model_gflops"]);
            let mfu = |peak: Option<f64>| achieved.zip(peak).map(|(a, p)| a / p);
            json!({
                "tokens_per_sec": nvrtc["tokens_per_sec"],
                "model_gflops": achieved,
                "mfu_vs_measured_peak": mfu(measured_peak),
                "mfu_vs_datasheet_peak": mfu(datasheet_peak),
            })
        }
    };
    let memory_peak_mib = std::fs::read_to_string(a.dir.join("memory-peak.txt"))
        .ok()
        .and_then(|t| t.trim().parse::<f64>().ok());
    let summary = json!({
        "gpu": gpu,
        "driver": env["driver"],
        "memory_mib": env["memory_mib"],
        "device": env["device"],
        "smoke": env["smoke"],
        "libraries": env["libraries"],
        "sections": sections.iter().map(|s| json!({
            "name": s.name, "seconds": s.seconds, "outcome": s.outcome,
        })).collect::<Vec<_>>(),
        "checks": {
            "kernels": check_counts(&read_json(&a.dir, "kernels")),
            "model": check_counts(&read_json(&a.dir, "model")),
        },
        "gemm_peak_gflops": {
            "ours": peak["ours_gflops"],
            "torch": peak["torch_gflops"],
            "measured": measured_peak,
            "datasheet": card.map(|c| c.bf16_flops() / 1e9),
            "datasheet_card": card.map(|c| c.id),
        },
        "step": {
            "preset": step["preset"],
            "tokens_per_sec": step["tokens_per_sec"],
            "model_gflops": achieved,
            "mfu_vs_measured_peak": mfu(measured_peak),
            "mfu_vs_datasheet_peak": mfu(datasheet_peak),
            "kernel_compiler": step["kernel_compiler"],
            "attention_kernels": step["attention_kernels"],
            "device_memory_peak_mib": memory_peak_mib,
            "device_pool_peak_mb": step["device_pool_peak_mb"],
            "split": step["traced_step"]["split"],
            "scan_forward_seconds": step["traced_step"]["scan_forward_seconds"],
            "scan_backward_seconds": step["traced_step"]["scan_backward_seconds"],
            "traced_step_seconds": step["traced_step"]["wall_seconds"],
        },
        "step_nvrtc": step_nvrtc,
        "scan": {
            "achieved_gbps": scan["achieved_gbps"],
            "copy_gbps": scan["copy_gbps"],
            "fraction_of_copy": scan["fraction_of_copy"],
        },
        "dist": read_json(&a.dir, "dist"),
        "prediction": prediction(
            &read_json(&a.dir, "predict"),
            &read_json(&a.dir, "predict-planned"),
            &step,
        ),
    });
    print!("{}", render(&summary));
    let path = a.dir.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("written to {}", path.display());
    let failed: Vec<&str> = sections
        .iter()
        .filter(|s| s.outcome != "ok")
        .map(|s| s.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("section(s) not ok: {}", failed.join(", "));
    }
    Ok(())
}

fn check_counts(report: &Value) -> Value {
    match report.is_null() {
        true => Value::Null,
        false => json!({"passed": report["passed"], "failed": report["failed"]}),
    }
}

/// `v` with `digits` decimals, or "n/a".
fn fmt(v: &Value, scale: f64, digits: usize) -> String {
    v.as_f64()
        .map(|x| format!("{:.*}", digits, x * scale))
        .unwrap_or_else(|| "n/a".into())
}

fn render(s: &Value) -> String {
    let mut out = String::from("\n");
    out += &format!(
        "GPU            {} | driver {} | {} MiB | device {}{}\n",
        s["gpu"].as_str().unwrap_or("?"),
        s["driver"].as_str().unwrap_or("?"),
        fmt(&s["memory_mib"], 1.0, 0),
        s["device"].as_str().unwrap_or("?"),
        if s["smoke"] == true {
            " | SMOKE (tiny sizes)"
        } else {
            ""
        }
    );
    let sections: Vec<String> = s["sections"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            format!(
                "{} {} ({}s)",
                x["name"].as_str().unwrap_or("?"),
                x["outcome"].as_str().unwrap_or("?"),
                x["seconds"]
            )
        })
        .collect();
    out += &format!("sections       {}\n", sections.join(" | "));
    for group in ["kernels", "model"] {
        let c = &s["checks"][group];
        out += &format!(
            "{:<14} {} passed, {} failed\n",
            format!("{group} checks"),
            fmt(&c["passed"], 1.0, 0),
            fmt(&c["failed"], 1.0, 0)
        );
    }
    let g = &s["gemm_peak_gflops"];
    out += &format!(
        "bf16 GEMM      ours {} TFLOP/s | torch {} | datasheet {} ({})\n",
        fmt(&g["ours"], 1e-3, 3),
        fmt(&g["torch"], 1e-3, 3),
        fmt(&g["datasheet"], 1e-3, 1),
        g["datasheet_card"]
            .as_str()
            .unwrap_or("card not recognised")
    );
    let st = &s["step"];
    out += &format!(
        "step ({})   {} tokens/s | {} TFLOP/s | MFU {}% of measured, {}% of datasheet\n",
        st["preset"].as_str().unwrap_or("?"),
        fmt(&st["tokens_per_sec"], 1.0, 0),
        fmt(&st["model_gflops"], 1e-3, 1),
        fmt(&st["mfu_vs_measured_peak"], 100.0, 1),
        fmt(&st["mfu_vs_datasheet_peak"], 100.0, 1),
    );
    if let Some(kernels) = st["attention_kernels"].as_str() {
        out += &format!("  attention      {kernels}\n");
    }
    let nv = &s["step_nvrtc"];
    if nv.is_object() {
        out += &format!(
            "  NVRTC kernels    {} tokens/s | {} TFLOP/s | MFU {}% of measured, {}% of datasheet (above: {})\n",
            fmt(&nv["tokens_per_sec"], 1.0, 0),
            fmt(&nv["model_gflops"], 1e-3, 1),
            fmt(&nv["mfu_vs_measured_peak"], 100.0, 1),
            fmt(&nv["mfu_vs_datasheet_peak"], 100.0, 1),
            st["kernel_compiler"]
                .as_str()
                .unwrap_or("the default compiler"),
        );
    }
    out += &format!(
        "memory         device peak {} MiB (nvidia-smi) | pool peak {} MB\n",
        fmt(&st["device_memory_peak_mib"], 1.0, 0),
        fmt(&st["device_pool_peak_mb"], 1.0, 0)
    );
    if let Some(split) = st["split"].as_array() {
        let parts: Vec<String> = split
            .iter()
            .map(|c| {
                format!(
                    "{} {}%",
                    c["category"].as_str().unwrap_or("?"),
                    fmt(&c["share"], 100.0, 1)
                )
            })
            .collect();
        out += &format!("step split     {}\n", parts.join(" | "));
        out += &format!(
            "               (one traced step, {} s, device synchronised at every span; scan forward {} s, backward {} s)\n",
            fmt(&st["traced_step_seconds"], 1.0, 3),
            fmt(&st["scan_forward_seconds"], 1.0, 3),
            fmt(&st["scan_backward_seconds"], 1.0, 3)
        );
    }
    out += &render_prediction(&s["prediction"]);
    let sc = &s["scan"];
    out += &format!(
        "scan           {} GB/s vs device copy {} GB/s ({}%)\n",
        fmt(&sc["achieved_gbps"], 1.0, 1),
        fmt(&sc["copy_gbps"], 1.0, 1),
        fmt(&sc["fraction_of_copy"], 100.0, 1)
    );
    let best_bus = s["dist"]["sizes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["busbw_gbps"].as_f64())
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    out += &format!(
        "dist           {} world {}: collectives {} | best busbw {}\n",
        s["dist"]["backend"].as_str().unwrap_or("n/a"),
        fmt(&s["dist"]["world"], 1.0, 0),
        match s["dist"]["checked"].as_bool() {
            Some(true) => "correct",
            _ => "not checked",
        },
        best_bus.map_or("n/a".into(), |b| format!("{b:.1} GB/s"))
    );
    let probe = &s["dist"]["overlap_probe"];
    if probe.is_object() {
        out += &format!(
            "               collective during compute: returned after {} ms of the {} ms queued before it ({})\n",
            fmt(&probe["collective_ms"], 1.0, 1),
            fmt(&probe["compute_ms"], 1.0, 1),
            match (probe["meaningful"].as_bool(), probe["overlapped"].as_bool()) {
                (Some(true), Some(true)) => "overlapped",
                (Some(true), _) => "NOT overlapped",
                _ => "CPU: timing not meaningful",
            }
        );
    }
    out
}

/// The cost model's prediction (OUT/predict.json: the kernels this binary runs;
/// OUT/predict-planned.json: the planned ones) beside the traced step's time, per op-class group
/// (the trace's categories mapped to the model's groups by `Group::of_category`).
fn prediction(current: &Value, planned: &Value, step: &Value) -> Value {
    if current.is_null() && planned.is_null() {
        return Value::Null;
    }
    let mut measured = [0.0; Group::ALL.len()];
    let split = step["traced_step"]["split"].as_array();
    for entry in split.into_iter().flatten() {
        let category = entry["category"]
            .as_str()
            .and_then(|c| c.parse::<Category>().ok());
        if let (Some(category), Some(seconds)) = (category, entry["seconds"].as_f64()) {
            let group = Group::of_category(category);
            measured[Group::ALL
                .iter()
                .position(|g| *g == group)
                .expect("a group")] += seconds;
        }
    }
    let traced = step["traced_step"]["wall_seconds"].as_f64();
    let groups: Vec<Value> = Group::ALL
        .iter()
        .zip(measured)
        .map(|(group, seconds)| {
            json!({
                "group": group.name(),
                "measured_seconds": split.map(|_| seconds),
                "measured_share": traced.filter(|_| split.is_some()).map(|t| seconds / t),
                "current_seconds": current["group_seconds"][group.name()],
                "planned_seconds": planned["group_seconds"][group.name()],
            })
        })
        .collect();
    let totals = |p: &Value| {
        json!({
            "kernels": p["kernels"],
            "card": p["card"]["id"],
            "step_seconds": p["step_seconds"],
            "tokens_per_sec": p["tokens_per_sec"],
            "mfu": p["mfu"],
        })
    };
    json!({
        "current": totals(current),
        "planned": totals(planned),
        "traced_step_seconds": traced,
        "measured_step_seconds": step["step_seconds"],
        "groups": groups,
    })
}

fn render_prediction(p: &Value) -> String {
    if p.is_null() {
        return "prediction     n/a (no predict.json)\n".into();
    }
    let ms = |v: &Value| fmt(v, 1e3, 1);
    let mut out = String::new();
    for set in ["current", "planned"] {
        let t = &p[set];
        out += &format!(
            "predicted      {} kernels on {}: step {} ms, {} tokens/s, MFU {}%\n",
            set,
            t["card"].as_str().unwrap_or("?"),
            ms(&t["step_seconds"]),
            fmt(&t["tokens_per_sec"], 1.0, 0),
            fmt(&t["mfu"], 100.0, 1),
        );
    }
    out += &format!(
        "  {:<12} {:>14} {:>7} {:>15} {:>15}\n",
        "ms per step", "traced", "share", "pred. current", "pred. planned"
    );
    for g in p["groups"].as_array().into_iter().flatten() {
        out += &format!(
            "  {:<12} {:>14} {:>6}% {:>15} {:>15}\n",
            g["group"].as_str().unwrap_or("?"),
            ms(&g["measured_seconds"]),
            fmt(&g["measured_share"], 100.0, 1),
            ms(&g["current_seconds"]),
            ms(&g["planned_seconds"]),
        );
    }
    out += &format!(
        "  {:<12} {:>14} {:>7} {:>15} {:>15}   (untraced step: {} ms)\n",
        "step",
        ms(&p["traced_step_seconds"]),
        "",
        ms(&p["current"]["step_seconds"]),
        ms(&p["planned"]["step_seconds"]),
        ms(&p["measured_step_seconds"]),
    );
    out
}
