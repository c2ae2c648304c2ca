//! Causal attention as one fused op on Burn's CubeCL backend, flash-style: the forward keeps the
//! output and one f32 log-sum-exp per query row, never an `L × L` matrix; the backward recomputes
//! the probabilities tile by tile from them. Three kernels: the forward, the backward's query side
//! (dQ, and `D = rowsum(dO ⊙ O)`), its key side (dK, dV, with the query heads of a grouped
//! key/value head summed in order). Memory: `O(B · L · H · hd)`.
//!
//! Two implementations of the three: [`tiles`], 16 × 16 tile products on the tensor cores, for
//! f16/bf16 inputs with a head dimension a multiple of 16 (the training path: zamba-1b's 256,
//! Zamba-7B's 464); [`kernels`], one unit per row with f32 products, for everything else (f32
//! inputs, odd head dimensions). Where a device has no tensor cores for the inputs' type (the
//! CPU runtime) the tile kernels compute their tile products with the plane's own units, so the
//! same kernels are verified without a GPU.
//!
//! Cube sizes and the tiles staged in shared memory come from the client's limits (the CPU
//! runtime: one unit per core; a GPU: warps of 32), so the same code runs on both.

mod kernels;
#[cfg(all(test, feature = "cuda"))]
mod ptx_tests;
mod tiles;

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Cube, DType, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::Tensor;
use burn_cubecl::kernel::untile;
use burn_cubecl::tensor::CubeTensor;
use cubecl::Device as CubeDevice;
use cubecl::client::Client;
use cubecl::features::MmaConfig;
use cubecl::{CubeCount, CubeDim};

use super::buffers::{address_type, empty, kernel_dtype, to_dtype};
use tiles::Tiling;

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

/// The row kernels' shape: rows per cube (one unit each) and rows per shared tile on `client` for
/// head dimension `head_dim`.
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

/// `(planes, tile)` shapes of the tile kernels, largest first (see [`TilePass::shape`]).
const TILE_SHAPES: [(usize, usize); 7] = [
    (4, 64),
    (4, 32),
    (2, 64),
    (2, 32),
    (2, 16),
    (1, 32),
    (1, 16),
];
/// Resident planes per multiprocessor beyond which more do not count (registers and the warp
/// schedulers bound them before shared memory does).
const MAX_RESIDENT_PLANES: usize = 16;

/// The three kernels of one call: [`kernels`] or [`tiles`] (see the module docs).
#[derive(Clone, Copy, Debug)]
enum Kernels {
    Rows(Geometry),
    Tiles {
        forward: Tiling,
        query: Tiling,
        key: Tiling,
    },
}

/// A tile kernel, by its shared-memory layout.
#[derive(Clone, Copy, Debug)]
enum TilePass {
    Forward,
    Query,
    Key,
}

/// What bounds a tile kernel's cube on a device.
#[derive(Clone, Copy, Debug)]
struct CubeLimits {
    /// Units per plane.
    plane: usize,
    /// Units per cube.
    units: usize,
    /// Shared memory per cube, bytes: on NVIDIA GPUs about a multiprocessor's whole shared
    /// memory, so that the cubes resident per multiprocessor are about `shared / bytes`.
    shared: usize,
}

impl TilePass {
    /// The `(planes, tile)` of [`TILE_SHAPES`] that fits `limits` and keeps the most planes
    /// resident per multiprocessor (at most [`MAX_RESIDENT_PLANES`]), the earlier on a tie; `None`
    /// when none fits.
    fn shape(self, head_dim: usize, elem: usize, limits: CubeLimits) -> Option<(usize, usize)> {
        let resident_planes = |planes: usize, tile: usize| {
            let bytes = self.shared_bytes(planes, tile, head_dim, elem);
            let fits = planes * limits.plane <= limits.units && bytes <= limits.shared;
            fits.then(|| (planes * (limits.shared / bytes)).min(MAX_RESIDENT_PLANES))
        };
        let mut best: Option<(usize, (usize, usize))> = None;
        for (planes, tile) in TILE_SHAPES {
            if let Some(score) = resident_planes(planes, tile)
                && best.is_none_or(|(top, _)| score > top)
            {
                best = Some((score, (planes, tile)));
            }
        }
        best.map(|(_, shape)| shape)
    }

