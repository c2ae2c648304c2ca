//! Causal attention as one fused op on Burn's CubeCL backend, flash-style: the forward keeps the
//! output and one f32 log-sum-exp per query row, never an `L × L` matrix; the backward recomputes
//! the probabilities tile by tile from them. Three kernels ([`kernels`]): the forward, the
//! backward's query side (dQ, and `D = rowsum(dO ⊙ O)`), its key side (dK, dV, with the query
//! heads of a grouped key/value head summed in order). Memory: `O(B · L · H · hd)`.
//!
//! The units per cube and the tile of rows staged in shared memory come from the client's limits
//! (the CPU runtime: one unit per core; a GPU: two warps), so the same code runs on both.

mod kernels;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Cube, DType, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::Tensor;
use burn_cubecl::kernel::untile;
use burn_cubecl::tensor::CubeTensor;
use cubecl::client::Client;
use cubecl::{CubeCount, CubeDim};

use super::buffers::{address_type, empty, kernel_dtype, to_dtype};

/// Rows per cube, at most: two 32-wide warps on a GPU.
const MAX_UNITS: usize = 64;
/// Rows per shared-memory tile, at most.
const MAX_TILE: usize = 64;
/// Shared memory one cube may use, at most, so that several cubes share a GPU multiprocessor.
const SHARED_BUDGET: usize = 48 * 1024;

/// Causal attention (see [`crate::causal_attention`]) on a CubeCL device.
pub(crate) fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f64) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as CubeAttentionBackend>::cube_causal_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        scale as f32,
    ))
}

#[backend_extension(Cube, Autodiff)]
pub(crate) trait CubeAttentionBackend: Backend {
    fn cube_causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self>;
}

/// Rows per cube and rows per shared tile on `client` for head dimension `head_dim`.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    units: usize,
    tile: usize,
}

impl Geometry {
    fn of(client: &Client, head_dim: usize) -> Self {
        let hardware = &client.properties().hardware;
        let units = [
            MAX_UNITS,
            hardware.max_units_per_cube as usize,
            hardware.max_cube_dim.0 as usize,
        ]
        .into_iter()
        .min()
        .unwrap_or(1)
        .max(1);
        // The key kernel's shared memory, the largest: two `[tile, hd]` tiles and two `[tile]`
        // statistics, f32.
        let shared = hardware.max_shared_memory_size.min(SHARED_BUDGET);
        let tile = (shared / (4 * (2 * head_dim + 2))).clamp(1, MAX_TILE);
        Self { units, tile }
    }
}

/// The inputs as the kernels read them, in one float type, and what the op returns them in.
#[derive(Clone, Debug)]
struct Inputs {
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    /// The kernels' input and output type: the inputs' when it is f32, f16 or bf16, else f32.
    act: DType,
    /// The inputs' dtype: the output's and the gradients'.
    dtype: DType,
    scale: f32,
}

impl Inputs {
    fn new(q: CubeTensor, k: CubeTensor, v: CubeTensor, scale: f32) -> Self {
        let dtype = q.dtype;
        let act = kernel_dtype(dtype);
        let [q, k, v] = [q, k, v].map(|t| untile(to_dtype(t, act)));
        Self {
            q,
            k,
            v,
            act,
            dtype,
            scale,
        }
    }

    /// Batch, length, query heads, key/value heads, head dimension.
    fn dims(&self) -> [usize; 5] {
        let [b, l, h, hd] = self.q.shape().dims::<4>();
        [b, l, h, self.k.shape()[2], hd]
    }

    fn is_empty(&self) -> bool {
        self.dims().contains(&0)
    }

    fn elem(&self) -> cubecl::prelude::ElemType {
        dtype_to_storage_type(self.act)
    }

    /// One cube per `units` rows of each (batch, head) of `heads` heads.
    ///
    /// # Panics
    /// If the device cannot launch that many cubes (batch × heads beyond 65,535 on CUDA).
    fn cubes(&self, geometry: Geometry, heads: usize) -> CubeCount {
        let [batch, len, ..] = self.dims();
        let blocks = len.div_ceil(geometry.units);
        let (max_x, max_y, _) = self.q.client.properties().hardware.max_cube_count;
        assert!(
            blocks <= max_x as usize && batch * heads <= max_y as usize,
            "causal_attention: {blocks} blocks of {} rows × {batch} batch × {heads} heads exceed \
             the device's grid ({max_x} × {max_y} cubes); use a smaller micro-batch",
            geometry.units
        );
        CubeCount::Static(blocks as u32, (batch * heads) as u32, 1)
    }
}

