//! Step traces read back as a trace viewer reads them: `train.profile_steps` on two thread ranks
//! with layer recomputation, and `bench model --trace`. The Chrome-trace JSON is parsed here
//! on its own terms (complete events with µs times), not through zamba-trace.

mod common;

use std::path::Path;
use std::process::Command;

use common::{SCHEDULE, options, write_config};
use serde_json::Value;
use zamba_train::train::train;

const BIN: &str = env!("CARGO_BIN_EXE_zamba-train");

/// Layers of the tiny preset: 0 1 mamba, 2 hybrid, 3 mamba, 4 hybrid, 5 mamba.
const LAYERS: [&str; 6] = [
    "layer 0 (mamba)",
    "layer 1 (mamba)",
    "layer 2 (hybrid)",
    "layer 3 (mamba)",
    "layer 4 (hybrid)",
    "layer 5 (mamba)",
];

/// A complete event, with its nesting as rebuilt from the times.
#[derive(Debug, Clone)]
struct Event {
    name: String,
    cat: String,
    start: f64,
    end: f64,
    track: (u64, u64),
    parent: Option<usize>,
}

/// Times are µs with ns resolution, rounded once each: nesting holds to within this.
const ROUNDING_US: f64 = 0.002;

/// Reads a trace's complete events and rebuilds the tree, failing on any two spans of a track
/// that overlap without one containing the other.
fn read_trace(path: &Path) -> Vec<Event> {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut events: Vec<Event> = doc["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ph"] == "X")
        .map(|e| {
            let start = e["ts"].as_f64().unwrap();
            Event {
                name: e["name"].as_str().unwrap().to_string(),
                cat: e["cat"].as_str().unwrap().to_string(),
                start,
                end: start + e["dur"].as_f64().unwrap(),
                track: (e["pid"].as_u64().unwrap(), e["tid"].as_u64().unwrap()),
                parent: None,
            }
        })
        .collect();
    assert!(!events.is_empty(), "{} has no spans", path.display());
    // Parents first: earlier start, and at equal starts the longer one.
    events.sort_by(|a, b| {
        (a.track, a.start)
            .partial_cmp(&(b.track, b.start))
            .unwrap()
            .then(b.end.partial_cmp(&a.end).unwrap())
    });
    let mut open: Vec<usize> = Vec::new();
    for i in 0..events.len() {
        while let Some(&top) = open.last() {
            let (outer, inner) = (&events[top], &events[i]);
            if outer.track != inner.track || inner.start >= outer.end - ROUNDING_US {
                open.pop();
                continue;
            }
            assert!(
                inner.end <= outer.end + ROUNDING_US,
                "{} [{}, {}] overlaps {} [{}, {}] without nesting in it",
                inner.name,
                inner.start,
                inner.end,
                outer.name,
                outer.start,
                outer.end
            );
            break;
        }
        events[i].parent = open.last().copied();
        open.push(i);
    }
    events
}

fn children(events: &[Event], parent: usize) -> impl Iterator<Item = &Event> {
    events.iter().filter(move |e| e.parent == Some(parent))
}

fn descendants(events: &[Event], root: usize) -> Vec<&Event> {
    let within = |mut i: usize| {
        while let Some(p) = events[i].parent {
            if p == root {
                return true;
            }
            i = p;
        }
        false
    };
    (0..events.len())
        .filter(|&i| within(i))
        .map(|i| &events[i])
        .collect()
}

fn index_of(events: &[Event], name: &str) -> usize {
    events
        .iter()
        .position(|e| e.name == name)
        .unwrap_or_else(|| panic!("no span {name}"))
}

/// Each layer once, in `order`, among `parent`'s children, each with a span of `op` inside.
fn assert_layers(events: &[Event], parent: usize, order: &[String], op: &str) {
    let layers: Vec<usize> = (0..events.len())
        .filter(|&i| events[i].parent == Some(parent) && events[i].cat == "layer")
        .filter(|&i| events[i].name.starts_with("layer "))
        .collect();
    let names: Vec<&str> = layers.iter().map(|&i| events[i].name.as_str()).collect();
    assert_eq!(names, order, "layers under {}", events[parent].name);
    for &layer in &layers {
        assert!(
            descendants(events, layer).iter().any(|e| e.name == op),
            "{} has no {op} span",
            events[layer].name
        );
    }
}

