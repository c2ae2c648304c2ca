//! The trainer on Burn's CubeCL CPU runtime (`--features cube-cpu`: the GPU kernels, compiled by
//! LLVM for the CPU), as a user runs it: the first steps of the tiny model in bf16 mixed precision
//! follow the fp32 run's loss curve on the same device (the bf16 path gave a NaN gradient norm at
//! step 0 when a dtype mix read bf16 buffers as f32).
#![cfg(feature = "cube-cpu")]

mod common;

use common::{SCHEDULE, options, step_losses, write_config};
use zamba_train::train::train;

/// Enough steps for fp32 to learn visibly; each costs seconds on this runtime.
const STEPS: usize = 6;

fn losses(dir: &std::path::Path, name: &str, precision: &str) -> Vec<f64> {
    let extra = format!(
        "{SCHEDULE}\n[train]\nsteps = {STEPS}\n[runtime]\ndevice = \"cube-cpu\"\nprecision = \"{precision}\"\n"
    );
    let config = write_config(dir, name, &extra);
    let mut opts = options(config);
    // Evaluation and checkpoints add nothing to this comparison; one micro-batch of 2 × 64 tokens
    // per step, as the runtime's cost is per kernel launch, not per token.
    opts.overrides = [
        "eval.every=0",
        "checkpoint.every=0",
        "batch.sequences=2",
        "batch.micro_batch=2",
    ]
    .map(String::from)
    .to_vec();
    train(&opts).unwrap_or_else(|e| panic!("{precision} run: {e:#}"));
    step_losses(&dir.join(name))
        .into_iter()
        .map(|(step, bits)| {
            let bits = bits.unwrap_or_else(|| panic!("{precision}: step {step} has no loss"));
            f64::from_bits(bits)
        })
        .collect()
}

#[test]
fn bf16_training_follows_the_fp32_loss_curve() {
    let dir = tempfile::tempdir().unwrap();
    let fp32 = losses(dir.path(), "fp32", "fp32");
    let bf16 = losses(dir.path(), "bf16", "bf16");
    assert_eq!(fp32.len(), STEPS);
    assert_eq!(bf16.len(), STEPS);
    assert!(
        fp32[STEPS - 1] < fp32[0] - 0.2,
        "fp32 must learn over {STEPS} steps: {fp32:?}"
    );
    // bf16 rounds every product's operands to 8 significant bits: within 3% of fp32's loss at
    // every step (the curves start equal and drift apart by the updates' rounding).
    for (step, (b, f)) in bf16.iter().zip(&fp32).enumerate() {
        assert!(
            b.is_finite() && (b - f).abs() <= 0.03 * f,
            "step {step}: bf16 loss {b} vs fp32 {f}\nbf16 {bf16:?}\nfp32 {fp32:?}"
        );
    }
    assert_ne!(bf16, fp32, "bf16 must actually round");
}
