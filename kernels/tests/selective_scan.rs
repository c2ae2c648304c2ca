//! The fused selective scan against the Burn-ops reference, an independent f64 implementation
//! (value and central finite differences), and itself (determinism, untracked inputs, dtypes).
//! The CPU kernel (Flex) is checked against those oracles; every device of [`kernel_devices`]
//! (also the CubeCL kernels with `--features cube-cpu` or `cuda`) runs the device checks of
//! `zamba_kernels::device_checks` (against the CPU kernel) and the device-independent properties.
//!
//! Relative error everywhere: `max_i |x_i - y_i| / max(max_i |y_i|, 1e-30)`, `y` the oracle.

mod common;

use burn::tensor::{DType, Device, Tensor, TensorData};
use zamba_kernels::check::rel_err;
use zamba_kernels::device_checks::{INPUT_NAMES, ScanCase, scan_checks};
use zamba_kernels::{
    ScanInputs, ScanShape, fused_kernel_available, kernel_devices, scan_bytes, scan_chunk,
    scan_flops, selective_scan, selective_scan_reference,
};

/// The CPU kernel's chunk.
fn flex_chunk() -> usize {
    scan_chunk(&Device::flex(), 16).expect("Flex has the fused kernel")
}

type Size = ScanShape;
type Case = ScanCase;
const NAMES: [&str; 8] = INPUT_NAMES;

/// The inputs of `case` as Burn tensors: `devices[i]` holds input `i`; `tracked[i]` says whether
/// it requires grad.
fn inputs(case: &Case, devices: &[Device; 8], tracked: [bool; 8]) -> ScanInputs {
    let shapes = case.shapes();
    let data = |i: usize| TensorData::new(case.inputs[i].clone(), shapes[i].clone());
    fn grad<const D: usize>(t: Tensor<D>, track: bool) -> Tensor<D> {
        if track { t.require_grad() } else { t }
    }
    ScanInputs {
        u: grad(Tensor::from_data(data(0), &devices[0]), tracked[0]),
        delta: grad(Tensor::from_data(data(1), &devices[1]), tracked[1]),
        a: grad(Tensor::from_data(data(2), &devices[2]), tracked[2]),
        b: grad(Tensor::from_data(data(3), &devices[3]), tracked[3]),
        c: grad(Tensor::from_data(data(4), &devices[4]), tracked[4]),
        d: grad(Tensor::from_data(data(5), &devices[5]), tracked[5]),
        z: grad(Tensor::from_data(data(6), &devices[6]), tracked[6]),
        delta_bias: grad(Tensor::from_data(data(7), &devices[7]), tracked[7]),
    }
}

type ScanFn = fn(ScanInputs) -> Tensor<3>;

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// Output and the gradient of every input (None where untracked) of `loss = Σ w · out`.
struct Run {
    out: Vec<f32>,
    grads: [Option<Vec<f32>>; 8],
}

fn run_autodiff(case: &Case, scan: ScanFn, devices: &[Device; 8], tracked: [bool; 8]) -> Run {
    let x = inputs(case, devices, tracked);
    let out = scan(x.clone());
    let shape = case.shapes()[0].clone();
    let w = Tensor::<3>::from_data(TensorData::new(case.w.clone(), shape), &devices[0]);
    let grads = (out.clone() * w).sum().backward();
    Run {
        out: values(out),
        grads: [
            x.u.grad(&grads).map(values),
            x.delta.grad(&grads).map(values),
            x.a.grad(&grads).map(values),
            x.b.grad(&grads).map(values),
            x.c.grad(&grads).map(values),
            x.d.grad(&grads).map(values),
            x.z.grad(&grads).map(values),
            x.delta_bias.grad(&grads).map(values),
        ],
    }
}

fn autodiff_devices() -> [Device; 8] {
    autodiff_on(&Device::flex())
}

fn autodiff_on(device: &Device) -> [Device; 8] {
    std::array::from_fn(|_| device.clone().autodiff())
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let err = rel_err(got, want);
    if std::env::var_os("SCAN_TEST_VERBOSE").is_some() {
        println!("{what}: {err:e}");
    }
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}

const ALL: [bool; 8] = [true; 8];

