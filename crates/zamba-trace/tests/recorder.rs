//! The recorder as its users see it: spans off and on, nesting, begin/end pairs, device syncs,
//! threads, and the Chrome-trace document read back.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use serde_json::Value;
use zamba_trace::{Capture, Category, begin, end, recording, span, span_with};

fn names(trace: &zamba_trace::Trace) -> Vec<(String, usize)> {
    trace
        .spans()
        .iter()
        .map(|s| (s.name.clone(), s.depth))
        .collect()
}

#[test]
fn without_a_capture_nothing_is_recorded_or_formatted() {
    assert!(!recording());
    let _a = span(Category::Gemm, "gemm");
    let _b = span_with(Category::Layer, || {
        panic!("the name is built only when recording")
    });
    begin(Category::Layer, || panic!("nor here"));
    end(Category::Layer, "layer 0 backward");
}

#[test]
fn spans_nest_and_guards_close_what_is_left_open_inside_them() {
    let capture = Capture::start("main");
    assert!(recording());
    {
        let _step = span(Category::Step, "step");
        {
            let _fwd = span_with(Category::Forward, || "forward".to_string());
            let _gemm = span(Category::Gemm, "in_proj");
            std::thread::sleep(Duration::from_millis(2));
        }
        // A begin/end pair, as an autodiff node at a layer's output and one at its input.
        begin(Category::Layer, || "layer 1 backward".into());
        let _scan = span(Category::Scan, "scan backward");
        drop(_scan);
        end(Category::Layer, "layer 1 backward");
        // Never ended: the step's guard ends it.
        begin(Category::Layer, || "layer 0 backward".into());
        let _inner = span(Category::Gemm, "left open");
        std::mem::forget(_inner);
    }
    // Never ended: the capture's end ends it.
    begin(Category::Other, || "after".into());
    let trace = capture.finish();
    assert!(!recording());
    assert_eq!(
        names(&trace),
        vec![
            ("step".into(), 0),
            ("forward".into(), 1),
            ("in_proj".into(), 2),
            ("layer 1 backward".into(), 1),
            ("scan backward".into(), 2),
            ("layer 0 backward".into(), 1),
            ("left open".into(), 2),
            ("after".into(), 0),
        ]
    );
    let spans = trace.spans();
    // Children lie within their parents.
    for (child, parent) in [(1, 0), (2, 1), (3, 0), (4, 3), (5, 0), (6, 5)] {
        assert!(spans[child].start >= spans[parent].start);
        assert!(
            spans[child].end() <= spans[parent].end(),
            "{child} in {parent}"
        );
    }
    assert!(spans[2].duration >= Duration::from_millis(2));
    let steps = trace.step_summaries();
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0].wall, spans[0].duration);
    let sum: Duration = steps[0].categories.values().map(|c| c.exclusive).sum();
    assert_eq!(sum, steps[0].wall);
}

#[test]
fn the_sync_runs_at_every_boundary_and_only_while_recording() {
    let syncs = Rc::new(Cell::new(0));
    let counter = syncs.clone();
    let capture = Capture::start("main").with_sync(move || counter.set(counter.get() + 1));
    {
        let _a = span(Category::Step, "a");
        let _b = span(Category::Gemm, "b");
    }
    assert_eq!(
        syncs.get(),
        4,
        "two spans, a sync before each start and each end"
    );
    let trace = capture.finish();
    assert_eq!(trace.spans().len(), 2);
    let _after = span(Category::Step, "after");
    drop(_after);
    assert_eq!(syncs.get(), 4, "no sync once the capture finished");
}

#[test]
fn captures_of_threads_do_not_mix_and_attached_threads_get_their_own_track() {
    let run = |rank: usize| {
        std::thread::spawn(move || {
            let capture = Capture::start(format!("rank {rank}"));
            let handle = capture.handle();
            let _step = span_with(Category::Step, || format!("step of rank {rank}"));
            std::thread::spawn(move || {
                let _attached = handle.attach(format!("rank {rank} comm"));
                let _c = span(Category::Communication, "all-reduce");
            })
            .join()
            .unwrap();
            // A thread that neither started nor attached records nothing.
            std::thread::spawn(|| {
                let _ignored = span(Category::Gemm, "unrelated");
            })
            .join()
            .unwrap();
            drop(_step);
            capture.finish()
        })
    };
    let (a, b) = (run(0), run(1));
    for (rank, trace) in [(0, a.join().unwrap()), (1, b.join().unwrap())] {
        assert_eq!(
            trace.tracks(),
            [format!("rank {rank}"), format!("rank {rank} comm")]
        );
        let spans: Vec<(&str, usize)> = trace
            .spans()
            .iter()
            .map(|s| (s.name.as_str(), s.track))
            .collect();
        let step = format!("step of rank {rank}");
        assert_eq!(spans, vec![(step.as_str(), 0), ("all-reduce", 1)]);
    }
}

