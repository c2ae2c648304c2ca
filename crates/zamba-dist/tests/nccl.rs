//! NCCL on real GPUs (build with `--features cuda`; run by scripts/gpu-check.sh with
//! `--ignored`): world 1 on GPU 0, and one rank per GPU where there are several.

#![cfg(feature = "cuda")]

mod common;

use std::time::Duration;

use burn::tensor::{Device, FloatDType, Tensor};
use common::*;
use zamba_dist::{Communicator, DistError, DistOptions, ReduceOp, connect_nccl};

fn gpus() -> usize {
    std::env::var("ZAMBA_GPU_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// One NCCL rank per GPU, each on its own thread; `f` gets the communicator and its device.
fn on_gpus<T: Send>(
    world: usize,
    timeout: Duration,
    f: impl Fn(&dyn Communicator, &Device) -> T + Sync,
) -> Vec<T> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let f = &f;
                s.spawn(move || {
                    let comm = connect_nccl(
                        &loopback_info(rank, world, port),
                        rank,
                        &DistOptions {
                            timeout,
                            ..Default::default()
                        },
                    )
                    .unwrap();
                    f(&comm, &Device::cuda(rank))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn to_gpu(t: Tensor<1>, device: &Device) -> Tensor<1> {
    t.to_device(device)
}

fn host(t: Tensor<1>) -> Vec<f32> {
    t.cast(FloatDType::F32).into_data().to_vec::<f32>().unwrap()
}

fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * w.abs().max(1e-3),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
#[ignore = "needs CUDA GPUs and NCCL: scripts/gpu-check.sh runs it"]
fn every_collective_on_one_rank_per_gpu() {
    for world in [1, gpus()] {
        let results = on_gpus(world, Duration::from_secs(60), |comm, device| {
            let (rank, world) = (comm.rank(), comm.world_size());
            let mut all = Vec::new();
            for dtype in [FloatDType::F32, FloatDType::BF16] {
                let rel = if dtype == FloatDType::F32 { 1e-5 } else { 2e-2 };
                let len = 1024 * world;
                for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
                    let got = host(
                        comm.all_reduce(to_gpu(input(rank, len, dtype), device), op)
                            .unwrap(),
                    );
                    assert_close(
                        &got,
                        &host(reference_reduce(world, len, dtype, op)),
                        rel,
                        &format!("all_reduce {op:?} {dtype:?}"),
                    );
                    all.push(got);
                    let got = host(
                        comm.reduce_scatter(to_gpu(input(rank, len, dtype), device), op)
                            .unwrap(),
                    );
                    let n = len / world;
                    let want = host(
                        reference_reduce(world, len, dtype, op).slice(rank * n..(rank + 1) * n),
                    );
                    assert_close(
                        &got,
                        &want,
                        rel,
                        &format!("reduce_scatter {op:?} {dtype:?}"),
                    );
                }
                let got = host(
                    comm.all_gather(to_gpu(input(rank, 333, dtype), device))
                        .unwrap(),
                );
                assert_eq!(
                    got,
                    host(reference_gather(world, 333, dtype)),
                    "all_gather {dtype:?}"
                );
                let got = host(
                    comm.broadcast(to_gpu(input(rank, 77, dtype), device), world - 1)
                        .unwrap(),
                );
                assert_eq!(
                    got,
                    host(input(world - 1, 77, dtype)),
                    "broadcast {dtype:?}"
                );
            }
            // A tensor someone else still holds is not overwritten.
            let kept = to_gpu(input(rank, 64, FloatDType::F32), device);
            let _ = comm.all_reduce(kept.clone(), ReduceOp::Sum).unwrap();
            assert_eq!(
                host(kept),
                host(input(rank, 64, FloatDType::F32)),
                "all_reduce wrote into a shared buffer"
            );
            let bytes = comm
                .broadcast_bytes((rank == 0).then(|| b"go".to_vec()), 0)
                .unwrap();
            assert_eq!(bytes, b"go");
            comm.barrier().unwrap();
            all
        });
        // NCCL's all-reduce gives every rank the same bits.
        for r in &results[1..] {
            assert!(r == &results[0], "ranks disagree at world {world}");
        }
    }
}

#[test]
#[ignore = "needs at least 2 CUDA GPUs and NCCL: scripts/gpu-check.sh runs it"]
fn a_rank_that_skips_a_collective_is_named() {
    let world = gpus();
    assert!(world >= 2, "set ZAMBA_GPU_COUNT >= 2");
    let errors = on_gpus(world, Duration::from_secs(5), |comm, device| {
        comm.barrier().unwrap();
        if comm.rank() == 1 {
            std::thread::sleep(Duration::from_secs(20));
            return None;
        }
        Some(
            comm.all_reduce(
                to_gpu(input(comm.rank(), 1 << 20, FloatDType::F32), device),
                ReduceOp::Sum,
            )
            .unwrap_err(),
        )
    });
    for e in errors.into_iter().flatten() {
        assert!(
            matches!(&e, DistError::Timeout { ranks, .. } if ranks == &[1]),
            "{e}"
        );
    }
}
