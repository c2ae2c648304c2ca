//! Strided `f32` matrices inside Flex tensors, and GEMMs on them with the `gemm` crate: the
//! operands are read in place whatever their strides (transposes and permuted views cost
//! nothing), and results go into fresh buffers that are never zero-filled. Also the one autodiff
//! node of the two-operand products built on them ([`product_with_grads`]).

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Bytes, DType, Flex};
use burn::tensor::Shape;

use crate::host::unwritten;

/// A read-only strided matrix: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat {
    pub(crate) ptr: *const f32,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: isize,
    pub(crate) cs: isize,
}

// SAFETY: a `Mat` only reads, from tensors its users keep alive for as long as they use it.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    /// The matrix of `t` along dimensions `row_dim` and `col_dim`, the other dimensions fixed at
    /// their entries in `at` (whose `row_dim`/`col_dim` entries are ignored).
    ///
    /// # Panics
    /// If `t` is not `f32`.
    pub(crate) fn of(t: &FlexTensor, at: &[usize], row_dim: usize, col_dim: usize) -> Mat {
        assert_eq!(t.dtype(), DType::F32, "strided GEMM: f32 tensors only");
        let layout = t.layout();
        let strides = layout.strides();
        let offset: isize = at
            .iter()
            .zip(strides)
            .enumerate()
            .filter(|&(d, _)| d != row_dim && d != col_dim)
            .map(|(_, (&i, &s))| i as isize * s)
            .sum();
        let data: &[f32] = t.storage();
        Mat {
            ptr: data
                .as_ptr()
                .wrapping_add(layout.start_offset())
                .wrapping_offset(offset),
            rows: layout.shape()[row_dim],
            cols: layout.shape()[col_dim],
            rs: strides[row_dim],
            cs: strides[col_dim],
        }
    }

    pub(crate) fn t(self) -> Mat {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Rows `start..end`.
    pub(crate) fn rows(self, start: usize, end: usize) -> Mat {
        debug_assert!(start <= end && end <= self.rows);
        Mat {
            ptr: self.ptr.wrapping_offset(start as isize * self.rs),
            rows: end - start,
            ..self
        }
    }

    /// Columns `start..end`.
    pub(crate) fn cols(self, start: usize, end: usize) -> Mat {
        self.t().rows(start, end).t()
    }
}

/// A destination matrix: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dst {
    pub(crate) ptr: *mut f32,
    pub(crate) rs: isize,
    pub(crate) cs: isize,
}

impl Dst {
    /// Row-major `[rows, cols]` at `ptr` with row stride `rs` (unit column stride).
    pub(crate) fn rows_of(ptr: *mut f32, rs: usize) -> Dst {
        Dst {
            ptr,
            rs: rs as isize,
            cs: 1,
        }
    }

    /// The destination starting `elements` past this one's start (a batch of a batched result).
    pub(crate) fn offset(self, elements: isize) -> Dst {
        Dst {
            ptr: self.ptr.wrapping_offset(elements),
            ..self
        }
    }

    /// The destination starting at element `(i, j)`.
    pub(crate) fn at(self, i: usize, j: usize) -> Dst {
        Dst {
            ptr: self
                .ptr
                .wrapping_offset(i as isize * self.rs + j as isize * self.cs),
            ..self
        }
    }
}

/// Products below this many multiply-adds run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 21;

/// How [`gemm_into`] may use threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    /// Rayon's pool for products large enough to gain from it.
    Pool,
    /// The calling thread only (the caller already runs tasks in parallel).
    Caller,
}

