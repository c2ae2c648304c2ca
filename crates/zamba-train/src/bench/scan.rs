//! `bench scan`: the fused selective-scan op against its roofline and the tensor-op reference.

use std::time::Duration;

use anyhow::{Result, bail};
use burn::tensor::{Device, Distribution, Tensor};
use clap::Args;

use super::{Machine, time};

#[derive(Args)]
pub struct ScanArgs {
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 512)]
    channels: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    #[arg(long, default_value_t = 16)]
    state: usize,
    #[arg(long, default_value_t = 2)]
    groups: usize,
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

pub(super) fn run(a: &ScanArgs, peak: &Machine) -> Result<()> {
    if a.channels % a.groups != 0 {
        bail!(
            "--channels {} must be divisible by --groups {}",
            a.channels,
            a.groups
        );
    }
    peak.print();
    let device = Device::flex();
    let (fwd, bwd) = scan_times(
        &device, a.batch, a.channels, a.seq_len, a.state, a.groups, a.repeats, false,
    );
    let (ref_fwd, ref_bwd) = scan_times(
        &device, a.batch, a.channels, a.seq_len, a.state, a.groups, 1, true,
    );
    let (flops_f, flops_b) = zamba_kernels::scan_flops(a.batch, a.channels, a.seq_len, a.state);
    let (ops_f, ops_b) = zamba_kernels::scan_lane_ops(a.batch, a.channels, a.seq_len, a.state);
    let (bytes_f, bytes_b) =
        zamba_kernels::scan_bytes(a.batch, a.channels, a.seq_len, a.state, a.groups);
    let [flops_f, flops_b, ops_f, ops_b, bytes_f, bytes_b] =
        [flops_f, flops_b, ops_f, ops_b, bytes_f, bytes_b].map(|v| v as f64);
    // Compute ceiling of an exp-bound kernel: the vector unit retires at most one FMA-lane-op per
    // 2 FLOP of the GEMM peak, and every op of the kernel (each instruction of the polynomial exp,
    // compares, blends, multiplies) takes one such slot; see `scan_lane_ops`.
    let lane_ops_per_s = peak.peak_gflops() * 1e9 / 2.0;
    println!(
        "selective_scan B={} D={} L={} N={} G={}; roofline = max(lane-ops / {:.1} G lane-ops/s, bytes / {:.1} GB/s)",
        a.batch,
        a.channels,
        a.seq_len,
        a.state,
        a.groups,
        lane_ops_per_s / 1e9,
        peak.bandwidth_gbs
    );
    for (name, t, flops, ops, bytes, reference) in [
        ("forward", fwd, flops_f, ops_f, bytes_f, ref_fwd),
        (
            "forward+backward",
            fwd + bwd,
            flops_f + flops_b,
            ops_f + ops_b,
            bytes_f + bytes_b,
            ref_fwd + ref_bwd,
        ),
    ] {
        let secs = t.as_secs_f64();
        let roofline = (ops / lane_ops_per_s).max(bytes / (peak.bandwidth_gbs * 1e9));
        println!(
            "  {name:<17} {:>9.3} ms  {:>6.2} GFLOP/s  {:>6.2} G lane-ops/s  {:>6.2} GB/s  roofline {:.3} ms ({:.0}% of roofline)  reference ops {:.1} ms ({:.0}x slower)",
            secs * 1e3,
            flops / secs / 1e9,
            ops / secs / 1e9,
            bytes / secs / 1e9,
            roofline * 1e3,
            100.0 * roofline / secs,
            reference.as_secs_f64() * 1e3,
            reference.as_secs_f64() / secs
        );
    }
    Ok(())
}

/// (forward, backward) time of one scan call with inputs that all require gradients.
#[allow(clippy::too_many_arguments)]
pub(super) fn scan_times(
    device: &Device,
    batch: usize,
    channels: usize,
    len: usize,
    state: usize,
    groups: usize,
    repeats: usize,
    reference: bool,
) -> (Duration, Duration) {
    let rand = |shape: Vec<usize>, lo: f64, hi: f64| {
        Tensor::<1>::random(
            [shape.iter().product::<usize>()],
            Distribution::Uniform(lo, hi),
            device,
        )
    };
    let u = rand(vec![batch, channels, len], -1.0, 1.0).reshape([batch, channels, len]);
    let delta = rand(vec![batch, channels, len], -3.0, 0.0).reshape([batch, channels, len]);
    let a = rand(vec![channels, state], -2.0, -0.1).reshape([channels, state]);
    let b = rand(vec![batch, groups, len, state], -1.0, 1.0).reshape([batch, groups, len, state]);
    let c = rand(vec![batch, groups, len, state], -1.0, 1.0).reshape([batch, groups, len, state]);
    let d = rand(vec![channels], 0.5, 1.5);
    let z = rand(vec![batch, channels, len], -1.0, 1.0).reshape([batch, channels, len]);
    let bias = rand(vec![channels], -1.0, 0.0);
    let scan = if reference {
        zamba_kernels::selective_scan_reference
    } else {
        zamba_kernels::selective_scan
    };
    let forward = || {
        scan(
            u.clone().autodiff().require_grad(),
            delta.clone().autodiff().require_grad(),
            a.clone().autodiff().require_grad(),
            b.clone().autodiff().require_grad(),
            c.clone().autodiff().require_grad(),
            d.clone().autodiff().require_grad(),
            z.clone().autodiff().require_grad(),
            bias.clone().autodiff().require_grad(),
        )
    };
    let fwd = time(repeats, || {
        let _ = forward().inner().into_data();
    });
    let total = time(repeats, || {
        let _ = forward().sum().backward();
    });
    (fwd, total.saturating_sub(fwd))
}
