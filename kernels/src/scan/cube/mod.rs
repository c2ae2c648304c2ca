//! The CubeCL kernels ([`forward`], [`kernels`]) behind the scan's kernel interface on Burn's
//! `Cube` backend: CUDA with the `cuda` feature, the LLVM-compiled CPU runtime with `cube-cpu`.
//! Everything that depends on the device (units per cube, plane width, the chunk) is taken from
//! the client's properties.

mod backward;
mod forward;
mod kernels;

use std::cell::Cell;

use burn::backend::{Cube, DType, TensorMetadata};
use burn::tensor::Shape;
use burn_cubecl::kernel::{cast, into_contiguous, slice, untile};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::ops::{permute, reshape};
use burn_cubecl::tensor::CubeTensor;
use cubecl::client::Client;
use cubecl::features::Plane;
use cubecl::ir::AddressType;
use cubecl::prelude::ElemType;
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise};

use crate::scan::op::{ScanKernel, ScanTensors};
use crate::scan::{ScanShape, cube_scan_chunk};

/// Units per cube of the forward, at most: mamba-ssm's 128 threads for long sequences.
const MAX_FORWARD_UNITS: usize = 128;

/// Consecutive time steps per unit of the forward (mamba-ssm: 4 to 16 by length). More would
/// amortise the scan across units over more work, but every loop over them is unrolled (two f32
/// registers per step), and at 8 the CPU runtime's LLVM compile of the kernel's variants made the
/// cube-cpu tests half again as slow; a GPU measurement decides whether 8 is worth it there.
const FORWARD_ITEMS: usize = 4;

/// Units along time per channel of the backward, at most: one 32-wide warp on a GPU, so that the
/// scans across units are plane shuffles but for one shared-memory step.
const MAX_BACKWARD_UNITS: usize = 32;

/// Channels per cube of the backward, at most: `dB`/`dC` are summed over them in shared memory
/// before the per-cube partials go to memory (more rows: less partial traffic, fewer cubes; 16
/// leaves `B·D / 16` cubes of 512 units, 256 for zamba-1b at micro-batch 1, and ~41 KB of
/// shared memory per cube).
const MAX_BACKWARD_ROWS: usize = 16;

/// The eight inputs as the kernels read them: activations (`u, delta, z, b, c`) in one float
/// type, parameters (`a, d, delta_bias`) contiguous `f32`; and the dtype each input came in.
#[derive(Clone, Debug)]
pub(crate) struct CubeInputs {
    u: CubeTensor,
    delta: CubeTensor,
    a: CubeTensor,
    b: CubeTensor,
    c: CubeTensor,
    d: CubeTensor,
    z: CubeTensor,
    delta_bias: CubeTensor,
    /// The activations' compute type: theirs when they share f32, f16 or bf16, else f32.
    act: DType,
    dtypes: [DType; 8],
    dims: ScanShape,
}

impl CubeInputs {
    fn new(tensors: [CubeTensor; 8]) -> Self {
        let shapes = tensors.each_ref().map(|t| t.shape());
        let dims = ScanShape::of_inputs(shapes.each_ref().map(|s| s.as_slice()));
        let dtypes = tensors.each_ref().map(|t| t.dtype);
        let [u, delta, a, b, c, d, z, delta_bias] = tensors;
        let act = match dtypes[0] {
            DType::F32 | DType::F16 | DType::BF16
                if [1, 3, 4, 6].iter().all(|&i| dtypes[i] == dtypes[0]) =>
            {
                dtypes[0]
            }
            _ => DType::F32,
        };
        // Activations are read at any strides; parameters are tiny and read contiguous.
        let activation = |t: CubeTensor| untile(to_dtype(t, act));
        let parameter = |t: CubeTensor| into_contiguous(to_dtype(t, DType::F32));
        Self {
            u: activation(u),
            delta: activation(delta),
            a: parameter(a),
            b: activation(b),
            c: activation(c),
            d: parameter(d),
            z: activation(z),
            delta_bias: parameter(delta_bias),
            act,
            dtypes,
            dims,
        }
    }

