//! A finished capture: its spans, on their tracks.

use std::path::Path;
use std::time::Duration;

use crate::category::Category;
use crate::summary::Summary;

/// One span: where it ran, when and how long, and how deep in its track's nesting.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanRecord {
    pub name: String,
    pub category: Category,
    /// Index into [`Trace::tracks`].
    pub track: usize,
    /// Start, from the start of the capture.
    pub start: Duration,
    pub duration: Duration,
    /// Spans open around it on its track when it started (0: a root span).
    pub depth: usize,
}

impl SpanRecord {
    pub fn end(&self) -> Duration {
        self.start + self.duration
    }
}

/// The spans of one capture, sorted by track, start and depth (a parent before its children).
#[derive(Clone, Debug, Default)]
pub struct Trace {
    tracks: Vec<String>,
    spans: Vec<SpanRecord>,
    unix_start: f64,
}

impl Trace {
    pub(crate) fn new(tracks: Vec<String>, mut spans: Vec<SpanRecord>, unix_start: f64) -> Self {
        spans.sort_by(|a, b| {
            (a.track, a.start, a.depth)
                .partial_cmp(&(b.track, b.start, b.depth))
                .expect("durations compare")
        });
        Self {
            tracks,
            spans,
            unix_start,
        }
    }

    /// Track names (a thread each), indexed by [`SpanRecord::track`].
    pub fn tracks(&self) -> &[String] {
        &self.tracks
    }

    pub fn spans(&self) -> &[SpanRecord] {
        &self.spans
    }

    /// Seconds since the Unix epoch at the start of the capture.
    pub fn unix_start(&self) -> f64 {
        self.unix_start
    }

    /// The time split of the whole capture (see [`Summary`]).
    pub fn summary(&self) -> Summary {
        Summary::of(&self.spans)
    }

    /// The time split of each root span of [`Category::Step`], in order: one summary per
    /// training step.
    pub fn step_summaries(&self) -> Vec<Summary> {
        self.spans
            .iter()
            .enumerate()
            .filter(|(_, s)| s.depth == 0 && s.category == Category::Step)
            .map(|(i, step)| Summary::of(self.subtree(i, step)))
            .collect()
    }

    /// The span at `index` and its descendants (they follow it in the sorted order).
    fn subtree(&self, index: usize, root: &SpanRecord) -> &[SpanRecord] {
        let len = self.spans[index + 1..]
            .iter()
            .take_while(|s| s.track == root.track && s.depth > root.depth)
            .count();
        &self.spans[index..index + 1 + len]
    }

    /// The Chrome-trace JSON document of this capture as process `pid` named `process`.
    pub fn chrome_json(&self, pid: u32, process: &str) -> String {
        crate::chrome::document(&[(pid, process, self)])
    }

    /// Writes [`chrome_json`](Self::chrome_json) to `path`.
    pub fn write_chrome(&self, path: &Path, pid: u32, process: &str) -> std::io::Result<()> {
        std::fs::write(path, self.chrome_json(pid, process))
    }
}

/// One Chrome-trace document of several captures, each as its own process (e.g. the ranks of
/// one process, run as threads).
pub fn chrome_json_of(captures: &[(u32, &str, &Trace)]) -> String {
    crate::chrome::document(captures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(track: usize, start_us: u64, dur_us: u64, depth: usize, cat: Category) -> SpanRecord {
        SpanRecord {
            name: format!("{cat} at {start_us}"),
            category: cat,
            track,
            start: Duration::from_micros(start_us),
            duration: Duration::from_micros(dur_us),
            depth,
        }
    }

    #[test]
    fn step_summaries_cover_one_step_each() {
        use Category::*;
        let trace = Trace::new(
            vec!["main".into()],
            vec![
                record(0, 100, 50, 0, Step),
                record(0, 0, 90, 0, Step),
                record(0, 10, 30, 1, Gemm),
                record(0, 110, 20, 1, Scan),
                record(0, 95, 3, 0, Other),
            ],
            0.0,
        );
        let steps = trace.step_summaries();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].wall, Duration::from_micros(90));
        assert_eq!(steps[0].exclusive(Gemm), Duration::from_micros(30));
        assert_eq!(steps[0].exclusive(Scan), Duration::ZERO);
        assert_eq!(steps[1].exclusive(Scan), Duration::from_micros(20));
        assert_eq!(steps[1].exclusive(Step), Duration::from_micros(30));
        // The root outside any step counts in the whole capture only.
        assert_eq!(trace.summary().wall, Duration::from_micros(143));
    }
}
