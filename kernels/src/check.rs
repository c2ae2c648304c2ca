//! What the kernel and model checks share: deterministic random data, the relative error they
//! compare with, the tolerance each comparison is entitled to on a device, and the outcome of one
//! named check — which the tests assert and `zamba-train selftest` reports.

use std::fmt;

use burn::tensor::{DType, Device};

/// SplitMix64: a fixed stream of numbers per seed, the same on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }

    /// Uniform in `[lo, hi)`, from 24 random bits.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform(1e-7, 1.0);
        let u2 = self.uniform(0.0, 1.0);
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }

    /// `n` uniform values in `[lo, hi)`.
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// `max_i |got_i - want_i| / max(max_i |want_i|, 1e-30)`: the error relative to the oracle's
/// largest value, so that tiny entries near zero do not dominate.
///
/// # Panics
/// If the lengths differ.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "compared vectors differ in length");
    let diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    let scale = want.iter().map(|v| (*v as f64).abs()).fold(0.0, f64::max);
    match diff.is_nan() || got.iter().any(|v| v.is_nan()) {
        true => f64::NAN,
        false => diff / scale.max(1e-30),
    }
}

/// The arithmetic a device's matrix products use for a float type. The tolerance of a comparison
/// that involves products follows from it (see [`Arithmetic::tolerance`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arithmetic {
    /// f32 operands and sums (the CPU backends).
    F32,
    /// f32 operands rounded to TF32's 10 mantissa bits, f32 sums: what tensor cores do with f32
    /// inputs (CUDA).
    Tf32,
    /// bf16 operands (7 mantissa bits), f32 sums.
    Bf16,
}

impl Arithmetic {
    /// The products of `dtype` operands on `device`.
    pub fn of(device: &Device, dtype: DType) -> Self {
        match dtype {
            DType::BF16 | DType::F16 => Self::Bf16,
            _ if is_cuda(device) => Self::Tf32,
            _ => Self::F32,
        }
    }

    /// The unit roundoff of the operands: 2^-24 (f32), 2^-11 (TF32), 2^-8 (bf16).
    pub fn unit_roundoff(self) -> f64 {
        match self {
            Self::F32 => 2f64.powi(-24),
            Self::Tf32 => 2f64.powi(-11),
            Self::Bf16 => 2f64.powi(-8),
        }
    }

    /// A comparison's relative tolerance under this arithmetic, from the one it needs where
    /// everything is f32 (`f32`: summation order, the kernels' `exp` approximations) and the one
    /// it needs with bf16 operands (`bf16`). Errors of a chain of products grow with the
    /// operands' unit roundoff, and TF32 rounds 2^3 = 8 times finer than bf16 (2^-11 vs 2^-8):
    /// TF32 is allowed an eighth of bf16's tolerance, never less than f32's.
    pub fn tolerance(self, f32: f64, bf16: f64) -> f64 {
        match self {
            Self::F32 => f32,
            Self::Tf32 => (bf16 * Self::Tf32.unit_roundoff() / Self::Bf16.unit_roundoff()).max(f32),
            Self::Bf16 => bf16,
        }
    }
}

impl fmt::Display for Arithmetic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Tf32 => "tf32",
            Self::Bf16 => "bf16",
        })
    }
}

#[cfg(feature = "cuda")]
fn is_cuda(device: &Device) -> bool {
    let device = device.clone().inner();
    Device::enumerate(burn::tensor::DeviceType::Cuda)
        .into_vec()
        .contains(&device)
}

#[cfg(not(feature = "cuda"))]
fn is_cuda(_: &Device) -> bool {
    false
}

/// The outcome of one named check: what was compared and how close it came, or why it failed.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    /// `Ok(detail)` or `Err(reason)`.
    pub outcome: Result<String, String>,
}

impl Check {
    pub fn passed(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            outcome: Ok(detail.into()),
        }
    }

    pub fn failed(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            outcome: Err(reason.into()),
        }
    }

    pub fn is_passed(&self) -> bool {
        self.outcome.is_ok()
    }

    /// Runs `body`, which returns the detail of a pass or the reason of a failure; a panic inside
    /// (a kernel's assertion, a device error) is a failure too, with its message.
    pub fn run(name: impl Into<String>, body: impl FnOnce() -> Result<String, String>) -> Self {
        let name = name.into();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body))
            .unwrap_or_else(|panic| Err(format!("panicked: {}", panic_message(&panic))));
        Self { name, outcome }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Ok(detail) => write!(f, "ok      {}: {detail}", self.name),
            Err(reason) => write!(f, "FAILED  {}: {reason}", self.name),
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// The comparisons of one check, collected so that the check reports its worst one: each is
/// `what`, its relative error and the tolerance it is allowed.
#[derive(Default)]
pub struct Comparisons {
    worst: Option<(String, f64, f64)>,
    failures: Vec<String>,
}

