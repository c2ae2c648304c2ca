//! Parameter and FLOP counts computed from the config alone (no weights allocated), so that
//! `zamba-train params --preset zamba-7b` works on any machine.

use crate::config::ZambaConfig;

/// Parameter counts by component. The shared block is counted once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    /// `embed_tokens` (also the tied output head).
    pub embedding: u64,
    /// All Mamba mixers (in_proj, conv, x_proj, dt_proj, A_log, D, out_proj).
    pub mamba: u64,
    /// The pre-Mamba RMSNorms of every layer and the final norm.
    pub norms: u64,
    /// The one shared attention + MLP block (with its two norms).
    pub shared_block: u64,
    /// The per-hybrid-layer projections of the shared block's output.
    pub hybrid_linears: u64,
}

impl ParamCounts {
    pub fn of(c: &ZambaConfig) -> Self {
        let (d, di, h, p, n, r, k) = (
            c.hidden_size as u64,
            c.d_inner() as u64,
            c.n_mamba_heads as u64,
            c.mamba_head_dim() as u64,
            c.mamba_d_state as u64,
            c.dt_rank() as u64,
            c.mamba_d_conv as u64,
        );
        let layers = c.num_hidden_layers as u64;
        let hybrid = c.hybrid_layers().len() as u64;
        let per_mamba =
            2 * di * d + di * k + di + h * (r + 2 * n) * p + h * p * r + di + di * n + di + di * d;
        let a = c.attention_hidden_size() as u64;
        let kv = (c.num_key_value_heads * c.attention_head_dim()) as u64;
        let i = c.intermediate_size as u64;
        let shared = a + a * a + 2 * a * kv + a * d + d + 3 * d * i;
        Self {
            embedding: c.vocab_size as u64 * d,
            mamba: layers * per_mamba,
            norms: layers * d + d,
            shared_block: shared,
            hybrid_linears: hybrid * d * d,
        }
    }

    pub fn total(&self) -> u64 {
        self.embedding + self.mamba + self.norms + self.shared_block + self.hybrid_linears
    }
}

/// Forward FLOPs per token (a multiply-add counts 2). Training ≈ 3× forward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlopsPerToken {
    /// Dense matmuls: projections, MLP, hybrid linears, the tied head.
    pub matmul: f64,
    /// QKᵀ and AV of the shared attention over a `seq_len` context, without a causal discount
    /// (the PaLM convention used by MFU figures).
    pub attention: f64,
    /// The selective scan and depthwise conv (elementwise work).
    pub scan: f64,
}

impl FlopsPerToken {
    pub fn of(c: &ZambaConfig, seq_len: usize) -> Self {
        let (d, di, n, r) = (
            c.hidden_size as f64,
            c.d_inner() as f64,
            c.mamba_d_state as f64,
            c.dt_rank() as f64,
        );
        let layers = c.num_hidden_layers as f64;
        let hybrid = c.hybrid_layers().len() as f64;
        let a = c.attention_hidden_size() as f64;
        let kv = (c.num_key_value_heads * c.attention_head_dim()) as f64;
        let i = c.intermediate_size as f64;
        let mamba = 2.0 * (2.0 * di * d + di * (r + 2.0 * n) + di * r + di * d);
        let shared = 2.0 * (a * a + 2.0 * a * kv + a * d + 3.0 * d * i);
        let matmul =
            layers * mamba + hybrid * (shared + 2.0 * d * d) + 2.0 * d * c.vocab_size as f64;
        let attention = hybrid * 2.0 * 2.0 * seq_len as f64 * a;
        let scan = layers * (scan_flops_per_token(c) + conv_flops_per_token(c));
        Self {
            matmul,
            attention,
            scan,
        }
    }

    pub fn forward(&self) -> f64 {
        self.matmul + self.attention + self.scan
    }

    pub fn train(&self) -> f64 {
        3.0 * self.forward()
    }
}

/// Forward FLOPs per token of one layer's selective scan: per channel and state, `exp`, two
/// multiply-adds for the state and one for the output ≈ 9 (the count the training-anchors note
/// uses; `zamba_kernels::scan_flops` counts the kernels as written instead).
pub fn scan_flops_per_token(c: &ZambaConfig) -> f64 {
    9.0 * c.d_inner() as f64 * c.mamba_d_state as f64
}

/// Forward FLOPs per token of one layer's depthwise causal conv: a multiply-add per channel and tap.
pub fn conv_flops_per_token(c: &ZambaConfig) -> f64 {
    2.0 * c.d_inner() as f64 * c.mamba_d_conv as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zamba_7b_has_the_published_parameter_count() {
        let counts = ParamCounts::of(&ZambaConfig::preset("zamba-7b").unwrap());
        assert_eq!(counts.total(), 7_232_490_496);
        assert_eq!(counts.embedding, 32000 * 3712);
        assert_eq!(counts.hybrid_linears, 13 * 3712 * 3712);
    }

    #[test]
    fn seven_b_forward_flops_are_about_twice_the_non_embedding_params() {
        let c = ZambaConfig::preset("zamba-7b").unwrap();
        let f = FlopsPerToken::of(&c, 4096);
        let counts = ParamCounts::of(&c);
        // Each matmul weight is used once per token, except the shared block (13 uses) and the
        // tied head; embeddings are a lookup.
        let dense =
            counts.mamba + counts.hybrid_linears + 13 * counts.shared_block + counts.embedding;
        let ratio = f.matmul / (2.0 * dense as f64);
        assert!((ratio - 1.0).abs() < 0.01, "ratio {ratio}");
    }
}
