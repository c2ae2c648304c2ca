//! The classes of work a span belongs to: the columns of a step's time split.

use std::fmt;
use std::str::FromStr;

/// What a span measures. Structural spans ([`Step`](Category::Step), [`Forward`](Category::Forward),
/// [`Backward`](Category::Backward), [`Layer`](Category::Layer)) contain op spans; their
/// *exclusive* time (not inside a nested span) is the work no op span covers, such as Burn's own
/// element-wise ops and, in the backward, their gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    /// One optimizer step: the root of the step's spans.
    Step,
    /// Reading and assembling the step's batch.
    Data,
    /// The forward pass of a micro-batch.
    Forward,
    /// The backward pass of a micro-batch.
    Backward,
    /// One layer of the model (or the embedding, the final norm and head), forward or backward.
    Layer,
    /// A layer's forward run again inside its backward (activation checkpointing).
    Recompute,
    /// Matrix products: linear layers, per-head products, the LM head; forward or backward.
    Gemm,
    /// The selective scan.
    Scan,
    /// Causal attention (scores, softmax, weighted values).
    Attention,
    /// RMSNorm.
    Norm,
    /// Fused element-wise ops (the causal conv with SiLU, GeLU · up).
    Elementwise,
    /// The cross-entropy loss.
    Loss,
    /// Gradient accumulation over micro-batches, bucketing, the global norm.
    Gradients,
    /// Collectives between ranks.
    Communication,
    /// AdamW and the parameter update.
    Optimizer,
    /// Held-out evaluation.
    Eval,
    /// Writing a checkpoint.
    Checkpoint,
    /// Anything else (metrics, logging).
    Other,
}

impl Category {
    /// Every category, in the order of a step's time split.
    pub const ALL: [Category; 18] = [
        Category::Step,
        Category::Data,
        Category::Forward,
        Category::Backward,
        Category::Layer,
        Category::Recompute,
        Category::Gemm,
        Category::Scan,
        Category::Attention,
        Category::Norm,
        Category::Elementwise,
        Category::Loss,
        Category::Gradients,
        Category::Communication,
        Category::Optimizer,
        Category::Eval,
        Category::Checkpoint,
        Category::Other,
    ];

    /// The lower-case name: the `cat` of a Chrome-trace event.
    pub fn name(self) -> &'static str {
        match self {
            Category::Step => "step",
            Category::Data => "data",
            Category::Forward => "forward",
            Category::Backward => "backward",
            Category::Layer => "layer",
            Category::Recompute => "recompute",
            Category::Gemm => "gemm",
            Category::Scan => "scan",
            Category::Attention => "attention",
            Category::Norm => "norm",
            Category::Elementwise => "elementwise",
            Category::Loss => "loss",
            Category::Gradients => "gradients",
            Category::Communication => "communication",
            Category::Optimizer => "optimizer",
            Category::Eval => "eval",
            Category::Checkpoint => "checkpoint",
            Category::Other => "other",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Category {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Category::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Category::ALL.iter().map(|c| c.name()).collect();
                format!(
                    "unknown span category {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_round_trip() {
        for c in Category::ALL {
            assert_eq!(c.name().parse::<Category>(), Ok(c));
        }
        let mut names: Vec<&str> = Category::ALL.iter().map(|c| c.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Category::ALL.len());
        assert!(
            "gemms"
                .parse::<Category>()
                .unwrap_err()
                .contains("expected one of step, data")
        );
    }
}
