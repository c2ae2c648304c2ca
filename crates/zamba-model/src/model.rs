//! The Zamba model (arXiv 2405.16712) as Burn modules, numerically the same model as
//! transformers' `ZambaForCausalLM`. See docs/architecture.md for the equations.
//!
//! Layout conventions (converted from transformers' layout in [`ParamBuilder`]):
//! - Linear weights are Burn's `[d_in, d_out]` (transformers stores `[out, in]`).
//! - `in_proj` columns are `[x_0..x_{D-1} | z_0..z_{D-1}]`; transformers interleaves the rows
//!   (`x_c = row 2c`, `z_c = row 2c+1`), which would cost a strided gather every step.
//! - The causal conv weight is `[D, K]` (transformers: `[D, 1, K]`).

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::activation::{gelu, silu};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::config::{LayerKind, ZambaConfig};
use crate::error::ModelError;
use crate::exec::{ActivationCheckpointing, Compute, Execution, f32};
use crate::recompute::checkpointed;
use crate::weights::{HostTensor, Init, WeightSource};

/// Builds parameters from a [`WeightSource`], converting transformers' layout to ours.
pub(crate) struct ParamBuilder<'a> {
    pub source: &'a mut dyn WeightSource,
    pub device: &'a Device,
    pub std: f64,
}

impl ParamBuilder<'_> {
    fn host(&mut self, name: &str, shape: &[usize], init: Init) -> Result<HostTensor, ModelError> {
        self.source.tensor(name, shape, init)
    }

    fn param<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Param<Tensor<D>>, ModelError> {
        let host = self.host(name, &shape, init)?;
        Ok(Param::from_tensor(to_device(host, self.device)))
    }

    fn linear(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<Linear, ModelError> {
        let host = self.host(name, &[d_out, d_in], Init::Normal { std: self.std })?;
        Ok(Linear {
            weight: Param::from_tensor(to_device(host.transposed(), self.device)),
            bias: None,
        })
    }

    fn rms_norm(&mut self, name: &str, width: usize, eps: f64) -> Result<RmsNorm, ModelError> {
        Ok(RmsNorm {
            gamma: self.param(name, [width], Init::Ones)?,
            epsilon: eps,
        })
    }
}

pub(crate) fn to_device<const D: usize>(host: HostTensor, device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(host.data, host.shape), device)
}

/// One Mamba mixer (Zamba's multi-head variant of Mamba-1).
#[derive(Module, Debug)]
pub struct MambaMixer {
    /// `[d, 2D]`, columns `[x | z]`.
    pub in_proj: Linear,
    /// `[D, K]`
    pub conv_weight: Param<Tensor<2>>,
    /// `[D]`
    pub conv_bias: Param<Tensor<1>>,
    /// `[H, R + 2N, P]`
    pub x_proj_weight: Param<Tensor<3>>,
    /// `[H, P, R]`
    pub dt_proj_weight: Param<Tensor<3>>,
    /// `[H, P]`
    pub dt_proj_bias: Param<Tensor<2>>,
    /// `[H, P, N]`; A = −exp(A_log).
    pub a_log: Param<Tensor<3>>,
    /// `[H, P]`
    pub d_skip: Param<Tensor<2>>,
    /// `[D, d]`
    pub out_proj: Linear,
    pub n_heads: usize,
    pub d_state: usize,
    pub dt_rank: usize,
    /// Run the plain-tensor-op scan instead of the fused kernel (tests compare the two).
    pub reference_scan: bool,
}

