//! `x · W` (a linear layer without bias) as direct GEMM calls on Flex, forward and backward.
//!
//! Burn's Flex matmul allocates every product zero-filled and then copies it once more into an
//! aligned buffer, on the calling thread, and its backward materialises transposed operands. Here
//! each product is written by the `gemm` crate into a fresh, uninitialised buffer that becomes the
//! result tensor as is, and every operand is read in place with its strides: a transposed weight
//! (the tied LM head), the `[B, L, D]` view of the scan's `[B, D, L]` output (`out_proj`), and the
//! transposes of the backward are never copied. `dx` is written in the layout `x` came in (when
//! that is a permutation of a dense buffer), so the gradient flowing back through a `swap_dims`
//! arrives contiguous.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, backend_extension};
use burn::tensor::{DType, Shape, Tensor};
use rayon::prelude::*;

use crate::dtype::expect_same_dtype;
use crate::host::{from_f32, zeros};
use crate::strided::{
    Dst, Mat, Threads, dense_strides_like, gemm_into, product_with_grads, written,
};

/// `x · weight` over the last dimension of `x` (`weight`: `[d_in, d_out]`, Burn's `Linear`
/// layout). Direct GEMMs on Flex devices for `f32` operands; Burn's `linear` elsewhere.
///
/// # Panics
/// If `weight`'s first dimension is not `x`'s last.
pub fn linear<const D: usize>(x: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    check(&x, &weight);
    let dims = x.dims();
    let _span = zamba_trace::span_with(zamba_trace::Category::Gemm, || {
        format!("linear {dims:?}·{:?}", weight.dims())
    });
    #[cfg(feature = "cube")]
    if crate::on_cube(&x.device()) {
        return crate::cube::ops::linear(x, weight);
    }
    if !fused(&x, &weight) {
        return linear_reference(x, weight);
    }
    // Rank 3 without a reshape (a reshape would copy a strided view such as out_proj's input).
    let x3: Tensor<3> = match D {
        3 => Tensor::from_dispatch(x.into_dispatch()),
        _ => x.reshape([1, dims[..D - 1].iter().product(), dims[D - 1]]),
    };
    let y = fused_linear(x3, weight, OutputOrder::RowMajor);
    let mut out_dims = dims;
    out_dims[D - 1] = y.dims()[2];
    match D {
        3 => Tensor::from_dispatch(y.into_dispatch()),
        _ => y.reshape(out_dims),
    }
}

/// [`linear`] with the result's last two dimensions swapped, written in that order: `x`
/// `[B, L, d_in]` → `[B, d_out, L]`, contiguous — the channel-major layout the causal conv and
/// the selective scan read, without a transposed copy.
pub fn linear_channels_first(x: Tensor<3>, weight: Tensor<2>) -> Tensor<3> {
    check(&x, &weight);
    let _span = zamba_trace::span_with(zamba_trace::Category::Gemm, || {
        format!("linear {:?}·{:?}", x.dims(), weight.dims())
    });
    #[cfg(feature = "cube")]
    if crate::on_cube(&x.device()) {
        return crate::cube::ops::linear(x, weight).swap_dims(1, 2);
    }
    match fused(&x, &weight) {
        true => fused_linear(x, weight, OutputOrder::ChannelsFirst).swap_dims(1, 2),
        false => linear_reference(x, weight).swap_dims(1, 2),
    }
}

fn check<const D: usize>(x: &Tensor<D>, weight: &Tensor<2>) {
    expect_same_dtype("linear", &[("x", x.dtype()), ("weight", weight.dtype())]);
    let dims = x.dims();
    let [d_in, d_out] = weight.dims();
    assert!(
        dims[D - 1] == d_in,
        "linear: x's last dimension is {} but the weight is [{d_in}, {d_out}] (x {dims:?})",
        dims[D - 1]
    );
}

/// Whether the direct GEMMs run: Flex devices, `f32` operands.
fn fused<const D: usize>(x: &Tensor<D>, weight: &Tensor<2>) -> bool {
    crate::on_flex(&x.device()) && x.dtype() == DType::F32 && weight.dtype() == DType::F32
}

