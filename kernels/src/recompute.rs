//! Recomputation of a whole block of the model in the backward: one autodiff node whose forward
//! runs a [`Segment`] without recording anything and keeps only the segment's inputs, and whose
//! backward reruns the segment with autodiff and backpropagates through it.
//!
//! Burn's own gradient checkpointing decides per op; this is per block (a Mamba layer, a use of the
//! shared attention block), the granularity of activation checkpointing in Megatron or
//! torch.utils.checkpoint. The inputs are the block's activations and its parameters, so the
//! node routes gradients to both.
//!
//! The backward runs a nested `backward()` on a graph of its own: the segment's inputs are
//! re-created as fresh leaves there, so that graph never joins the one being differentiated
//! (whose lock the outer backward holds).

use std::fmt::Debug;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, BackendTensor, Dispatch, DispatchAutodiffContext,
    DispatchTensor, DispatchTensorKind, ExtensionType, Flex, backend_extension,
};

/// Most tensors (activations and parameters together) one segment may take: the autodiff node has
/// a fixed number of parents.
pub const MAX_SEGMENT_INPUTS: usize = 12;

/// A block of the forward pass, over rank-erased tensors (the segment knows their ranks).
pub trait Segment: Send + Sync {
    /// The output, computed without autodiff from inputs without autodiff.
    fn forward(&self, inputs: Vec<DispatchTensor>) -> DispatchTensor;

    /// The gradient of `Σ dout ⊙ forward(inputs)` with respect to every input (`None` where it
    /// has none), computed by running the forward again with autodiff.
    fn backward(
        &self,
        inputs: Vec<DispatchTensor>,
        dout: DispatchTensor,
    ) -> Vec<Option<DispatchTensor>>;
}

/// A [`Segment`] as an argument of the backend extension.
#[derive(Clone)]
pub struct SegmentArg(Arc<dyn Segment>);

impl Debug for SegmentArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Segment")
    }
}

/// Runs `segment` on `inputs` (all float tensors on one device) so that autodiff keeps only the
/// inputs for the backward and recomputes the segment's inside there. Without autodiff, or when
/// no input requires a gradient, it is simply `segment.forward`.
///
/// # Panics
/// With more than [`MAX_SEGMENT_INPUTS`] inputs, or on a device without the op (Flex and the
/// CubeCL devices have it).
pub fn recompute(inputs: Vec<DispatchTensor>, segment: Arc<dyn Segment>) -> DispatchTensor {
    assert!(
        !inputs.is_empty() && inputs.len() <= MAX_SEGMENT_INPUTS,
        "recompute: a segment takes 1 to {MAX_SEGMENT_INPUTS} tensors, got {}",
        inputs.len()
    );
    <Dispatch as RecomputeBackend>::recompute(SegmentInputs(inputs), SegmentArg(segment))
}

/// The segment's inputs at the backend-extension boundary: float primitives of backend `B`, as
/// many as the segment takes (`#[derive(ExtensionType)]` maps fixed fields only, hence the
/// implementation below, which does for a list what the derive does for each field).
pub(crate) struct SegmentInputs<B: Backend>(Vec<FloatTensor<B>>);

impl<B: Backend> ExtensionType<B> for SegmentInputs<B> {
    type Target = SegmentInputs<Dispatch>;

    fn map_to_dispatch<F>(self, map_kind: F, autodiff: DispatchAutodiffContext) -> Self::Target
    where
        F: Fn(BackendTensor<B>) -> DispatchTensorKind,
    {
        let wrap = |t| DispatchTensor {
            kind: map_kind(BackendTensor::Float(t)),
            autodiff,
        };
        SegmentInputs(self.0.into_iter().map(wrap).collect())
    }

    fn map_from_dispatch<F>(target: Self::Target, unwrap_kind: F) -> Self
    where
        F: Fn(DispatchTensor) -> BackendTensor<B>,
    {
        SegmentInputs(
            target
                .0
                .into_iter()
                .map(|t| unwrap_kind(t).float())
                .collect(),
        )
    }

    fn routing_tensor(target: &Self::Target) -> Option<&DispatchTensor> {
        target.0.first()
    }

    fn routing_float_tensor(target: &Self::Target) -> Option<&DispatchTensor> {
        target.0.first()
    }

    fn autodiff_context(target: &Self::Target) -> DispatchAutodiffContext {
        target
            .0
            .iter()
            .fold(DispatchAutodiffContext::Disabled, |context, t| {
                context.merge(t.autodiff)
            })
    }
}