impl MambaMixer {
    fn build(b: &mut ParamBuilder, prefix: &str, c: &ZambaConfig) -> Result<Self, ModelError> {
        let (d, di, h, p, n, r, k) = (
            c.hidden_size,
            c.d_inner(),
            c.n_mamba_heads,
            c.mamba_head_dim(),
            c.mamba_d_state,
            c.dt_rank(),
            c.mamba_d_conv,
        );
        // in_proj: transformers rows are interleaved x/z; de-interleave into [x | z] columns.
        let hf_in = b.host(
            &format!("{prefix}.in_proj.weight"),
            &[2 * di, d],
            Init::Normal { std: b.std },
        )?;
        let mut ours = vec![0.0f32; d * 2 * di];
        for ch in 0..di {
            for half in 0..2 {
                let row = &hf_in.data[(2 * ch + half) * d..(2 * ch + half + 1) * d];
                let col = half * di + ch;
                for (i, &v) in row.iter().enumerate() {
                    ours[i * 2 * di + col] = v;
                }
            }
        }
        let in_proj = Linear {
            weight: Param::from_tensor(to_device(HostTensor::new(vec![d, 2 * di], ours), b.device)),
            bias: None,
        };
        let conv = b.host(
            &format!("{prefix}.conv1d.weight"),
            &[di, 1, k],
            Init::Normal { std: b.std },
        )?;
        let conv_weight =
            Param::from_tensor(to_device(HostTensor::new(vec![di, k], conv.data), b.device));
        Ok(Self {
            in_proj,
            conv_weight,
            conv_bias: b.param(&format!("{prefix}.conv1d.bias"), [di], Init::Zeros)?,
            x_proj_weight: b.param(
                &format!("{prefix}.x_proj_weight"),
                [h, r + 2 * n, p],
                Init::Normal { std: b.std },
            )?,
            dt_proj_weight: b.param(
                &format!("{prefix}.dt_proj_weight"),
                [h, p, r],
                Init::Uniform {
                    bound: (r as f64).powf(-0.5),
                },
            )?,
            dt_proj_bias: b.param(
                &format!("{prefix}.dt_proj_bias"),
                [h, p],
                Init::DtBias {
                    min: c.time_step_min,
                    max: c.time_step_max,
                    floor: c.time_step_floor,
                },
            )?,
            a_log: b.param(
                &format!("{prefix}.A_log"),
                [h, p, n],
                Init::ALog { d_state: n },
            )?,
            d_skip: b.param(&format!("{prefix}.D"), [h, p], Init::Ones)?,
            out_proj: b.linear(&format!("{prefix}.out_proj.weight"), di, d)?,
            n_heads: h,
            d_state: n,
            dt_rank: r,
            reference_scan: false,
        })
    }

    /// `hidden`: `[B, L, d]` → `[B, L, d]`, in the compute type of `compute`.
    pub(crate) fn forward(&self, hidden: Tensor<3>, compute: Compute) -> Tensor<3> {
        let [batch, len, _] = hidden.dims();
        let [h, r, n] = [self.n_heads, self.dt_rank, self.d_state];
        let [di, k] = self.conv_weight.dims();
        let p = di / h;

        let xz = compute.linear(&self.in_proj, hidden);
        let x = xz.clone().slice([0..batch, 0..len, 0..di]).swap_dims(1, 2); // [B, D, L]
        let z = xz.slice([0..batch, 0..len, di..2 * di]).swap_dims(1, 2); // [B, D, L]
        let x = silu(causal_depthwise_conv(
            x,
            compute.cast(self.conv_weight.val()),
            compute.cast(self.conv_bias.val()),
            k,
        ));

        // Per head: [dt; B; C] = W_x[h] · x_h   ([H, R+2N, P] · [B, H, P, L] → [B, H, R+2N, L])
        let ssm = compute
            .cast(self.x_proj_weight.val())
            .unsqueeze::<4>()
            .matmul(x.clone().reshape([batch, h, p, len]));
        let dt = ssm.clone().slice([0..batch, 0..h, 0..r, 0..len]);
        let b_t = ssm
            .clone()
            .slice([0..batch, 0..h, r..r + n, 0..len])
            .swap_dims(2, 3);
        let c_t = ssm
            .slice([0..batch, 0..h, r + n..r + 2 * n, 0..len])
            .swap_dims(2, 3);
        let delta = compute
            .cast(self.dt_proj_weight.val())
            .unsqueeze::<4>()
            .matmul(dt)
            .reshape([batch, di, len]);
        // The scan's parameters stay f32 (its state and sums are f32 on every backend).
        let a = self.a_log.val().exp().neg().reshape([di, n]);
        let d_skip = self.d_skip.val().reshape([di]);
        let dt_bias = self.dt_proj_bias.val().reshape([di]);

        let scan = if self.reference_scan {
            zamba_kernels::selective_scan_reference
        } else {
            zamba_kernels::selective_scan
        };
        let y = scan(x, delta, a, b_t, c_t, d_skip, z, dt_bias); // [B, D, L], gated by silu(z)
        compute.linear(&self.out_proj, y.swap_dims(1, 2))
    }
}

