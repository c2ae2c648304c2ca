//! Per-layer activation checkpointing: a block of the model (a module and a function of some
//! activations) run through [`zamba_kernels::recompute`], so that autodiff keeps only the block's
//! input activations and recomputes its inside in the backward.

use std::sync::Arc;

use burn::backend::DispatchTensor;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Gradients, Tensor};
use zamba_kernels::Segment;

/// The block's function: the module and the activations in, one activation out.
type BlockFn<M> = dyn Fn(&M, Vec<Tensor<3>>) -> Tensor<3> + Send + Sync;

/// `f(module, activations)`, recomputed in the backward when autodiff records it. The module's
/// parameters and the activations are the block's inputs: both receive their gradients.
pub(crate) fn checkpointed<M>(
    module: &M,
    activations: Vec<Tensor<3>>,
    f: impl Fn(&M, Vec<Tensor<3>>) -> Tensor<3> + Send + Sync + 'static,
) -> Tensor<3>
where
    M: Module + Clone + Send + Sync + 'static,
{
    if !activations[0].device().is_autodiff() {
        return f(module, activations);
    }
    let mut params = CollectParams(Vec::new());
    module.visit(&mut params);
    let segment = BlockSegment {
        module: module.clone(),
        activations: activations.len(),
        f: Arc::new(f),
    };
    let inputs = activations
        .into_iter()
        .map(Tensor::into_dispatch)
        .chain(params.0)
        .collect();
    Tensor::from_dispatch(zamba_kernels::recompute(inputs, Arc::new(segment)))
}

struct BlockSegment<M> {
    module: M,
    activations: usize,
    f: Arc<BlockFn<M>>,
}

impl<M: Module + Clone + Send + Sync> BlockSegment<M> {
    /// Runs the block on `inputs` (activations, then parameters in visiting order), each made a
    /// gradient-requiring leaf of a new graph when `track`. Returns the activations it used, the
    /// module and the output.
    fn run(&self, inputs: Vec<DispatchTensor>, track: bool) -> (Vec<Tensor<3>>, M, Tensor<3>) {
        let mut inputs = inputs.into_iter();
        let activations: Vec<Tensor<3>> = inputs
            .by_ref()
            .take(self.activations)
            .map(|t| leaf(Tensor::from_dispatch(t), track))
            .collect();
        let module = self.module.clone().map(&mut ReplaceParams {
            tensors: inputs,
            track,
        });
        let out = (self.f)(&module, activations.clone());
        (activations, module, out)
    }
}

/// `t` on the autodiff backend, a gradient-requiring leaf when `track`. Untracked, it records
/// nothing, but runs the same ops as the forward that does: a backend's inference ops may round
/// differently (Flex's fused attention), and recomputation must not change a value.
fn leaf<const D: usize>(t: Tensor<D>, track: bool) -> Tensor<D> {
    match track {
        true => t.autodiff().require_grad(),
        false => t.autodiff(),
    }
}

impl<M: Module + Clone + Send + Sync> Segment for BlockSegment<M> {
    fn forward(&self, inputs: Vec<DispatchTensor>) -> DispatchTensor {
        self.run(inputs, false).2.inner().into_dispatch()
    }

    fn backward(
        &self,
        inputs: Vec<DispatchTensor>,
        dout: DispatchTensor,
    ) -> Vec<Option<DispatchTensor>> {
        let (activations, module, out) =
            zamba_trace::span(zamba_trace::Category::Recompute, "recompute")
                .run(|| self.run(inputs, true));
        // A constant: the gradient of Σ out ⊙ dout with respect to `out` is `dout`.
        let grads = (out * Tensor::<3>::from_dispatch(dout)).sum().backward();
        let mut collect = CollectGrads {
            grads: &grads,
            out: activations
                .iter()
                .map(|a| a.grad(&grads).map(Tensor::into_dispatch))
                .collect(),
        };
        module.visit(&mut collect);
        collect.out
    }
}

/// Every float parameter's value, in visiting order.
struct CollectParams(Vec<DispatchTensor>);

impl ModuleVisitor for CollectParams {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.val().into_dispatch());
    }
}

/// Replaces every float parameter, in visiting order, by the next of `tensors`.
struct ReplaceParams<I> {
    tensors: I,
    track: bool,
}

impl<I: Iterator<Item = DispatchTensor>> ModuleMapper for ReplaceParams<I> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let tensor = self
            .tensors
            .next()
            .expect("one input per parameter, in visiting order");
        let track = self.track;
        param.map(|_| leaf(Tensor::from_dispatch(tensor), track))
    }
}

/// The gradient of every float parameter, in visiting order, after the activations'; each also
/// goes to the thread's gradient sink, if any (see [`crate::gradient_hook`]).
struct CollectGrads<'a> {
    grads: &'a Gradients,
    out: Vec<Option<DispatchTensor>>,
}

impl ModuleVisitor for CollectGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let grad = param.val().grad(self.grads);
        crate::gradient_hook::deliver(param.id, grad.as_ref());
        self.out.push(grad.map(Tensor::into_dispatch));
    }
}
