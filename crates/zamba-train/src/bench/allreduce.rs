//! `bench allreduce`: time and bandwidth of one communicator's all-reduce across message sizes.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use burn::tensor::{Device, Tensor};
use clap::Args;

use super::overlap_probe::{self, OverlapProbe};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AllreduceBackend {
    /// Ranks as threads of this process, sharing memory.
    Threads,
    /// Ranks as threads of this process, each with its own TCP connections over loopback.
    Tcp,
    /// NCCL, one thread per GPU (needs a build with `--features cuda` and `--world` GPUs).
    Nccl,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AllreduceDtype {
    F32,
    Bf16,
}

#[derive(Args)]
pub struct AllreduceArgs {
    /// Ranks.
    #[arg(long, default_value_t = 4)]
    world: usize,
    /// Message sizes in bytes, comma-separated; K, M, G suffixes are powers of 1024.
    #[arg(long, value_delimiter = ',', default_value = "4K,64K,1M,16M,64M")]
    sizes: Vec<String>,
    #[arg(long, value_enum, default_value = "threads")]
    backend: AllreduceBackend,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: AllreduceDtype,
    /// Timed all-reduces per size (after one warm-up).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// First check every collective's values (all-reduce sum and mean, reduce-scatter,
    /// all-gather, broadcast) on each rank; a wrong value is an error.
    #[arg(long)]
    check: bool,
    /// Also check that a collective issued from a second thread waits for its own tensor only,
    /// not for the compute queued before it on the device (see docs/distributed.md); an error if
    /// it does not on NCCL. On CPU ranks only its value is checked.
    #[arg(long)]
    overlap_probe: bool,
    /// Also write the table (and the checks' outcomes) as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn parse_size(text: &str) -> Result<usize> {
    let text = text.trim();
    let (digits, scale) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], 1 << 10),
        Some((i, 'M' | 'm')) => (&text[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    match digits.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n * scale),
        _ => bail!("--sizes: {text:?} is not a size in bytes like 4096, 64K or 16M"),
    }
}

/// The communicators of one benchmark group, and the device each rank's tensors live on.
fn allreduce_group(a: &AllreduceArgs) -> Result<Vec<(Box<dyn zamba_dist::Communicator>, Device)>> {
    let opts = zamba_dist::DistOptions {
        timeout: Duration::from_secs(120),
        ..Default::default()
    };
    match a.backend {
        AllreduceBackend::Threads => Ok(zamba_dist::thread_group(a.world, &opts)
            .into_iter()
            .map(|c| (c, Device::flex()))
            .collect()),
        AllreduceBackend::Tcp => {
            let infos = loopback_world(a.world)?;
            std::thread::scope(|s| {
                let joins: Vec<_> = infos
                    .iter()
                    .map(|info| {
                        let opts = &opts;
                        s.spawn(move || zamba_dist::init(info, zamba_dist::Backend::Tcp, opts))
                    })
                    .collect();
                joins
                    .into_iter()
                    .map(|j| Ok((j.join().expect("rendezvous thread")?, Device::flex())))
                    .collect()
            })
        }
        AllreduceBackend::Nccl => nccl_group(a, &opts),
    }
}

#[cfg(not(feature = "cuda"))]
fn nccl_group(
    _: &AllreduceArgs,
    _: &zamba_dist::DistOptions,
) -> Result<Vec<(Box<dyn zamba_dist::Communicator>, Device)>> {
    bail!("--backend nccl needs a zamba-train built with `--features cuda`")
}

#[cfg(feature = "cuda")]
fn nccl_group(
    a: &AllreduceArgs,
    opts: &zamba_dist::DistOptions,
) -> Result<Vec<(Box<dyn zamba_dist::Communicator>, Device)>> {
    let infos = loopback_world(a.world)?;
    std::thread::scope(|s| {
        let joins: Vec<_> = infos
            .iter()
            .map(|info| s.spawn(move || zamba_dist::connect_nccl(info, info.local_rank, opts)))
            .collect();
        joins
            .into_iter()
            .enumerate()
            .map(|(rank, j)| {
                let comm: Box<dyn zamba_dist::Communicator> =
                    Box::new(j.join().expect("NCCL init thread")?);
                Ok((comm, Device::cuda(rank)))
            })
            .collect()
    })
}

