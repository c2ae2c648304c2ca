//! The fused CPU ops (linear, per-head products, causal attention, GELU gate, cross-entropy,
//! AdamW, causal conv + SiLU, RMSNorm) against their plain tensor-op versions — values and gradients — and
//! against central finite differences in f64.
//!
//! Relative error: `max_i |x_i - y_i| / max(max_i |y_i|, 1e-30)`, `y` the oracle.

use burn::tensor::{Device, Int, Tensor, TensorData};
use zamba_kernels::{
    AdamWHyper, IGNORE_INDEX, adamw_update, adamw_update_reference, causal_attention,
    causal_attention_reference, causal_conv1d_silu, causal_conv1d_silu_reference, cross_entropy,
    cross_entropy_reference, gelu_mul, gelu_mul_reference, linear, linear_channels_first,
    linear_reference, per_head_matmul, per_head_matmul_reference, per_head_matmul_transposed,
    rms_norm, rms_norm_reference,
};

/// SplitMix64 → uniform in [lo, hi).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        lo + (hi - lo) * ((x >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want
        .iter()
        .fold(0f64, |m, y| m.max(y.abs() as f64))
        .max(1e-30);
    let diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    diff / scale
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn tensor<const D: usize>(data: &[f32], shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(data.to_vec(), shape.to_vec()), device)
}

/// Central finite difference of `f` at `x` along coordinate `i`, in f64.
fn finite_difference(f: &dyn Fn(&[f64]) -> f64, x: &[f64], i: usize, h: f64) -> f64 {
    let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
    plus[i] += h;
    minus[i] -= h;
    (f(&plus) - f(&minus)) / (2.0 * h)
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy.

/// `(loss, d loss / d logits)` of `op` on an autodiff Flex device.
fn ce_run(
    op: fn(Tensor<2>, Tensor<1, Int>) -> Tensor<1>,
    logits: &[f32],
    targets: &[i64],
    vocab: usize,
) -> (f32, Vec<f32>) {
    let device = Device::flex().autodiff();
    let rows = targets.len();
    let x = tensor(logits, [rows, vocab], &device).require_grad();
    let t = Tensor::<1, Int>::from_data(TensorData::new(targets.to_vec(), vec![rows]), &device);
    let loss = op(x.clone(), t);
    let grads = (loss.clone() * 1.5).sum().backward();
    (values(loss)[0], values(x.grad(&grads).unwrap()))
}

fn ce_case(rows: usize, vocab: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
    let mut rng = Rng(seed);
    let logits = rng.vec(rows * vocab, -6.0, 6.0);
    let targets = (0..rows)
        .map(|r| match r % 5 {
            3 => IGNORE_INDEX,
            _ => (rng.uniform(0.0, vocab as f32) as i64).min(vocab as i64 - 1),
        })
        .collect();
    (logits, targets)
}

#[test]
fn cross_entropy_matches_tensor_ops_in_value_and_gradient() {
    // Vocabulary sizes with and without a vector remainder.
    for (rows, vocab) in [(37, 4096), (11, 1000), (5, 3)] {
        let (logits, targets) = ce_case(rows, vocab, rows as u64);
        let (loss, grad) = ce_run(cross_entropy, &logits, &targets, vocab);
        let (want_loss, want_grad) = ce_run(cross_entropy_reference, &logits, &targets, vocab);
        assert!(
            ((loss - want_loss) / want_loss).abs() < 1e-6,
            "{rows}x{vocab}: loss {loss} vs {want_loss}"
        );
        let err = rel_error(&grad, &want_grad);
        assert!(err < 2e-6, "{rows}x{vocab}: gradient error {err:e}");
        for (r, &t) in targets.iter().enumerate() {
            if t == IGNORE_INDEX {
                assert!(grad[r * vocab..(r + 1) * vocab].iter().all(|&g| g == 0.0));
            }
        }
    }
}

#[test]
fn cross_entropy_gradient_matches_finite_differences() {
    let (rows, vocab) = (4, 9);
    let (logits, targets) = ce_case(rows, vocab, 7);
    let (_, grad) = ce_run(cross_entropy, &logits, &targets, vocab);
    let loss = |x: &[f64]| {
        let mut total = 0.0;
        let mut count = 0;
        for (row, &t) in x.chunks(vocab).zip(&targets) {
            if t != IGNORE_INDEX {
                let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
                total += lse - row[t as usize];
                count += 1;
            }
        }
        1.5 * total / count as f64
    };
    let x: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
    for (i, &g) in grad.iter().enumerate() {
        let fd = finite_difference(&loss, &x, i, 1e-5);
        assert!((g as f64 - fd).abs() < 1e-6, "logit {i}: {g} vs {fd}");
    }
}

#[test]
fn cross_entropy_edge_cases() {
    let device = Device::flex();
    let ignored = Tensor::<1, Int>::full([3], IGNORE_INDEX, &device);
    let loss = cross_entropy(Tensor::zeros([3, 8], &device), ignored);
    assert_eq!(values(loss), [0.0]);
    let (mut logits, targets) = ce_case(2, 16, 1);
    logits[5] = f32::NAN;
    let t = Tensor::<1, Int>::from_data(TensorData::new(targets, vec![2]), &device);
    let loss = cross_entropy(tensor(&logits, [2, 16], &device), t);
    assert!(values(loss)[0].is_nan(), "a NaN logit must give a NaN loss");
}

#[test]
#[should_panic(expected = "outside the vocabulary")]
fn cross_entropy_rejects_targets_outside_the_vocabulary() {
    let device = Device::flex();
    let t = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 8], vec![2]), &device);
    cross_entropy(Tensor::zeros([2, 8], &device), t);
}