/// `dst (+)= alpha · lhs · rhs` (`accumulate`: add to what `dst` holds).
///
/// # Safety
/// `dst` must be valid for writes (and, with `accumulate`, reads) of the `lhs.rows × rhs.cols`
/// elements its strides address, not aliased by the operands; `lhs`, `rhs` valid for reads of
/// theirs.
pub(crate) unsafe fn gemm_into(
    dst: Dst,
    lhs: Mat,
    rhs: Mat,
    alpha: f32,
    accumulate: bool,
    threads: Threads,
) {
    debug_assert_eq!(lhs.cols, rhs.rows);
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let parallelism = match threads == Threads::Pool && m * n * k >= PARALLEL_MIN_MACS {
        true => gemm::Parallelism::Rayon(0),
        false => gemm::Parallelism::None,
    };
    // gemm computes `dst = a·dst + b·lhs·rhs`, reading `dst` only when asked to (and writing
    // every element of it).
    // SAFETY: the caller's promise: the pointers are valid for what their strides address.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.cs,
            dst.rs,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A new `f32` tensor of `shape` with `strides` (a permutation of a dense layout, see
/// [`dense_strides_like`]) whose every element `fill` writes, given the buffer's start. The
/// buffer is never zero-filled (it is [`unwritten`]).
///
/// # Safety
/// `fill` writes every element of the buffer (`shape.num_elements()` floats) and reads only
/// elements it wrote.
pub(crate) unsafe fn written(
    shape: Shape,
    strides: Vec<isize>,
    fill: impl FnOnce(*mut f32),
) -> FlexTensor {
    let mut data = unwritten(shape.num_elements());
    fill(data.as_mut_ptr().cast());
    // SAFETY: `fill` wrote every element, the caller's promise.
    let data = unsafe { data.assume_init() }.into_vec();
    FlexTensor::new(
        Bytes::from_elems(data),
        Layout::new(shape, strides, 0),
        DType::F32,
    )
}

/// Row-major strides of `like`'s shape in the order of `like`'s strides, when `like` is a
/// permutation of a dense buffer (a contiguous tensor, or a transposed view of one); otherwise the
/// contiguous strides. A gradient written with them has its input's memory order.
pub(crate) fn dense_strides_like(like: &Layout) -> Vec<isize> {
    let shape = like.shape();
    let strides = like.strides();
    let mut order: Vec<usize> = (0..shape.num_dims()).collect();
    order.sort_by_key(|&d| std::cmp::Reverse((strides[d], shape[d])));
    let mut dense = vec![0isize; shape.num_dims()];
    let mut next = 1isize;
    for &d in order.iter().rev() {
        dense[d] = next;
        next *= shape[d] as isize;
    }
    let is_permutation = (0..shape.num_dims()).all(|d| shape[d] == 1 || strides[d] == dense[d]);
    match is_permutation {
        true => dense,
        false => Layout::contiguous(shape.clone()).strides().to_vec(),
    }
}

// SAFETY: tasks sharing a destination write disjoint elements of it (each its own batch).
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// A raw pointer that tasks writing disjoint parts of one buffer can share.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SharedMut(pub(crate) *mut f32);

impl SharedMut {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: every user writes only the part of the buffer its task owns.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// The gradient of one operand of a product `y = f(a, b)` from `(a, b, dy)`.
pub(crate) type OperandGrad = fn(&FlexTensor, &FlexTensor, &FlexTensor) -> FlexTensor;

/// The autodiff node of a product of two `f32` operands on Flex (`linear`, `per_head_matmul`):
/// keeps both operands as they came (views, not copies) and computes each operand's gradient only
/// when that operand needs one.
#[derive(Debug)]
struct ProductBackward {
    grads: [OperandGrad; 2],
}

impl Backward<Flex, 2> for ProductBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        // f32, as the forward's output (only f32 operands reach these ops).
        let dy = grads.consume::<Flex>(&ops.node);
        let (a, b) = ops.state;
        let _span = zamba_trace::span_with(zamba_trace::Category::Gemm, || {
            let [a, b] = [&a, &b].map(|t| t.layout().shape().to_vec());
            format!("gemm backward {a:?}·{b:?}")
        });
        for (parent, grad) in ops.parents.into_iter().zip(self.grads) {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, grad(&a, &b, &dy));
            }
        }
    }
}

/// `forward(a, b)` as one autodiff node whose backward is `grads` (see [`ProductBackward`]).
pub(crate) fn product_with_grads<C: CheckpointStrategy>(
    a: FloatTensor<Autodiff<Flex, C>>,
    b: FloatTensor<Autodiff<Flex, C>>,
    forward: impl FnOnce(&FlexTensor, &FlexTensor) -> FlexTensor,
    grads: [OperandGrad; 2],
) -> FloatTensor<Autodiff<Flex, C>> {
    let [(a, ga), (b, gb)] = [a, b].map(|t| t.into_parts());
    let y = forward(&a, &b);
    let node = ProductBackward { grads };
    match node.prepare::<C>([ga, gb]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((a, b), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}