#[test]
fn profile_steps_trace_every_rank_with_nested_spans_covering_each_step() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        "traced",
        &format!("{SCHEDULE}\n[train]\nsteps = 4\n"),
    );
    let mut opts = options(config);
    opts.overrides = vec![
        "train.profile_steps=[1, 2]".into(),
        "train.activation_checkpointing=layers".into(),
        "runtime.world_size=2".into(),
        "checkpoint.every=2".into(),
        "eval.every=2".into(),
        "runtime.peak_gflops=100".into(),
    ];
    train(&opts).unwrap();

    let traces = tmp.path().join("traced/traces");
    for rank in 0..2 {
        let events = read_trace(&traces.join(format!("steps-1-2.rank-{rank}.json")));
        let step_track = events[index_of(&events, "step 1")].track;
        let roots: Vec<&str> = events
            .iter()
            .filter(|e| e.parent.is_none() && e.track == step_track)
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(
            roots,
            ["step 1", "step 2"],
            "every span of the rank's track inside a traced step"
        );
        for step in ["step 1", "step 2"] {
            let root = index_of(&events, step);
            let phases: Vec<&str> = children(&events, root).map(|e| e.cat.as_str()).collect();
            for phase in [
                "data",
                "forward",
                "loss",
                "backward",
                "communication",
                "optimizer",
            ] {
                assert!(
                    phases.contains(&phase),
                    "{step} of rank {rank} has no {phase}: {phases:?}"
                );
            }
            // Eval and checkpoint after every second step: after step 1.
            for phase in ["eval", "checkpoint"] {
                assert_eq!(phases.contains(&phase), step == "step 1", "{step}: {phase}");
            }
            // The gradients are reduced on the rank's communication thread, overlapped with the
            // backward (dist.overlap_grad_reduce): buckets on a track of their own, within the
            // step, each around its collective.
            let (start, end) = (events[root].start, events[root].end + ROUNDING_US);
            let on_comm_track = |e: &&Event| {
                e.track.0 == step_track.0
                    && e.track != step_track
                    && e.start >= start
                    && e.end <= end
            };
            let bucket = events
                .iter()
                .position(|e| on_comm_track(&e) && e.name.starts_with("bucket 0"))
                .unwrap_or_else(|| panic!("{step} of rank {rank}: no bucket 0"));
            assert_eq!(events[bucket].cat, "gradients");
            assert!(
                children(&events, bucket)
                    .any(|e| e.name == "all-reduce" && e.cat == "communication")
            );

            let forward = events
                .iter()
                .position(|e| e.name == "forward 0" && e.start >= events[root].start)
                .unwrap();
            let order: Vec<String> = LAYERS.iter().map(|l| l.to_string()).collect();
            assert_layers(&events, forward, &order, "scan forward");
            let backward = events
                .iter()
                .position(|e| e.name == "backward 0" && e.start >= events[root].start)
                .unwrap();
            let reversed: Vec<String> = LAYERS
                .iter()
                .rev()
                .map(|l| format!("{l} backward"))
                .collect();
            // With recomputation each layer's backward reruns its forward, then differentiates it.
            assert_layers(&events, backward, &reversed, "recompute");
            assert_layers(&events, backward, &reversed, "scan backward");
        }
    }
}

#[test]
fn bench_model_traces_one_step_layer_by_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("step.json");
    let out = Command::new(BIN)
        .args([
            "bench",
            "model",
            "--preset",
            "zamba-tiny",
            "--batch",
            "2",
            "--seq-len",
            "32",
        ])
        .args(["--steps", "1", "--peak-gflops", "100", "--trace"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("trace of one step written to"), "{stdout}");
    assert!(
        stdout.contains("scan"),
        "the time split lists the scan: {stdout}"
    );

    let events = read_trace(&path);
    let roots: Vec<&str> = events
        .iter()
        .filter(|e| e.parent.is_none())
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(roots, ["step"]);
    let forward = index_of(&events, "forward 0");
    let order: Vec<String> = LAYERS.iter().map(|l| l.to_string()).collect();
    assert_layers(&events, forward, &order, "scan forward");
    let backward = index_of(&events, "backward 0");
    let reversed: Vec<String> = LAYERS
        .iter()
        .rev()
        .map(|l| format!("{l} backward"))
        .collect();
    assert_layers(&events, backward, &reversed, "scan backward");
    assert!(
        events.iter().all(|e| e.cat != "recompute"),
        "no recomputation by default"
    );
    // The hybrid layers' backward holds the attention's.
    let hybrid = index_of(&events, "layer 2 (hybrid) backward");
    assert!(
        descendants(&events, hybrid)
            .iter()
            .any(|e| e.name == "attention backward")
    );

    let bad = Command::new(BIN)
        .args([
            "bench",
            "model",
            "--preset",
            "zamba-tiny",
            "--world",
            "2",
            "--trace",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("leave out --world"));
}
