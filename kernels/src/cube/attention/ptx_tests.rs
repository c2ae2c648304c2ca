//! The tile kernels' tensor-core path, checked without a GPU: each kernel compiled offline to
//! sm_90 PTX by the NVPTX backend the `cuda` build uses, for an H100's limits with bf16 `cmma`,
//! must expand (every fragment a configuration the device has) and multiply on the tensor cores.
//!
//! The kernels' `exp` and `ln` link CUDA's libdevice, as on a GPU: `CUDA_PATH` names a toolkit
//! holding `nvvm/libdevice/libdevice.10.bc` (or pip's `nvidia-cuda-nvcc-cu12`, its
//! `nvidia/cuda_nvcc` folder), else the usual locations are searched.

use std::ffi::CStr;
use std::sync::Arc;

use cubecl::Compiler;
use cubecl::ir::features::{Features, MmaConfig};
use cubecl::ir::nvidia::SmArch;
use cubecl::ir::{DeviceIdentity, HardwareProperties, MemoryDeviceProperties};
use cubecl::prelude::*;
use cubecl::profile::TimingMethod;
use cubecl_llvm::nvptx::ptx_version::PtxVersion;
use cubecl_llvm::{LlvmTarget, PlironArtifact, PlironCompiler, PlironOptions};

use super::TilePass;
use super::tiles::{self, Tiling};

/// An H100 as CubeCL describes it, as far as these kernels read it.
fn h100() -> Arc<DeviceProperties> {
    let hardware = HardwareProperties {
        load_width: 128,
        vector_register_count: None,
        plane_size_min: 32,
        plane_size_max: 32,
        max_bindings: 32,
        max_shared_memory_size: 232_448,
        max_cube_count: (u32::MAX, u16::MAX as u32, u16::MAX as u32),
        max_units_per_cube: 1024,
        max_cube_dim: (1024, 1024, 64),
        num_streaming_multiprocessors: Some(132),
        num_tensor_cores: None,
        min_tensor_cores_dim: None,
        num_cpu_cores: None,
        last_level_cache_size: None,
        max_vector_size: VectorSize::MAX,
        cube_mma_reserved_shared_memory: 0,
    };
    let mut properties = DeviceProperties::new(
        Features::default(),
        MemoryDeviceProperties::new(u64::MAX, 256),
        hardware,
        TimingMethod::Device,
        DeviceIdentity {
            name: "H100 (offline)".to_string(),
            fingerprint: "offline".to_string(),
            physical: None,
        },
    );
    properties.features.matmul.cmma.insert(MmaConfig {
        a_type: half::bf16::cube_type(),
        b_type: half::bf16::cube_type(),
        cd_type: f32::cube_type(),
        m: 16,
        n: 16,
        k: 16,
    });
    Arc::new(properties)
}

/// The PTX of `kernel` for sm_90 and the shared memory it needs, bytes.
fn ptx_of(kernel: impl CubeKernel) -> (String, usize) {
    let mut compiler = PlironCompiler {
        target: LlvmTarget::Nvptx,
    };
    let options = PlironOptions {
        sm_arch: Some(SmArch::new(90, false)),
        ptx_version: PtxVersion::for_driver(12080),
        ..Default::default()
    };
    let PlironArtifact::NvptxCode(module) = compiler
        .compile(kernel.define(), &options)
        .expect("the kernel compiles for sm_90")
    else {
        unreachable!("the NVPTX target produces PTX");
    };
    // SAFETY: the module's PTX is NUL-terminated (`NvptxModule::ptx`).
    let ptx = unsafe { CStr::from_ptr(module.ptx.as_ptr()) };
    (
        ptx.to_string_lossy().into_owned(),
        module.shared_memory_size,
    )
}

fn tensor() -> TensorCompilationArg {
    TensorCompilationArg {
        meta: TensorMetaCompilationArg { len: (), rank: () },
        buffer: BufferCompilationArg { inplace: None },
    }
}

/// `mma` instructions of `layout` (`row.col`: B column-major, `row.row`: row-major) in `ptx`.
fn products(ptx: &str, layout: &str) -> usize {
    let op = format!("wmma.mma.sync.aligned.{layout}.m16n16k16.f32.bf16.bf16.f32");
    ptx.matches(&op).count()
}

/// Both kinds of tensor-core product in `ptx`, and a shared memory within what
/// [`TilePass::shared_bytes`] reserves (the shapes chosen from it fit the device) and at most the
/// alignment slack below it (it counts every buffer).
fn check((ptx, shared): (String, usize), pass: TilePass, tiling: Tiling) {
    let (transposed, plain) = (products(&ptx, "row.col"), products(&ptx, "row.row"));
    let counted = pass.shared_bytes(tiling.planes, tiling.tile, tiling.head_dim, 2);
    println!(
        "{pass:?}: {transposed} + {plain} tensor-core products, {shared} bytes of shared memory \
         (counted {counted})"
    );
    assert!(
        transposed > 0,
        "{pass:?}: no S = Q Kᵀ-shaped product\n{ptx}"
    );
    assert!(plain > 0, "{pass:?}: no P V-shaped product\n{ptx}");
    assert!(
        shared <= counted && shared + 512 >= counted,
        "{pass:?}: the kernel uses {shared} bytes of shared memory, the count says {counted}"
    );
}

#[test]
fn tile_kernels_multiply_on_the_tensor_cores_of_sm_90() {
    let tiling = Tiling {
        head_dim: 64,
        tile: 32,
        planes: 2,
        plane: 32,
        tensor_cores: true,
    };
    let settings = || {
        KernelSettings::new(
            *CubeDim::new_1d(tiling.units() as u32),
            ExecutionMode::Checked,
            AddressType::U32,
        )
    };
    let target = || Arc::new(TargetProperties::default());
    let elem = half::bf16::cube_type();
    let forward = tiles::attention_forward::AttentionForward::new(
        settings(),
        h100(),
        target(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        (),
        tiling,
        true,
        elem,
    );
    // S = Q Kᵀ reads the keys column-major; O += P V reads V row-major.
    check(ptx_of(forward), TilePass::Forward, tiling);
    let query = tiles::attention_backward_query::AttentionBackwardQuery::new(
        settings(),
        h100(),
        target(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        (),
        tiling,
        elem,
    );
    check(ptx_of(query), TilePass::Query, tiling);
    let key = tiles::attention_backward_key::AttentionBackwardKey::new(
        settings(),
        h100(),
        target(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        tensor(),
        (),
        tiling,
        elem,
    );
    check(ptx_of(key), TilePass::Key, tiling);
}