/// Causal depthwise conv over time with left zero padding: `x`: `[B, D, L]`, `weight`: `[D, K]`.
/// out[t] = bias + Σ_k w[k]·x[t + k − (K−1)]. K shifted multiply-adds beat a grouped conv with
/// D groups of one channel.
fn causal_depthwise_conv(x: Tensor<3>, weight: Tensor<2>, bias: Tensor<1>, k: usize) -> Tensor<3> {
    let [batch, di, len] = x.dims();
    let zeros = Tensor::zeros([batch, di, k - 1], (&x.device(), x.dtype()));
    let padded = Tensor::cat(vec![zeros, x], 2);
    let mut out = bias.reshape([1, di, 1]).expand([batch, di, len]);
    for j in 0..k {
        let tap = weight.clone().slice([0..di, j..j + 1]).reshape([1, di, 1]);
        out = out + padded.clone().slice([0..batch, 0..di, j..j + len]) * tap;
    }
    out
}

/// The ONE shared attention + MLP block. Its input is `[x, x0]` (width 2d); no residual inside.
#[derive(Module, Debug)]
pub struct SharedTransformer {
    pub input_layernorm: RmsNorm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub pre_ff_layernorm: RmsNorm,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub scale: f64,
}

impl SharedTransformer {
    fn build(b: &mut ParamBuilder, prefix: &str, c: &ZambaConfig) -> Result<Self, ModelError> {
        let (d, a, hd, i) = (
            c.hidden_size,
            c.attention_hidden_size(),
            c.attention_head_dim(),
            c.intermediate_size,
        );
        let kv = c.num_key_value_heads * hd;
        Ok(Self {
            input_layernorm: b.rms_norm(
                &format!("{prefix}.input_layernorm.weight"),
                a,
                c.rms_norm_eps,
            )?,
            q_proj: b.linear(&format!("{prefix}.self_attn.q_proj.weight"), a, a)?,
            k_proj: b.linear(&format!("{prefix}.self_attn.k_proj.weight"), a, kv)?,
            v_proj: b.linear(&format!("{prefix}.self_attn.v_proj.weight"), a, kv)?,
            o_proj: b.linear(&format!("{prefix}.self_attn.o_proj.weight"), a, d)?,
            pre_ff_layernorm: b.rms_norm(
                &format!("{prefix}.pre_ff_layernorm.weight"),
                d,
                c.rms_norm_eps,
            )?,
            gate_proj: b.linear(&format!("{prefix}.feed_forward.gate_proj.weight"), d, i)?,
            up_proj: b.linear(&format!("{prefix}.feed_forward.up_proj.weight"), d, i)?,
            down_proj: b.linear(&format!("{prefix}.feed_forward.down_proj.weight"), i, d)?,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            scale: c.attention_scale(),
        })
    }

