//! metrics.jsonl parsing and the PNG/SVG plots.

use std::path::{Path, PathBuf};
use zamba_train::metrics::{parse_metrics, read_metrics};
use zamba_train::plot::{PlotArgs, plot_runs, plot_schedule};
use zamba_train::schedule::{CosineSchedule, ScheduleConfig};

/// A run directory with `steps` step lines and an eval line every 10 steps.
fn fake_run(root: &Path, name: &str, steps: u64, loss_scale: f64) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut text = String::new();
    for step in 0..steps {
        let tokens = (step + 1) * 512;
        let loss = loss_scale * (6.0 - (step as f64 + 1.0).ln());
        text.push_str(&format!(
            "{{\"step\":{step},\"tokens\":{tokens},\"loss\":{loss},\"lr\":{},\"grad_norm\":0.5,\"tokens_per_sec\":1000.0,\"mfu\":0.1}}\n",
            1e-3 * (step + 1) as f64 / steps as f64
        ));
        if (step + 1) % 10 == 0 {
            text.push_str(&format!(
                "{{\"eval\":true,\"step\":{step},\"tokens\":{tokens},\"loss\":{{\"web\":{},\"instruct\":{}}}}}\n",
                loss + 0.1,
                loss - 0.2
            ));
        }
    }
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
    dir
}

#[test]
fn parses_step_and_eval_lines() {
    let text = r#"{"step":0,"tokens":512,"loss":5.0,"lr":0.0001,"grad_norm":1.5,"tokens_per_sec":900.0}
{"step":1,"tokens":1024,"loss":null,"lr":0.0002,"grad_norm":null,"tokens_per_sec":950.0,"skipped":true}
{"eval":true,"step":1,"tokens":1024,"loss":{"web":4.5,"instruct":3.5}}
{"step":2,"tokens":1536,"loss":4.0,"lr":0.0003,"grad_norm":0.9,"tokens_per_sec":null}
{"eval":true,"step":2,"tokens":1536,"loss":{"web":4.7,"instruct":3.0}}
"#;
    let m = parse_metrics(text).unwrap();
    assert_eq!(m.steps.len(), 3);
    assert_eq!(m.steps[1].loss, None);
    assert_eq!(m.final_train_loss(), Some(4.0));
    assert_eq!(m.tokens(), Some(1536));
    let best = m.best_eval_loss();
    assert_eq!((best["web"], best["instruct"]), (4.5, 3.0));
}

#[test]
fn checkpoint_lines_are_their_own_records() {
    // An asynchronous checkpoint's line comes once it is sealed, after later steps' lines.
    let text = r#"{"step":0,"tokens":512,"loss":5.0,"lr":0.0001}
{"checkpoint":true,"step":0,"async":false,"stall_s":2.5,"wait_s":2.5,"write_s":2.5}
{"step":1,"tokens":1024,"loss":4.0,"lr":0.0002}
{"step":2,"tokens":1536,"loss":3.0,"lr":0.0003}
{"checkpoint":true,"step":1,"async":true,"stall_s":0.25,"wait_s":0.0,"write_s":3.0}
"#;
    let m = parse_metrics(text).unwrap();
    assert_eq!(m.last_step(), Some(2));
    assert_eq!(m.final_train_loss(), Some(3.0));
    let costs: Vec<_> = m
        .checkpoints
        .iter()
        .map(|c| (c.step, c.asynchronous, c.stall_s, c.wait_s, c.write_s))
        .collect();
    assert_eq!(
        costs,
        vec![(0, false, 2.5, 2.5, 2.5), (1, true, 0.25, 0.0, 3.0)]
    );
    let e = parse_metrics("{\"checkpoint\":true,\"step\":1,\"async\":true}\n").unwrap_err();
    assert!(e.0 == 1 && e.1.contains("stall_s"), "{e:?}");
}