/// `[B, M, K] · [K, N]` → `[B, M, N]` (in `order`).
fn fused_linear(x: Tensor<3>, weight: Tensor<2>, order: OutputOrder) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as LinearBackend>::linear(
        x.into_dispatch(),
        weight.into_dispatch(),
        order == OutputOrder::ChannelsFirst,
    ))
}

/// The memory order of a `[B, M, N]` result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutputOrder {
    RowMajor,
    /// Strides `[M·N, 1, M]`: each batch's `[N, M]` transpose is contiguous.
    ChannelsFirst,
}

/// [`linear`] with Burn's matmul; any backend. `x` is taken as one `[rows, d_in]` matrix, so the
/// weight gradient is one product rather than a batched one summed over the batch.
pub fn linear_reference<const D: usize>(x: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    let mut dims = x.dims();
    let [d_in, d_out] = weight.dims();
    let rows = dims[..D - 1].iter().product();
    dims[D - 1] = d_out;
    x.reshape([rows, d_in]).matmul(weight).reshape(dims)
}

#[backend_extension(Flex, Autodiff)]
pub(crate) trait LinearBackend: Backend {
    /// `x`: `[B, M, K]`, `weight`: `[K, N]` → `[B, M, N]`, any strides; with `channels_first`
    /// the result has strides `[M·N, 1, M]`.
    fn linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        channels_first: bool,
    ) -> FloatTensor<Self>;
}

/// Batch `i` of a `[B, M, K]` tensor.
fn batch(t: &FlexTensor, i: usize) -> Mat {
    Mat::of(t, &[i, 0, 0], 1, 2)
}

/// The whole `[B, M, K]` tensor as one `[B·M, K]` matrix, when its batch stride allows that.
fn merged(t: &FlexTensor) -> Option<Mat> {
    let shape = t.layout().shape();
    let m = batch(t, 0);
    (shape[0] == 1 || t.layout().strides()[0] == shape[1] as isize * m.rs).then_some(Mat {
        rows: shape[0] * shape[1],
        ..m
    })
}

/// Runs the products of a batched result, one per batch, in parallel (they write disjoint
/// batches). One at a time would leave the pool idle while each starts: gemm packs a row-major left
/// operand of up to 1024 rows (a batch's `L` rows) on the calling thread before it splits the work.
fn for_each_batch(batches: usize, product: impl Fn(usize) + Sync + Send) {
    (0..batches).into_par_iter().for_each(product);
}

fn weight(w: &FlexTensor) -> Mat {
    Mat::of(w, &[0, 0], 0, 1)
}

fn forward(x: &FlexTensor, w: &FlexTensor, channels_first: bool) -> FlexTensor {
    let [b, m, _] = x.layout().shape().dims::<3>();
    let w = weight(w);
    let n = w.cols;
    let shape = Shape::from(vec![b, m, n]);
    if channels_first {
        let strides = vec![(m * n) as isize, 1, m as isize];
        let fill = |out| {
            let out = Dst {
                ptr: out,
                rs: 1,
                cs: m as isize,
            };
            // SAFETY: batch i is the m × n matrix at offset i·m·n, column-major; the batches
            // are disjoint; the operands are the tensors' own views.
            for_each_batch(b, |i| unsafe {
                gemm_into(out.at(0, i * n), batch(x, i), w, 1.0, false, Threads::Pool)
            })
        };
        // SAFETY: the b column-major m × n products cover the output.
        return unsafe { written(shape, strides, fill) };
    }
    let strides = Layout::contiguous(shape.clone()).strides().to_vec();
    let fill = |out| {
        let out = Dst::rows_of(out, n);
        // SAFETY: the output is b·m × n, row-major (batch i: rows i·m..(i+1)·m, disjoint); the
        // operands are the tensors' own views.
        match merged(x) {
            Some(x) => unsafe { gemm_into(out, x, w, 1.0, false, Threads::Pool) },
            None => for_each_batch(b, |i| unsafe {
                gemm_into(out.at(i * m, 0), batch(x, i), w, 1.0, false, Threads::Pool)
            }),
        }
    };
    // SAFETY: the product (or one per batch) writes all b·m rows of the output.
    unsafe { written(shape, strides, fill) }
}

