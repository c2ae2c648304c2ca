//! Recurrent decoding: one token per step with O(1) work per Mamba layer (a conv window of K−1
//! inputs and the `[D, N]` scan state per channel) and a key/value cache per hybrid layer for the
//! shared attention block. Every row of the batch advances by one token per step, so rows with
//! prompts of different lengths share a batch without padding: each row's cache holds exactly its
//! own history.
//!
//! The equations are those of the full forward in [`crate::model`] (see docs/architecture.md),
//! written for a single time step; a test checks both give the same logits at every position.

use burn::tensor::activation::{gelu, silu, softmax, softplus};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::model::{MambaMixer, SharedTransformer, ZambaModel};

/// Per-layer Mamba state of every row.
struct MambaState {
    /// The last K−1 conv inputs: `[B, D, K−1]`.
    conv: Tensor<3>,
    /// The selective-scan state: `[B, D, N]`.
    ssm: Tensor<3>,
}

/// Keys and values of one hybrid layer's attention, `[B, kv_heads, capacity, head_dim]`; the first
/// `len` positions are filled.
struct KvCache {
    keys: Tensor<4>,
    values: Tensor<4>,
}

/// The decoding state of a batch of sequences for one model.
pub struct Decoder<'m> {
    model: &'m ZambaModel,
    batch: usize,
    /// Tokens consumed so far by every row.
    len: usize,
    mamba: Vec<MambaState>,
    /// One cache per layer; `Some` for hybrid layers.
    kv: Vec<Option<KvCache>>,
    device: Device,
}

impl ZambaModel {
    /// A decoder for `batch` sequences, with room for `capacity` tokens before its caches grow.
    pub fn decoder(&self, batch: usize, capacity: usize) -> Decoder<'_> {
        let device = self.embed_tokens.weight.device();
        let capacity = capacity.max(1);
        let mamba = self
            .layers
            .iter()
            .map(|layer| {
                let [d_inner, k] = layer.mamba.conv_weight.dims();
                MambaState {
                    conv: Tensor::zeros([batch, d_inner, k - 1], &device),
                    ssm: Tensor::zeros([batch, d_inner, layer.mamba.d_state], &device),
                }
            })
            .collect();
        let kv = self
            .layers
            .iter()
            .map(|layer| {
                layer.hybrid_linear.as_ref().map(|_| {
                    let shape = kv_shape(&self.shared, batch, capacity);
                    KvCache {
                        keys: Tensor::zeros(shape, &device),
                        values: Tensor::zeros(shape, &device),
                    }
                })
            })
            .collect();
        Decoder {
            model: self,
            batch,
            len: 0,
            mamba,
            kv,
            device,
        }
    }
}

fn kv_shape(shared: &SharedTransformer, batch: usize, capacity: usize) -> [usize; 4] {
    let [_, kv_width] = shared.k_proj.weight.dims();
    let head_dim = kv_width / shared.n_kv_heads;
    [batch, shared.n_kv_heads, capacity, head_dim]
}

impl Decoder<'_> {
    /// Tokens consumed so far by every row.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Feeds one token per row and returns the next-token logits `[B, vocab]`.
    pub fn step(&mut self, tokens: &[u32]) -> Tensor<2> {
        assert_eq!(tokens.len(), self.batch, "one token per row");
        let model = self.model;
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let ids =
            Tensor::<2, Int>::from_data(TensorData::new(ids, vec![self.batch, 1]), &self.device);
        let [batch, d] = [self.batch, model.final_layernorm.gamma.dims()[0]];
        let x0 = model.embed_tokens.forward(ids).reshape([batch, d]);
        let mut x = x0.clone();
        self.grow_caches();
        for (i, layer) in model.layers.iter().enumerate() {
            let mamba_in = match (&layer.hybrid_linear, &mut self.kv[i]) {
                (Some(linear), Some(cache)) => {
                    let shared = attend_one(&model.shared, x.clone(), x0.clone(), cache, self.len);
                    x.clone() + linear.forward(shared)
                }
                _ => x.clone(),
            };
            let normed = layer.input_layernorm.forward(mamba_in);
            x = x + mamba_one(&layer.mamba, normed, &mut self.mamba[i]);
        }
        self.len += 1;
        let h = model.final_layernorm.forward(x);
        h.matmul(model.embed_tokens.weight.val().transpose())
    }

    /// Doubles the key/value caches when the next token would not fit.
    fn grow_caches(&mut self) {
        for cache in self.kv.iter_mut().flatten() {
            let [b, heads, capacity, head_dim] = cache.keys.dims();
            if self.len < capacity {
                continue;
            }
            let extra = || Tensor::zeros([b, heads, capacity, head_dim], &self.device);
            cache.keys = Tensor::cat(vec![cache.keys.clone(), extra()], 2);
            cache.values = Tensor::cat(vec![cache.values.clone(), extra()], 2);
        }
    }
}

