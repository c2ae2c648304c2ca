//! `ZambaConfig`: the same fields, defaults and derived values as transformers' `ZambaConfig`,
//! so a `config.json` of `model_type: "zamba"` deserializes directly.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::ModelError;

/// `mamba_dt_rank` is either an integer or the string `"auto"` (= ceil(hidden_size / 16)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum DtRank {
    Fixed(usize),
    Auto(AutoTag),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AutoTag {
    Auto,
}

/// Kind of a layer in the hybrid schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// transformers 5 writes Mamba layers as "linear_attention".
    #[serde(alias = "linear_attention")]
    Mamba,
    Hybrid,
}

/// Field names and defaults follow transformers' `ZambaConfig` (defaults are Zamba-7B's).
/// Fields that only matter to transformers' generation code (use_cache, num_logits_to_keep,
/// attention_dropout, use_mamba_kernels, rope settings) are accepted and ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct ZambaConfig {
    /// Must be `"zamba"` (Zamba v1; Zamba2 is a different architecture).
    pub model_type: String,
    /// Rows of the token embedding (tied to the LM head); at least the tokenizer's vocabulary.
    pub vocab_size: usize,
    /// The LM head shares the embedding matrix; only `true` is supported.
    pub tie_word_embeddings: bool,
    /// Width of the residual stream (d_model).
    pub hidden_size: usize,
    /// Width of the shared attention block's input `[x, x0]`; must be 2 × `hidden_size` (absent: derived).
    pub attention_hidden_size: Option<usize>,
    /// Hidden width of the shared block's gated MLP.
    pub intermediate_size: usize,
    /// Number of layers (Mamba blocks; the hybrid ones also apply the shared block first).
    pub num_hidden_layers: usize,
    /// Query heads of the shared attention.
    pub num_attention_heads: usize,
    /// Per-head width of the shared attention (absent: 2 × `hidden_size` / `num_attention_heads`).
    pub attention_head_dim: Option<usize>,
    /// Key/value heads of the shared attention (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Heads of each Mamba block's selective scan; `mamba_expand` × `hidden_size` must divide by it.
    pub n_mamba_heads: usize,
    /// Activation of the shared MLP; only `"gelu"` is supported.
    pub hidden_act: String,
    /// Activation of the Mamba blocks; only `"silu"` is supported.
    pub hidden_mamba_act: String,
    /// Standard deviation of the normal initialisation of linear and embedding weights.
    pub initializer_range: f64,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Padding token id (below `vocab_size`); its embedding row is initialised to zero.
    pub pad_token_id: Option<u32>,
    /// Beginning-of-sequence token id (written to config.json for generation).
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id (written to config.json for generation).
    pub eos_token_id: Option<u32>,
    /// Longest sequence transformers' generation code expects (attention has no position embedding).
    pub max_position_embeddings: usize,
    /// Every this many layers after the first three, one is hybrid (with `attn_layer_offset`).
    pub attn_layer_period: usize,
    /// Which layer within each `attn_layer_period` is hybrid.
    pub attn_layer_offset: usize,
    /// State size N of the selective scan.
    pub mamba_d_state: usize,
    /// Width of the Mamba blocks' causal depthwise convolution.
    pub mamba_d_conv: usize,
    /// Mamba inner width = `mamba_expand` × `hidden_size`.
    pub mamba_expand: usize,
    /// Rank of the Δ (time-step) projection: an integer, or `"auto"` = ceil(`hidden_size` / 16).
    pub mamba_dt_rank: DtRank,
    /// Smallest initial time step Δ: each dt bias starts at softplus⁻¹(Δ), Δ log-uniform in [min, max].
    pub time_step_min: f64,
    /// Largest initial time step Δ.
    pub time_step_max: f64,
    /// Initial time steps below this are raised to it.
    pub time_step_floor: f64,
    /// Bias in the Mamba convolution; only `true` is supported.
    pub mamba_conv_bias: bool,
    /// Bias in the Mamba in/out projections; only `false` is supported.
    pub mamba_proj_bias: bool,
    /// Explicit schedule; derived from `attn_layer_period/offset` when absent.
    pub layers_block_type: Option<Vec<LayerKind>>,
}

