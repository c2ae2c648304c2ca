//! Moving Flex tensors in and out of the CPU kernels: contiguous `f32` views and owned results.

use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::ops::FloatTensorOps;
use burn::backend::{Bytes, DType, Flex, FloatDType};
use burn::tensor::Shape;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `len` zeros, written by all threads of the pool. A large `vec![0.0; len]` is one
/// single-threaded memset on the calling thread (freed memory is reused, so the allocator cannot
/// hand out pages the kernel zeroed), while the kernels' own passes over the buffer run in
/// parallel.
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()
        .par_chunks_mut(1 << 14)
        .for_each(|chunk| chunk.fill(MaybeUninit::new(0.0)));
    // SAFETY: every element of the capacity was just written.
    unsafe { v.set_len(len) };
    v
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