    fn address_type(&self, more: &[&CubeTensor]) -> AddressType {
        [&self.u, &self.delta, &self.b, &self.c, &self.z]
            .into_iter()
            .chain(more.iter().copied())
            .map(|t| t.required_address_type())
            .max()
            .unwrap_or_default()
    }

    /// A new contiguous `[batch, channels, len]` tensor of the activation type: each lane's row
    /// time-contiguous, as the forward's units write it.
    fn empty_lanes(&self) -> CubeTensor {
        let ScanShape {
            batch,
            channels,
            len,
            ..
        } = self.dims;
        empty(&self.u, [batch, channels, len], self.act)
    }

    /// A new `[batch, channels, len]` tensor of the activation type, laid out channel-fastest
    /// (`[batch, len, channels]` in memory) so that the units of a cube, consecutive channels,
    /// write consecutive addresses at every step.
    fn empty_rows(&self) -> CubeTensor {
        let ScanShape {
            batch,
            channels,
            len,
            ..
        } = self.dims;
        let t = empty(&self.u, [batch, len, channels], self.act);
        permute(t, &[0, 2, 1])
    }
}

fn to_dtype(t: CubeTensor, dtype: DType) -> CubeTensor {
    match t.dtype == dtype {
        true => t,
        false => cast(t, dtype),
    }
}

/// An uninitialised contiguous tensor on the device of `like`.
fn empty<const R: usize>(like: &CubeTensor, shape: [usize; R], dtype: DType) -> CubeTensor {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::new(shape),
        dtype,
    )
}

fn elem(dtype: DType) -> ElemType {
    burn::backend::cubecl::dtype_to_storage_type(dtype)
}

/// How the forward splits one lane over a cube (see `forward.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ForwardLayout {
    units: usize,
    items: usize,
    /// Plane (warp) width used by the scan across units: the device's fixed plane size where
    /// it has plane operations, else 1 (every unit its own plane; shared memory only).
    plane: usize,
}

/// The forward's layout for sequences of `len` steps on `client`: units a multiple of the
/// plane, no more than the client allows or than `len` needs.
fn forward_layout(client: &Client, len: usize) -> ForwardLayout {
    let properties = client.properties();
    let hardware = &properties.hardware;
    let cap = [
        MAX_FORWARD_UNITS,
        hardware.max_units_per_cube as usize,
        hardware.max_cube_dim.0 as usize,
    ]
    .into_iter()
    .min()
    .unwrap_or(1)
    .max(1);
    let fixed_plane = hardware.plane_size_min == hardware.plane_size_max;
    let plane = match hardware.plane_size_max as usize {
        width
            if properties.features.plane.contains(Plane::Ops)
                && fixed_plane
                && width.is_power_of_two()
                && width <= cap =>
        {
            width
        }
        _ => 1,
    };
    let needed = len.div_ceil(FORWARD_ITEMS).div_ceil(plane) * plane;
    ForwardLayout {
        units: needed.min(cap / plane * plane),
        items: FORWARD_ITEMS,
        plane,
    }
}

/// How the backward splits a cube (see `backward.rs`): `rows` channels of one group, each walked
/// by `units` units along time owning `items` steps of a chunk; `plane` as in [`ForwardLayout`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BackwardLayout {
    rows: usize,
    units: usize,
    items: usize,
    plane: usize,
}

/// f32s of shared memory of one backward cube (see `backward.rs`): per row the staged chunk
/// (7 fields), the `dB`/`dC` contributions, the two scans' plane totals, the carried adjoint,
/// the units' and the row's `dA`.
fn backward_shared_floats(rows: usize, units: usize, state: usize, chunk: usize) -> usize {
    rows * (9 * chunk + 4 * units + 2 * state + units)
}

thread_local! {
    /// `(rows, units)` the backward launches on this thread instead of its own choice (see
    /// [`with_backward_layout`]).
    static FORCED_BACKWARD: Cell<Option<(usize, usize)>> = const { Cell::new(None) };
}