impl Default for ZambaConfig {
    fn default() -> Self {
        Self {
            model_type: "zamba".into(),
            vocab_size: 32000,
            tie_word_embeddings: true,
            hidden_size: 3712,
            attention_hidden_size: None,
            intermediate_size: 14848,
            num_hidden_layers: 76,
            num_attention_heads: 16,
            attention_head_dim: None,
            num_key_value_heads: 16,
            n_mamba_heads: 2,
            hidden_act: "gelu".into(),
            hidden_mamba_act: "silu".into(),
            initializer_range: 0.02,
            rms_norm_eps: 1e-5,
            pad_token_id: Some(0),
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            max_position_embeddings: 4096,
            attn_layer_period: 6,
            attn_layer_offset: 4,
            mamba_d_state: 16,
            mamba_d_conv: 4,
            mamba_expand: 2,
            mamba_dt_rank: DtRank::Auto(AutoTag::Auto),
            time_step_min: 1e-3,
            time_step_max: 0.1,
            time_step_floor: 1e-4,
            mamba_conv_bias: true,
            mamba_proj_bias: false,
            layers_block_type: None,
        }
    }
}

/// Named presets. `zamba-7b` is Zyphra/Zamba-7B-v1, `zamba-1b` the same architecture at ~1B
/// parameters (the GPU check's model); the others are proxies sized for CPU.
pub const PRESETS: &[&str] = &[
    "zamba-7b",
    "zamba-1b",
    "zamba-tiny",
    "zamba-bench",
    "zamba-7b-shape",
];