/// The output (in the kernels' type) and, with `keep_lse`, each query row's log-sum-exp
/// (`[B, H, L]`, f32).
fn forward(x: &Inputs, keep_lse: bool) -> (CubeTensor, Option<CubeTensor>) {
    let [batch, len, heads, _, head_dim] = x.dims();
    let out = empty(&x.q, [batch, len, heads, head_dim], x.act);
    // Without the statistics the kernel still takes a (never written) one-element tensor.
    let lse = match keep_lse {
        true => empty(&x.q, [batch, heads, len], DType::F32),
        false => empty(&x.q, [1, 1, 1], DType::F32),
    };
    if !x.is_empty() {
        let client = x.q.client.clone();
        let geometry = Geometry::of(&client, head_dim);
        kernels::attention_forward::launch(
            &client,
            x.cubes(geometry, heads),
            CubeDim::new_1d(geometry.units as u32),
            address_type(&[&x.q, &x.k, &x.v, &out, &lse]),
            x.q.clone().into_tensor_arg(),
            x.k.clone().into_tensor_arg(),
            x.v.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            x.scale,
            head_dim,
            geometry.tile,
            geometry.units,
            keep_lse,
            x.elem(),
        );
    }
    (out, keep_lse.then_some(lse))
}

/// `[dq, dk, dv]` in the inputs' dtype, from the forward's output and log-sum-exp.
fn backward(x: &Inputs, out: &CubeTensor, lse: &CubeTensor, dout: CubeTensor) -> [CubeTensor; 3] {
    let [batch, len, heads, kv_heads, head_dim] = x.dims();
    let dout = untile(to_dtype(dout, x.act));
    let dq = empty(&x.q, [batch, len, heads, head_dim], x.act);
    let dk = empty(&x.q, [batch, len, kv_heads, head_dim], x.act);
    let dv = empty(&x.q, [batch, len, kv_heads, head_dim], x.act);
    if !x.is_empty() {
        let client = x.q.client.clone();
        let geometry = Geometry::of(&client, head_dim);
        let cube_dim = CubeDim::new_1d(geometry.units as u32);
        let delta = empty(&x.q, [batch, heads, len], DType::F32);
        kernels::attention_backward_query::launch(
            &client,
            x.cubes(geometry, heads),
            cube_dim,
            address_type(&[&x.q, &x.k, &x.v, out, &dout, lse, &dq, &delta]),
            x.q.clone().into_tensor_arg(),
            x.k.clone().into_tensor_arg(),
            x.v.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            dout.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            dq.clone().into_tensor_arg(),
            delta.clone().into_tensor_arg(),
            x.scale,
            head_dim,
            geometry.tile,
            geometry.units,
            x.elem(),
        );
        kernels::attention_backward_key::launch(
            &client,
            x.cubes(geometry, kv_heads),
            cube_dim,
            address_type(&[&x.q, &x.k, &x.v, &dout, lse, &delta, &dk, &dv]),
            x.q.clone().into_tensor_arg(),
            x.k.clone().into_tensor_arg(),
            x.v.clone().into_tensor_arg(),
            dout.into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            delta.into_tensor_arg(),
            dk.clone().into_tensor_arg(),
            dv.clone().into_tensor_arg(),
            x.scale,
            head_dim,
            geometry.tile,
            geometry.units,
            x.elem(),
        );
    }
    [dq, dk, dv].map(|g| to_dtype(g, x.dtype))
}

impl CubeAttentionBackend for Cube {
    fn cube_causal_attention(
        q: CubeTensor,
        k: CubeTensor,
        v: CubeTensor,
        scale: f32,
    ) -> CubeTensor {
        let x = Inputs::new(q, k, v, scale);
        to_dtype(forward(&x, false).0, x.dtype)
    }
}

/// What the backward needs: the inputs as the kernels read them (shared, not copied), the
/// output in the kernels' type and the log-sum-exp per query row.
#[derive(Clone, Debug)]
struct AttentionState {
    inputs: Inputs,
    out: CubeTensor,
    lse: CubeTensor,
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Cube, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let _span = zamba_trace::span(zamba_trace::Category::Attention, "attention backward");
        let dout = grads.consume::<Cube>(&ops.node);
        let AttentionState { inputs, out, lse } = ops.state;
        let computed = backward(&inputs, &out, &lse, dout);
        for (parent, grad) in ops.parents.into_iter().zip(computed) {
            if let Some(node) = parent {
                grads.register::<Cube>(node.id, grad);
            }
        }
    }
}

impl<C: CheckpointStrategy> CubeAttentionBackend for Autodiff<Cube, C> {
    fn cube_causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        let [(q, gq), (k, gk), (v, gv)] = [q, k, v].map(|t| t.into_parts());
        let inputs = Inputs::new(q, k, v, scale);
        // Compute bound: the backward recomputes the probabilities from its own statistics,
        // never by rerunning the forward through Burn's checkpointer.
        match AttentionBackward
            .prepare::<C>([gq, gk, gv])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, lse) = forward(&inputs, true);
                let lse = lse.expect("a forward asked for the statistics keeps them");
                let result = to_dtype(out.clone(), inputs.dtype);
                prep.finish(AttentionState { inputs, out, lse }, result)
            }
            OpsKind::UnTracked(prep) => {
                let out = forward(&inputs, false).0;
                prep.finish(to_dtype(out, inputs.dtype))
            }
        }
    }
}
