//! Times the fused selective scan on Flex: forward (inference), forward with checkpoints (training)
//! and forward + backward, at Bt=4, Dc=512, L=512, N=16, G=2 unless given
//! `batch channels len state groups` as arguments. Build optimized:
//! `cargo run --release -p zamba-kernels --example scan_bench`.

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use zamba_kernels::{ScanInputs, ScanShape, scan_bytes, scan_chunk, scan_flops, selective_scan};

/// Random inputs in the ranges the model produces.
fn random_inputs(shape: ScanShape, device: &Device) -> ScanInputs {
    let ScanShape {
        batch,
        channels,
        groups,
        len,
        state,
    } = shape;
    let normal = Distribution::Normal(0.0, 1.0);
    ScanInputs {
        u: Tensor::random([batch, channels, len], normal, device),
        delta: Tensor::random(
            [batch, channels, len],
            Distribution::Uniform(-4.0, 1.0),
            device,
        ),
        a: -Tensor::random([channels, state], Distribution::Uniform(0.0, 2.7), device).exp(),
        b: Tensor::random([batch, groups, len, state], normal, device),
        c: Tensor::random([batch, groups, len, state], normal, device),
        d: Tensor::random([channels], normal, device),
        z: Tensor::random([batch, channels, len], normal, device),
        delta_bias: Tensor::random([channels], Distribution::Uniform(-1.0, 0.5), device),
    }
}

/// Median seconds of `reps` runs of `f`, after one warm-up run.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .expect("arguments: batch channels len state groups")
        })
        .collect();
    let dims: [usize; 5] = match args.len() {
        0 => [4, 512, 512, 16, 2],
        _ => args
            .try_into()
            .expect("arguments: batch channels len state groups"),
    };
    let [batch, channels, len, state, groups] = dims;
    let shape = ScanShape {
        batch,
        channels,
        groups,
        len,
        state,
    };
    let (fwd_flops, bwd_flops) = scan_flops(shape);
    let chunk = scan_chunk(&Device::flex(), state).expect("Flex has the fused kernel");
    let (fwd_bytes, bwd_bytes) = scan_bytes(shape, chunk, 4);
    let reps = 7;
    println!(
        "Bt={batch} Dc={channels} L={len} N={state} G={groups}, {} rayon threads, median of {reps}",
        rayon::current_num_threads()
    );

    let plain = random_inputs(shape, &Device::flex());
    let forward = time(reps, || {
        selective_scan(plain.clone()).into_data();
    });

    let x = random_inputs(shape, &Device::flex().autodiff()).require_grad();
    let forward_ckpt = time(reps, || {
        selective_scan(x.clone()).into_data();
    });
    let train = time(reps, || {
        let grads = selective_scan(x.clone()).sum().backward();
        let du = x.u.grad(&grads).map(|g| g.into_data());
        std::hint::black_box(du);
    });

    let report = |name: &str, secs: f64, flops: u64, bytes: u64| {
        println!(
            "{name:<28} {:>9.2} ms  {:>7.2} GFLOP/s  {:>6.2} GB/s (minimal traffic)",
            secs * 1e3,
            flops as f64 / secs / 1e9,
            bytes as f64 / secs / 1e9
        );
    };
    report("forward (inference)", forward, fwd_flops, fwd_bytes);
    report(
        "forward (with checkpoints)",
        forward_ckpt,
        fwd_flops,
        fwd_bytes,
    );
    report(
        "forward + backward",
        train,
        fwd_flops + bwd_flops,
        fwd_bytes + bwd_bytes,
    );
}
