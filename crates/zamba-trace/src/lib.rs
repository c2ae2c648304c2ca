//! Spans of a training step: where its time goes, by op class and by layer.
//!
//! Code anywhere in the workspace opens a span around a piece of work:
//!
//! ```
//! use zamba_trace::{Capture, Category, span, span_with};
//!
//! fn layer_forward(i: usize) {
//!     let _layer = span_with(Category::Layer, || format!("layer {i}"));
//!     let _gemm = span(Category::Gemm, "in_proj");
//!     // … the work; both spans end when their guards drop.
//! }
//!
//! // Nothing is recorded until a thread starts a capture (the trainer does so for
//! // `train.profile_steps`); the capture's sync (e.g. `device.sync()`) runs at every span
//! // boundary, so that a span on an asynchronous device measures the work queued inside it.
//! let capture = Capture::start("rank 0").with_sync(|| ());
//! layer_forward(3);
//! let trace = capture.finish();
//! assert_eq!(trace.spans().len(), 2);
//! let split = trace.summary(); // category → time, exclusive of nested spans
//! assert_eq!(split.categories.len(), 2);
//! let json = trace.chrome_json(0, "rank 0"); // for Perfetto / chrome://tracing
//! # assert!(json.contains("\"traceEvents\""));
//! ```
//!
//! **Cost when off**: [`span`] and [`span_with`] read one process-wide atomic counter (the
//! number of threads recording) and return an inert guard; the name closure of `span_with` is
//! not called. While some thread records, other threads pay a thread-local lookup.
//!
//! **Threads**: a capture records the thread that started it, on a track of its own; another
//! thread joins with [`CaptureHandle::attach`] (its spans go on its own track). Spans of threads
//! that did neither are not recorded, so concurrent captures (ranks run as threads) do not mix.
//!
//! **Spans that cannot be a guard** (a layer's backward, opened by one autodiff node and closed by
//! another) use [`begin`] and [`end`]. Whatever is still open when an enclosing span ends, or when
//! the capture finishes, ends there: spans always nest.

mod category;
mod chrome;
mod recorder;
mod summary;
mod trace;

pub use category::Category;
pub use recorder::{
    Attached, Capture, CaptureHandle, Span, begin, current_capture, end, recording, span, span_with,
};
pub use summary::{CategoryTime, Summary};
pub use trace::{SpanRecord, Trace, chrome_json_of};