/// The shared block for one token at position `pos`: `x`, `x0` `[B, d]` → `[B, d]`, appending this
/// token's key and value to `cache`.
fn attend_one(
    s: &SharedTransformer,
    x: Tensor<2>,
    x0: Tensor<2>,
    cache: &mut KvCache,
    pos: usize,
) -> Tensor<2> {
    let [batch, kv_heads, _, head_dim] = cache.keys.dims();
    let groups = s.n_heads / s.n_kv_heads;
    let u = s.input_layernorm.forward(Tensor::cat(vec![x, x0], 1));
    let q = s
        .q_proj
        .forward(u.clone())
        .reshape([batch, kv_heads, groups, head_dim]);
    let k = s
        .k_proj
        .forward(u.clone())
        .reshape([batch, kv_heads, 1, head_dim]);
    let v = s.v_proj.forward(u).reshape([batch, kv_heads, 1, head_dim]);
    let at = [0..batch, 0..kv_heads, pos..pos + 1, 0..head_dim];
    cache.keys = cache.keys.clone().slice_assign(at.clone(), k);
    cache.values = cache.values.clone().slice_assign(at, v);
    let past = [0..batch, 0..kv_heads, 0..pos + 1, 0..head_dim];
    let keys = cache.keys.clone().slice(past.clone());
    let values = cache.values.clone().slice(past);
    // Query head h = kv·groups + g attends with kv head kv (transformers' repeat_kv order).
    let scores = q.matmul(keys.swap_dims(2, 3)) * s.scale; // [B, kv, groups, T]
    let attn = softmax(scores, 3).matmul(values); // [B, kv, groups, hd]
    let attn = attn.reshape([batch, kv_heads * groups * head_dim]);
    let h = s.pre_ff_layernorm.forward(s.o_proj.forward(attn));
    let gated = gelu(s.gate_proj.forward(h.clone())) * s.up_proj.forward(h);
    s.down_proj.forward(gated)
}

/// One Mamba mixer step: `hidden` `[B, d]` → `[B, d]`, advancing the conv window and scan state.
fn mamba_one(m: &MambaMixer, hidden: Tensor<2>, state: &mut MambaState) -> Tensor<2> {
    let [batch, _] = hidden.dims();
    let [di, k] = m.conv_weight.dims();
    let [h, r, n] = [m.n_heads, m.dt_rank, m.d_state];
    let p = di / h;

    let xz = m.in_proj.forward(hidden);
    let x = xz.clone().slice([0..batch, 0..di]);
    let z = xz.slice([0..batch, di..2 * di]);
    // Causal depthwise conv over the window [x_{t−K+1} … x_t].
    let window = Tensor::cat(vec![state.conv.clone(), x.reshape([batch, di, 1])], 2);
    state.conv = window.clone().slice([0..batch, 0..di, 1..k]);
    let conv = (window * m.conv_weight.val().unsqueeze::<3>())
        .sum_dim(2)
        .reshape([batch, di])
        + m.conv_bias.val().unsqueeze::<2>();
    let xc = silu(conv);

    // Per head: [dt; B; C] = W_x[h] · x_h.
    let ssm = m
        .x_proj_weight
        .val()
        .unsqueeze::<4>()
        .matmul(xc.clone().reshape([batch, h, p, 1])); // [B, H, R+2N, 1]
    let dt = ssm.clone().slice([0..batch, 0..h, 0..r, 0..1]);
    let per_channel = |t: Tensor<4>| {
        t.reshape([batch, h, 1, n])
            .expand([batch, h, p, n])
            .reshape([batch, di, n])
    };
    let b_t = per_channel(ssm.clone().slice([0..batch, 0..h, r..r + n, 0..1]));
    let c_t = per_channel(ssm.slice([0..batch, 0..h, r + n..r + 2 * n, 0..1]));
    let delta = m
        .dt_proj_weight
        .val()
        .unsqueeze::<4>()
        .matmul(dt)
        .reshape([batch, di])
        + m.dt_proj_bias.val().reshape([1, di]);
    let delta = softplus(delta, 1.0);
    let a = m.a_log.val().exp().neg().reshape([1, di, n]);

    // s_t = exp(Δ·A) ⊙ s_{t−1} + Δ·x·B_t;  y = C_t · s_t + D ⊙ x
    let decay = (delta.clone().reshape([batch, di, 1]) * a).exp();
    let input = (delta * xc.clone()).reshape([batch, di, 1]) * b_t;
    state.ssm = decay * state.ssm.clone() + input;
    let y = (state.ssm.clone() * c_t).sum_dim(2).reshape([batch, di])
        + m.d_skip.val().reshape([1, di]) * xc;
    m.out_proj.forward(y * silu(z))
}