    /// Shared memory of one cube: its buffers of `[rows, hd]`, `[tile, hd]` and `[rows, tile]`
    /// elements, in the inputs' type (`elem` bytes) or f32, and its f32 statistics (see
    /// `tiles.rs`), each aligned to 32 bytes.
    fn shared_bytes(self, planes: usize, tile: usize, head_dim: usize, elem: usize) -> usize {
        let rows = tiles::FRAGMENT * planes;
        // (row buffers in E, in f32; tile buffers in E; score buffers in f32, in E; statistics)
        let (row_e, row_f, tile_e, score_f, score_e, stats) = match self {
            TilePass::Forward => (1, 1, 2, 1, 1, 3 * rows),
            TilePass::Query => (2, 1, 2, 2, 1, 2 * rows),
            TilePass::Key => (2, 2, 2, 2, 2, 2 * tile),
        };
        let buffers = row_e + row_f + tile_e + score_f + score_e + 1;
        rows * head_dim * (row_e * elem + row_f * 4)
            + tile * head_dim * tile_e * elem
            + rows * tile * (score_f * 4 + score_e * elem)
            + stats * 4
            + buffers * 32
    }
}

impl Kernels {
    /// The tile kernels for f16/bf16 inputs with a head dimension a multiple of 16 where their
    /// cubes fit the device, else the row kernels.
    fn choose(client: &Client, act: DType, head_dim: usize) -> Self {
        let rows = Kernels::Rows(Geometry::of(client, head_dim));
        if !matches!(act, DType::F16 | DType::BF16) || head_dim % tiles::FRAGMENT != 0 {
            return rows;
        }
        let properties = client.properties();
        let elem = dtype_to_storage_type(act);
        let tensor_cores = properties.features.matmul.cmma.contains(&MmaConfig {
            a_type: elem,
            b_type: elem,
            cd_type: dtype_to_storage_type(DType::F32),
            m: tiles::FRAGMENT as u32,
            n: tiles::FRAGMENT as u32,
            k: tiles::FRAGMENT as u32,
        });
        let hardware = &properties.hardware;
        let plane = (hardware.plane_size_max as usize).max(1);
        let units = hardware.max_units_per_cube.min(hardware.max_cube_dim.0) as usize;
        let shared = hardware.max_shared_memory_size;
        let Some(shapes) = tile_shapes(head_dim, act.size(), plane, units, shared) else {
            return rows;
        };
        let [forward, query, key] = shapes.map(|(planes, tile)| Tiling {
            head_dim,
            tile,
            planes,
            plane,
            tensor_cores,
        });
        Kernels::Tiles {
            forward,
            query,
            key,
        }
    }
}

/// Which kernels [`causal_attention`] runs on the Cube device `device` for inputs of `dtype` with
/// head dimension `head_dim` (logs and device checks).
pub(crate) fn kernels_on(device: &CubeDevice, dtype: DType, head_dim: usize) -> &'static str {
    match Kernels::choose(&device.client(), kernel_dtype(dtype), head_dim) {
        Kernels::Rows(_) => "row kernels (f32 products)",
        Kernels::Tiles { forward, .. } => match forward.tensor_cores {
            true => "tile kernels on the tensor cores",
            false => "tile kernels, tile products by the plane's units",
        },
    }
}

/// The tile kernels' `(planes, tile)` shapes — forward, dQ, dK/dV — for head dimension
/// `head_dim`, inputs of `elem_bytes` bytes and a device with `plane` units per plane, `units`
/// units and `shared` bytes of shared memory per cube; `None` where a kernel fits no shape (the
/// row kernels run).
pub fn tile_shapes(
    head_dim: usize,
    elem_bytes: usize,
    plane: usize,
    units: usize,
    shared: usize,
) -> Option<[(usize, usize); 3]> {
    let limits = CubeLimits {
        plane,
        units,
        shared,
    };
    Some([
        TilePass::Forward.shape(head_dim, elem_bytes, limits)?,
        TilePass::Query.shape(head_dim, elem_bytes, limits)?,
        TilePass::Key.shape(head_dim, elem_bytes, limits)?,
    ])
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
    kernels: Kernels,
}