/// Runs `f` with the Cube backward launched as `rows` channels × `units` units along time per
/// cube on this thread, whatever the client's limits (a device check compares layouts that the
/// device would not choose at its sizes: the CPU runtime's cubes are only as wide as its cores).
/// `units` must be a power of two dividing the chunk.
pub(crate) fn with_backward_layout<R>(rows: usize, units: usize, f: impl FnOnce() -> R) -> R {
    assert!(
        units.is_power_of_two() && cube_scan_chunk(1).is_multiple_of(units) && rows > 0,
        "backward layout {rows} × {units}: units must be a power of two dividing the chunk"
    );
    /// Puts the previous layout back, also when `f` panics.
    struct Restore(Option<(usize, usize)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED_BACKWARD.set(self.0);
        }
    }
    let _restore = Restore(FORCED_BACKWARD.replace(Some((rows, units))));
    f()
}

/// The backward's layout on `client`: as many rows as the group and the client allow (up to
/// [`MAX_BACKWARD_ROWS`]), then as many units along time (a power of two dividing the chunk).
fn backward_layout(client: &Client, dims: &ScanShape, chunk: usize) -> BackwardLayout {
    let properties = client.properties();
    let hardware = &properties.hardware;
    let cap = (hardware.max_units_per_cube as usize)
        .min(hardware.max_cube_dim.0 as usize * hardware.max_cube_dim.1 as usize)
        .max(1);
    let by_shared = hardware.max_shared_memory_size
        / (backward_shared_floats(1, MAX_BACKWARD_UNITS, dims.state, chunk) * size_of::<f32>());
    let rows = [
        MAX_BACKWARD_ROWS,
        dims.channels / dims.groups,
        cap,
        hardware.max_cube_dim.1 as usize,
        by_shared,
    ]
    .into_iter()
    .min()
    .unwrap_or(1)
    .max(1);
    let fit = [
        MAX_BACKWARD_UNITS,
        cap / rows,
        hardware.max_cube_dim.0 as usize,
        chunk,
    ]
    .into_iter()
    .min()
    .unwrap_or(1)
    .max(1);
    let (rows, units) = FORCED_BACKWARD.get().unwrap_or((rows, 1 << fit.ilog2()));
    let plane = match hardware.plane_size_max as usize {
        width
            if properties.features.plane.contains(Plane::Ops)
                && hardware.plane_size_min == hardware.plane_size_max
                && units % width == 0 =>
        {
            width
        }
        _ => 1,
    };
    BackwardLayout {
        rows,
        units,
        items: chunk / units,
        plane,
    }
}

impl ScanKernel for Cube {
    type Inputs = CubeInputs;
    type Checkpoints = CubeTensor;

    fn prepare(inputs: ScanTensors<Cube>) -> CubeInputs {
        CubeInputs::new(inputs.into_array())
    }

    fn forward(x: &CubeInputs, keep_checkpoints: bool) -> (CubeTensor, Option<CubeTensor>) {
        let ScanShape {
            batch,
            channels,
            len,
            state,
            ..
        } = x.dims;
        let chunk = cube_scan_chunk(state);
        let client = x.u.client.clone();
        let out = x.empty_lanes();
        // Without checkpoints the kernel still takes a (never written) one-element tensor.
        let saved = match keep_checkpoints {
            true => len.div_ceil(chunk).saturating_sub(1).max(1),
            false => 0,
        };
        let checkpoints = match saved {
            0 => empty(&x.u, [1, 1, 1, 1], DType::F32),
            _ => empty(&x.u, [batch, channels, saved, state], DType::F32),
        };
        let layout = forward_layout(&client, len);
        forward::scan_forward::launch(
            &client,
            CubeCount::Static(channels as u32, batch as u32, 1),
            CubeDim::new_1d(layout.units as u32),
            x.address_type(&[&out, &checkpoints]),
            x.u.clone().into_tensor_arg(),
            x.delta.clone().into_tensor_arg(),
            x.z.clone().into_tensor_arg(),
            x.b.clone().into_tensor_arg(),
            x.c.clone().into_tensor_arg(),
            x.a.clone().into_tensor_arg(),
            x.d.clone().into_tensor_arg(),
            x.delta_bias.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            checkpoints.clone().into_tensor_arg(),
            state,
            layout.units,
            layout.items,
            layout.plane,
            chunk,
            keep_checkpoints,
            elem(x.act),
        );
        let out = to_dtype(out, x.dtypes[0]);
        (out, keep_checkpoints.then_some(checkpoints))
    }