/// Odd sizes: shorter than a chunk, several chunks with a partial last one, exactly two chunks,
/// G = 1 and 2, N = 16 and 8 (vector path), 12 and 5 (scalar path), 72 (state on the heap), and
/// enough channels per group that the backward splits them into several blocks (channels 64,
/// groups 2, state 8).
fn sizes() -> Vec<Size> {
    let s = |batch, channels, groups, len, state| Size {
        batch,
        channels,
        groups,
        len,
        state,
    };
    let chunk = flex_chunk();
    assert!(37 < chunk && 150 > 2 * chunk && 150 % chunk != 0);
    vec![
        s(2, 6, 2, 37, 16),
        s(3, 5, 1, 150, 8),
        s(2, 64, 2, 70, 8),
        s(2, 4, 2, 2 * chunk, 12),
        s(2, 3, 1, 1, 5),
        s(2, 4, 2, 101, 16),
        s(2, 2, 1, 20, 72),
    ]
}

#[test]
fn fused_matches_reference_forward_and_all_gradients() {
    for (k, size) in sizes().into_iter().enumerate() {
        let mut case = Case::new(size, 100 + k as u64);
        // A few Δ pre-activations beyond softplus's linear threshold of 20.
        for t in (0..case.inputs[1].len()).step_by(29) {
            case.inputs[1][t] = 21.0 + (t % 5) as f32;
        }
        let fused = run_autodiff(&case, selective_scan, &autodiff_devices(), ALL);
        let reference = run_autodiff(&case, selective_scan_reference, &autodiff_devices(), ALL);
        assert_close(&format!("{size:?} out"), &fused.out, &reference.out, 1e-5);
        for (i, name) in NAMES.iter().enumerate() {
            let got = fused.grads[i].as_ref().expect("fused grad");
            let want = reference.grads[i].as_ref().expect("reference grad");
            assert_close(&format!("{size:?} d{name}"), got, want, 1e-5);
        }
    }
}

#[test]
fn fused_forward_without_autodiff_matches_reference() {
    let case = Case::new(sizes()[1], 7);
    let devices: [Device; 8] = std::array::from_fn(|_| Device::flex());
    let x = inputs(&case, &devices, [false; 8]);
    assert_close(
        "out",
        &values(selective_scan(x.clone())),
        &values(selective_scan_reference(x)),
        1e-5,
    );
}

// ------------------------------------------------------------------------------------------------
// Independent oracle: the scan in f64, and central finite differences of `Σ w · out` on it.

fn softplus(x: f64) -> f64 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

fn scan_f64(size: Size, x: &[Vec<f64>; 8]) -> Vec<f64> {
    let Size {
        batch,
        channels,
        groups,
        len,
        state,
    } = size;
    let [u, delta, a, b, c, d, z, bias] = x;
    let mut out = vec![0.0; batch * channels * len];
    for bt in 0..batch {
        for ch in 0..channels {
            let g = ch / (channels / groups);
            let mut s = vec![0.0; state];
            for t in 0..len {
                let i = (bt * channels + ch) * len + t;
                let dt = softplus(delta[i] + bias[ch]);
                let row = ((bt * groups + g) * len + t) * state;
                let mut y = d[ch] * u[i];
                for n in 0..state {
                    s[n] = (dt * a[ch * state + n]).exp() * s[n] + dt * b[row + n] * u[i];
                    y += c[row + n] * s[n];
                }
                out[i] = y * z[i] / (1.0 + (-z[i]).exp());
            }
        }
    }
    out
}