impl ZambaConfig {
    /// A named preset (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        let proxy = |hidden: usize, layers: usize, heads: usize, vocab: usize| ZambaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: 4 * hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: heads,
            ..ZambaConfig::default()
        };
        let config = match name {
            "zamba-7b" => ZambaConfig::default(),
            // Zamba-7B's shape scaled to ~1B: hidden 2048, 30 layers (hybrid at 2, 7, 13, 19,
            // 25), 2 Mamba heads, 16 attention heads, MLP 4×, Mistral's 32k vocabulary.
            "zamba-1b" => proxy(2048, 30, 16, 32000),
            // 6 layers, hybrid at 2 and 4 (period 2, offset 1): the smallest model that exercises
            // two uses of the shared block; for tests.
            "zamba-tiny" => ZambaConfig {
                attn_layer_period: 2,
                attn_layer_offset: 1,
                ..proxy(64, 6, 4, 512)
            },
            // The benchmark configuration of docs/performance.md (~8M parameters): 12 layers,
            // hybrid at 2 and 7.
            "zamba-bench" => proxy(256, 12, 8, 4096),
            // Zamba-7B's layout (76 layers, hybrid at 2, 7, 13, …, 73; MLP 4×; 16 attention
            // heads) at hidden 128, the vocabulary scaled with the hidden size (32000 · 128 /
            // 3712): the embedding, the shared block and the layers hold about 7B's shares of the
            // parameters, so the backward finishes the gradients in 7B's proportions — what
            // gradient reduction overlapped with it depends on (`bench model --world --link-gbps`).
            "zamba-7b-shape" => proxy(128, 76, 16, 1104),
            other => {
                return Err(ModelError::Config(format!(
                    "unknown model preset {other:?}; known presets: {}",
                    PRESETS.join(", ")
                )));
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates a transformers `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::io(path, "could not read the model config", e))?;
        let config: ZambaConfig = serde_json::from_str(&text).map_err(|e| {
            ModelError::Config(format!(
                "{}: not a valid Zamba config.json: {e}",
                path.display()
            ))
        })?;
        config
            .validate()
            .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    pub fn d_inner(&self) -> usize {
        self.mamba_expand * self.hidden_size
    }

    pub fn mamba_head_dim(&self) -> usize {
        self.d_inner() / self.n_mamba_heads
    }

    pub fn dt_rank(&self) -> usize {
        match self.mamba_dt_rank {
            DtRank::Fixed(r) => r,
            DtRank::Auto(_) => self.hidden_size.div_ceil(16),
        }
    }

    pub fn attention_hidden_size(&self) -> usize {
        self.attention_hidden_size.unwrap_or(2 * self.hidden_size)
    }

    pub fn attention_head_dim(&self) -> usize {
        self.attention_head_dim
            .unwrap_or(2 * self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Softmax scale of the shared attention: 1/sqrt(head_dim / 2) (Zamba's quirk).
    pub fn attention_scale(&self) -> f64 {
        (self.attention_head_dim() as f64 / 2.0).powf(-0.5)
    }

    /// The hybrid schedule: `["mamba","mamba","hybrid"] + ["hybrid" if i % period == offset else
    /// "mamba" for i in range(L - 3)]`, unless the config lists it explicitly.
    pub fn layer_kinds(&self) -> Vec<LayerKind> {
        if let Some(kinds) = &self.layers_block_type {
            return kinds.clone();
        }
        let n = self.num_hidden_layers;
        let mut kinds = vec![LayerKind::Mamba, LayerKind::Mamba, LayerKind::Hybrid];
        kinds.extend((0..n.saturating_sub(3)).map(|i| {
            if self.attn_layer_period > 0 && i % self.attn_layer_period == self.attn_layer_offset {
                LayerKind::Hybrid
            } else {
                LayerKind::Mamba
            }
        }));
        kinds.truncate(n);
        kinds
    }

    pub fn hybrid_layers(&self) -> Vec<usize> {
        self.layer_kinds()
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == LayerKind::Hybrid)
            .map(|(i, _)| i)
            .collect()
    }

    /// Checks every constraint the model relies on; the message names the offending field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let err = |msg: String| Err(ModelError::Config(msg));
        if self.model_type != "zamba" {
            return err(format!(
                "model_type is {:?}, expected \"zamba\" (Zamba v1; Zamba2 is a different architecture)",
                self.model_type
            ));
        }
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("n_mamba_heads", self.n_mamba_heads),
            ("mamba_d_state", self.mamba_d_state),
            ("mamba_d_conv", self.mamba_d_conv),
            ("mamba_expand", self.mamba_expand),
            ("dt rank (mamba_dt_rank)", self.dt_rank()),
        ] {
            if value == 0 {
                return err(format!("{name} must be greater than 0"));
            }
        }
        if self.d_inner() % self.n_mamba_heads != 0 {
            return err(format!(
                "d_inner = mamba_expand * hidden_size = {} is not divisible by n_mamba_heads = {}",
                self.d_inner(),
                self.n_mamba_heads
            ));
        }
        let attn = self.attention_hidden_size();
        if attn != 2 * self.hidden_size {
            return err(format!(
                "attention_hidden_size = {attn} must be 2 * hidden_size = {} (the shared block reads [x, x0])",
                2 * self.hidden_size
            ));
        }
        if self.attention_head_dim() * self.num_attention_heads != attn {
            return err(format!(
                "attention_head_dim ({}) * num_attention_heads ({}) must equal attention_hidden_size ({attn})",
                self.attention_head_dim(),
                self.num_attention_heads
            ));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.tie_word_embeddings {
            return err(
                "tie_word_embeddings = false is not supported: Zamba ties lm_head to embed_tokens"
                    .into(),
            );
        }
        if self.hidden_act != "gelu" {
            return err(format!(
                "hidden_act {:?} is not supported (Zamba uses \"gelu\")",
                self.hidden_act
            ));
        }
        if self.hidden_mamba_act != "silu" {
            return err(format!(
                "hidden_mamba_act {:?} is not supported (Zamba uses \"silu\")",
                self.hidden_mamba_act
            ));
        }
        if !(self.rms_norm_eps > 0.0) {
            return err(format!(
                "rms_norm_eps must be > 0, got {}",
                self.rms_norm_eps
            ));
        }
        if !(self.time_step_min > 0.0 && self.time_step_min <= self.time_step_max) {
            return err(format!(
                "time_step_min ({}) must be > 0 and <= time_step_max ({})",
                self.time_step_min, self.time_step_max
            ));
        }
        let kinds = self.layer_kinds();
        if kinds.len() != self.num_hidden_layers {
            return err(format!(
                "layers_block_type has {} entries but num_hidden_layers is {}",
                kinds.len(),
                self.num_hidden_layers
            ));
        }
        if let Some(pad) = self.pad_token_id
            && pad as usize >= self.vocab_size
        {
            return err(format!(
                "pad_token_id {pad} is not below vocab_size {}",
                self.vocab_size
            ));
        }
        if self.mamba_proj_bias {
            return err(
                "mamba_proj_bias = true is not supported (Zamba's in/out projections have no bias)"
                    .into(),
            );
        }
        if !self.mamba_conv_bias {
            return err(
                "mamba_conv_bias = false is not supported (Zamba's conv1d has a bias)".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zamba_7b_schedule_matches_the_paper() {
        let c = ZambaConfig::preset("zamba-7b").unwrap();
        assert_eq!(c.dt_rank(), 232);
        assert_eq!(c.attention_head_dim(), 464);
        assert_eq!(
            c.hybrid_layers(),
            vec![2, 7, 13, 19, 25, 31, 37, 43, 49, 55, 61, 67, 73]
        );
    }

    #[test]
    fn bench_preset_has_two_hybrid_layers() {
        assert_eq!(
            ZambaConfig::preset("zamba-bench").unwrap().hybrid_layers(),
            vec![2, 7]
        );
    }

    #[test]
    fn one_b_preset_is_about_a_billion_parameters() {
        let c = ZambaConfig::preset("zamba-1b").unwrap();
        assert_eq!(c.hybrid_layers(), vec![2, 7, 13, 19, 25]);
        let total = crate::params::ParamCounts::of(&c).total();
        assert!((0.95e9..1.05e9).contains(&(total as f64)), "{total}");
    }

    #[test]
    fn seven_b_shape_holds_seven_b_shares_of_the_parameters() {
        let shares = |name: &str| {
            let c = ZambaConfig::preset(name).unwrap();
            let p = crate::params::ParamCounts::of(&c);
            let total = p.total() as f64;
            (
                c.hybrid_layers(),
                [p.embedding, p.shared_block, p.mamba + p.hybrid_linears].map(|n| n as f64 / total),
            )
        };
        let (seven_b_layers, seven_b) = shares("zamba-7b");
        let (shape_layers, shape) = shares("zamba-7b-shape");
        assert_eq!(shape_layers, seven_b_layers);
        for (part, (ours, theirs)) in ["embedding", "shared block", "layers"]
            .iter()
            .zip(shape.iter().zip(seven_b))
        {
            assert!(
                (ours / theirs - 1.0).abs() < 0.25,
                "{part}: {ours:.4} of the parameters, Zamba-7B {theirs:.4}"
            );
        }
    }

    #[test]
    fn parses_transformers_json_with_defaults() {
        let c: ZambaConfig = serde_json::from_str(
            r#"{"model_type":"zamba","hidden_size":32,"num_hidden_layers":5,"mamba_dt_rank":"auto",
                "num_attention_heads":4,"num_key_value_heads":4,"intermediate_size":64,"vocab_size":100,
                "layers_block_type":["mamba","hybrid","mamba","hybrid","mamba"],"use_cache":true}"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.dt_rank(), 2);
        assert_eq!(c.hybrid_layers(), vec![1, 3]);
        let explicit: ZambaConfig = serde_json::from_str(r#"{"mamba_dt_rank": 7}"#).unwrap();
        assert_eq!(explicit.dt_rank(), 7);
    }

    #[test]
    fn invalid_configs_are_errors_naming_the_field() {
        let cases: Vec<(ZambaConfig, &str)> = vec![
            (
                ZambaConfig {
                    n_mamba_heads: 3,
                    ..ZambaConfig::default()
                },
                "n_mamba_heads",
            ),
            (
                ZambaConfig {
                    hidden_size: 0,
                    ..ZambaConfig::default()
                },
                "hidden_size",
            ),
            (
                ZambaConfig {
                    attention_head_dim: Some(100),
                    ..ZambaConfig::default()
                },
                "attention_head_dim",
            ),
            (
                ZambaConfig {
                    num_key_value_heads: 5,
                    ..ZambaConfig::default()
                },
                "num_key_value_heads",
            ),
            (
                ZambaConfig {
                    model_type: "zamba2".into(),
                    ..ZambaConfig::default()
                },
                "model_type",
            ),
            (
                ZambaConfig {
                    layers_block_type: Some(vec![LayerKind::Mamba]),
                    ..ZambaConfig::default()
                },
                "layers_block_type",
            ),
        ];
        for (config, field) in cases {
            let msg = config.validate().unwrap_err().to_string();
            assert!(msg.contains(field), "{msg:?} should name {field}");
        }
        assert!(
            ZambaConfig::preset("zamba-70b")
                .unwrap_err()
                .to_string()
                .contains("zamba-7b")
        );
    }
}
