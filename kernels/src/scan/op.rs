//! The scan as one Burn backend extension: the kernel interface every backend implements
//! ([`ScanKernel`]), and the one autodiff node over it.
//!
//! Routing: [`super::selective_scan`] calls `Dispatch::selective_scan`, which Burn routes by the
//! device to `Flex`, `Cube` (the CubeCL runtimes, with the `cuda` or `cube-cpu` feature) or
//! `Autodiff<_, _>` over either. Both are written once, for any `B: ScanKernel`: without autodiff
//! a forward that keeps nothing; with autodiff a forward that keeps the chunk-boundary states and
//! a backward node that hands them to the backend's backward.

use std::fmt::Debug;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, ExtensionType, backend_extension};
use burn::tensor::Tensor;

use super::ScanInputs;

/// The eight inputs of [`ScanInputs`] as primitives of backend `B` (shapes already checked), or
/// their eight gradients.
#[derive(ExtensionType)]
pub(crate) struct ScanTensors<B: Backend> {
    pub u: FloatTensor<B>,
    pub delta: FloatTensor<B>,
    pub a: FloatTensor<B>,
    pub b: FloatTensor<B>,
    pub c: FloatTensor<B>,
    pub d: FloatTensor<B>,
    pub z: FloatTensor<B>,
    pub delta_bias: FloatTensor<B>,
}

impl<B: Backend> ScanTensors<B> {
    /// The tensors in the order of the fields.
    pub(crate) fn into_array(self) -> [FloatTensor<B>; 8] {
        [
            self.u,
            self.delta,
            self.a,
            self.b,
            self.c,
            self.d,
            self.z,
            self.delta_bias,
        ]
    }

    /// The inverse of [`Self::into_array`].
    pub(crate) fn from_array(tensors: [FloatTensor<B>; 8]) -> Self {
        let [u, delta, a, b, c, d, z, delta_bias] = tensors;
        Self {
            u,
            delta,
            a,
            b,
            c,
            d,
            z,
            delta_bias,
        }
    }
}

/// What a backend implements to run the fused scan.
pub(crate) trait ScanKernel: Backend {
    /// The inputs as the kernels read them (converted once, e.g. to `f32` or to a contiguous
    /// layout), kept by the autodiff node for the backward.
    type Inputs: Clone + Send + Debug + 'static;
    /// The states entering every chunk but the first, saved by a forward for the backward.
    type Checkpoints: Clone + Send + Debug + 'static;

    fn prepare(inputs: ScanTensors<Self>) -> Self::Inputs;

    /// `y · silu(z)`, in the dtype `u` came in; with `keep_checkpoints`, also the chunk-boundary
    /// states.
    fn forward(
        x: &Self::Inputs,
        keep_checkpoints: bool,
    ) -> (FloatTensor<Self>, Option<Self::Checkpoints>);

    /// The gradients of the eight inputs, each in the dtype its input came in, from the saved
    /// checkpoints and the output gradient.
    fn backward(
        x: &Self::Inputs,
        checkpoints: &Self::Checkpoints,
        dout: FloatTensor<Self>,
    ) -> ScanTensors<Self>;
}

/// The fused scan as a Burn backend extension. Only the backends listed here can be reached;
/// [`super::fused_kernel_available`] says which devices those are.
#[backend_extension(Flex, Cube: cfg(feature = "cube"), Autodiff)]
pub(crate) trait SelectiveScanBackend: Backend {
    fn selective_scan(#[extension_type] inputs: ScanTensors<Self>) -> FloatTensor<Self>;
}

/// Entry point used by [`super::selective_scan`].
pub(crate) fn fused(x: ScanInputs) -> Tensor<3> {
    let inputs = ScanTensors::<Dispatch> {
        u: x.u.into_dispatch(),
        delta: x.delta.into_dispatch(),
        a: x.a.into_dispatch(),
        b: x.b.into_dispatch(),
        c: x.c.into_dispatch(),
        d: x.d.into_dispatch(),
        z: x.z.into_dispatch(),
        delta_bias: x.delta_bias.into_dispatch(),
    };
    Tensor::from_dispatch(<Dispatch as SelectiveScanBackend>::selective_scan(inputs))
}

/// Flex and Cube without autodiff: the forward, without checkpoints.
impl<B: ScanKernel> SelectiveScanBackend for B {
    fn selective_scan(inputs: ScanTensors<Self>) -> FloatTensor<Self> {
        B::forward(&B::prepare(inputs), false).0
    }
}

/// What the backward needs: the prepared inputs (shared, not copied) and the checkpoints.
#[derive(Clone, Debug)]
struct ScanState<B: ScanKernel> {
    inputs: B::Inputs,
    checkpoints: B::Checkpoints,
}

#[derive(Debug)]
struct ScanBackward;

impl<B: ScanKernel> Backward<B, 8> for ScanBackward {
    type State = ScanState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 8>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let _span = zamba_trace::span(zamba_trace::Category::Scan, "scan backward");
        let dout = grads.consume::<B>(&ops.node);
        let ScanState {
            inputs,
            checkpoints,
        } = ops.state;
        let computed = B::backward(&inputs, &checkpoints, dout).into_array();
        for (parent, grad) in ops.parents.into_iter().zip(computed) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: ScanKernel, C: CheckpointStrategy> SelectiveScanBackend for Autodiff<B, C> {
    fn selective_scan(inputs: ScanTensors<Self>) -> FloatTensor<Self> {
        let (tensors, guards) = unzip(inputs.into_array().map(|t| t.into_parts()));
        let inputs = B::prepare(ScanTensors::from_array(tensors));
        // Compute bound: the backward must never rerun the forward through Burn's checkpointer;
        // it recomputes from its own chunk checkpoints instead.
        match ScanBackward.prepare::<C>(guards).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, checkpoints) = B::forward(&inputs, true);
                let checkpoints = checkpoints.expect("a forward asked for checkpoints keeps them");
                prep.finish(
                    ScanState {
                        inputs,
                        checkpoints,
                    },
                    out,
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(B::forward(&inputs, false).0),
        }
    }
}

fn unzip<X, Y, const N: usize>(pairs: [(X, Y); N]) -> ([X; N], [Y; N]) {
    let (xs, ys): (Vec<X>, Vec<Y>) = pairs.into_iter().unzip();
    (exactly(xs), exactly(ys))
}

fn exactly<T, const N: usize>(items: Vec<T>) -> [T; N] {
    let len = items.len();
    items
        .try_into()
        .unwrap_or_else(|_| unreachable!("{len} items, not {N}"))
}