/// The rendezvous of `world` ranks as threads of this process, meeting on a free loopback port
/// with a fresh job token.
fn loopback_world(world: usize) -> Result<Vec<zamba_dist::RendezvousInfo>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let token = zamba_dist::generate_token()?;
    Ok((0..world)
        .map(|rank| zamba_dist::RendezvousInfo {
            rank,
            world_size: world,
            local_rank: rank,
            local_world_size: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            launcher: zamba_dist::Launcher::Torchrun,
            token: Some(zamba_dist::TokenSource::Value(token.clone())),
        })
        .collect())
}

/// nccl-tests' definitions: algbw = bytes / time; busbw = algbw · 2(n−1)/n for all-reduce, the
/// traffic per link of a bandwidth-optimal algorithm, comparable across world sizes.
pub(super) fn run(a: &AllreduceArgs) -> Result<()> {
    if a.world == 0 || a.iters == 0 {
        bail!("--world and --iters must be at least 1");
    }
    let sizes = a
        .sizes
        .iter()
        .map(|s| parse_size(s))
        .collect::<Result<Vec<_>>>()?;
    let (dtype, element) = match a.dtype {
        AllreduceDtype::F32 => (burn::tensor::DType::F32, 4),
        AllreduceDtype::Bf16 => (burn::tensor::DType::BF16, 2),
    };
    let mut group = allreduce_group(a)?;
    if a.check {
        group = check_collectives(group, dtype)?;
        println!(
            "collectives check: all-reduce, reduce-scatter, all-gather, broadcast correct on every rank"
        );
    }
    let probe = match a.overlap_probe {
        true => Some(probe_group(
            &group,
            matches!(a.backend, AllreduceBackend::Nccl),
        )?),
        false => None,
    };
    println!(
        "all_reduce (sum), {:?} backend, world {}, {:?}, {} iterations per size",
        a.backend, a.world, a.dtype, a.iters
    );
    println!(
        "{:>12} {:>12} {:>12} {:>12} {:>12}",
        "bytes", "elements", "time (us)", "algbw GB/s", "busbw GB/s"
    );
    let times: Vec<Vec<f64>> = std::thread::scope(|s| {
        let joins: Vec<_> = group
            .into_iter()
            .map(|(comm, device)| {
                let sizes = &sizes;
                s.spawn(move || -> Result<Vec<f64>> {
                    let mut seconds = Vec::new();
                    for &bytes in sizes {
                        let count = (bytes / element).max(1);
                        let x = Tensor::<1>::ones([count], (&device, dtype));
                        comm.all_reduce(x.clone(), zamba_dist::ReduceOp::Sum)?;
                        comm.barrier()?;
                        let t = Instant::now();
                        for _ in 0..a.iters {
                            let y = comm.all_reduce(x.clone(), zamba_dist::ReduceOp::Sum)?;
                            std::hint::black_box(y);
                        }
                        device.sync().map_err(|e| anyhow::anyhow!("{e:?}"))?;
                        seconds.push(t.elapsed().as_secs_f64() / a.iters as f64);
                    }
                    Ok(seconds)
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("benchmark thread"))
            .collect::<Result<_>>()
    })?;
    let n = a.world as f64;
    let mut rows = Vec::new();
    for (i, &bytes) in sizes.iter().enumerate() {
        let count = (bytes / element).max(1);
        let bytes = (count * element) as f64;
        // The slowest rank's time is the collective's.
        let secs = times.iter().map(|t| t[i]).fold(0.0, f64::max);
        let algbw = bytes / secs / 1e9;
        let busbw = algbw * 2.0 * (n - 1.0) / n;
        println!(
            "{bytes:>12} {count:>12} {:>12.1} {algbw:>12.3} {busbw:>12.3}",
            secs * 1e6
        );
        rows.push(serde_json::json!({
            "bytes": bytes, "seconds": secs, "algbw_gbps": algbw, "busbw_gbps": busbw,
        }));
    }
    if let Some(path) = &a.json {
        let json = serde_json::json!({
            "backend": format!("{:?}", a.backend).to_lowercase(),
            "world": a.world,
            "dtype": format!("{:?}", a.dtype).to_lowercase(),
            "checked": a.check,
            "overlap_probe": probe.as_ref().map(OverlapProbe::json),
            "sizes": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    match probe {
        Some(p) if p.meaningful && !p.overlapped() => bail!(
            "overlap probe: the collective waited for the compute queued before it ({:.1} ms of \
             {:.1} ms): gradient reduction would not overlap the backward",
            p.collective.as_secs_f64() * 1e3,
            p.compute.as_secs_f64() * 1e3
        ),
        _ => Ok(()),
    }
}

/// [`overlap_probe::run`] on every rank at once; rank 0's result, printed.
fn probe_group(
    group: &[(Box<dyn zamba_dist::Communicator>, Device)],
    on_gpu: bool,
) -> Result<OverlapProbe> {
    let mut results = std::thread::scope(|s| {
        let joins: Vec<_> = group
            .iter()
            .map(|(comm, device)| {
                s.spawn(move || overlap_probe::run(comm.as_ref(), device, on_gpu))
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("overlap probe thread"))
            .collect::<Result<Vec<_>>>()
    })?;
    let rank0 = results.swap_remove(0);
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    println!(
        "overlap probe: a collective from a second thread returned after {:.1} ms, the compute queued \
         before it took {:.1} ms: {}",
        ms(rank0.collective),
        ms(rank0.compute),
        match (rank0.meaningful, rank0.overlapped()) {
            (false, _) => "value correct (CPU ops run eagerly: the timing shows nothing)",
            (true, true) => "overlapped, value correct",
            (true, false) => "NOT overlapped",
        }
    );
    Ok(rank0)
}

/// Every collective on every rank, against the values it must give: rank `r` contributes
/// `r + 1 + i/n` at element `i` of an `n`-element tensor (exact in bf16 for the small sizes
/// used), so sums, means, shards and gathers are known in closed form.
/// Takes the group to its ranks' threads and gives it back.
fn check_collectives(
    group: Vec<(Box<dyn zamba_dist::Communicator>, Device)>,
    dtype: burn::tensor::DType,
) -> Result<Vec<(Box<dyn zamba_dist::Communicator>, Device)>> {
    let world = group.len();
    let n = 4 * world;
    let contribution = |rank: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (rank + 1) as f32 + (i % 4) as f32 / 4.0)
            .collect()
    };
    let sum: Vec<f32> = (0..n)
        .map(|i| (0..world).map(|r| contribution(r)[i]).sum())
        .collect();
    let mean: Vec<f32> = sum.iter().map(|s| s / world as f32).collect();
    std::thread::scope(|s| {
        let joins: Vec<_> = group
            .into_iter()
            .map(|(comm, device)| {
                let (sum, mean) = (&sum, &mean);
                s.spawn(move || -> Result<_> {
                    let rank = comm.rank();
                    let mine = Tensor::<1>::from_floats(contribution(rank).as_slice(), &device)
                        .cast(dtype);
                    let values = |t: Tensor<1>| -> Vec<f32> {
                        t.cast(burn::tensor::DType::F32)
                            .into_data()
                            .try_to_vec::<f32>()
                            .expect("f32 values")
                    };
                    let expect = |what: &str, got: Vec<f32>, want: &[f32]| -> Result<()> {
                        match got.as_slice() == want {
                            true => Ok(()),
                            false => bail!("rank {rank}: {what} gave {got:?}, expected {want:?}"),
                        }
                    };
                    let op = zamba_dist::ReduceOp::Sum;
                    expect(
                        "all_reduce(sum)",
                        values(comm.all_reduce(mine.clone(), op)?),
                        sum,
                    )?;
                    let avg = zamba_dist::ReduceOp::Avg;
                    expect(
                        "all_reduce(avg)",
                        values(comm.all_reduce(mine.clone(), avg)?),
                        mean,
                    )?;
                    let scattered = values(comm.reduce_scatter(mine.clone(), op)?);
                    expect("reduce_scatter(sum)", scattered, &shard_of(sum, rank))?;
                    let gathered =
                        values(comm.all_gather(mine.clone().slice([rank * 4..rank * 4 + 4]))?);
                    let all: Vec<f32> = (0..world)
                        .flat_map(|r| shard_of(&contribution(r), r))
                        .collect();
                    expect("all_gather", gathered, &all)?;
                    let root = world - 1;
                    let broadcast = values(comm.broadcast(mine, root)?);
                    expect("broadcast", broadcast, &contribution(root))?;
                    Ok((comm, device))
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("check thread"))
            .collect::<Result<Vec<_>>>()
    })
}

fn shard_of(v: &[f32], rank: usize) -> Vec<f32> {
    v[rank * 4..(rank + 1) * 4].to_vec()
}
