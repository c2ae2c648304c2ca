//! The cross-entropy on a device against its tensor-op definition on the CPU in f32
//! ([`cross_entropy_reference`] on Flex: Burn's `log_softmax`, `gather` and masked mean): the
//! loss and the gradient of the logits.
//!
//! The kernel's statistics and loss are f32 on every device, so f32 logits get an f32
//! tolerance; bf16 logits are rounded on the way in, their gradient once on the way out.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::check::{Arithmetic, Check, Comparisons, Rng};
use crate::{IGNORE_INDEX, cross_entropy, cross_entropy_reference};

/// Which rows of a case have their target ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    None,
    /// Every fourth row, from row 2.
    Some,
    All,
}

/// `(rows, vocab, ignored)`: vocabularies that are no multiple of any unit count or vector
/// width (below, between and above a GPU cube's 256 units), one row, rows with every target
/// ignored.
pub fn odd_sizes() -> Vec<(usize, usize, Ignored)> {
    vec![
        (7, 33, Ignored::Some),
        (3, 4099, Ignored::Some),
        (1, 33, Ignored::None),
        (1, 4099, Ignored::None),
        (5, 257, Ignored::All),
        (37, 3, Ignored::Some),
    ]
}

/// Random logits and targets of one call; the loss is multiplied by `scale` before the
/// backward, so that the gradient of the loss is not 1.
#[derive(Clone, Debug)]
pub struct CrossEntropyCase {
    pub rows: usize,
    pub vocab: usize,
    pub logits: Vec<f32>,
    pub targets: Vec<i64>,
    pub scale: f32,
    /// The op gets the gradient's leaf itself (its buffer shared), not a product of it that only
    /// the op holds (whose buffer the backward may overwrite with the gradient).
    pub shared_logits: bool,
}

impl CrossEntropyCase {
    /// Logits uniform in `[offset − 6, offset + 6)` (a large `offset` overflows `exp` unless the
    /// maximum is taken out first).
    pub fn new(rows: usize, vocab: usize, ignored: Ignored, offset: f32, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let logits = rng.vec(rows * vocab, offset - 6.0, offset + 6.0);
        let targets = (0..rows)
            .map(|r| match (ignored, r % 4) {
                (Ignored::All, _) | (Ignored::Some, 2) => IGNORE_INDEX,
                _ => (rng.next_u64() % vocab as u64) as i64,
            })
            .collect();
        Self {
            rows,
            vocab,
            logits,
            targets,
            scale: 1.5,
            shared_logits: false,
        }
    }

    /// Rounds the logits to bf16-representable values.
    pub fn rounded_to_bf16(mut self) -> Self {
        super::round_to_bf16([&mut self.logits]);
        self
    }

    /// The loss and the gradient of the logits of `scale · cross_entropy(logits, targets)` with
    /// the fused op on the autodiff version of `device` with logits in `dtype`, or with its
    /// reference; the loss is checked to come back in f32, the gradient in `dtype`.
    pub fn run(
        &self,
        device: &Device,
        dtype: DType,
        reference: bool,
    ) -> Result<CrossEntropyRun, String> {
        let device = device.clone().autodiff();
        let shape = [self.rows, self.vocab];
        let logits = Tensor::<2>::from_data(TensorData::new(self.logits.clone(), shape), &device)
            .cast(dtype)
            .require_grad();
        let targets = Tensor::<1, Int>::from_data(
            TensorData::new(self.targets.clone(), [self.rows]),
            &device,
        );
        let input = match self.shared_logits {
            true => logits.clone(),
            false => logits.clone() * 1.0,
        };
        let loss = match reference {
            false => cross_entropy(input, targets),
            true => cross_entropy_reference(input, targets),
        };
        if loss.dtype() != DType::F32 {
            return Err(format!("loss in {:?}, expected F32", loss.dtype()));
        }
        let grads = (loss.clone() * self.scale as f64).sum().backward();
        let grad = logits.grad(&grads).ok_or("no gradient of the logits")?;
        if grad.dtype() != dtype {
            return Err(format!(
                "d logits in {:?}, expected {dtype:?}",
                grad.dtype()
            ));
        }
        Ok(CrossEntropyRun {
            loss: f32_values(loss),
            grad: f32_values(grad),
        })
    }
}

fn f32_values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 values")
}

/// The loss (one value) and the gradient of the logits of one [`CrossEntropyCase::run`].
#[derive(Clone, Debug, PartialEq)]
pub struct CrossEntropyRun {
    pub loss: Vec<f32>,
    pub grad: Vec<f32>,
}

