//! The Chrome trace-event JSON format (the "JSON Object Format" of the Trace Event Format), read
//! by Perfetto (ui.perfetto.dev), chrome://tracing and speedscope: one complete event (`"ph":
//! "X"`) per span, times in microseconds from the start of the capture, and metadata events that
//! name each process and thread.

use serde_json::{Value, json};

use crate::trace::Trace;

/// The document of several captures, each as process `pid` named as given.
pub(crate) fn document(captures: &[(u32, &str, &Trace)]) -> String {
    let mut events = Vec::new();
    for &(pid, process, trace) in captures {
        events.push(metadata("process_name", pid, None, process));
        for (tid, track) in trace.tracks().iter().enumerate() {
            events.push(metadata("thread_name", pid, Some(tid), track));
        }
        for span in trace.spans() {
            events.push(json!({
                "name": span.name,
                "cat": span.category.name(),
                "ph": "X",
                "ts": micros(span.start.as_nanos()),
                "dur": micros(span.duration.as_nanos()),
                "pid": pid,
                "tid": span.track,
            }));
        }
    }
    let start = captures.first().map_or(0.0, |(_, _, t)| t.unix_start());
    json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "producer": "zamba-trace",
            "unix_start_seconds": start,
        },
    })
    .to_string()
}

fn metadata(kind: &str, pid: u32, tid: Option<usize>, name: &str) -> Value {
    json!({
        "name": kind,
        "ph": "M",
        "pid": pid,
        "tid": tid.unwrap_or(0),
        "args": { "name": name },
    })
}

/// Nanoseconds as microseconds with three decimals (the format's unit, at full precision).
fn micros(nanos: u128) -> Value {
    json!(nanos as f64 / 1e3)
}