impl Inputs {
    fn new(q: CubeTensor, k: CubeTensor, v: CubeTensor, scale: f32) -> Self {
        let dtype = q.dtype;
        let act = kernel_dtype(dtype);
        let [q, k, v] = [q, k, v].map(|t| untile(to_dtype(t, act)));
        let kernels = Kernels::choose(&q.client, act, q.shape()[3]);
        Self {
            q,
            k,
            v,
            act,
            dtype,
            scale,
            kernels,
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

    /// One cube per `rows` rows of each (batch, head) of `heads` heads.
    ///
    /// # Panics
    /// If the device cannot launch that many cubes (batch × heads beyond 65,535 on CUDA).
    fn cubes(&self, rows: usize, heads: usize) -> CubeCount {
        let [batch, len, ..] = self.dims();
        let blocks = len.div_ceil(rows);
        let (max_x, max_y, _) = self.q.client.properties().hardware.max_cube_count;
        assert!(
            blocks <= max_x as usize && batch * heads <= max_y as usize,
            "causal_attention: {blocks} blocks of {rows} rows × {batch} batch × {heads} heads \
             exceed the device's grid ({max_x} × {max_y} cubes); use a smaller micro-batch"
        );
        CubeCount::Static(blocks as u32, (batch * heads) as u32, 1)
    }

    /// The launch of a tile kernel of `tiling` over `heads` heads: its cubes and their units.
    fn tile_launch(&self, tiling: Tiling, heads: usize) -> (CubeCount, CubeDim) {
        (
            self.cubes(tiling.rows(), heads),
            CubeDim::new_1d(tiling.units() as u32),
        )
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
    if x.is_empty() {
        return (out, keep_lse.then_some(lse));
    }
    let client = x.q.client.clone();
    let address = address_type(&[&x.q, &x.k, &x.v, &out, &lse]);
    let [q, k, v] = [&x.q, &x.k, &x.v].map(|t| t.clone().into_tensor_arg());
    let (out_arg, lse_arg) = (out.clone().into_tensor_arg(), lse.clone().into_tensor_arg());
    match x.kernels {
        Kernels::Rows(geometry) => kernels::attention_forward::launch(
            &client,
            x.cubes(geometry.units, heads),
            CubeDim::new_1d(geometry.units as u32),
            address,
            q,
            k,
            v,
            out_arg,
            lse_arg,
            x.scale,
            head_dim,
            geometry.tile,
            geometry.units,
            keep_lse,
            x.elem(),
        ),
        Kernels::Tiles { forward, .. } => {
            let (cubes, cube_dim) = x.tile_launch(forward, heads);
            tiles::attention_forward::launch(
                &client,
                cubes,
                cube_dim,
                address,
                q,
                k,
                v,
                out_arg,
                lse_arg,
                x.scale,
                forward,
                keep_lse,
                x.elem(),
            )
        }
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
        let delta = empty(&x.q, [batch, heads, len], DType::F32);
        backward_query(x, out, lse, &dout, &dq, &delta);
        backward_key(x, lse, &dout, &delta, &dk, &dv);
    }
    [dq, dk, dv].map(|g| to_dtype(g, x.dtype))
}

/// `dq` and `delta = rowsum(dO ⊙ O)` (`[B, H, L]`, f32).
fn backward_query(
    x: &Inputs,
    out: &CubeTensor,
    lse: &CubeTensor,
    dout: &CubeTensor,
    dq: &CubeTensor,
    delta: &CubeTensor,
) {
    let [_, _, heads, _, head_dim] = x.dims();
    let client = &x.q.client;
    let address = address_type(&[&x.q, &x.k, &x.v, out, dout, lse, dq, delta]);
    let [q, k, v, out, dout, lse, dq, delta] =
        [&x.q, &x.k, &x.v, out, dout, lse, dq, delta].map(|t| t.clone().into_tensor_arg());
    match x.kernels {
        Kernels::Rows(geometry) => kernels::attention_backward_query::launch(
            client,
            x.cubes(geometry.units, heads),
            CubeDim::new_1d(geometry.units as u32),
            address,
            q,
            k,
            v,
            out,
            dout,
            lse,
            dq,
            delta,
            x.scale,
            head_dim,
            geometry.tile,
            geometry.units,
            x.elem(),
        ),
        Kernels::Tiles { query, .. } => {
            let (cubes, cube_dim) = x.tile_launch(query, heads);
            tiles::attention_backward_query::launch(
                client,
                cubes,
                cube_dim,
                address,
                q,
                k,
                v,
                out,
                dout,
                lse,
                dq,
                delta,
                x.scale,
                query,
                x.elem(),
            )
        }
    }
}

/// `dk` and `dv`, from `delta` of [`backward_query`].
fn backward_key(
    x: &Inputs,
    lse: &CubeTensor,
    dout: &CubeTensor,
    delta: &CubeTensor,
    dk: &CubeTensor,
    dv: &CubeTensor,
) {
    let [_, _, _, kv_heads, head_dim] = x.dims();
    let client = &x.q.client;
    let address = address_type(&[&x.q, &x.k, &x.v, dout, lse, delta, dk, dv]);
    let [q, k, v, dout, lse, delta, dk, dv] =
        [&x.q, &x.k, &x.v, dout, lse, delta, dk, dv].map(|t| t.clone().into_tensor_arg());
    match x.kernels {
        Kernels::Rows(geometry) => kernels::attention_backward_key::launch(
            client,
            x.cubes(geometry.units, kv_heads),
            CubeDim::new_1d(geometry.units as u32),
            address,
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dk,
            dv,
            x.scale,
            head_dim,
            geometry.tile,
            geometry.units,
            x.elem(),
        ),
        Kernels::Tiles { key, .. } => {
            let (cubes, cube_dim) = x.tile_launch(key, kv_heads);
            tiles::attention_backward_key::launch(
                client,
                cubes,
                cube_dim,
                address,
                q,
                k,
                v,
                dout,
                lse,
                delta,
                dk,
                dv,
                x.scale,
                key,
                x.elem(),
            )
        }
    }
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
