//! Activation memory of one training micro-batch, estimated from the config alone: the tensors
//! autodiff keeps for the backward as `model.rs` computes the forward, so a run can be sized
//! (e.g. Zamba-7B at seq 4096 on one GPU) before it is queued.
//!
//! Counted: every tensor an op saves for its backward (views share their base tensor, which is
//! counted once), in the compute type or f32 as the forward makes them (see [`Precision`]); plus,
//! as `transient`, the largest working set of the backward: one block's activations and their
//! gradients while it is differentiated (recomputed first with `"layers"`), and the attention's
//! working set, which depends on its kernel ([`AttentionKernel`]: `L × L` scores, or one
//! statistic per row). Not counted: allocator slack, the parameters, their gradients and AdamW
//! state (16 bytes per parameter, reported separately).

use crate::config::ZambaConfig;
use crate::exec::{ActivationCheckpointing, Precision};

/// What the attention op keeps for its backward, which depends on the device's backend (see
/// `zamba_kernels::causal_attention`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `[B, H, L, L]` probabilities, kept from the forward and worked on in the backward: the
    /// fused op on the CPU (Flex), Burn's attention on other backends.
    Scores,
    /// The flash-style op of CubeCL devices (CUDA, `cube-cpu`): one f32 log-sum-exp per query row
    /// kept, and one more statistic per row in the backward; nothing of size `L × L`.
    Flash,
}

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
        attention: AttentionKernel,
    ) -> Self {
        let blocks = BlockBytes::of(c, micro_batch, seq_len, precision, attention);
        let layers = c.num_hidden_layers as f64;
        let uses = c.hybrid_layers().len() as f64;
        let largest_block = blocks.mamba.max(blocks.shared + blocks.attention_work);
        match checkpointing {
            ActivationCheckpointing::None => Self {
                kept: layers * blocks.mamba + uses * blocks.shared + blocks.head,
                transient: blocks.attention_work + blocks.residual,
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
    /// The attention's working set in its backward beyond its inputs, output and their gradients.
    attention_work: f64,
    /// Final norm, tied head, log-softmax.
    head: f64,
}

impl BlockBytes {
    fn of(
        c: &ZambaConfig,
        micro_batch: usize,
        seq_len: usize,
        precision: Precision,
        attention: AttentionKernel,
    ) -> Self {
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
        // One f32 statistic per (batch, head, query row); the score matrices, two of them.
        let rows = f * micro_batch as f64 * c.num_attention_heads as f64 * seq_len as f64;
        let (attention_kept, attention_work) = match attention {
            AttentionKernel::Scores => (0.0, 2.0 * rows * seq_len as f64),
            AttentionKernel::Flash => (rows, rows),
        };
        // Norm of [x, x0]; q, k, v and the attention output (and what the attention keeps);
        // o_proj's output in f32 and its norm; gate, gelu(gate), up and their product; the MLP
        // output kept by the projection.
        let shared = norm(a)
            + cast * tokens * a
            + 4.0 * e * tokens * a
            + attention_kept
            + norm(d)
            + cast * tokens * d
            + 4.0 * e * tokens * i
            + e * tokens * d;
        // Final norm, the head's input cast, the logits, their f32 copy and log-softmax.
        let head = norm(d) + cast * tokens * d + e * tokens * v + 2.0 * f * tokens * v;
        Self {
            residual: f * tokens * d,
            mamba,
            shared,
            attention_work,
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
        let at = |p, k| ActivationMemory::of(&c, 1, 4096, p, k, AttentionKernel::Flash).peak();
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
        let kept =
            |k| ActivationMemory::of(&c, 1, 4096, Precision::Bf16, k, AttentionKernel::Flash).kept;
        let residual = 4.0 * 4096.0 * 3712.0;
        let head_only = kept(ActivationCheckpointing::Layers) - (76.0 + 13.0 + 1.0) * residual;
        assert!(head_only > 0.0 && head_only < kept(ActivationCheckpointing::None) / 20.0);
    }

    #[test]
    fn flash_attention_keeps_the_estimate_linear_in_the_sequence_length() {
        let c = ZambaConfig::preset("zamba-7b").unwrap();
        for k in [
            ActivationCheckpointing::None,
            ActivationCheckpointing::Layers,
        ] {
            let at = |len, a| ActivationMemory::of(&c, 1, len, Precision::Bf16, k, a).peak();
            let flash = at(8192, AttentionKernel::Flash) / at(4096, AttentionKernel::Flash);
            assert!((flash - 2.0).abs() < 1e-12, "{k:?}: {flash}");
            let scores = at(8192, AttentionKernel::Scores) / at(4096, AttentionKernel::Scores);
            assert!(scores > 2.05, "{k:?}: {scores}");
        }
        // Without recomputation the scores are two f32 [B, H, L, L] matrices in the backward;
        // flash attention keeps one f32 per (head, row) for each use of the shared block and
        // works on one more.
        let at = |a| {
            let none = ActivationCheckpointing::None;
            ActivationMemory::of(&c, 1, 4096, Precision::Bf16, none, a).peak()
        };
        let rows = 4.0 * c.num_attention_heads as f64 * 4096.0;
        let uses = c.hybrid_layers().len() as f64;
        let saved = at(AttentionKernel::Scores) - at(AttentionKernel::Flash);
        let want = rows * (2.0 * 4096.0 - uses - 1.0);
        assert!((saved - want).abs() < 1.0, "{saved} vs {want}");
    }
}