#[test]
fn a_resumed_run_replaces_the_lines_after_its_checkpoint() {
    let text = "{\"step\":0,\"tokens\":1,\"loss\":3.0,\"lr\":0.1}\n{\"step\":1,\"tokens\":2,\"loss\":2.9,\"lr\":0.1}\n{\"step\":2,\"tokens\":3,\"loss\":2.8,\"lr\":0.1}\n\
                {\"step\":1,\"tokens\":2,\"loss\":2.5,\"lr\":0.1}\n{\"step\":2,\"tokens\":3,\"loss\":2.4,\"lr\":0.1}\n";
    let m = parse_metrics(text).unwrap();
    let losses: Vec<_> = m.steps.iter().map(|s| (s.step, s.loss.unwrap())).collect();
    assert_eq!(losses, vec![(0, 3.0), (1, 2.5), (2, 2.4)]);
}

#[test]
fn garbled_metrics_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    std::fs::write(&path, "{\"step\":0,\"tokens\":1,\"loss\":3.0,\"lr\":0.1}\nnot json\n{\"step\":1,\"tokens\":2,\"loss\":2.0,\"lr\":0.1}\n").unwrap();
    let e = format!("{:#}", read_metrics(&path).unwrap_err());
    assert!(e.contains("metrics.jsonl:2:"), "{e}");

    std::fs::write(&path, "{\"step\":0,\"tokens\":1,\"lr\":0.1}\n").unwrap();
    let e = format!("{:#}", read_metrics(&path).unwrap_err());
    assert!(e.contains("metrics.jsonl:1:") && e.contains("loss"), "{e}");

    std::fs::write(
        &path,
        "{\"eval\":true,\"step\":0,\"tokens\":1,\"loss\":3.0}\n",
    )
    .unwrap();
    let e = format!("{:#}", read_metrics(&path).unwrap_err());
    assert!(
        e.contains("metrics.jsonl:1:") && e.contains("object"),
        "{e}"
    );

    // A half-written last line (the trainer is appending) is not an error.
    std::fs::write(
        &path,
        "{\"step\":0,\"tokens\":1,\"loss\":3.0,\"lr\":0.1}\n{\"step\":1,\"tok",
    )
    .unwrap();
    assert_eq!(read_metrics(&path).unwrap().steps.len(), 1);

    let missing = dir.path().join("nope");
    let e = format!(
        "{:#}",
        plot_runs(&[missing.clone()], &dir.path().join("x.png")).unwrap_err()
    );
    assert!(e.contains("nope/metrics.jsonl"), "{e}");
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.len() > 10_000,
        "{} is only {} bytes",
        path.display(),
        bytes.len()
    );
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
}

fn assert_svg(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.contains("<svg") && text.contains("</svg>"),
        "not an SVG"
    );
    // Lines, and the text of titles and legends.
    assert!(
        text.contains("<polyline") || text.contains("<path"),
        "no curves"
    );
    assert!(
        text.contains("train loss") && text.contains("held-out loss per source"),
        "missing titles"
    );
}

#[test]
fn plots_several_runs_to_png_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let a = fake_run(dir.path(), "run-a", 60, 1.0);
    let b = fake_run(dir.path(), "run-b", 40, 0.9);
    let png = dir.path().join("out/runs.png");
    plot_runs(&[a.clone(), b.clone()], &png).unwrap();
    assert_png(&png);
    let svg = dir.path().join("runs.svg");
    plot_runs(&[a.clone(), b], &svg).unwrap();
    assert_svg(&svg);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.contains("run-a") && text.contains("run-b · instruct"),
        "legend names runs and sources"
    );

    let e = plot_runs(&[a.clone()], &dir.path().join("x.jpg")).unwrap_err();
    assert!(e.to_string().contains(".png or .svg"), "{e}");

    // The subcommand's default output for one run is RUN_DIR/plot.png.
    zamba_train::plot::run(PlotArgs {
        runs: vec![a.clone()],
        out: None,
    })
    .unwrap();
    assert_png(&a.join("plot.png"));
}

#[test]
fn plots_a_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let s = ScheduleConfig::Cosine(CosineSchedule {
        peak_lr: 1e-3,
        min_lr: 1e-4,
        warmup_steps: 100,
    });
    let png = dir.path().join("lr.png");
    plot_schedule(&s, 10_000, &png).unwrap();
    assert_png(&png);
    let svg = dir.path().join("lr.svg");
    plot_schedule(&s, 10_000, &svg).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.contains("<svg") && text.contains("LR schedule: cosine"),
        "{}",
        &text[..text.len().min(500)]
    );
}