// ---------------------------------------------------------------------------------------------
// AdamW.

fn adamw_steps(
    update: fn(
        Tensor<1>,
        Tensor<1>,
        Tensor<1>,
        Tensor<1>,
        &AdamWHyper,
    ) -> (Tensor<1>, Tensor<1>, Tensor<1>),
    n: usize,
) -> [Vec<f32>; 3] {
    let device = Device::flex();
    let mut rng = Rng(42);
    let mut theta = tensor(&rng.vec(n, -1.0, 1.0), [n], &device);
    let (mut m, mut v) = (Tensor::zeros([n], &device), Tensor::zeros([n], &device));
    for step in 1..=4u64 {
        let grad = tensor(&rng.vec(n, -3.0, 3.0), [n], &device);
        let hyper = AdamWHyper {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: if step % 2 == 0 { 0.1 } else { 0.0 },
            step,
            grad_scale: 0.7,
        };
        // Keep an alias of theta alive on odd steps: the kernel must not write through it.
        let alias = (step % 2 == 1).then(|| theta.clone());
        let before = alias.as_ref().map(|t| values(t.clone()));
        (theta, m, v) = update(theta, grad, m, v, &hyper);
        if let (Some(alias), Some(before)) = (alias, before) {
            assert_eq!(
                values(alias),
                before,
                "the update wrote into a shared buffer"
            );
        }
    }
    [values(theta), values(m), values(v)]
}

#[test]
fn adamw_update_is_bit_identical_to_tensor_ops() {
    for n in [1, 15, 16, 1000, 70_001] {
        let fused = adamw_steps(adamw_update, n);
        let reference = adamw_steps(adamw_update_reference, n);
        for (name, (f, r)) in ["theta", "m", "v"].iter().zip(fused.iter().zip(&reference)) {
            let same = f.iter().zip(r).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name} differs at n = {n}");
        }
    }
}

