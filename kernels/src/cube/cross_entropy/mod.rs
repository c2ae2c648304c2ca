//! Cross-entropy over the vocabulary as one fused op on Burn's CubeCL backend. Forward: one pass
//! per row over the logits in their own dtype, an online f32 `(max, Σ exp)` over the vocabulary
//! in chunks of a cube's width, keeping one f32 log-sum-exp per row, then one small fixed-order
//! mean over the valid rows (the loss in f32). Backward: one element-wise pass writing
//! `(softmax − onehot) · dloss / valid` in the logits' dtype, over the logits' buffer when the op
//! holds the only reference to it. No f32 copy of the logits and no `[rows, vocab]`
//! intermediate; no float atomics (bit-identical reruns). Kernels in [`kernels`].

mod kernels;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Cube, DType, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{Int, Tensor};
use burn_cubecl::kernel::{cast, into_contiguous};
use burn_cubecl::tensor::CubeTensor;
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise};

use super::buffers::{address_type, empty, kernel_dtype, to_dtype};
use crate::IGNORE_INDEX;

/// Units per cube, at most: eight 32-wide warps on a GPU.
const MAX_UNITS: usize = 256;
/// Cubes of the forward's launch, at most (a grid's x extent): beyond it a cube takes several
/// consecutive rows.
const MAX_CUBES: usize = 65_535;

/// Mean cross-entropy of `logits` `[rows, vocab]` against `targets` on a CubeCL device (see
/// [`crate::cross_entropy`]).
pub(crate) fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as CubeCrossEntropyBackend>::cube_cross_entropy(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}

#[backend_extension(Cube, Autodiff)]
pub(crate) trait CubeCrossEntropyBackend: Backend {
    fn cube_cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>)
    -> FloatTensor<Self>;
}

/// The inputs as the kernels read them: contiguous logits in their float type, i32 targets.
#[derive(Clone, Debug)]
struct Inputs {
    logits: CubeTensor,
    targets: CubeTensor,
    rows: usize,
    vocab: usize,
    act: DType,
    dtype: DType,
}

impl Inputs {
    fn new(logits: CubeTensor, targets: CubeTensor) -> Self {
        let dtype = logits.dtype;
        let act = kernel_dtype(dtype);
        let logits = into_contiguous(to_dtype(logits, act));
        let targets = into_contiguous(cast(targets, DType::I32));
        let shape = logits.shape();
        Self {
            logits,
            targets,
            rows: shape[0],
            vocab: shape[1],
            act,
            dtype,
        }
    }

    /// Units per cube: a power of two within the device's limits and the vocabulary's width.
    fn units(&self) -> usize {
        let hardware = &self.logits.client.properties().hardware;
        let limit = [
            MAX_UNITS,
            hardware.max_units_per_cube as usize,
            hardware.max_cube_dim.0 as usize,
            self.vocab.next_power_of_two(),
        ]
        .into_iter()
        .min()
        .unwrap_or(1)
        .max(1);
        1 << limit.ilog2()
    }

    fn elem(&self) -> cubecl::prelude::ElemType {
        dtype_to_storage_type(self.act)
    }
}

/// What the forward leaves for the backward: each row's log-sum-exp and the count of valid
/// targets (at least 1), both f32 on the device.
#[derive(Clone, Debug)]
struct Statistics {
    lse: CubeTensor,
    count: CubeTensor,
}

/// The loss (`[1]`, f32) and the statistics.
fn forward(x: &Inputs) -> (CubeTensor, Statistics) {
    let client = &x.logits.client;
    let units = x.units();
    let ignore = IGNORE_INDEX as i32;
    let lse = empty(&x.logits, [x.rows.max(1)], DType::F32);
    let row_loss = empty(&x.logits, [x.rows.max(1)], DType::F32);
    if x.rows > 0 {
        let rows_per_cube = x.rows.div_ceil(MAX_CUBES);
        kernels::cross_entropy_rows::launch(
            client,
            CubeCount::new_1d(x.rows.div_ceil(rows_per_cube) as u32),
            CubeDim::new_1d(units as u32),
            address_type(&[&x.logits]),
            x.logits.clone().into_tensor_arg(),
            x.targets.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            row_loss.clone().into_tensor_arg(),
            x.rows,
            rows_per_cube,
            x.vocab,
            ignore,
            units,
            x.elem(),
        );
    }
    let loss = empty(&x.logits, [1], DType::F32);
    let count = empty(&x.logits, [1], DType::F32);
    kernels::mean_over_rows::launch(
        client,
        CubeCount::new_1d(1),
        CubeDim::new_1d(units as u32),
        address_type(&[&row_loss]),
        row_loss.into_tensor_arg(),
        x.targets.clone().into_tensor_arg(),
        loss.clone().into_tensor_arg(),
        count.clone().into_tensor_arg(),
        x.rows,
        ignore,
        units,
    );
    (loss, Statistics { lse, count })
}

/// `d logits` in the logits' dtype for the loss gradient `dloss` (`[1]`), written over the
/// logits when no other tensor shares their buffer (each element is read before it is written).
fn backward(x: &Inputs, stats: &Statistics, dloss: CubeTensor) -> CubeTensor {
    let dloss = into_contiguous(to_dtype(dloss, DType::F32));
    let grad = match x.logits.can_mut() {
        true => x.logits.clone(),
        false => empty(&x.logits, x.logits.shape(), x.act),
    };
    let elements = x.rows * x.vocab;
    if elements > 0 {
        let client = &x.logits.client;
        let cube_dim = CubeDim::new(client, elements);
        kernels::cross_entropy_backward::launch(
            client,
            calculate_cube_count_elemwise(client, elements, cube_dim),
            cube_dim,
            address_type(&[&x.logits, &grad]),
            x.logits.clone().into_tensor_arg(),
            x.targets.clone().into_tensor_arg(),
            stats.lse.clone().into_tensor_arg(),
            dloss.into_tensor_arg(),
            stats.count.clone().into_tensor_arg(),
            grad.clone().into_tensor_arg(),
            x.vocab,
            IGNORE_INDEX as i32,
            x.elem(),
        );
    }
    to_dtype(grad, x.dtype)
}

impl CubeCrossEntropyBackend for Cube {
    fn cube_cross_entropy(logits: CubeTensor, targets: CubeTensor) -> CubeTensor {
        forward(&Inputs::new(logits, targets)).0
    }
}

/// What the backward needs: the inputs as the kernels read them and the forward's statistics.
#[derive(Clone, Debug)]
struct CrossEntropyState {
    inputs: Inputs,
    stats: Statistics,
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Cube, 1> for CrossEntropyBackward {
    type State = CrossEntropyState;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let _span = zamba_trace::span(zamba_trace::Category::Loss, "cross-entropy backward");
        let dloss = grads.consume::<Cube>(&ops.node);
        let [parent] = ops.parents;
        let Some(node) = parent else { return };
        let CrossEntropyState { inputs, stats } = ops.state;
        grads.register::<Cube>(node.id, backward(&inputs, &stats, dloss));
    }
}

impl<C: CheckpointStrategy> CubeCrossEntropyBackend for Autodiff<Cube, C> {
    fn cube_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        let (logits, guard) = logits.into_parts();
        let inputs = Inputs::new(logits, targets);
        let (loss, stats) = forward(&inputs);
        match CrossEntropyBackward
            .prepare::<C>([guard])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(CrossEntropyState { inputs, stats }, loss),
            OpsKind::UnTracked(prep) => prep.finish(loss),
        }
    }
}