impl CrossEntropyRun {
    fn compare(&self, what: &str, want: &Self, tol: f64, c: &mut Comparisons) {
        c.close(format!("{what} loss"), &self.loss, &want.loss, tol);
        c.close(format!("{what} d logits"), &self.grad, &want.grad, tol);
    }
}

/// f32 against the reference: both sides f32 throughout; they differ in the order of the sums
/// (an online `(max, Σ exp)` in a tree against a max then a sum) and in `exp`.
const F32_TOLERANCE: f64 = 1e-5;

/// bf16 logits against the reference in f32 on the same bf16-representable values: the loss
/// and the gradient are rounded to bf16 once (2^-9 of the largest value).
const BF16_TOLERANCE: f64 = 8e-3;

/// Every cross-entropy check on `device`.
pub fn cross_entropy_checks(device: &Device) -> Vec<Check> {
    let mut checks = vec![vs_reference(device)];
    // Flex has no bf16 kernel: its bf16 op is its f32 one on the cast logits.
    if *device != Device::flex() && device.supports_dtype(DType::BF16) {
        checks.push(bf16_vs_reference(device));
    }
    checks.push(deterministic(device));
    checks.push(all_ignored_is_zero(device));
    checks
}

fn tolerance(device: &Device, dtype: DType) -> f64 {
    Arithmetic::of(device, dtype).tolerance(F32_TOLERANCE, BF16_TOLERANCE)
}

fn vs_reference(device: &Device) -> Check {
    Check::run("cross-entropy f32 vs the reference, odd sizes", || {
        let mut c = Comparisons::new();
        for (k, (rows, vocab, ignored)) in odd_sizes().into_iter().enumerate() {
            for offset in [0.0, 90.0] {
                let case = CrossEntropyCase::new(rows, vocab, ignored, offset, 300 + k as u64);
                let want = case.run(&Device::flex(), DType::F32, true)?;
                let got = case.run(device, DType::F32, false)?;
                let what = format!("{rows}x{vocab} {ignored:?} ignored, logits ~{offset}");
                got.compare(&what, &want, tolerance(device, DType::F32), &mut c);
            }
        }
        c.outcome()
    })
}

fn bf16_vs_reference(device: &Device) -> Check {
    Check::run("cross-entropy bf16 vs the reference in f32", || {
        let mut c = Comparisons::new();
        for (rows, vocab) in [(9, 4099), (6, 33)] {
            let case = CrossEntropyCase::new(rows, vocab, Ignored::Some, 0.0, 41).rounded_to_bf16();
            let want = case.run(&Device::flex(), DType::F32, true)?;
            let got = case.run(device, DType::BF16, false)?;
            let what = format!("{rows}x{vocab}");
            got.compare(&what, &want, tolerance(device, DType::BF16), &mut c);
        }
        c.outcome()
    })
}

/// Two runs agree bit for bit, in f32 and (where supported) bf16, and with the logits' buffer
/// shared (the gradient written elsewhere) or not (written over it).
fn deterministic(device: &Device) -> Check {
    Check::run(
        "cross-entropy deterministic bit for bit, in place or not",
        || {
            let case = CrossEntropyCase::new(300, 1031, Ignored::Some, 0.0, 17);
            let shared = CrossEntropyCase {
                shared_logits: true,
                ..case.clone()
            };
            let mut dtypes = vec![DType::F32];
            if *device != Device::flex() && device.supports_dtype(DType::BF16) {
                dtypes.push(DType::BF16);
            }
            for dtype in dtypes {
                let first = case.run(device, dtype, false)?;
                if case.run(device, dtype, false)? != first {
                    return Err(format!("two {dtype:?} runs on the same inputs differ"));
                }
                if shared.run(device, dtype, false)? != first {
                    return Err(format!("{dtype:?}: shared logits give another result"));
                }
            }
            Ok("two runs identical, shared logits too".into())
        },
    )
}

/// Every target ignored: exactly 0 and a zero gradient (not NaN, as a mean over no rows).
fn all_ignored_is_zero(device: &Device) -> Check {
    Check::run("cross-entropy of every target ignored", || {
        let case = CrossEntropyCase::new(4, 33, Ignored::All, 0.0, 5);
        let run = case.run(device, DType::F32, false)?;
        match run.loss == [0.0] && run.grad.iter().all(|&g| g == 0.0) {
            true => Ok("loss 0, gradient 0".into()),
            false => Err(format!(
                "loss {:?}, largest |gradient| {}",
                run.loss,
                run.grad.iter().fold(0f32, |m, g| m.max(g.abs()))
            )),
        }
    })
}