/// The op over the segment's inputs.
#[backend_extension(Flex, Cube: cfg(feature = "cube"), Autodiff)]
pub(crate) trait RecomputeBackend: Backend {
    fn recompute(
        #[extension_type] inputs: SegmentInputs<Self>,
        segment: SegmentArg,
    ) -> FloatTensor<Self>;
}

/// A backend whose float primitives can be handed to (and taken back from) code written against
/// `Tensor` without autodiff.
pub(crate) trait Wrap: Backend {
    fn wrap(tensor: FloatTensor<Self>) -> DispatchTensor;
    fn unwrap(tensor: DispatchTensor) -> FloatTensor<Self>;
}

fn plain(kind: DispatchTensorKind) -> DispatchTensor {
    DispatchTensor {
        kind,
        autodiff: DispatchAutodiffContext::Disabled,
    }
}

impl Wrap for Flex {
    fn wrap(tensor: FloatTensor<Self>) -> DispatchTensor {
        plain(DispatchTensorKind::Flex(BackendTensor::Float(tensor)))
    }
    fn unwrap(tensor: DispatchTensor) -> FloatTensor<Self> {
        match tensor.kind {
            DispatchTensorKind::Flex(t) => t.float(),
            other => panic!("recompute: a segment returned a tensor of another backend: {other:?}"),
        }
    }
}

#[cfg(feature = "cube")]
impl Wrap for burn::backend::Cube {
    fn wrap(tensor: FloatTensor<Self>) -> DispatchTensor {
        plain(DispatchTensorKind::Cube(BackendTensor::Float(tensor)))
    }
    fn unwrap(tensor: DispatchTensor) -> FloatTensor<Self> {
        match tensor.kind {
            DispatchTensorKind::Cube(t) => t.float(),
            other => panic!("recompute: a segment returned a tensor of another backend: {other:?}"),
        }
    }
}

fn run_plain<B: Wrap>(inputs: Vec<FloatTensor<B>>, segment: &SegmentArg) -> FloatTensor<B> {
    B::unwrap(segment.0.forward(inputs.into_iter().map(B::wrap).collect()))
}

/// Flex and Cube without autodiff: the segment's forward.
impl<B: Wrap> RecomputeBackend for B {
    fn recompute(inputs: SegmentInputs<Self>, segment: SegmentArg) -> FloatTensor<Self> {
        run_plain::<B>(inputs.0, &segment)
    }
}

/// The backward's state: the segment and its inputs (without autodiff).
#[derive(Clone)]
struct RecomputeState<B: Backend> {
    inputs: Vec<FloatTensor<B>>,
    segment: SegmentArg,
}

impl<B: Backend> Debug for RecomputeState<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecomputeState({} inputs)", self.inputs.len())
    }
}

#[derive(Debug)]
struct RecomputeBackward;

impl<B: Wrap> Backward<B, MAX_SEGMENT_INPUTS> for RecomputeBackward {
    type State = RecomputeState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, MAX_SEGMENT_INPUTS>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let dout = B::wrap(grads.consume::<B>(&ops.node));
        let RecomputeState { inputs, segment } = ops.state;
        let wrapped = inputs.into_iter().map(B::wrap).collect();
        let computed = segment.0.backward(wrapped, dout);
        for (parent, grad) in ops.parents.into_iter().zip(computed) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<B>(node.id, B::unwrap(grad));
            }
        }
    }
}

impl<B: Wrap, C: CheckpointStrategy> RecomputeBackend for Autodiff<B, C> {
    fn recompute(inputs: SegmentInputs<Self>, segment: SegmentArg) -> FloatTensor<Self> {
        let (tensors, mut guards): (Vec<_>, Vec<_>) =
            inputs.0.into_iter().map(|t| t.into_parts()).unzip();
        // The node has a fixed number of parents: pad with untracked placeholders.
        while guards.len() < MAX_SEGMENT_INPUTS {
            guards.push(<Self as AutodiffBackend>::from_inner(tensors[0].clone()).node());
        }
        let guards: [_; MAX_SEGMENT_INPUTS] = guards
            .try_into()
            .unwrap_or_else(|_| panic!("recompute: at most {MAX_SEGMENT_INPUTS} inputs"));
        let out = run_plain::<B>(tensors.clone(), &segment);
        match RecomputeBackward
            .prepare::<C>(guards)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                RecomputeState {
                    inputs: tensors,
                    segment,
                },
                out,
            ),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}
