//! The time split of a set of spans by category.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use crate::category::Category;
use crate::trace::SpanRecord;

/// Time of one category.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CategoryTime {
    /// Inside spans of the category and not inside a span nested in them: the categories'
    /// exclusive times add up to [`Summary::wall`].
    pub exclusive: Duration,
    /// Inside spans of the category, nested spans included (a span inside another of its own
    /// category is counted once).
    pub total: Duration,
    /// Spans of the category.
    pub spans: usize,
}

/// The time split of a set of spans (a step, a capture): per category, the time inside its
/// spans, exclusive of nested spans and in total.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// Time inside the root spans (depth 0 within the set), over all tracks.
    pub wall: Duration,
    pub categories: BTreeMap<Category, CategoryTime>,
}

impl Summary {
    /// The split of `spans`, sorted by track, start and depth (as [`crate::Trace`] keeps
    /// them); the set's shallowest spans are its roots.
    pub(crate) fn of(spans: &[SpanRecord]) -> Summary {
        let mut summary = Summary::default();
        let Some(root_depth) = spans.iter().map(|s| s.depth).min() else {
            return summary;
        };
        // Per track, the open ancestors of the current span: (index into spans, children time).
        let mut ancestors: Vec<(usize, Duration)> = Vec::new();
        let mut track = usize::MAX;
        for (i, span) in spans.iter().enumerate() {
            if span.track != track {
                summary.close_all(spans, &mut ancestors);
                track = span.track;
            }
            while ancestors.len() > span.depth - root_depth {
                summary.close_one(spans, &mut ancestors);
            }
            if let Some((_, children)) = ancestors.last_mut() {
                *children += span.duration;
            } else {
                summary.wall += span.duration;
            }
            let nested_in_same = ancestors
                .iter()
                .any(|&(a, _)| spans[a].category == span.category);
            let entry = summary.categories.entry(span.category).or_default();
            entry.spans += 1;
            if !nested_in_same {
                entry.total += span.duration;
            }
            ancestors.push((i, Duration::ZERO));
        }
        summary.close_all(spans, &mut ancestors);
        summary
    }

    fn close_one(&mut self, spans: &[SpanRecord], ancestors: &mut Vec<(usize, Duration)>) {
        let (index, children) = ancestors.pop().expect("an open ancestor");
        let span = &spans[index];
        let entry = self.categories.entry(span.category).or_default();
        entry.exclusive += span.duration.saturating_sub(children);
    }

    fn close_all(&mut self, spans: &[SpanRecord], ancestors: &mut Vec<(usize, Duration)>) {
        while !ancestors.is_empty() {
            self.close_one(spans, ancestors);
        }
    }

    /// Exclusive time of `category` (zero if it has no span).
    pub fn exclusive(&self, category: Category) -> Duration {
        self.categories
            .get(&category)
            .map_or(Duration::ZERO, |c| c.exclusive)
    }

    /// Category name → exclusive seconds, for every category with a span.
    pub fn exclusive_seconds(&self) -> BTreeMap<&'static str, f64> {
        self.categories
            .iter()
            .map(|(c, t)| (c.name(), t.exclusive.as_secs_f64()))
            .collect()
    }

    /// A text table, one line per category with a span, largest exclusive time first:
    /// exclusive ms, its share of `wall`, total ms, span count.
    pub fn table(&self) -> String {
        let mut rows: Vec<(&Category, &CategoryTime)> = self.categories.iter().collect();
        rows.sort_by(|a, b| b.1.exclusive.cmp(&a.1.exclusive).then(a.0.cmp(b.0)));
        let wall = self.wall.as_secs_f64().max(f64::MIN_POSITIVE);
        let mut text = format!(
            "{:<14} {:>12} {:>7} {:>12} {:>7}\n",
            "category", "exclusive ms", "share", "total ms", "spans"
        );
        for (category, time) in rows {
            let exclusive = time.exclusive.as_secs_f64();
            let _ = writeln!(
                text,
                "{:<14} {:>12.3} {:>6.1}% {:>12.3} {:>7}",
                category.name(),
                exclusive * 1e3,
                100.0 * exclusive / wall,
                time.total.as_secs_f64() * 1e3,
                time.spans
            );
        }
        let _ = writeln!(text, "{:<14} {:>12.3}", "wall", wall * 1e3);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(
        track: usize,
        start: u64,
        duration: u64,
        depth: usize,
        category: Category,
    ) -> SpanRecord {
        SpanRecord {
            name: category.to_string(),
            category,
            track,
            start: Duration::from_micros(start),
            duration: Duration::from_micros(duration),
            depth,
        }
    }

    #[test]
    fn exclusive_times_add_up_to_the_wall_time() {
        use Category::*;
        // Track 0: step [0, 100) ⊃ layer [10, 60) ⊃ gemm [10, 30), layer [30, 50) (nested in
        // the same category), gemm [70, 80); track 1: communication [5, 25).
        let spans = vec![
            span(0, 0, 100, 0, Step),
            span(0, 10, 50, 1, Layer),
            span(0, 10, 20, 2, Gemm),
            span(0, 30, 20, 2, Layer),
            span(0, 70, 10, 1, Gemm),
            span(1, 5, 20, 0, Communication),
        ];
        let s = Summary::of(&spans);
        assert_eq!(s.wall, Duration::from_micros(120));
        let us = |c| s.exclusive(c).as_micros();
        assert_eq!(us(Step), 40);
        assert_eq!(us(Layer), 10 + 20);
        assert_eq!(us(Gemm), 30);
        assert_eq!(us(Communication), 20);
        let sum: Duration = s.categories.values().map(|c| c.exclusive).sum();
        assert_eq!(sum, s.wall);
        assert_eq!(s.categories[&Layer].total, Duration::from_micros(50));
        assert_eq!(s.categories[&Layer].spans, 2);
        assert_eq!(s.categories[&Gemm].total, Duration::from_micros(30));
        assert_eq!(s.exclusive(Scan), Duration::ZERO);
        let table = s.table();
        // Largest exclusive time first; ties in category order.
        let first: Vec<&str> = table
            .lines()
            .skip(1)
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            first[..4],
            ["step", "layer", "gemm", "communication"],
            "{table}"
        );
        assert!(table.contains("wall"), "{table}");
        assert_eq!(s.exclusive_seconds()["gemm"], 30e-6);
    }

    #[test]
    fn a_subtree_is_summarised_from_its_own_depth() {
        use Category::*;
        let spans = vec![span(0, 0, 10, 3, Layer), span(0, 2, 4, 4, Scan)];
        let s = Summary::of(&spans);
        assert_eq!(s.wall, Duration::from_micros(10));
        assert_eq!(s.exclusive(Layer), Duration::from_micros(6));
        assert_eq!(Summary::of(&[]), Summary::default());
    }
}
