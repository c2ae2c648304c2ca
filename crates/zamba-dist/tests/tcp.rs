//! The TCP communicator over loopback, one thread per rank: the same bits as the thread group,
//! and failures named on every rank.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::FloatDType;
use common::*;
use zamba_dist::{Backend, Communicator, DistError, Interrupt, ReduceOp, init, thread_group};

fn tcp_ranks<T: Send>(
    world: usize,
    timeout_ms: u64,
    f: impl Fn(Box<dyn Communicator>) -> T + Sync,
) -> Vec<T> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let f = &f;
                s.spawn(move || {
                    let comm = init(
                        &loopback_info(rank, world, port),
                        Backend::Tcp,
                        &opts(timeout_ms),
                    )
                    .unwrap();
                    f(comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn thread_ranks(world: usize) -> Vec<Outputs> {
    let comms = thread_group(world, &opts(10_000));
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| s.spawn(move || exercise(&*c)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn tcp_matches_the_thread_group_bit_for_bit() {
    for world in [2, 3] {
        let tcp = tcp_ranks(world, 20_000, |comm| exercise(&*comm));
        assert_eq!(tcp, thread_ranks(world), "world {world}");
    }
}

#[test]
fn a_rank_that_leaves_is_named_by_every_other_rank() {
    let start = Instant::now();
    let results = tcp_ranks(3, 20_000, |comm| {
        comm.barrier().unwrap();
        if comm.rank() == 2 {
            // Closing its connections is what the death of its process looks like.
            return None;
        }
        Some(
            comm.all_reduce(input(comm.rank(), 64, FloatDType::F32), ReduceOp::Sum)
                .unwrap_err(),
        )
    });
    assert!(start.elapsed() < Duration::from_secs(15));
    for e in results.into_iter().flatten() {
        assert!(
            matches!(e, DistError::PeerLost { rank: 2, .. }),
            "expected rank 2 lost, got {e}"
        );
    }
}

#[test]
fn a_hung_rank_is_named_by_every_other_rank() {
    let results = tcp_ranks(3, 600, |comm| {
        if comm.rank() == 1 {
            std::thread::sleep(Duration::from_millis(2500));
            return None;
        }
        Some(
            comm.all_reduce(input(comm.rank(), 64, FloatDType::BF16), ReduceOp::Avg)
                .unwrap_err(),
        )
    });
    for e in results.into_iter().flatten() {
        match &e {
            DistError::Timeout { ranks, .. } => assert_eq!(ranks, &[1], "{e}"),
            other => panic!("expected a time-out naming rank 1, got {other}"),
        }
    }
}

#[test]
fn a_rank_that_never_starts_is_named_at_the_rendezvous() {
    let port = free_port();
    let world = 3;
    let errors: Vec<DistError> = std::thread::scope(|s| {
        let handles: Vec<_> = [0, 1]
            .map(|rank| {
                s.spawn(move || {
                    match init(&loopback_info(rank, world, port), Backend::Tcp, &opts(700)) {
                        Ok(_) => panic!("rank {rank} joined a world without rank 2"),
                        Err(e) => e,
                    }
                })
            })
            .into_iter()
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in errors {
        match &e {
            DistError::Timeout { ranks, op, .. } => {
                assert_eq!(ranks, &[2], "{e}");
                assert!(op.contains("never joined"), "{e}");
            }
            other => panic!("expected the rendezvous to name rank 2, got {other}"),
        }
    }
}

#[test]
fn ranks_with_different_tokens_do_not_meet() {
    let port = free_port();
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = [0, 1]
            .map(|rank| {
                s.spawn(move || {
                    let mut info = loopback_info(rank, 2, port);
                    if rank == 1 {
                        info.token = Some(zamba_dist::TokenSource::Value(
                            "another-jobs-token-9876543210".into(),
                        ));
                    }
                    init(&info, Backend::Tcp, &opts(1500))
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default()
                })
            })
            .into_iter()
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        errors[1].contains("could not prove that it holds the job token"),
        "{}",
        errors[1]
    );
    assert!(errors[0].contains("[1]"), "{}", errors[0]);
}

#[test]
fn an_interrupt_ends_a_collective_waiting_for_a_silent_rank() {
    let port = free_port();
    let stop = Arc::new(AtomicBool::new(false));
    let results: Vec<Result<(), DistError>> = std::thread::scope(|s| {
        let handles: Vec<_> = [0, 1]
            .map(|rank| {
                let stop = stop.clone();
                s.spawn(move || {
                    let mut opts = opts(60_000);
                    let flag = stop.clone();
                    opts.interrupt = Interrupt::new(move || {
                        flag.load(Ordering::SeqCst).then(|| "SIGTERM".to_string())
                    });
                    let comm = init(&loopback_info(rank, 2, port), Backend::Tcp, &opts)?;
                    if rank == 1 {
                        // Silent, and still there well after the interrupt.
                        while !stop.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        std::thread::sleep(Duration::from_secs(2));
                        return Ok(());
                    }
                    comm.barrier()
                })
            })
            .into_iter()
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Long before the 60 s time-out, rank 0 leaves the barrier, saying why.
    match &results[0] {
        Err(DistError::Interrupted { op, reason }) => {
            assert!(op.contains("barrier"), "{op}");
            assert_eq!(reason, "SIGTERM");
        }
        other => panic!("expected an interrupted barrier, got {other:?}"),
    }
}