#[test]
fn fused_matches_f64_scan_and_finite_differences() {
    let size = Size {
        batch: 2,
        channels: 4,
        groups: 2,
        len: flex_chunk() + 6,
        state: 8,
    };
    let case = Case::new(size, 42);
    let fused = run_autodiff(&case, selective_scan, &autodiff_devices(), ALL);

    let mut x: [Vec<f64>; 8] =
        std::array::from_fn(|i| case.inputs[i].iter().map(|v| *v as f64).collect());
    let w: Vec<f64> = case.w.iter().map(|v| *v as f64).collect();
    let out = scan_f64(size, &x);
    let out32: Vec<f32> = out.iter().map(|v| *v as f32).collect();
    assert_close("out vs f64", &fused.out, &out32, 1e-5);

    let loss =
        |x: &[Vec<f64>; 8]| -> f64 { scan_f64(size, x).iter().zip(&w).map(|(o, w)| o * w).sum() };
    for i in 0..8 {
        let mut fd = Vec::with_capacity(x[i].len());
        for k in 0..x[i].len() {
            let v = x[i][k];
            let h = 1e-5 * v.abs().max(1.0);
            x[i][k] = v + h;
            let up = loss(&x);
            x[i][k] = v - h;
            let down = loss(&x);
            x[i][k] = v;
            fd.push(((up - down) / (2.0 * h)) as f32);
        }
        let got = fused.grads[i].as_ref().expect("fused grad");
        assert_close(
            &format!("d{} vs finite differences", NAMES[i]),
            got,
            &fd,
            1e-5,
        );
    }
}

// ------------------------------------------------------------------------------------------------

