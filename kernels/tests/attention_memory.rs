//! Causal attention's device memory on the CubeCL CPU runtime (`--features cube-cpu`) grows
//! linearly with the sequence length: the fused op keeps the output and one statistic per query
//! row for the backward, and its backward works tile by tile, never on an `L × L` matrix. (The
//! composition of products and a softmax it replaced keeps `[B, H, L, L]` scores and
//! probabilities: 16 times the memory at 4 times the length.) Its own test binary: the device's
//! memory counters are per process.
#![cfg(feature = "cube-cpu")]

use burn::tensor::{Device, Distribution, Tensor};
use zamba_kernels::causal_attention;

/// What one forward and backward of the op took on the device.
#[derive(Debug)]
struct StepMemory {
    /// Bytes allocated by the forward and alive until the backward: the output and what the op
    /// keeps for its backward.
    kept: u64,
    /// The device's reserved bytes after the step, which started from a cleaned-up pool: the
    /// allocator keeps the pages a step needed at its peak until the next cleanup.
    reserved: u64,
}

fn step_memory(len: usize) -> StepMemory {
    let device = Device::cpu().autodiff();
    device.memory_cleanup();
    let usage = || {
        device
            .memory_pool_usage()
            .expect("a CubeCL device reports its pools")
    };
    let [batch, heads, kv_heads, head_dim] = [1, 4, 2, 8];
    let random = |heads| {
        let shape = [batch, len, heads, head_dim];
        Tensor::<4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device)
    };
    let (q, k, v) = (random(heads), random(kv_heads), random(kv_heads));
    let [q, k, v] = [q, k, v].map(|t| t.require_grad());
    let w = random(heads);
    let before = usage().bytes_in_use;
    let out = causal_attention(q.clone(), k.clone(), v.clone(), 0.35);
    let kept = usage().bytes_in_use - before;
    let grads = (out * w).sum().backward();
    for x in [&q, &k, &v] {
        assert!(x.grad(&grads).is_some(), "a gradient of every input");
    }
    StepMemory {
        kept,
        reserved: usage().bytes_reserved,
    }
}

#[test]
fn attention_memory_grows_linearly_with_the_sequence_length() {
    let (short, long) = (512, 2048);
    let (at_short, at_long) = (step_memory(short), step_memory(long));
    println!("L {short}: {at_short:?}\nL {long}: {at_long:?}");
    // Four times the length: four times the memory (4.5 for what does not scale), where the
    // L × L scores take sixteen.
    let growth = |at_long: u64, at_short: u64| at_long as f64 / at_short as f64;
    let kept = growth(at_long.kept, at_short.kept);
    let reserved = growth(at_long.reserved, at_short.reserved);
    assert!(
        kept <= 4.5,
        "kept for the backward grew {kept:.1}x: {at_short:?} → {at_long:?}"
    );
    assert!(
        reserved <= 4.5,
        "the step's reserved memory grew {reserved:.1}x: {at_short:?} → {at_long:?}"
    );
}