#[test]
fn a_capture_dropped_unfinished_stops_recording() {
    let capture = Capture::start("main");
    let _open = span(Category::Step, "open");
    drop(capture);
    assert!(!recording());
    let again = Capture::start("main");
    let _s = span(Category::Step, "second");
    drop(_s);
    assert_eq!(again.finish().spans().len(), 1);
}

#[test]
#[should_panic(expected = "already records")]
fn a_thread_records_into_one_capture_at_a_time() {
    let _first = Capture::start("main");
    let _second = Capture::start("main");
}

#[test]
fn the_chrome_document_names_processes_and_threads_and_keeps_the_spans() {
    let capture = Capture::start("rank 0 main");
    {
        let _step = span(Category::Step, "step 10");
        let _gemm = span(Category::Gemm, "lm head");
        std::thread::sleep(Duration::from_millis(1));
    }
    let trace = capture.finish();
    let doc: Value = serde_json::from_str(&trace.chrome_json(3, "rank 3")).unwrap();
    let events = doc["traceEvents"].as_array().unwrap();
    let find = |name: &str| events.iter().find(|e| e["name"] == name).unwrap().clone();
    assert_eq!(find("process_name")["args"]["name"], "rank 3");
    assert_eq!(find("thread_name")["args"]["name"], "rank 0 main");
    let (step, gemm) = (find("step 10"), find("lm head"));
    assert_eq!(step["ph"], "X");
    assert_eq!(step["cat"], "step");
    assert_eq!(gemm["cat"], "gemm");
    assert_eq!(step["pid"], 3);
    let us = |e: &Value, k: &str| e[k].as_f64().unwrap();
    assert!(us(&gemm, "ts") >= us(&step, "ts"));
    assert!(us(&gemm, "ts") + us(&gemm, "dur") <= us(&step, "ts") + us(&step, "dur"));
    assert!(us(&gemm, "dur") >= 1000.0, "microseconds");
    let expected = trace.spans()[1].duration.as_nanos() as f64 / 1e3;
    assert!((us(&gemm, "dur") - expected).abs() < 1e-6);
}

#[test]
fn several_captures_make_one_document_with_a_process_each() {
    let traces: Vec<zamba_trace::Trace> = (0..2)
        .map(|rank| {
            let capture = Capture::start("main");
            drop(span_with(Category::Step, || format!("step of rank {rank}")));
            capture.finish()
        })
        .collect();
    let json = zamba_trace::chrome_json_of(&[(0, "rank 0", &traces[0]), (1, "rank 1", &traces[1])]);
    let doc: Value = serde_json::from_str(&json).unwrap();
    let events = doc["traceEvents"].as_array().unwrap();
    let of = |name: &str| events.iter().find(|e| e["name"] == name).unwrap()["pid"].clone();
    assert_eq!(of("step of rank 0"), 0);
    assert_eq!(of("step of rank 1"), 1);
    let processes: Vec<&Value> = events
        .iter()
        .filter(|e| e["name"] == "process_name")
        .map(|e| &e["args"]["name"])
        .collect();
    assert_eq!(processes, ["rank 0", "rank 1"]);
}

#[test]
fn helper_threads_join_the_current_capture_and_successive_ones_share_a_track() {
    assert!(
        zamba_trace::current_capture().is_none(),
        "not recording yet"
    );
    let capture = Capture::start("rank 0");
    for step in 0..2 {
        let (handle, track) = zamba_trace::current_capture().expect("this thread records");
        assert_eq!(track, "rank 0");
        std::thread::spawn(move || {
            let _attached = handle.attach(format!("{track} communication"));
            let _c = span_with(Category::Communication, || format!("bucket of step {step}"));
        })
        .join()
        .unwrap();
    }
    let trace = capture.finish();
    assert_eq!(trace.tracks(), ["rank 0", "rank 0 communication"]);
    let comm: Vec<&str> = trace
        .spans()
        .iter()
        .filter(|s| s.track == 1)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(comm, ["bucket of step 0", "bucket of step 1"]);
}
