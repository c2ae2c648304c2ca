//! Every collective on thread groups of 1–4 ranks against plain tensor-op references, and the
//! group's failure modes: mismatched calls, a rank that never arrives, a rank that panics.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::FloatDType;
use common::*;
use zamba_dist::{Communicator, DistError, Interrupt, ReduceOp, SingleRank, thread_group};

/// Runs `f` on every rank of a thread group, one thread each; returns each rank's result.
fn on_threads<T: Send>(
    world: usize,
    timeout_ms: u64,
    f: impl Fn(Box<dyn Communicator>) -> T + Sync,
) -> Vec<T> {
    let comms = thread_group(world, &opts(timeout_ms));
    std::thread::scope(|s| {
        let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(|| f(c))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn every_collective_matches_the_reference_on_1_to_4_threads() {
    for world in 1..=4 {
        on_threads(world, 10_000, |comm| exercise(&*comm));
    }
}

#[test]
fn single_rank_is_the_identity() {
    let outputs = exercise(&SingleRank);
    assert!(!outputs.is_empty());
    let e = SingleRank
        .broadcast(input(0, 4, FloatDType::F32), 1)
        .unwrap_err();
    assert!(e.to_string().contains("root 1"), "{e}");
}

#[test]
fn max_propagates_nan() {
    let results = on_threads(2, 10_000, |comm| {
        let mut values = vec![1.0f32, 2.0, 3.0];
        if comm.rank() == 1 {
            values[1] = f32::NAN;
        }
        let t = burn::tensor::Tensor::<1>::from_data(
            burn::tensor::TensorData::new(values, [3]),
            &device(),
        );
        comm.all_reduce(t, ReduceOp::Max)
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    });
    for r in results {
        assert!(r[1].is_nan() && r[0] == 1.0 && r[2] == 3.0, "{r:?}");
    }
}

#[test]
fn mismatched_collectives_fail_on_every_rank_naming_both_calls() {
    let errors = on_threads(2, 10_000, |comm| {
        let t = input(comm.rank(), 8, FloatDType::F32);
        let result = if comm.rank() == 0 {
            comm.all_reduce(t, ReduceOp::Sum)
        } else {
            comm.all_gather(t)
        };
        result.unwrap_err().to_string()
    });
    for e in errors {
        assert!(
            e.contains("rank 0 called all_reduce") && e.contains("rank 1 called all_gather"),
            "{e}"
        );
    }
}

#[test]
fn bad_arguments_are_refused_before_communicating() {
    let errors = on_threads(3, 10_000, |comm| {
        let uneven = comm
            .reduce_scatter(input(0, 10, FloatDType::F32), ReduceOp::Sum)
            .unwrap_err();
        let root = comm.broadcast(input(0, 3, FloatDType::F32), 7).unwrap_err();
        let int = burn::tensor::Tensor::<1, burn::tensor::Int>::arange(0..4, &device())
            .float()
            .cast(FloatDType::F64);
        let dtype = comm.all_reduce(int, ReduceOp::Sum).unwrap_err();
        [uneven, root, dtype].map(|e| e.to_string())
    });
    for [uneven, root, dtype] in errors {
        assert!(
            uneven.contains("not a multiple of the world size 3"),
            "{uneven}"
        );
        assert!(root.contains("root 7"), "{root}");
        assert!(dtype.contains("f32 or bf16"), "{dtype}");
    }
}

#[test]
fn a_rank_that_never_arrives_is_named_by_every_other_rank() {
    let start = Instant::now();
    let results = on_threads(4, 500, |comm| {
        if comm.rank() == 2 {
            // Busy elsewhere for longer than the time-out, then tries to join.
            std::thread::sleep(Duration::from_millis(1500));
            return comm.barrier().unwrap_err();
        }
        comm.all_reduce(input(comm.rank(), 16, FloatDType::F32), ReduceOp::Sum)
            .unwrap_err()
    });
    assert!(start.elapsed() < Duration::from_secs(5));
    for e in results {
        match &e {
            DistError::Timeout { ranks, op, .. } => {
                assert_eq!(ranks, &[2], "{e}");
                assert!(op.contains("all_reduce #0"), "{e}");
            }
            other => panic!("expected a time-out naming rank 2, got {other}"),
        }
    }
}

#[test]
fn a_panicked_rank_is_named_without_waiting_for_the_time_out() {
    let start = Instant::now();
    let comms = thread_group(3, &opts(60_000));
    let results: Vec<Option<DistError>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    comm.barrier().unwrap();
                    if comm.rank() == 1 {
                        panic!("rank 1 fails on purpose");
                    }
                    Some(
                        comm.all_reduce(input(comm.rank(), 4, FloatDType::F32), ReduceOp::Sum)
                            .unwrap_err(),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(None))
            .collect()
    });
    assert!(start.elapsed() < Duration::from_secs(10));
    for e in results.into_iter().flatten() {
        match &e {
            DistError::PeerLost {
                rank: 1, detail, ..
            } => assert!(detail.contains("panicked"), "{e}"),
            other => panic!("expected rank 1 lost, got {other}"),
        }
    }
}

#[test]
fn a_failed_group_stays_failed() {
    let results = on_threads(2, 300, |comm| {
        if comm.rank() == 1 {
            std::thread::sleep(Duration::from_millis(800));
        } else {
            comm.barrier().unwrap_err();
        }
        comm.barrier().unwrap_err().to_string()
    });
    for e in results {
        assert!(e.contains("timed out") && e.contains("[1]"), "{e}");
    }
}

#[test]
fn an_interrupt_ends_a_wait_for_a_rank_that_never_arrives() {
    let stop = Arc::new(AtomicBool::new(false));
    let mut opts = opts(60_000);
    let flag = stop.clone();
    opts.interrupt =
        Interrupt::new(move || flag.load(Ordering::SeqCst).then(|| "SIGINT".to_string()));
    let mut comms = thread_group(2, &opts);
    let _absent = comms.pop();
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::SeqCst);
    });
    let e = comms[0].barrier().unwrap_err();
    setter.join().unwrap();
    assert!(
        matches!(&e, DistError::Interrupted { reason, .. } if reason == "SIGINT"),
        "{e}"
    );
}
