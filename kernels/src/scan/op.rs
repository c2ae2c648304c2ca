//! The scan as one Burn backend extension: the kernel interface every backend implements
//! ([`ScanKernel`]), and the one autodiff node over it.
//!
//! Routing: [`crate::selective_scan`] calls `Dispatch::selective_scan`, which Burn routes by the
//! device to `Flex`, `Cube` (the CubeCL runtimes, with the `cuda` or `cube-cpu` feature) or
//! `Autodiff<_, _>` over either. The autodiff implementation is written once, for any
//! `B: ScanKernel`: its forward keeps the chunk-boundary states, its backward node hands them to
//! the backend's backward.

use std::fmt::Debug;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::Tensor;

/// What a backend implements to run the fused scan. The eight inputs are, in order,
/// `u, delta, a, b, c, d, z, delta_bias` (shapes as in [`crate::selective_scan`], already
/// validated).
pub(crate) trait ScanKernel: Backend {
    /// The inputs as the kernels read them (converted once, e.g. to `f32` or to a contiguous
    /// layout), kept by the autodiff node for the backward.
    type Inputs: Clone + Send + Debug + 'static;
    /// The states entering every chunk but the first, saved by a forward for the backward.
    type Checkpoints: Clone + Send + Debug + 'static;

    fn prepare(inputs: [FloatTensor<Self>; 8]) -> Self::Inputs;

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
    ) -> [FloatTensor<Self>; 8];
}

/// The fused scan as a Burn backend extension. Only the backends listed here can be reached;
/// [`crate::fused_kernel_available`] says which devices those are.
#[backend_extension(Flex, Cube: cfg(feature = "cube"), Autodiff)]
pub(crate) trait SelectiveScanBackend: Backend {
    #[allow(clippy::too_many_arguments)]
    fn selective_scan(
        u: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        d: FloatTensor<Self>,
        z: FloatTensor<Self>,
        delta_bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// Entry point used by [`crate::selective_scan`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn fused(
    u: Tensor<3>,
    delta: Tensor<3>,
    a: Tensor<2>,
    b: Tensor<4>,
    c: Tensor<4>,
    d: Tensor<1>,
    z: Tensor<3>,
    delta_bias: Tensor<1>,
) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as SelectiveScanBackend>::selective_scan(
        u.into_dispatch(),
        delta.into_dispatch(),
        a.into_dispatch(),
        b.into_dispatch(),
        c.into_dispatch(),
        d.into_dispatch(),
        z.into_dispatch(),
        delta_bias.into_dispatch(),
    ))
}

/// The forward without autodiff: no checkpoints.
fn untracked<B: ScanKernel>(inputs: [FloatTensor<B>; 8]) -> FloatTensor<B> {
    B::forward(&B::prepare(inputs), false).0
}

impl SelectiveScanBackend for Flex {
    fn selective_scan(
        u: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        d: FloatTensor<Self>,
        z: FloatTensor<Self>,
        delta_bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        untracked::<Self>([u, delta, a, b, c, d, z, delta_bias])
    }
}

#[cfg(feature = "cube")]
impl SelectiveScanBackend for burn::backend::Cube {
    fn selective_scan(
        u: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        d: FloatTensor<Self>,
        z: FloatTensor<Self>,
        delta_bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        untracked::<Self>([u, delta, a, b, c, d, z, delta_bias])
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
        let computed = B::backward(&inputs, &checkpoints, dout);
        for (parent, grad) in ops.parents.into_iter().zip(computed) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: ScanKernel, C: CheckpointStrategy> SelectiveScanBackend for Autodiff<B, C> {
    fn selective_scan(
        u: FloatTensor<Self>,
        delta: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        d: FloatTensor<Self>,
        z: FloatTensor<Self>,
        delta_bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [p0, p1, p2, p3, p4, p5, p6, p7] =
            [u, delta, a, b, c, d, z, delta_bias].map(|t| t.into_parts());
        let (tensors, guards) = (
            [p0.0, p1.0, p2.0, p3.0, p4.0, p5.0, p6.0, p7.0],
            [p0.1, p1.1, p2.1, p3.1, p4.1, p5.1, p6.1, p7.1],
        );
        let inputs = B::prepare(tensors);
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