/// `dx = dy · Wᵀ`, in the memory order of `x` where that is dense.
fn grad_x(x: &FlexTensor, w: &FlexTensor, dy: &FlexTensor) -> FlexTensor {
    let shape = x.layout().shape().clone();
    let strides = dense_strides_like(x.layout());
    let wt = weight(w).t();
    let fill = |dx| {
        let dx = Dst {
            ptr: dx,
            rs: strides[1],
            cs: strides[2],
        };
        // SAFETY: batch i of dx is an m × k matrix at these (dense) strides inside the buffer,
        // disjoint from the other batches'.
        for_each_batch(shape[0], |i| unsafe {
            let dst = dx.offset(i as isize * strides[0]);
            gemm_into(dst, batch(dy, i), wt, 1.0, false, Threads::Pool)
        })
    };
    // SAFETY: the batches' products cover dx.
    unsafe { written(shape.clone(), strides.clone(), fill) }
}

/// Columns of dW per task when it is a sum of per-batch products.
const GRAD_W_COLS: usize = 64;

/// `dW = Σ_batches xᵀ · dy`, in the memory order of `w` where that is dense.
fn grad_w(x: &FlexTensor, w: &FlexTensor, dy: &FlexTensor) -> FlexTensor {
    let shape = w.layout().shape().clone();
    if x.layout().shape()[0] == 0 {
        // A sum of no products.
        return from_f32(zeros(shape.num_elements()), shape, DType::F32);
    }
    let strides = dense_strides_like(w.layout());
    let (rs, cs, cols) = (strides[0], strides[1], shape[1]);
    let fill = |dw| {
        let dst = Dst { ptr: dw, rs, cs };
        // SAFETY: dW is a k × n matrix at these (dense) strides; the first product into each
        // part of it writes that part, the others add to it.
        match (merged(x), merged(dy)) {
            (Some(x), Some(dy)) => unsafe { gemm_into(dst, x.t(), dy, 1.0, false, Threads::Pool) },
            // One sum of per-batch products: blocks of dW's columns in parallel, each summing
            // the batches in order (the same sums as one product after another). Whole-dW
            // products would have gemm pack each batch's xᵀ, when row-major, on the calling
            // thread; blocks of rows would each pack all of the batch's dy (a strided copy of
            // the whole of it when dy is channel-major, as in_proj's is, repeated per block);
            // blocks of columns pack only theirs.
            _ => {
                let batches = x.layout().shape()[0];
                (0..cols.div_ceil(GRAD_W_COLS))
                    .into_par_iter()
                    .for_each(|block| {
                        let (c0, c1) = (block * GRAD_W_COLS, ((block + 1) * GRAD_W_COLS).min(cols));
                        // SAFETY: columns c0..c1 of dW belong to this task; batch 0 writes
                        // them, the others add.
                        (0..batches).for_each(|i| unsafe {
                            let dy = batch(dy, i).cols(c0, c1);
                            gemm_into(
                                dst.at(0, c0),
                                batch(x, i).t(),
                                dy,
                                1.0,
                                i > 0,
                                Threads::Caller,
                            )
                        })
                    });
            }
        }
    };
    // SAFETY: the product, or each block's first product, writes every element of dW.
    unsafe { written(shape, strides, fill) }
}

impl LinearBackend for Flex {
    fn linear(x: FlexTensor, weight: FlexTensor, channels_first: bool) -> FlexTensor {
        forward(&x, &weight, channels_first)
    }
}

impl<C: CheckpointStrategy> LinearBackend for Autodiff<Flex, C> {
    fn linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        channels_first: bool,
    ) -> FloatTensor<Self> {
        let forward = |x: &FlexTensor, w: &FlexTensor| forward(x, w, channels_first);
        product_with_grads::<C>(x, weight, forward, [grad_x, grad_w])
    }
}
