//! Shared by the integration tests: inputs, references computed with plain Burn tensor ops,
//! and exact (bitwise) comparison.

#![allow(dead_code)]

use std::time::Duration;

use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use zamba_dist::{Communicator, DistOptions, ReduceOp};

pub fn device() -> Device {
    Device::flex()
}

pub fn opts(timeout_ms: u64) -> DistOptions {
    DistOptions {
        timeout: Duration::from_millis(timeout_ms),
        ..Default::default()
    }
}

/// Rank `rank`'s input: values of mixed magnitude, so that summation order shows in the bits.
pub fn input(rank: usize, len: usize, dtype: FloatDType) -> Tensor<1> {
    let values: Vec<f32> = (0..len)
        .map(|i| {
            let x = ((rank * 7919 + i * 104_729) % 1000) as f32 / 1000.0 - 0.5;
            x * 10f32.powi(((i + rank) % 7) as i32 - 3)
        })
        .collect();
    let t = Tensor::<1>::from_data(TensorData::new(values, [len]), &device());
    if dtype == FloatDType::F32 {
        t
    } else {
        t.cast(dtype)
    }
}

/// The reduction of all ranks' inputs with plain tensor ops: f32, in rank order; bf16 inputs
/// are widened first and the result rounded once.
pub fn reference_reduce(world: usize, len: usize, dtype: FloatDType, op: ReduceOp) -> Tensor<1> {
    let wide = |r| input(r, len, dtype).cast(FloatDType::F32);
    let mut acc = wide(0);
    for r in 1..world {
        acc = match op {
            ReduceOp::Sum | ReduceOp::Avg => acc + wide(r),
            ReduceOp::Max => acc.max_pair(wide(r)),
        };
    }
    if op == ReduceOp::Avg {
        acc = acc / world as f32;
    }
    if dtype == FloatDType::F32 {
        acc
    } else {
        acc.cast(dtype)
    }
}

pub fn reference_gather(world: usize, len: usize, dtype: FloatDType) -> Tensor<1> {
    Tensor::cat((0..world).map(|r| input(r, len, dtype)).collect(), 0)
}

/// Raw bits of a flat tensor, for exact comparison.
pub fn bits(t: Tensor<1>) -> (DType, Vec<u8>) {
    let dtype = t.dtype();
    (dtype, t.into_data().as_bytes().to_vec())
}

pub fn assert_same_bits(got: Tensor<1>, want: Tensor<1>, what: &str) {
    let (got_dtype, got) = bits(got);
    let (want_dtype, want) = bits(want);
    assert_eq!(got_dtype, want_dtype, "{what}: dtype");
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(got == want, "{what}: values differ from the reference");
}

/// Everything a rank computes in [`exercise`], to compare across communicators.
pub type Outputs = Vec<(DType, Vec<u8>)>;

/// Runs every collective, f32 and bf16, and checks each against the reference.
pub fn exercise(comm: &dyn Communicator) -> Outputs {
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut outputs = Vec::new();
    for dtype in [FloatDType::F32, FloatDType::BF16] {
        let len = 12 * world + 5;
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
            let what = format!("all_reduce {op:?} {dtype:?} rank {rank}/{world}");
            let got = comm.all_reduce(input(rank, len, dtype), op).expect(&what);
            outputs.push(bits(got.clone()));
            assert_same_bits(got, reference_reduce(world, len, dtype, op), &what);

            let len = 12 * world;
            let what = format!("reduce_scatter {op:?} {dtype:?} rank {rank}/{world}");
            let got = comm
                .reduce_scatter(input(rank, len, dtype), op)
                .expect(&what);
            outputs.push(bits(got.clone()));
            let n = len / world;
            let want = reference_reduce(world, len, dtype, op).slice(rank * n..(rank + 1) * n);
            assert_same_bits(got, want, &what);
        }
        let what = format!("all_gather {dtype:?} rank {rank}/{world}");
        let got = comm.all_gather(input(rank, 9, dtype)).expect(&what);
        outputs.push(bits(got.clone()));
        assert_same_bits(got, reference_gather(world, 9, dtype), &what);

        let root = world - 1;
        let what = format!("broadcast {dtype:?} from {root}, rank {rank}/{world}");
        let got = comm.broadcast(input(rank, len, dtype), root).expect(&what);
        outputs.push(bits(got.clone()));
        assert_same_bits(got, input(root, len, dtype), &what);
    }
    let message = b"stop at step 12".to_vec();
    let got = comm
        .broadcast_bytes((rank == 0).then(|| message.clone()), 0)
        .expect("broadcast_bytes");
    assert_eq!(got, message);
    comm.barrier().expect("barrier");
    outputs
}

/// A port that was free a moment ago, on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub const TEST_TOKEN: &str = "test-token-0123456789abcdef";

/// Rank `rank` of a loopback job of `world` ranks (torchrun-style, one node).
pub fn loopback_info(rank: usize, world: usize, port: u16) -> zamba_dist::RendezvousInfo {
    zamba_dist::RendezvousInfo {
        rank,
        world_size: world,
        local_rank: rank,
        local_world_size: world,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        launcher: zamba_dist::Launcher::Torchrun,
        token: Some(zamba_dist::TokenSource::Value(TEST_TOKEN.into())),
    }
}