/// The device checks (`zamba_kernels::device_checks`, also run by `zamba-train selftest`) on
/// every device of this build: f32 against the CPU kernel on odd sizes, bf16 activations,
/// determinism.
#[test]
fn device_checks_pass_on_every_device() {
    let mut failed = Vec::new();
    for device in kernel_devices() {
        for check in scan_checks(&device) {
            println!("{device:?}: {check}");
            if !check.is_passed() {
                failed.push(format!("{device:?}: {check}"));
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn untracked_and_non_autodiff_inputs() {
    for device in kernel_devices() {
        untracked_and_non_autodiff_inputs_on(&device);
    }
}

fn untracked_and_non_autodiff_inputs_on(device: &Device) {
    let case = Case::new(sizes()[2], 9);
    let all = run_autodiff(&case, selective_scan, &autodiff_on(device), ALL);

    // Only u and b tracked; the others on the autodiff device but constant.
    let tracked = [true, false, false, true, false, false, false, false];
    let some = run_autodiff(&case, selective_scan, &autodiff_on(device), tracked);
    assert_eq!(some.out, all.out, "{device:?}");
    for i in 0..8 {
        match tracked[i] {
            true => assert_eq!(some.grads[i], all.grads[i], "{device:?} d{}", NAMES[i]),
            false => assert!(some.grads[i].is_none(), "d{} should be None", NAMES[i]),
        }
    }

    // a, d, delta_bias on the device without autodiff, delta untracked, rest tracked.
    let mut devices = autodiff_on(device);
    for i in [2, 5, 7] {
        devices[i] = device.clone();
    }
    let tracked = [true, false, false, true, true, false, true, false];
    let mixed = run_autodiff(&case, selective_scan, &devices, tracked);
    assert_eq!(mixed.out, all.out, "{device:?}");
    for i in 0..8 {
        match tracked[i] {
            true => assert_eq!(mixed.grads[i], all.grads[i], "{device:?} d{}", NAMES[i]),
            false => assert!(mixed.grads[i].is_none(), "d{} should be None", NAMES[i]),
        }
    }

    // Nothing tracked on the autodiff device, and no autodiff at all: the same output.
    let x = inputs(&case, &autodiff_on(device), [false; 8]);
    assert_eq!(values(selective_scan(x)), all.out, "{device:?}");
    let devices: [Device; 8] = std::array::from_fn(|_| device.clone());
    let x = inputs(&case, &devices, [false; 8]);
    assert_eq!(values(selective_scan(x)), all.out, "{device:?}");
}

/// Non-f32 inputs are computed in f32 and the output and gradients come back in the input dtype:
/// with f32-representable values stored as f64, everything equals the f32 run exactly.
#[test]
fn f64_inputs_match_the_f32_run() {
    for device in kernel_devices() {
        if device.supports_dtype(DType::F64) {
            f64_inputs_match_the_f32_run_on(&device);
        }
    }
}

fn f64_inputs_match_the_f32_run_on(device: &Device) {
    let case = Case::new(sizes()[0], 5);
    let want = run_autodiff(&case, selective_scan, &autodiff_on(device), ALL);

    let f64 = |t: Tensor<3>| t.cast(DType::F64).require_grad();
    let x = inputs(&case, &autodiff_on(device), [false; 8]);
    let x = ScanInputs {
        u: f64(x.u),
        delta: f64(x.delta),
        a: x.a.cast(DType::F64).require_grad(),
        b: x.b.cast(DType::F64).require_grad(),
        c: x.c.cast(DType::F64).require_grad(),
        d: x.d.cast(DType::F64).require_grad(),
        z: f64(x.z),
        delta_bias: x.delta_bias.cast(DType::F64).require_grad(),
    };
    let out = selective_scan(x.clone());
    assert_eq!(out.dtype(), DType::F64);
    let w = Tensor::<3>::from_data(
        TensorData::new(case.w.clone(), case.shapes()[0].clone()),
        &device.clone().autodiff(),
    );
    let grads = (out.clone() * w.cast(DType::F64)).sum().backward();
    let as_f32 = |t: Tensor<1>| {
        assert_eq!(t.dtype(), DType::F64);
        values(t.cast(DType::F32))
    };
    assert_eq!(as_f32(out.flatten(0, 2)), want.out, "{device:?}");
    let got = [
        as_f32(x.u.grad(&grads).expect("du").flatten(0, 2)),
        as_f32(x.delta.grad(&grads).expect("ddelta").flatten(0, 2)),
        as_f32(x.a.grad(&grads).expect("da").flatten(0, 1)),
        as_f32(x.b.grad(&grads).expect("db").flatten(0, 3)),
        as_f32(x.c.grad(&grads).expect("dc").flatten(0, 3)),
        as_f32(x.d.grad(&grads).expect("dd")),
        as_f32(x.z.grad(&grads).expect("dz").flatten(0, 2)),
        as_f32(x.delta_bias.grad(&grads).expect("ddelta_bias")),
    ];
    for ((got, want), name) in got.iter().zip(&want.grads).zip(NAMES) {
        assert_eq!(Some(got), want.as_ref(), "{device:?} d{name}");
    }
}

#[test]
#[should_panic(expected = "`b` must have shape [batch, groups, len, state]")]
fn shape_mismatch_names_the_input() {
    let case = Case::new(sizes()[0], 1);
    let x = inputs(&case, &autodiff_devices(), ALL);
    let b = x.b.clone().narrow(2, 0, 5);
    let _ = selective_scan(ScanInputs { b, ..x });
}

#[test]
fn every_kernel_device_takes_the_fused_path() {
    for device in kernel_devices() {
        assert!(fused_kernel_available(&device), "{device:?}");
        assert!(
            fused_kernel_available(&device.clone().autodiff()),
            "{device:?}"
        );
        let chunk = scan_chunk(&device, 16).expect("a chunk");
        assert!(chunk >= 4, "{device:?}: chunk {chunk}");
    }
}

#[test]
fn cost_model() {
    let shape = |batch, channels, len, state, groups| ScanShape {
        batch,
        channels,
        groups,
        len,
        state,
    };
    assert_eq!(scan_flops(shape(2, 3, 5, 4, 1)), (30 * 39, 30 * 121));
    // One chunk: no checkpoints. f32 = 4 bytes.
    let (fwd, bwd) = scan_bytes(shape(1, 2, 4, 3, 1), 64, 4);
    let (rows, bc, params) = (8, 12, 10);
    assert_eq!(
        (fwd, bwd),
        (
            4 * (4 * rows + 2 * bc + params),
            4 * (7 * rows + 4 * bc + 2 * params)
        )
    );
    // bf16 activations: half the bytes of everything but the parameters.
    let (fwd, bwd) = scan_bytes(shape(1, 2, 4, 3, 1), 64, 2);
    assert_eq!(
        (fwd, bwd),
        (
            2 * (4 * rows + 2 * bc) + 4 * params,
            2 * (7 * rows + 4 * bc) + 4 * 2 * params
        )
    );
    // Three chunks: two checkpointed states per lane.
    let len = 2 * 16 + 1;
    let (with_ck, _) = scan_bytes(shape(1, 1, len, 1, 1), 16, 4);
    assert_eq!(with_ck, 4 * (4 * len as u64 + 2 * len as u64 + 3 + 2));
}

/// Every other test of this binary again at the narrower SIMD levels this CPU has.
#[test]
fn narrower_simd_levels_pass_too() {
    common::assert_narrower_simd_levels_pass("narrower_simd_levels_pass_too");
}