    /// `x`, `x0`: `[B, L, d]` (f32) → `[B, L, d]`, in the compute type of `compute`.
    pub(crate) fn forward(&self, x: Tensor<3>, x0: Tensor<3>, compute: Compute) -> Tensor<3> {
        let [batch, len, _] = x.dims();
        let u = self.input_layernorm.forward(Tensor::cat(vec![x, x0], 2));
        let heads = |t: Tensor<3>, n: usize| {
            let width = t.dims()[2];
            t.reshape([batch, len, n, width / n]).swap_dims(1, 2)
        };
        let q = heads(compute.linear(&self.q_proj, u.clone()), self.n_heads);
        let mut k = heads(compute.linear(&self.k_proj, u.clone()), self.n_kv_heads);
        let mut v = heads(compute.linear(&self.v_proj, u), self.n_kv_heads);
        if self.n_kv_heads != self.n_heads {
            let groups = self.n_heads / self.n_kv_heads;
            k = repeat_kv(k, groups);
            v = repeat_kv(v, groups);
        }
        let options = AttentionModuleOptions {
            scale: Some(self.scale),
            softcap: None,
            is_causal: true,
        };
        let attn = attention(q, k, v, None, None, options); // [B, heads, L, hd]
        let attn = attn.swap_dims(1, 2).reshape([batch as i64, len as i64, -1]);
        let h = self
            .pre_ff_layernorm
            .forward(f32(compute.linear(&self.o_proj, attn)));
        let gated = gelu(compute.linear(&self.gate_proj, h.clone())) * compute.linear(&self.up_proj, h);
        compute.linear(&self.down_proj, gated)
    }
}

/// `[B, kv, L, hd]` → `[B, kv·groups, L, hd]`, each kv head repeated `groups` times in a row.
fn repeat_kv(t: Tensor<4>, groups: usize) -> Tensor<4> {
    let [b, kv, l, hd] = t.dims();
    t.unsqueeze_dim::<5>(2)
        .expand([b, kv, groups, l, hd])
        .reshape([b, kv * groups, l, hd])
}

/// One of the `num_hidden_layers` layers: a Mamba block, and for hybrid layers the
/// per-invocation projection of the shared block's output.
#[derive(Module, Debug)]
pub struct ZambaLayer {
    pub input_layernorm: RmsNorm,
    pub mamba: MambaMixer,
    /// `Some` for hybrid layers: `W_l`, applied to the shared block's output.
    pub hybrid_linear: Option<Linear>,
}

#[derive(Module, Debug)]
pub struct ZambaModel {
    pub embed_tokens: Embedding,
    pub layers: Vec<ZambaLayer>,
    pub shared: SharedTransformer,
    pub final_layernorm: RmsNorm,
    /// Embedding rows of this token receive no gradient from the lookup (PyTorch `padding_idx`).
    pub padding_idx: Option<usize>,
    /// How the forward runs; not part of the weights (see [`ZambaModel::with_execution`]).
    #[module(skip)]
    pub execution: Execution,
}

impl ZambaModel {
    /// Builds the model taking every parameter from `source` (random init or a checkpoint).
    pub fn from_source(
        config: &ZambaConfig,
        source: &mut dyn WeightSource,
        device: &Device,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let c = config;
        let mut b = ParamBuilder {
            source,
            device,
            std: c.initializer_range,
        };
        let embed = b.host(
            "model.embed_tokens.weight",
            &[c.vocab_size, c.hidden_size],
            Init::Embedding {
                std: c.initializer_range,
                padding_idx: c.pad_token_id,
            },
        )?;
        let embed_tokens = Embedding {
            weight: Param::from_tensor(to_device(embed, device)),
        };
        let kinds = c.layer_kinds();
        let first_hybrid = c.hybrid_layers().first().copied();
        let mut layers = Vec::with_capacity(kinds.len());
        for (i, kind) in kinds.iter().enumerate() {
            let layer = match kind {
                LayerKind::Mamba => ZambaLayer {
                    input_layernorm: b.rms_norm(
                        &format!("model.layers.{i}.input_layernorm.weight"),
                        c.hidden_size,
                        c.rms_norm_eps,
                    )?,
                    mamba: MambaMixer::build(&mut b, &format!("model.layers.{i}.mamba"), c)?,
                    hybrid_linear: None,
                },
                LayerKind::Hybrid => ZambaLayer {
                    input_layernorm: b.rms_norm(
                        &format!("model.layers.{i}.mamba_decoder.input_layernorm.weight"),
                        c.hidden_size,
                        c.rms_norm_eps,
                    )?,
                    mamba: MambaMixer::build(
                        &mut b,
                        &format!("model.layers.{i}.mamba_decoder.mamba"),
                        c,
                    )?,
                    hybrid_linear: Some(b.linear(
                        &format!("model.layers.{i}.linear.weight"),
                        c.hidden_size,
                        c.hidden_size,
                    )?),
                },
            };
            layers.push(layer);
        }
        // The shared block is named after its first use; a checkpoint source resolves the other
        // names it may be stored under.
        let shared_prefix = format!("model.layers.{}.shared_transf", first_hybrid.unwrap_or(0));
        let shared = SharedTransformer::build(&mut b, &shared_prefix, c)?;
        let final_layernorm = b.rms_norm(
            "model.final_layernorm.weight",
            c.hidden_size,
            c.rms_norm_eps,
        )?;
        Ok(Self {
            embed_tokens,
            layers,
            shared,
            final_layernorm,
            padding_idx: c.pad_token_id.map(|p| p as usize),
            execution: Execution::default(),
        })
    }

