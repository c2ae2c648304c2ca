//! A block's backward pass as one trace span (`zamba_trace`): an identity op at the block's output
//! whose backward begins the span, and one at its input whose backward ends it.
//!
//! Burn runs the backward's nodes by decreasing depth in the graph, so on a chain of blocks (the
//! model's layers, joined by the residual stream) everything computed from a block's marked
//! input and feeding its marked output runs between the two markers' backward steps. What
//! depends on parameters only (e.g. a weight's cast) runs at the end of the backward instead,
//! outside every block's span.
//!
//! The markers exist only while the calling thread records spans and the tensor is on an
//! autodiff device: at all other times [`mark_backward_span`] returns its input untouched.

use std::fmt::Debug;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;
use zamba_trace::Category;

/// Which end of the block a marked tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockEdge {
    /// The block's input: the backward's span ends once its gradient is computed.
    Input,
    /// The block's output: the backward's span begins when its gradient arrives.
    Output,
}

/// What a marker does in the backward.
#[derive(Clone, Debug)]
pub struct SpanMark {
    edge: BlockEdge,
    category: Category,
    name: Arc<str>,
}

impl SpanMark {
    fn apply(&self) {
        match self.edge {
            BlockEdge::Output => zamba_trace::begin(self.category, || self.name.to_string()),
            BlockEdge::Input => zamba_trace::end(self.category, &self.name),
        }
    }
}

/// `x`, marked as the `edge` of a block whose backward shows as one span `name` of `category`
/// (the same name at both edges). See the module docs for when a marker is recorded.
pub fn mark_backward_span<const D: usize>(
    x: Tensor<D>,
    edge: BlockEdge,
    category: Category,
    name: impl FnOnce() -> String,
) -> Tensor<D> {
    let device = x.device();
    if !zamba_trace::recording() || !device.is_autodiff() || !crate::fused_kernel_available(&device)
    {
        return x;
    }
    let mark = SpanMark {
        edge,
        category,
        name: name().into(),
    };
    Tensor::from_dispatch(<Dispatch as BackwardSpanBackend>::backward_span_mark(
        x.into_dispatch(),
        mark,
    ))
}

#[backend_extension(Flex, Cube: cfg(feature = "cube"), Autodiff)]
pub(crate) trait BackwardSpanBackend: Backend {
    fn backward_span_mark(x: FloatTensor<Self>, mark: SpanMark) -> FloatTensor<Self>;
}

impl BackwardSpanBackend for Flex {
    fn backward_span_mark(x: FloatTensor<Self>, _mark: SpanMark) -> FloatTensor<Self> {
        x
    }
}

#[cfg(feature = "cube")]
impl BackwardSpanBackend for burn::backend::Cube {
    fn backward_span_mark(x: FloatTensor<Self>, _mark: SpanMark) -> FloatTensor<Self> {
        x
    }
}

#[derive(Debug)]
struct MarkBackward;

impl<B: Backend> Backward<B, 1> for MarkBackward {
    type State = SpanMark;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        ops.state.apply();
        let [parent] = ops.parents;
        if let Some(node) = parent {
            grads.register::<B>(node.id, grad);
        }
    }
}

impl<B: Backend, C: CheckpointStrategy> BackwardSpanBackend for Autodiff<B, C> {
    fn backward_span_mark(x: FloatTensor<Self>, mark: SpanMark) -> FloatTensor<Self> {
        let (x, guard) = x.into_parts();
        match MarkBackward
            .prepare::<C>([guard])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(mark, x),
            OpsKind::UnTracked(prep) => prep.finish(x),
        }
    }
}