impl Comparisons {
    pub fn new() -> Self {
        Self::default()
    }

    /// Compares `got` with the oracle `want` within the relative `tolerance`.
    pub fn close(&mut self, what: impl Into<String>, got: &[f32], want: &[f32], tolerance: f64) {
        let what = what.into();
        let err = rel_err(got, want);
        if err.is_nan() || err > tolerance {
            self.failures.push(format!(
                "{what}: relative error {err:.3e} > {tolerance:.1e}"
            ));
        }
        let ratio = err / tolerance;
        let worse = match &self.worst {
            None => true,
            Some((_, e, t)) => ratio.is_nan() || ratio > e / t,
        };
        if worse {
            self.worst = Some((what, err, tolerance));
        }
    }

    /// Compares each gradient `got[i]` of input `names[i]` with `want[i]`; a gradient missing on
    /// either side is a failure.
    pub fn close_grads(
        &mut self,
        what: &str,
        names: &[&str],
        got: &[Option<Vec<f32>>],
        want: &[Option<Vec<f32>>],
        tolerance: f64,
    ) {
        for (name, (got, want)) in names.iter().zip(got.iter().zip(want)) {
            match (got, want) {
                (Some(got), Some(want)) => {
                    self.close(format!("{what} d{name}"), got, want, tolerance)
                }
                _ => self.require(false, || format!("{what}: no gradient of {name}")),
            }
        }
    }

    /// Requires `ok`, else records `failure`.
    pub fn require(&mut self, ok: bool, failure: impl FnOnce() -> String) {
        if !ok {
            self.failures.push(failure());
        }
    }

    /// The check's result: the failures, or the comparison that came closest to its tolerance.
    pub fn outcome(self) -> Result<String, String> {
        const SHOWN: usize = 5;
        if !self.failures.is_empty() {
            let more = self.failures.len().saturating_sub(SHOWN);
            let mut text = self.failures[..self.failures.len().min(SHOWN)].join("; ");
            if more > 0 {
                text += &format!("; and {more} more");
            }
            return Err(text);
        }
        Ok(match self.worst {
            Some((what, err, tol)) => format!("worst {what}: {err:.2e} (tolerance {tol:.0e})"),
            None => "as required".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_is_against_the_largest_oracle_value() {
        assert_eq!(rel_err(&[1.0, 2.5], &[1.0, 2.0]), 0.25);
        assert_eq!(rel_err(&[0.0], &[0.0]), 0.0);
        assert!(rel_err(&[f32::NAN], &[1.0]).is_nan());
    }

    #[test]
    fn tolerances_follow_the_operands_roundoff() {
        assert_eq!(Arithmetic::F32.tolerance(1e-4, 0.1), 1e-4);
        assert_eq!(Arithmetic::Tf32.tolerance(1e-4, 0.1), 0.1 / 8.0);
        assert_eq!(Arithmetic::Tf32.tolerance(1e-4, 4e-4), 1e-4);
        assert_eq!(Arithmetic::Bf16.tolerance(1e-4, 0.1), 0.1);
        assert_eq!(Arithmetic::of(&Device::flex(), DType::F32), Arithmetic::F32);
        assert_eq!(
            Arithmetic::of(&Device::flex(), DType::BF16),
            Arithmetic::Bf16
        );
    }

    #[test]
    fn comparisons_report_failures_and_the_worst_pass() {
        let mut c = Comparisons::new();
        c.close("a", &[1.0], &[1.0], 1e-5);
        c.close("b", &[1.001], &[1.0], 1e-2);
        assert!(c.outcome().unwrap().starts_with("worst b: 1.00e-3"));
        let mut c = Comparisons::new();
        c.close("nan", &[f32::NAN], &[1.0], 1e-5);
        c.require(false, || "dtype".into());
        let e = c.outcome().unwrap_err();
        assert!(
            e.contains("nan: relative error NaN") && e.contains("dtype"),
            "{e}"
        );
    }

    #[test]
    fn a_panicking_check_fails_with_its_message() {
        let c = Check::run("boom", || panic!("kernel said no"));
        assert_eq!(c.outcome.unwrap_err(), "panicked: kernel said no");
        assert!(Check::run("fine", || Ok("1e-6".into())).is_passed());
    }
}
