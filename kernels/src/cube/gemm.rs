//! Matrix products on Burn's CubeCL backend, with the matmul routine chosen per runtime.
//!
//! Burn's own `matmul` asks cubek for its automatic choice, which on a device without tensor
//! cores falls back to a GPU-shaped routine (`SimpleUnit`): on the CubeCL CPU runtime that runs one
//! unit at a time and takes seconds for a 256³ product. On that runtime the products here use
//! cubek's `CpuGemm` routine (register-blocked, written for CPUs: milliseconds); on GPUs Burn's
//! automatic choice (tensor cores).

use burn::backend::DType;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::kernel::matmul::{MatmulStrategy, matmul as burn_matmul};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::ops::permute;
use burn_cubecl::tensor::CubeTensor;
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek::matmul::strategy::Strategy;
use cubek::std::InputBinding;

/// `lhs · rhs` over the last two dimensions, `[.., m, k] · [.., k, n]` → a new contiguous
/// `[.., m, n]` of `out_dtype` (the sums are f32 whatever the operands). Both operands have the
/// same dtype and the same leading dimensions; any strides.
///
/// # Panics
/// If the shapes disagree, or the device fails the product.
pub(crate) fn matmul(lhs: CubeTensor, rhs: CubeTensor, out_dtype: DType) -> CubeTensor {
    check(&lhs, &rhs);
    match is_cpu_runtime(&lhs) {
        true => cpu_gemm(lhs, rhs, out_dtype),
        false => burn_matmul(lhs, rhs, None, MatmulStrategy::Cube, out_dtype)
            .unwrap_or_else(|e| panic!("matmul on the CubeCL device: {e:?}")),
    }
}

/// `t` with its last two dimensions swapped (a view: no copy).
pub(crate) fn transposed(t: CubeTensor) -> CubeTensor {
    let rank = t.meta.shape().num_dims();
    let mut axes: Vec<usize> = (0..rank).collect();
    axes.swap(rank - 2, rank - 1);
    permute(t, &axes)
}

fn check(lhs: &CubeTensor, rhs: &CubeTensor) {
    let (a, b) = (lhs.meta.shape(), rhs.meta.shape());
    let rank = a.num_dims();
    assert!(
        rank >= 2
            && b.num_dims() == rank
            && a[..rank - 2] == b[..rank - 2]
            && a[rank - 1] == b[rank - 2]
            && lhs.dtype == rhs.dtype,
        "matmul: lhs {:?} ({:?}) and rhs {:?} ({:?}) must be [.., m, k] and [.., k, n] of one dtype",
        a,
        lhs.dtype,
        b,
        rhs.dtype
    );
}

#[cfg(feature = "cube-cpu")]
fn is_cpu_runtime(t: &CubeTensor) -> bool {
    matches!(t.device, cubecl::Device::Cpu(_))
}

#[cfg(not(feature = "cube-cpu"))]
fn is_cpu_runtime(_: &CubeTensor) -> bool {
    false
}

/// cubek's CPU routine. It reads row- or column-major matrices in place; an operand that is
/// neither (a broadcast or sliced batch, say) is made contiguous first.
fn cpu_gemm(lhs: CubeTensor, rhs: CubeTensor, out_dtype: DType) -> CubeTensor {
    let shape = {
        let (a, b) = (lhs.meta.shape(), rhs.meta.shape());
        let mut dims = a.to_vec();
        let rank = dims.len();
        dims[rank - 1] = b[rank - 1];
        Shape::from(dims)
    };
    let out =
        empty_device_contiguous_dtype(lhs.client.clone(), lhs.device.clone(), shape, out_dtype);
    let strategy = Strategy::Tiled(cubek::matmul::tiled::Strategy::CpuGemm(Default::default()));
    let launch = |lhs: &CubeTensor, rhs: &CubeTensor| {
        let input = dtype_to_storage_type(lhs.dtype);
        let mut elems = MatmulElems::from_globals(&MatmulGlobalElems {
            lhs: input,
            rhs: input,
            out: dtype_to_storage_type(out_dtype),
        });
        cubek::matmul::launch::launch_ref(
            &strategy,
            &lhs.client,
            InputBinding::new(lhs.clone().binding(), input),
            InputBinding::new(rhs.clone().binding(), input),
            out.clone().binding(),
            &mut elems,
        )
    };
    if launch(&lhs, &rhs).is_err() {
        let (lhs, rhs) = (into_contiguous(lhs), into_contiguous(rhs));
        launch(&lhs, &rhs).unwrap_or_else(|e| panic!("matmul on the CubeCL CPU runtime: {e:?}"));
    }
    out
}
