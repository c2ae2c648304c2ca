//! The batched product `a · b` on the CubeCL backend as one autodiff node, so that its backward's
//! two products go through [`super::gemm::matmul`] too (Burn's matmul backward would call Burn's
//! matmul): `da = dy · bᵀ`, `db = aᵀ · dy`, each computed only where its operand needs it, with
//! the transposes as views.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Cube, Dispatch, backend_extension};
use burn::tensor::Tensor;
use burn_cubecl::tensor::CubeTensor;

use super::gemm::{matmul, transposed};

/// `a · b` over the last two dimensions (`[.., m, k] · [.., k, n]`, the same leading dimensions,
/// one dtype) on a CubeCL device, result in the operands' dtype.
pub(crate) fn product<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as CubeProductBackend>::cube_product(
        a.into_dispatch(),
        b.into_dispatch(),
    ))
}

#[backend_extension(Cube, Autodiff)]
pub(crate) trait CubeProductBackend: Backend {
    fn cube_product(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl CubeProductBackend for Cube {
    fn cube_product(a: CubeTensor, b: CubeTensor) -> CubeTensor {
        let dtype = a.dtype;
        matmul(a, b, dtype)
    }
}

#[derive(Debug)]
struct ProductBackward;

impl Backward<Cube, 2> for ProductBackward {
    type State = (CubeTensor, CubeTensor);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let dy = grads.consume::<Cube>(&ops.node);
        let (a, b) = ops.state;
        let [pa, pb] = ops.parents;
        if let Some(node) = pa {
            let dtype = a.dtype;
            let dy = cast(dy.clone(), dtype);
            grads.register::<Cube>(node.id, matmul(dy, transposed(b.clone()), dtype));
        }
        if let Some(node) = pb {
            let dtype = b.dtype;
            let dy = cast(dy, dtype);
            grads.register::<Cube>(node.id, matmul(transposed(a), dy, dtype));
        }
    }
}

/// `t` in `dtype` (the output gradient arrives in the output's dtype, the operands').
fn cast(t: CubeTensor, dtype: burn::backend::DType) -> CubeTensor {
    match t.dtype == dtype {
        true => t,
        false => burn_cubecl::kernel::cast(t, dtype),
    }
}

impl<C: CheckpointStrategy> CubeProductBackend for Autodiff<Cube, C> {
    fn cube_product(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let [(a, ga), (b, gb)] = [a, b].map(|t| t.into_parts());
        let dtype = a.dtype;
        let y = matmul(a.clone(), b.clone(), dtype);
        match ProductBackward
            .prepare::<C>([ga, gb])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((a, b), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}
