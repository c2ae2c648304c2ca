//! Helpers shared by the kernel tests: random inputs, comparisons against an oracle, finite
//! differences, and the rerun of a test binary at the narrower SIMD levels.
//!
//! Relative error everywhere: [`rel_err`], `max_i |x_i - y_i| / max(max_i |y_i|, 1e-30)` with `y`
//! the oracle, NaN when the result holds a NaN. The tests run with the feature `poison-outputs`,
//! which fills every kernel output buffer with NaN before the kernel writes it: an element a
//! kernel fails to write fails the comparison.

// Each test binary uses a part of these helpers.
#![allow(dead_code)]

use burn::tensor::{Device, Tensor, TensorData};
pub use zamba_kernels::check::rel_err;

/// SplitMix64 → uniform in [lo, hi).
pub struct Rng(pub u64);

impl Rng {
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        lo + (hi - lo) * ((x >> 40) as f32 / (1u64 << 24) as f32)
    }

    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

pub fn tensor<const D: usize>(data: &[f32], shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(data.to_vec(), shape.to_vec()), device)
}

/// Central finite difference of `f` at `x` along coordinate `i`, in f64.
pub fn finite_difference(f: &dyn Fn(&[f64]) -> f64, x: &[f64], i: usize, h: f64) -> f64 {
    let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
    plus[i] += h;
    minus[i] -= h;
    (f(&plus) - f(&minus)) / (2.0 * h)
}

/// The output and the input gradients of `loss = Σ w · op(...)` for one op, on an autodiff Flex
/// device.
pub struct OpRun {
    pub out: Vec<f32>,
    pub grads: Vec<Vec<f32>>,
}

impl OpRun {
    /// Asserts this run matches `reference`: the output within relative error `out_tol`, each
    /// gradient (named by `names`, in order) within `grad_tol`; `case` names the case in messages.
    pub fn assert_matches(
        &self,
        reference: &OpRun,
        names: &[&str],
        [out_tol, grad_tol]: [f64; 2],
        case: &str,
    ) {
        let err = rel_err(&self.out, &reference.out);
        assert!(err < out_tol, "{case} output error {err:e}");
        assert_eq!(
            self.grads.len(),
            names.len(),
            "{case}: one name per gradient"
        );
        for (name, (f, r)) in names.iter().zip(self.grads.iter().zip(&reference.grads)) {
            let err = rel_err(f, r);
            assert!(err < grad_tol, "{case} d{name} error {err:e}");
        }
    }
}

/// Runs every other test of the calling test binary again with the kernels capped at AVX2 and
/// at scalar code (one child process per level below the CPU's, as the level is fixed per
/// process): the narrower paths, which machines without AVX-512 run, stay tested on machines
/// that have it. `this_test` is the name of the calling test, which the children skip.
pub fn assert_narrower_simd_levels_pass(this_test: &str) {
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
            .args(["--quiet", "--skip", this_test])
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
