//! Moving Flex tensors in and out of the CPU kernels: contiguous `f32` views and owned results.

use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::ops::FloatTensorOps;
use burn::backend::{Bytes, DType, Flex, FloatDType};
use burn::tensor::Shape;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Whether kernel output buffers start as NaN (feature `poison-outputs`, on in this crate's
/// tests): a test comparing a result with a reference then fails on every element a kernel
/// failed to write, or read before writing it.
const POISON: bool = cfg!(feature = "poison-outputs");

/// `len` zeros, written by all threads of the pool. A large `vec![0.0; len]` is one
/// single-threaded memset on the calling thread (freed memory is reused, so the allocator cannot
/// hand out pages the kernel zeroed), while the kernels' own passes over the buffer run in
/// parallel. For buffers whose zeros are read (sums accumulated in place); a buffer the kernel
/// writes in full before reading it is an [`output`].
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    filled(len, 0.0)
}

/// `len` floats for a kernel to write in full before it reads or returns them: zeros (a
/// `&mut [f32]` must not see uninitialised memory), NaN with [`POISON`].
pub(crate) fn output(len: usize) -> Vec<f32> {
    filled(len, if POISON { f32::NAN } else { 0.0 })
}

fn filled(len: usize, value: f32) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()
        .par_chunks_mut(1 << 14)
        .for_each(|chunk| chunk.fill(MaybeUninit::new(value)));
    // SAFETY: every element of the capacity was just written.
    unsafe { v.set_len(len) };
    v
}

/// Room for `len` floats that a kernel writes through raw pointers (GEMM destinations), never
/// zero-filled: uninitialised, NaN with [`POISON`]. Only what was written may be read (e.g. by
/// `assume_init` once every element was).
pub(crate) fn unwritten(len: usize) -> Box<[MaybeUninit<f32>]> {
    let mut buffer = Box::new_uninit_slice(len);
    if POISON {
        buffer
            .par_chunks_mut(1 << 14)
            .for_each(|chunk| chunk.fill(MaybeUninit::new(f32::NAN)));
    }
    buffer
}

/// A contiguous `f32` tensor with the same values; no copy when `t` already is one.
pub(crate) fn contiguous_f32(t: FlexTensor) -> FlexTensor {
    let t = match t.dtype() {
        DType::F32 => t,
        _ => Flex::float_cast(t, FloatDType::F32),
    };
    match t.is_contiguous() {
        true => t,
        false => t.to_contiguous(),
    }
}

/// The elements of a tensor made by [`contiguous_f32`].
pub(crate) fn as_f32(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("contiguous_f32 produces contiguous f32 tensors")
}

/// A Flex tensor owning `data` (no copy), cast to `dtype` if that is not `f32`.
pub(crate) fn from_f32(data: Vec<f32>, shape: Shape, dtype: DType) -> FlexTensor {
    let t = FlexTensor::new(
        Bytes::from_elems(data),
        Layout::contiguous(shape),
        DType::F32,
    );
    match dtype {
        DType::F32 => t,
        other => Flex::float_cast(t, FloatDType::from(other)),
    }
}

/// The elements of a contiguous `f32` tensor for writing, in place when `t` owns its buffer
/// alone (otherwise the buffer is copied first).
pub(crate) fn as_f32_mut(t: &mut FlexTensor) -> &mut [f32] {
    let (start, end) = t
        .layout()
        .contiguous_offsets()
        .expect("contiguous_f32 produces contiguous tensors");
    &mut t.storage_mut::<f32>()[start..end]
}

/// Integer ids as `i64`, whatever integer dtype the backend stores them in.
pub(crate) fn int_ids(t: &FlexTensor) -> Vec<i64> {
    let t = match t.is_contiguous() {
        true => t.clone(),
        false => t.to_contiguous(),
    };
    match t.dtype() {
        DType::I64 => t.as_slice::<i64>().expect("contiguous").to_vec(),
        DType::I32 => t
            .as_slice::<i32>()
            .expect("contiguous")
            .iter()
            .map(|&x| x as i64)
            .collect(),
        DType::I16 => t
            .as_slice::<i16>()
            .expect("contiguous")
            .iter()
            .map(|&x| x as i64)
            .collect(),
        DType::I8 => t
            .as_slice::<i8>()
            .expect("contiguous")
            .iter()
            .map(|&x| x as i64)
            .collect(),
        DType::U32 => t
            .as_slice::<u32>()
            .expect("contiguous")
            .iter()
            .map(|&x| x as i64)
            .collect(),
        other => panic!("expected an integer tensor of token ids, got dtype {other:?}"),
    }
}

/// `t` (contiguous `f32`) with `shape`, cast back to `dtype` if that is not `f32`.
pub(crate) fn cast_back(t: FlexTensor, shape: Shape, dtype: DType) -> FlexTensor {
    let t = t.reshape(shape);
    match dtype {
        DType::F32 => t,
        other => Flex::float_cast(t, FloatDType::from(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests run with `poison-outputs`: an element a kernel does not write stays NaN and
    /// fails their comparisons; zeros stay zeros for the sums that start from them.
    #[test]
    fn output_buffers_hold_nan_until_written_in_the_tests() {
        const {
            assert!(
                POISON,
                "this crate's tests run with the feature poison-outputs"
            )
        };
        let n = 3 << 14; // several pieces of the parallel fill
        assert!(output(n).iter().all(|x| x.is_nan()));
        // SAFETY: `unwritten` fills the buffer with `POISON`.
        let poisoned = unsafe { unwritten(n).assume_init() };
        assert!(poisoned.iter().all(|x| x.is_nan()));
        assert!(zeros(n).iter().all(|&x| x == 0.0));
    }
}
