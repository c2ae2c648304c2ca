//! `bench scan`: the fused selective-scan op against its roofline and the tensor-op reference;
//! with `--device`, that device's fused kernel next to the CPU kernel.

use std::time::Duration;

use anyhow::{Result, bail};
use burn::tensor::{DType, Device, Distribution, Tensor};
use clap::Args;
use zamba_kernels::ScanInputs;
pub(super) use zamba_kernels::ScanShape;
use zamba_model::Precision;
use zamba_train::device::{DeviceChoice, device_for};

use super::{Machine, sync, time};

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
    /// Also time the fused kernel of this device (cuda, cuda:N, cube-cpu) next to the CPU kernel.
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// The activations' type on --device: fp32, or bf16 (read and written in bf16, f32 state).
    #[arg(long, default_value = "fp32")]
    precision: Precision,
    /// Also write --device's figures as JSON to this file: times, bytes moved, achieved GB/s and
    /// a device-to-device copy's GB/s.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

pub(super) fn run(a: &ScanArgs, peak: &Machine) -> Result<()> {
    if !a.channels.is_multiple_of(a.groups) {
        bail!(
            "--channels {} must be divisible by --groups {}",
            a.channels,
            a.groups
        );
    }
    let shape = ScanShape {
        batch: a.batch,
        channels: a.channels,
        len: a.seq_len,
        state: a.state,
        groups: a.groups,
    };
    let device = device_for(a.device, 0, a.precision)?;
    peak.print();
    // Compute ceiling of an exp-bound kernel: the vector unit retires at most one FMA-lane-op per
    // 2 FLOP of the GEMM peak, and every op of the kernel (each instruction of the polynomial exp,
    // compares, blends, multiplies) takes one such slot; see `scan_lane_ops`.
    println!(
        "selective_scan B={} D={} L={} N={} G={}; CPU roofline = max(lane-ops / {:.1} G lane-ops/s, bytes / {:.1} GB/s)",
        a.batch,
        a.channels,
        a.seq_len,
        a.state,
        a.groups,
        peak.peak_gflops() / 2.0,
        peak.bandwidth_gbs
    );
    let flex = Device::flex();
    let cpu = scan_times(&flex, shape, DType::F32, a.repeats, false)?;
    let reference = scan_times(&flex, shape, DType::F32, 1, true)?;
    print_rows(
        "CPU kernel (cpu)",
        &flex,
        shape,
        cpu,
        Some(reference),
        peak,
        4,
    );
    let dtype = super::compute_dtype(a.precision);
    let act_bytes = dtype.size();
    let times = match device != flex || dtype != DType::F32 {
        true => {
            let times = scan_times(&device, shape, dtype, a.repeats, false)?;
            let name = format!("fused kernel ({}, {})", a.device, a.precision);
            print_rows(&name, &device, shape, times, None, peak, act_bytes);
            println!(
                "  forward+backward: {:.2}x the CPU kernel's time",
                (times.0 + times.1).as_secs_f64() / (cpu.0 + cpu.1).as_secs_f64()
            );
            times
        }
        false => cpu,
    };
    if let Some(path) = &a.json {
        let copy_gbps = device_copy_gbps(&device, 256 << 20);
        println!("  device-to-device copy (read + write): {copy_gbps:.1} GB/s");
        let chunk = zamba_kernels::scan_chunk(&device, shape.state).unwrap_or(1);
        let (bytes_f, bytes_b) = zamba_kernels::scan_bytes(shape, chunk, act_bytes);
        let (fwd, bwd) = (times.0.as_secs_f64(), times.1.as_secs_f64());
        let achieved = (bytes_f + bytes_b) as f64 / (fwd + bwd) / 1e9;
        let json = serde_json::json!({
            "device": a.device.to_string(),
            "precision": a.precision.to_string(),
            "shape": {"batch": shape.batch, "channels": shape.channels, "len": shape.len,
                      "state": shape.state, "groups": shape.groups},
            "forward_seconds": fwd,
            "backward_seconds": bwd,
            "forward_bytes": bytes_f,
            "backward_bytes": bytes_b,
            "forward_gbps": bytes_f as f64 / fwd / 1e9,
            "achieved_gbps": achieved,
            "copy_gbps": copy_gbps,
            "fraction_of_copy": achieved / copy_gbps,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

/// GB/s (bytes read + written) of an element-wise pass over `bytes` of f32 on `device` that reads
/// each element once and writes it once — what a device-to-device copy moves; best of 5, each
/// timed with the device synchronised.
fn device_copy_gbps(device: &Device, bytes: usize) -> f64 {
    let x = Tensor::<1>::random([bytes / 4], Distribution::Default, device);
    sync(device);
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        let t = std::time::Instant::now();
        let y = x.clone().add_scalar(0.0);
        sync(device);
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(y);
    }
    (2 * bytes) as f64 / best / 1e9
}

/// Forward and forward+backward rows: time, GFLOP/s, lane-ops/s, GB/s, share of the CPU roofline,
/// and the plain-tensor-op reference's time where given.
fn print_rows(
    name: &str,
    device: &Device,
    s: ScanShape,
    (fwd, bwd): (Duration, Duration),
    reference: Option<(Duration, Duration)>,
    peak: &Machine,
    activation_bytes: usize,
) {
    let chunk = zamba_kernels::scan_chunk(device, s.state).unwrap_or(1);
    let (flops_f, flops_b) = zamba_kernels::scan_flops(s);
    let (ops_f, ops_b) = zamba_kernels::scan_lane_ops(s);
    let (bytes_f, bytes_b) = zamba_kernels::scan_bytes(s, chunk, activation_bytes);
    let [flops_f, flops_b, ops_f, ops_b, bytes_f, bytes_b] =
        [flops_f, flops_b, ops_f, ops_b, bytes_f, bytes_b].map(|v| v as f64);
    let lane_ops_per_s = peak.peak_gflops() * 1e9 / 2.0;
    println!("{name}:");
    let rows = [
        (
            "forward",
            fwd,
            flops_f,
            ops_f,
            bytes_f,
            reference.map(|r| r.0),
        ),
        (
            "forward+backward",
            fwd + bwd,
            flops_f + flops_b,
            ops_f + ops_b,
            bytes_f + bytes_b,
            reference.map(|r| r.0 + r.1),
        ),
    ];
    for (row, t, flops, ops, bytes, reference) in rows {
        let secs = t.as_secs_f64();
        let roofline = (ops / lane_ops_per_s).max(bytes / (peak.bandwidth_gbs * 1e9));
        let versus = reference
            .map(|r| {
                format!(
                    "  reference ops {:.1} ms ({:.0}x slower)",
                    r.as_secs_f64() * 1e3,
                    r.as_secs_f64() / secs
                )
            })
            .unwrap_or_default();
        println!(
            "  {row:<17} {:>9.3} ms  {:>6.2} GFLOP/s  {:>6.2} G lane-ops/s  {:>6.2} GB/s  roofline {:.3} ms ({:.0}% of roofline){versus}",
            secs * 1e3,
            flops / secs / 1e9,
            ops / secs / 1e9,
            bytes / secs / 1e9,
            roofline * 1e3,
            100.0 * roofline / secs,
        );
    }
}

/// (forward, backward) time of one scan call on `device` with inputs that all require gradients;
/// the activations (`u, delta, b, c, z`) in `dtype`, the parameters f32.
pub(super) fn scan_times(
    device: &Device,
    s: ScanShape,
    dtype: DType,
    repeats: usize,
    reference: bool,
) -> Result<(Duration, Duration)> {
    let rand = |shape: Vec<usize>, lo: f64, hi: f64| {
        Tensor::<1>::random(
            [shape.iter().product::<usize>()],
            Distribution::Uniform(lo, hi),
            device,
        )
    };
    let ScanShape {
        batch,
        channels,
        len,
        state,
        groups,
    } = s;
    let act = |t: Tensor<1>| t.cast(dtype);
    let rows = [batch, channels, len];
    let bc = [batch, groups, len, state];
    let u = act(rand(rows.to_vec(), -1.0, 1.0)).reshape(rows);
    let delta = act(rand(rows.to_vec(), -3.0, 0.0)).reshape(rows);
    let a = rand(vec![channels, state], -2.0, -0.1).reshape([channels, state]);
    let b = act(rand(bc.to_vec(), -1.0, 1.0)).reshape(bc);
    let c = act(rand(bc.to_vec(), -1.0, 1.0)).reshape(bc);
    let d = rand(vec![channels], 0.5, 1.5);
    let z = act(rand(rows.to_vec(), -1.0, 1.0)).reshape(rows);
    let bias = rand(vec![channels], -1.0, 0.0);
    let scan = if reference {
        zamba_kernels::selective_scan_reference
    } else {
        zamba_kernels::selective_scan
    };
    // Fresh leaves on every call, as a training step has.
    let forward = || {
        let inputs = ScanInputs {
            u: u.clone().autodiff(),
            delta: delta.clone().autodiff(),
            a: a.clone().autodiff(),
            b: b.clone().autodiff(),
            c: c.clone().autodiff(),
            d: d.clone().autodiff(),
            z: z.clone().autodiff(),
            delta_bias: bias.clone().autodiff(),
        };
        scan(inputs.require_grad())
    };
    let fwd = time(repeats, || {
        let _ = forward().inner().into_data();
    });
    let total = time(repeats, || {
        let grads = forward().sum().backward();
        std::hint::black_box(grads);
        sync(device);
    });
    Ok((fwd, total.saturating_sub(fwd)))
}