#[test]
fn adamw_update_accepts_autodiff_tensors() {
    // Moments restored from a checkpoint may live on the autodiff device.
    let device = Device::flex().autodiff();
    let hyper = AdamWHyper {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
        grad_scale: 1.0,
    };
    let t = |x: f32| Tensor::<1>::from_data(TensorData::new(vec![x; 3], vec![3]), &device);
    let (theta, m, v) = adamw_update(t(1.0), t(2.0), t(0.0), t(0.0), &hyper);
    let (want_theta, want_m, want_v) =
        adamw_update_reference(t(1.0), t(2.0), t(0.0), t(0.0), &hyper);
    assert_eq!(values(theta), values(want_theta));
    assert_eq!(values(m), values(want_m));
    assert_eq!(values(v), values(want_v));
}

#[test]
#[should_panic(expected = "same length")]
fn adamw_update_rejects_mismatched_lengths() {
    let device = Device::flex();
    let hyper = AdamWHyper {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
        grad_scale: 1.0,
    };
    let t = |n| Tensor::<1>::zeros([n], &device);
    adamw_update(t(4), t(5), t(4), t(4), &hyper);
}

// ---------------------------------------------------------------------------------------------
// Causal conv + SiLU, RMSNorm: three-input ops compared through `loss = Σ w · op(...)`.

/// Output and input gradients of `loss = Σ w · out` for an op of `x` `[.., width]` and two
/// parameter vectors/matrices, all on an autodiff Flex device.
struct OpRun {
    out: Vec<f32>,
    grads: Vec<Vec<f32>>,
}

impl OpRun {
    /// Asserts this run matches `reference`: the output within relative error `out_tol`, each
    /// gradient (named by `names`, in order) within `grad_tol`; `case` names the case in messages.
    fn assert_matches(
        &self,
        reference: &OpRun,
        names: &[&str],
        [out_tol, grad_tol]: [f64; 2],
        case: &str,
    ) {
        let err = rel_error(&self.out, &reference.out);
        assert!(err < out_tol, "{case} output error {err:e}");
        assert_eq!(
            self.grads.len(),
            names.len(),
            "{case}: one name per gradient"
        );
        for (name, (f, r)) in names.iter().zip(self.grads.iter().zip(&reference.grads)) {
            let err = rel_error(f, r);
            assert!(err < grad_tol, "{case} d{name} error {err:e}");
        }
    }
}

type ConvFn = fn(Tensor<3>, Tensor<2>, Tensor<1>) -> Tensor<3>;

fn conv_run(
    op: ConvFn,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    dims: [usize; 4],
    loss_w: &[f32],
) -> OpRun {
    let [batch, channels, len, taps] = dims;
    let device = Device::flex().autodiff();
    let xt = tensor(x, [batch, channels, len], &device).require_grad();
    let wt = tensor(w, [channels, taps], &device).require_grad();
    let bt = tensor(b, [channels], &device).require_grad();
    let out = op(xt.clone(), wt.clone(), bt.clone());
    let grads = (out.clone() * tensor(loss_w, [batch, channels, len], &device))
        .sum()
        .backward();
    OpRun {
        out: values(out),
        grads: vec![
            values(xt.grad(&grads).unwrap()),
            values(wt.grad(&grads).unwrap()),
            values(bt.grad(&grads).unwrap()),
        ],
    }
}

fn conv_case(dims: [usize; 4], seed: u64) -> [Vec<f32>; 4] {
    let [batch, channels, len, taps] = dims;
    let mut rng = Rng(seed);
    [
        rng.vec(batch * channels * len, -2.0, 2.0),
        rng.vec(channels * taps, -1.0, 1.0),
        rng.vec(channels, -0.5, 0.5),
        rng.vec(batch * channels * len, -1.0, 1.0),
    ]
}

#[test]
fn causal_conv_silu_matches_tensor_ops() {
    for dims in [[2, 5, 37, 4], [3, 16, 64, 4], [1, 2, 3, 4], [2, 3, 20, 1]] {
        let [x, w, b, lw] = conv_case(dims, dims[2] as u64);
        let fused = conv_run(causal_conv1d_silu, &x, &w, &b, dims, &lw);
        let reference = conv_run(causal_conv1d_silu_reference, &x, &w, &b, dims, &lw);
        fused.assert_matches(
            &reference,
            &["x", "weight", "bias"],
            [1e-6, 2e-6],
            &format!("{dims:?}"),
        );
    }
}

