//! Activation memory of one training micro-batch, estimated from the config alone: the tensors
//! autodiff keeps for the backward as `model.rs` computes the forward, so a run can be sized
//! (e.g. Zamba-7B at seq 4096 on one GPU) before it is queued.
//!
//! Counted: every tensor an op saves for its backward (views share their base tensor, which is
//! counted once), in the compute type or f32 as the forward makes them (see [`Precision`]); plus,
//! as `transient`, the largest working set of the backward: one block's activations and their
//! gradients while it is differentiated (recomputed first with `"layers"`), and the attention's
//! `L × L` scores. Not counted: allocator slack, the parameters, their gradients and AdamW state
//! (16 bytes per parameter, reported separately).

use crate::config::ZambaConfig;
use crate::exec::{ActivationCheckpointing, Precision};

/// Estimated bytes of one micro-batch's activations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActivationMemory {
    /// Kept from the forward until the backward reaches them.
    pub kept: f64,
    /// The backward's largest extra working set.
    pub transient: f64,
}

impl ActivationMemory {
    pub fn of(
        c: &ZambaConfig,
        micro_batch: usize,
        seq_len: usize,
        precision: Precision,
        checkpointing: ActivationCheckpointing,
    ) -> Self {
        let blocks = BlockBytes::of(c, micro_batch, seq_len, precision);
        let layers = c.num_hidden_layers as f64;
        let uses = c.hybrid_layers().len() as f64;
        let largest_block = blocks.mamba.max(blocks.shared + blocks.attention_scores);
        match checkpointing {
            ActivationCheckpointing::None => Self {
                kept: layers * blocks.mamba + uses * blocks.shared + blocks.head,
                transient: blocks.attention_scores + blocks.residual,
            },
            ActivationCheckpointing::Layers => Self {
                // Each block keeps its input: the residual stream per layer, the shared block's
                // projected output per use, and the embeddings once.
                kept: (layers + uses + 1.0) * blocks.residual + blocks.head,
                // The block being differentiated: its recomputed activations and their gradients.
                transient: 2.0 * largest_block,
            },
        }
    }

    pub fn peak(&self) -> f64 {
        self.kept + self.transient
    }
}

/// Bytes kept by one block of each kind (see the module docs).
struct BlockBytes {
    /// One `[B, L, d]` f32 tensor: the residual stream.
    residual: f64,
    mamba: f64,
    /// One use of the shared block, with its per-use projection.
    shared: f64,
    /// The attention's score matrices in its backward.
    attention_scores: f64,
    /// Final norm, tied head, log-softmax.
    head: f64,
}

impl BlockBytes {
    fn of(c: &ZambaConfig, micro_batch: usize, seq_len: usize, precision: Precision) -> Self {
        let tokens = (micro_batch * seq_len) as f64;
        let (d, di, h, n, r) = (
            c.hidden_size as f64,
            c.d_inner() as f64,
            c.n_mamba_heads as f64,
            c.mamba_d_state as f64,
            c.dt_rank() as f64,
        );
        let (a, i, v) = (
            c.attention_hidden_size() as f64,
            c.intermediate_size as f64,
            c.vocab_size as f64,
        );
        let f = 4.0;
        let (e, cast) = match precision {
            Precision::Fp32 => (4.0, 0.0),
            // A cast to bf16 is a new tensor, kept by the matmul it feeds.
            Precision::Bf16 => (2.0, 2.0),
        };
        // RMSNorm keeps its input and its normalised output (f32).
        let norm = |width: f64| 2.0 * f * tokens * width;
        // in_proj [x|z], the fused conv + SiLU's output, delta, the scan's output; x_proj's
        // [dt; B; C]; the scan's chunk checkpoints (f32, chunks of ≥ 16 steps for N ≤ 16).
        let chunk = (256.0 / n).clamp(16.0, 64.0);
        let mamba = norm(d)
            + cast * tokens * d
            + e * tokens * (5.0 * di + h * (r + 2.0 * n))
            + f * tokens * di * n / chunk;
        // Norm of [x, x0]; q, k, v and the attention output; o_proj's output in f32 and its
        // norm; gate, gelu(gate), up and their product; the MLP output kept by the projection.
        let shared = norm(a)
            + cast * tokens * a
            + 4.0 * e * tokens * a
            + norm(d)
            + cast * tokens * d
            + 4.0 * e * tokens * i
            + e * tokens * d;
        let attention_scores =
            2.0 * f * micro_batch as f64 * c.num_attention_heads as f64 * (seq_len as f64).powi(2);
        // Final norm, the head's input cast, the logits, their f32 copy and log-softmax.
        let head = norm(d) + cast * tokens * d + e * tokens * v + 2.0 * f * tokens * v;
        Self {
            residual: f * tokens * d,
            mamba,
            shared,
            attention_scores,
            head,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recomputation_and_bf16_shrink_the_estimate() {
        let c = ZambaConfig::preset("zamba-7b").unwrap();
        let at = |p, k| ActivationMemory::of(&c, 1, 4096, p, k).peak();
        let full = at(Precision::Fp32, ActivationCheckpointing::None);
        let bf16 = at(Precision::Bf16, ActivationCheckpointing::None);
        let layers = at(Precision::Bf16, ActivationCheckpointing::Layers);
        assert!(bf16 < full && layers < bf16 / 4.0, "{full} {bf16} {layers}");
        // Zamba-7B, seq 4096, micro-batch 1, bf16: ~70 GB of activations without recomputation
        // (an 80 GB GPU also holds the model states), ~14 GB with it.
        assert!((50e9..100e9).contains(&bf16), "{bf16}");
        assert!((8e9..20e9).contains(&layers), "{layers}");
        // Kept with recomputation: one residual-stream tensor per layer, per shared-block use and
        // for the embeddings, plus the head.
        let kept = |k| ActivationMemory::of(&c, 1, 4096, Precision::Bf16, k).kept;
        let residual = 4.0 * 4096.0 * 3712.0;
        let head_only = kept(ActivationCheckpointing::Layers) - (76.0 + 13.0 + 1.0) * residual;
        assert!(head_only > 0.0 && head_only < kept(ActivationCheckpointing::None) / 20.0);
    }
}