    fn backward(x: &CubeInputs, checkpoints: &CubeTensor, dout: CubeTensor) -> ScanTensors<Cube> {
        let ScanShape {
            batch,
            channels,
            groups,
            len,
            state,
        } = x.dims;
        let client = x.u.client.clone();
        let dout = untile(to_dtype(dout, x.act));
        let chunk = cube_scan_chunk(state);
        let layout = backward_layout(&client, &x.dims, chunk);
        let blocks = (channels / groups).div_ceil(layout.rows);
        let (du, ddelta, dz) = (x.empty_rows(), x.empty_rows(), x.empty_rows());
        let db_parts = empty(&x.u, [batch * groups, blocks, len, state], DType::F32);
        let dc_parts = empty(&x.u, [batch * groups, blocks, len, state], DType::F32);
        let lane_parts = empty(&x.u, [batch, layout.units, channels, state + 2], DType::F32);
        backward::scan_backward::launch(
            &client,
            CubeCount::Static(blocks as u32, (batch * groups) as u32, 1),
            CubeDim::new_2d(layout.units as u32, layout.rows as u32),
            x.address_type(&[&dout, &du, &ddelta, &dz, &db_parts, &dc_parts]),
            x.u.clone().into_tensor_arg(),
            x.delta.clone().into_tensor_arg(),
            x.z.clone().into_tensor_arg(),
            x.b.clone().into_tensor_arg(),
            x.c.clone().into_tensor_arg(),
            x.a.clone().into_tensor_arg(),
            x.d.clone().into_tensor_arg(),
            x.delta_bias.clone().into_tensor_arg(),
            checkpoints.clone().into_tensor_arg(),
            dout.into_tensor_arg(),
            du.clone().into_tensor_arg(),
            ddelta.clone().into_tensor_arg(),
            dz.clone().into_tensor_arg(),
            db_parts.clone().into_tensor_arg(),
            dc_parts.clone().into_tensor_arg(),
            lane_parts.clone().into_tensor_arg(),
            state,
            layout.rows,
            layout.units,
            layout.items,
            layout.plane,
            elem(x.act),
        );
        let bc_shape = [batch, groups, len, state];
        let db = sum_parts(&db_parts, [batch * groups, blocks, len * state], x.act);
        let dc = sum_parts(&dc_parts, [batch * groups, blocks, len * state], x.act);
        // Per-unit, per-lane [dA, dD, d delta_bias] summed over batch and units, then split by
        // column.
        let units = batch * layout.units;
        let params = sum_parts(&lane_parts, [1, units, channels * (state + 2)], DType::F32);
        let params = reshape(params, Shape::new([channels, state + 2]));
        let column = |columns: std::ops::Range<usize>| {
            into_contiguous(slice(params.clone(), &[0..channels, columns]))
        };
        let da = column(0..state);
        let dd = reshape(column(state..state + 1), Shape::new([channels]));
        let dbias = reshape(column(state + 1..state + 2), Shape::new([channels]));
        let db = reshape(db, Shape::new(bc_shape));
        let dc = reshape(dc, Shape::new(bc_shape));
        let computed = [du, ddelta, da, db, dc, dd, dz, dbias];
        let mut dtypes = x.dtypes.into_iter();
        ScanTensors::from_array(computed.map(|g| to_dtype(g, dtypes.next().expect("eight dtypes"))))
    }
}

/// `Σ_k parts[o, k, r]` as a contiguous `[o, r]` tensor of type `dtype` (see
/// [`kernels::sum_parts`]).
fn sum_parts(parts: &CubeTensor, [outer, count, rows]: [usize; 3], dtype: DType) -> CubeTensor {
    let client = parts.client.clone();
    let out = empty(parts, [outer, rows], dtype);
    let cube_dim = CubeDim::new(&client, outer * rows);
    let cube_count = calculate_cube_count_elemwise(&client, outer * rows, cube_dim);
    kernels::sum_parts::launch(
        &client,
        cube_count,
        cube_dim,
        [parts, &out]
            .map(|t| t.required_address_type())
            .into_iter()
            .max()
            .unwrap_or_default(),
        parts.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        count,
        rows,
        elem(dtype),
    );
    out
}