#[test]
fn causal_conv_silu_gradients_match_finite_differences() {
    let dims = [1, 2, 6, 3];
    let [batch, channels, len, taps] = dims;
    let [x, w, b, lw] = conv_case(dims, 3);
    let fused = conv_run(causal_conv1d_silu, &x, &w, &b, dims, &lw);
    // All inputs in one f64 vector: x, then w, then b.
    let all: Vec<f64> = x.iter().chain(&w).chain(&b).map(|&v| v as f64).collect();
    let (nx, nw) = (x.len(), w.len());
    let loss = |p: &[f64]| {
        let (x, rest) = p.split_at(nx);
        let (w, b) = rest.split_at(nw);
        let mut total = 0.0;
        for lane in 0..batch * channels {
            let c = lane % channels;
            for t in 0..len {
                let mut a = b[c];
                for k in 0..taps {
                    if let Some(src) = (t + k).checked_sub(taps - 1) {
                        a += w[c * taps + k] * x[lane * len + src];
                    }
                }
                total += lw[lane * len + t] as f64 * a / (1.0 + (-a).exp());
            }
        }
        total
    };
    let grads: Vec<f32> = fused.grads.concat();
    for (i, &g) in grads.iter().enumerate() {
        let fd = finite_difference(&loss, &all, i, 1e-5);
        assert!(
            (g as f64 - fd).abs() < 2e-5 * (1.0 + fd.abs()),
            "input {i}: {g} vs {fd}"
        );
    }
}

type NormFn = fn(Tensor<3>, Tensor<1>, f64) -> Tensor<3>;

fn norm_run(op: NormFn, x: &[f32], gamma: &[f32], shape: [usize; 3], loss_w: &[f32]) -> OpRun {
    let device = Device::flex().autodiff();
    let xt = tensor(x, shape, &device).require_grad();
    let gt = tensor(gamma, [shape[2]], &device).require_grad();
    let out = op(xt.clone(), gt.clone(), 1e-5);
    let grads = (out.clone() * tensor(loss_w, shape, &device))
        .sum()
        .backward();
    OpRun {
        out: values(out),
        grads: vec![
            values(xt.grad(&grads).unwrap()),
            values(gt.grad(&grads).unwrap()),
        ],
    }
}

#[test]
fn rms_norm_matches_tensor_ops() {
    for shape in [[2, 70, 256], [3, 5, 20], [1, 130, 7]] {
        let n: usize = shape.iter().product();
        let mut rng = Rng(n as u64);
        let (x, gamma, lw) = (
            rng.vec(n, -3.0, 3.0),
            rng.vec(shape[2], 0.5, 1.5),
            rng.vec(n, -1.0, 1.0),
        );
        let fused = norm_run(rms_norm, &x, &gamma, shape, &lw);
        let reference = norm_run(rms_norm_reference, &x, &gamma, shape, &lw);
        fused.assert_matches(
            &reference,
            &["x", "gamma"],
            [1e-6, 5e-6],
            &format!("{shape:?}"),
        );
    }
}