    /// Switches every Mamba block between the fused scan and the plain-tensor-op reference.
    pub fn with_reference_scan(mut self, reference: bool) -> Self {
        for layer in &mut self.layers {
            layer.mamba.reference_scan = reference;
        }
        self
    }

    /// Sets how the forward runs: mixed precision, per-layer recomputation in the backward.
    pub fn with_execution(mut self, execution: Execution) -> Self {
        self.execution = execution;
        self
    }

    /// Final hidden states (after the final norm, f32): `tokens` `[B, L]` → `[B, L, d]`.
    pub fn hidden_states(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let compute = Compute::new(self.execution.precision);
        let recompute = self.execution.checkpointing == ActivationCheckpointing::Layers;
        let x0 = self.embed(tokens);
        let mut x = x0.clone();
        for layer in &self.layers {
            // t = W_l · Shared([x, x0]) feeds only this layer's Mamba block, never the residual.
            let t = layer.hybrid_linear.as_ref().map(|linear| {
                let block = (self.shared.clone(), linear.clone());
                let inputs = vec![x.clone(), x0.clone()];
                let run = move |(shared, linear): &(SharedTransformer, Linear),
                                inputs: Vec<Tensor<3>>| {
                    let [x, x0] = <[Tensor<3>; 2]>::try_from(inputs).expect("x and x0");
                    f32(compute.linear(linear, shared.forward(x, x0, compute)))
                };
                match recompute {
                    true => checkpointed(&block, inputs, run),
                    false => run(&block, inputs),
                }
            });
            let block = (layer.input_layernorm.clone(), layer.mamba.clone());
            let inputs = [Some(x), t].into_iter().flatten().collect();
            let run = move |(norm, mamba): &(RmsNorm, MambaMixer), inputs: Vec<Tensor<3>>| {
                let mut inputs = inputs.into_iter();
                let x = inputs.next().expect("the residual stream");
                let mamba_in = match inputs.next() {
                    Some(t) => x.clone() + t,
                    None => x.clone(),
                };
                x + f32(mamba.forward(norm.forward(mamba_in), compute))
            };
            x = match recompute {
                true => checkpointed(&block, inputs, run),
                false => run(&block, inputs),
            };
        }
        self.final_layernorm.forward(x)
    }

    /// Logits `[B, L, vocab]` (f32) with the tied embedding head.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let compute = Compute::new(self.execution.precision);
        let h = compute.cast(self.hidden_states(tokens));
        let head = compute.cast(self.embed_tokens.weight.val().transpose().unsqueeze::<3>());
        f32(h.matmul(head))
    }

    fn embed(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let x0 = self.embed_tokens.forward(tokens.clone());
        match self.padding_idx {
            // Same values, but the lookup of the padding row is cut from the graph.
            Some(pad) if x0.device().is_autodiff() => {
                let [b, l, d] = x0.dims();
                let is_pad: Tensor<3, Bool> = tokens
                    .equal_elem(pad as i64)
                    .unsqueeze_dim::<3>(2)
                    .expand([b, l, d]);
                x0.clone().mask_where(is_pad, x0.detach())
            }
            _ => x0,
        }
    }

    pub fn num_params(&self) -> usize {
        Module::num_params(self)
    }
}