#[test]
fn rms_norm_gradients_match_finite_differences() {
    let shape = [1, 3, 5];
    let n = 15;
    let mut rng = Rng(9);
    let (x, gamma, lw) = (
        rng.vec(n, -2.0, 2.0),
        rng.vec(5, 0.5, 1.5),
        rng.vec(n, -1.0, 1.0),
    );
    let fused = norm_run(rms_norm, &x, &gamma, shape, &lw);
    let all: Vec<f64> = x.iter().chain(&gamma).map(|&v| v as f64).collect();
    let loss = |p: &[f64]| {
        let (x, g) = p.split_at(n);
        x.chunks(5)
            .zip(lw.chunks(5))
            .map(|(row, w)| {
                let rms = (row.iter().map(|v| v * v).sum::<f64>() / 5.0 + 1e-5).sqrt();
                (0..5)
                    .map(|j| w[j] as f64 * row[j] / rms * g[j])
                    .sum::<f64>()
            })
            .sum()
    };
    for (i, &g) in fused.grads.concat().iter().enumerate() {
        let fd = finite_difference(&loss, &all, i, 1e-5);
        assert!(
            (g as f64 - fd).abs() < 2e-5 * (1.0 + fd.abs()),
            "input {i}: {g} vs {fd}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Linear (direct GEMMs on strided operands).

type LinearFn = fn(Tensor<3>, Tensor<2>) -> Tensor<3>;

/// How the operands reach the op: as contiguous tensors, or as transposed views of buffers laid
/// out the other way (out_proj's input, the tied head's weight).
#[derive(Clone, Copy, Debug)]
struct LinearCase {
    dims: [usize; 4], // batch, rows, d_in, d_out
    x_transposed: bool,
    w_transposed: bool,
}

fn linear_run(op: LinearFn, case: LinearCase, x: &[f32], w: &[f32], loss_w: &[f32]) -> OpRun {
    let [b, m, k, n] = case.dims;
    let device = Device::flex().autodiff();
    let xt = match case.x_transposed {
        true => tensor(x, [b, k, m], &device).require_grad(),
        false => tensor(x, [b, m, k], &device).require_grad(),
    };
    let wt = match case.w_transposed {
        true => tensor(w, [n, k], &device).require_grad(),
        false => tensor(w, [k, n], &device).require_grad(),
    };
    let x_in = match case.x_transposed {
        true => xt.clone().swap_dims(1, 2),
        false => xt.clone(),
    };
    let w_in = match case.w_transposed {
        true => wt.clone().transpose(),
        false => wt.clone(),
    };
    let out = op(x_in, w_in);
    let grads = (out.clone() * tensor(loss_w, [b, m, n], &device))
        .sum()
        .backward();
    OpRun {
        out: values(out),
        grads: vec![
            values(xt.grad(&grads).unwrap()),
            values(wt.grad(&grads).unwrap()),
        ],
    }
}

#[test]
fn linear_matches_tensor_ops_on_strided_operands() {
    let mut cases = Vec::new();
    // Small (one thread) and above the parallel threshold; batch 1 and several.
    for dims in [[2, 70, 33, 19], [1, 5, 3, 2], [4, 128, 96, 200]] {
        for (x_transposed, w_transposed) in
            [(false, false), (true, false), (false, true), (true, true)]
        {
            cases.push(LinearCase {
                dims,
                x_transposed,
                w_transposed,
            });
        }
    }
    for case in cases {
        let [b, m, k, n] = case.dims;
        let mut rng = Rng((b * m * k * n) as u64);
        let (x, w, lw) = (
            rng.vec(b * m * k, -2.0, 2.0),
            rng.vec(k * n, -1.0, 1.0),
            rng.vec(b * m * n, -1.0, 1.0),
        );
        let reference = linear_run(linear_reference, case, &x, &w, &lw);
        let channels_first: LinearFn = |x, w| linear_channels_first(x, w).swap_dims(1, 2);
        for (order, op) in [
            ("row-major", linear as LinearFn),
            ("channels-first", channels_first),
        ] {
            let fused = linear_run(op, case, &x, &w, &lw);
            fused.assert_matches(
                &reference,
                &["x", "w"],
                [1e-6, 1e-6],
                &format!("{order} {case:?}"),
            );
        }
    }
}

#[test]
fn linear_values_match_a_plain_loop_in_every_rank() {
    let (k, n) = (7, 5);
    let mut rng = Rng(3);
    let (x, w) = (rng.vec(6 * k, -1.0, 1.0), rng.vec(k * n, -1.0, 1.0));
    let want: Vec<f32> = x
        .chunks(k)
        .flat_map(|row| {
            (0..n).map(|j| {
                (0..k)
                    .map(|i| row[i] as f64 * w[i * n + j] as f64)
                    .sum::<f64>() as f32
            })
        })
        .collect();
    let device = Device::flex();
    let w_t = tensor(&w, [k, n], &device);
    let got2 = values(linear(tensor(&x, [6, k], &device), w_t.clone()));
    let got4 = values(linear(tensor(&x, [1, 2, 3, k], &device), w_t));
    assert!(rel_error(&got2, &want) < 1e-6);
    assert_eq!(got2, got4);
}

#[test]
#[should_panic(expected = "linear: x's last dimension is 4 but the weight is [3, 2]")]
fn linear_rejects_mismatched_dimensions() {
    let device = Device::flex();
    let _ = linear(
        tensor(&[0.0; 8], [2, 4], &device),
        tensor(&[0.0; 6], [3, 2], &device),
    );
}

type HeadsFn = fn(Tensor<3>, Tensor<4>) -> Tensor<4>;

/// `dims`: batch, heads, M, K, N. With `sliced`, `x` is rows `1..K + 1` of a taller tensor (a
/// strided view, as `dt` is of `x_proj`'s output).
fn heads_run(op: HeadsFn, dims: [usize; 5], sliced: bool, inputs: &[Vec<f32>; 3]) -> OpRun {
    let [b, h, m, k, n] = dims;
    let device = Device::flex().autodiff();
    let wt = tensor(&inputs[0], [h, m, k], &device).require_grad();
    let rows = if sliced { k + 2 } else { k };
    let xt = tensor(&inputs[1], [b, h, rows, n], &device).require_grad();
    let x_in = match sliced {
        true => xt.clone().slice([0..b, 0..h, 1..k + 1, 0..n]),
        false => xt.clone(),
    };
    let out = op(wt.clone(), x_in);
    let grads = (out.clone() * tensor(&inputs[2], [b, h, m, n], &device))
        .sum()
        .backward();
    OpRun {
        out: values(out),
        grads: vec![
            values(wt.grad(&grads).unwrap()),
            values(xt.grad(&grads).unwrap()),
        ],
    }
}

#[test]
fn per_head_matmul_matches_tensor_ops_in_value_and_gradient() {
    for (dims, sliced) in [
        ([2, 3, 5, 7, 11], false),
        ([4, 2, 48, 256, 130], false),
        ([3, 2, 9, 4, 20], true),
    ] {
        let [b, h, m, k, n] = dims;
        let rows = if sliced { k + 2 } else { k };
        let mut rng = Rng(dims.iter().product::<usize>() as u64);
        let inputs = [
            rng.vec(h * m * k, -1.0, 1.0),
            rng.vec(b * h * rows * n, -2.0, 2.0),
            rng.vec(b * h * m * n, -1.0, 1.0),
        ];
        let reference = heads_run(per_head_matmul_reference, dims, sliced, &inputs);
        let transposed: HeadsFn = |w, x| per_head_matmul_transposed(w, x).swap_dims(2, 3);
        for (order, op) in [
            ("row-major", per_head_matmul as HeadsFn),
            ("transposed", transposed),
        ] {
            let fused = heads_run(op, dims, sliced, &inputs);
            fused.assert_matches(
                &reference,
                &["w", "x"],
                [1e-6, 1e-6],
                &format!("{order} {dims:?}"),
            );
        }
    }
}

#[test]
#[should_panic(expected = "per_head_matmul: w [2, 3, 4] and x [1, 3, 4, 5]")]
fn per_head_matmul_rejects_mismatched_heads() {
    let device = Device::flex();
    let _ = per_head_matmul(
        tensor(&[0.0; 24], [2, 3, 4], &device),
        tensor(&[0.0; 60], [1, 3, 4, 5], &device),
    );
}

// ---------------------------------------------------------------------------------------------
// GELU gate.

type GeluFn = fn(Tensor<3>, Tensor<3>) -> Tensor<3>;

fn gelu_run(op: GeluFn, inputs: &[Vec<f32>; 3], shape: [usize; 3]) -> OpRun {
    let device = Device::flex().autodiff();
    let gate = tensor(&inputs[0], shape, &device).require_grad();
    let up = tensor(&inputs[1], shape, &device).require_grad();
    let out = op(gate.clone(), up.clone());
    let grads = (out.clone() * tensor(&inputs[2], shape, &device))
        .sum()
        .backward();
    OpRun {
        out: values(out),
        grads: vec![
            values(gate.grad(&grads).unwrap()),
            values(up.grad(&grads).unwrap()),
        ],
    }
}

#[test]
fn gelu_mul_matches_tensor_ops_and_finite_differences() {
    for shape in [[2, 70, 129], [1, 3, 5]] {
        let n: usize = shape.iter().product();
        let mut rng = Rng(n as u64);
        let inputs = [
            rng.vec(n, -6.0, 6.0),
            rng.vec(n, -2.0, 2.0),
            rng.vec(n, -1.0, 1.0),
        ];
        let fused = gelu_run(gelu_mul, &inputs, shape);
        let reference = gelu_run(gelu_mul_reference, &inputs, shape);
        fused.assert_matches(
            &reference,
            &["gate", "up"],
            [1e-6, 2e-6],
            &format!("{shape:?}"),
        );
    }
    // d/dgate of gelu(gate)·up, by central differences of the f64 formula.
    let gelu64 = |x: f64| {
        let erf = |x: f64| {
            let (mut term, mut sum) = (x, x);
            for k in 1..120 {
                term *= -x * x / k as f64;
                sum += term / (2 * k + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
    };
    let gates = [-3.5f32, -1.0, -0.2, 0.0, 0.3, 1.7, 4.0];
    let ones = vec![1.0; gates.len()];
    let run = gelu_run(
        gelu_mul,
        &[gates.to_vec(), ones.clone(), ones],
        [1, 1, gates.len()],
    );
    for (i, &g) in gates.iter().enumerate() {
        let fd = finite_difference(&|p: &[f64]| gelu64(p[0]), &[g as f64], 0, 1e-5);
        assert!(
            (run.out[i] as f64 - gelu64(g as f64)).abs() < 1e-6,
            "gelu({g})"
        );
        assert!(
            (run.grads[0][i] as f64 - fd).abs() < 2e-6,
            "gelu'({g}): {} vs {fd}",
            run.grads[0][i]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Causal attention.

type AttentionFn = fn(Tensor<4>, Tensor<4>, Tensor<4>, f64) -> Tensor<4>;

/// `dims`: batch, len, heads, kv heads, head dim. With `strided`, q/k/v reach the op as
/// `[B, heads, L, hd]` tensors with dims 1 and 2 swapped (not contiguous).
fn attention_run(
    op: AttentionFn,
    dims: [usize; 5],
    strided: bool,
    inputs: &[Vec<f32>; 4],
) -> OpRun {
    let [b, l, h, kv, hd] = dims;
    let device = Device::flex().autodiff();
    let leaf = |data: &[f32], heads: usize| match strided {
        true => tensor(data, [b, heads, l, hd], &device).require_grad(),
        false => tensor(data, [b, l, heads, hd], &device).require_grad(),
    };
    let [q, k, v] = [(&inputs[0], h), (&inputs[1], kv), (&inputs[2], kv)].map(|(x, n)| leaf(x, n));
    let view = |t: &Tensor<4>| match strided {
        true => t.clone().swap_dims(1, 2),
        false => t.clone(),
    };
    let out = op(view(&q), view(&k), view(&v), 1.0 / (hd as f64).sqrt());
    let grads = (out.clone() * tensor(&inputs[3], [b, l, h, hd], &device))
        .sum()
        .backward();
    OpRun {
        out: values(out),
        grads: [q, k, v]
            .iter()
            .map(|t| values(t.grad(&grads).unwrap()))
            .collect(),
    }
}

fn attention_inputs(dims: [usize; 5], seed: u64) -> [Vec<f32>; 4] {
    let [b, l, h, kv, hd] = dims;
    let mut rng = Rng(seed);
    [
        rng.vec(b * l * h * hd, -2.0, 2.0),
        rng.vec(b * l * kv * hd, -2.0, 2.0),
        rng.vec(b * l * kv * hd, -1.0, 1.0),
        rng.vec(b * l * h * hd, -1.0, 1.0),
    ]
}

#[test]
fn causal_attention_matches_tensor_ops_in_value_and_gradient() {
    // Lengths below, at and across the 64-row blocks; grouped queries; strided inputs.
    for (dims, strided) in [
        ([2, 70, 4, 4, 8], false),
        ([1, 130, 4, 2, 16], false),
        ([2, 64, 2, 1, 4], true),
        ([1, 1, 3, 3, 5], false),
        ([3, 33, 6, 3, 7], true),
    ] {
        let inputs = attention_inputs(dims, dims.iter().product::<usize>() as u64);
        let fused = attention_run(causal_attention, dims, strided, &inputs);
        let reference = attention_run(causal_attention_reference, dims, strided, &inputs);
        fused.assert_matches(
            &reference,
            &["q", "k", "v"],
            [2e-6, 1e-5],
            &format!("{dims:?}"),
        );
    }
}

#[test]
fn causal_attention_values_match_a_plain_loop() {
    let dims = [1, 9, 2, 1, 3];
    let [_, l, h, _, hd] = dims;
    let inputs = attention_inputs(dims, 5);
    let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut want = vec![0f32; l * h * hd];
    for head in 0..h {
        for i in 0..l {
            let score = |j: usize| {
                (0..hd)
                    .map(|c| q[(i * h + head) * hd + c] as f64 * k[j * hd + c] as f64)
                    .sum::<f64>()
                    * scale
            };
            let weights: Vec<f64> = (0..=i).map(|j| score(j).exp()).collect();
            let total: f64 = weights.iter().sum();
            for c in 0..hd {
                let o: f64 = (0..=i).map(|j| weights[j] * v[j * hd + c] as f64).sum();
                want[(i * h + head) * hd + c] = (o / total) as f32;
            }
        }
    }
    let got = attention_run(causal_attention, dims, false, &inputs).out;
    assert!(rel_error(&got, &want) < 1e-6, "{got:?} vs {want:?}");
}

#[test]
#[should_panic(expected = "causal_attention: q [1, 4, 3, 2], k [1, 4, 2, 2]")]
fn causal_attention_rejects_heads_that_do_not_group() {
    let device = Device::flex();
    let t = |heads: usize| tensor(&vec![0.0; 8 * heads], [1, 4, heads, 2], &device);
    let _ = causal_attention(t(3), t(2), t(2), 1.0);
}

/// Every test of this file again with the kernels capped at AVX2 and at scalar code (each in a
/// child process, as the level is fixed per process): the narrower paths, which machines
/// without AVX-512 run, stay tested on machines that have it.
#[test]
fn narrower_simd_levels_pass_too() {
    if std::env::var_os(zamba_kernels::SIMD_ENV).is_some() {
        return; // the child run itself
    }
    let exe = std::env::current_exe().expect("test binary path");
    for level in [
        zamba_kernels::SimdLevel::Avx2,
        zamba_kernels::SimdLevel::Scalar,
    ] {
        if level >= zamba_kernels::detected_simd_level() {
            continue; // the default run already covers it
        }
        let name = format!("{level:?}").to_lowercase();
        let out = std::process::Command::new(&exe)
            .env(zamba_kernels::SIMD_ENV, &name)
            .args(["--quiet", "--skip", "narrower_simd_levels_pass_too"])
            .output()
            .expect("run the test binary");
        assert!(
            out.status.success(),
            "tests failed with {}={name}:\n{}{}",
            zamba_kernels::SIMD_ENV,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
