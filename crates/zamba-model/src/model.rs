//! The Zamba model (arXiv 2405.16712) as Burn modules, numerically the same model as
//! transformers' `ZambaForCausalLM`. See docs/architecture.md for the equations.
//!
//! Layout conventions (declared with each parameter in [`crate::param_table`]):
//! - Linear weights are Burn's `[d_in, d_out]` (transformers stores `[out, in]`).
//! - `in_proj` columns are `[x_0..x_{D-1} | z_0..z_{D-1}]`; transformers interleaves the rows
//!   (`x_c = row 2c`, `z_c = row 2c+1`), which would cost a strided gather every step.
//! - The causal conv weight is `[D, K]` (transformers: `[D, 1, K]`).

use std::collections::HashMap;

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use zamba_kernels::{BlockEdge, mark_backward_span};
use zamba_trace::{Category, span, span_with};

use zamba_kernels::expect_same_dtype;

use crate::config::{LayerKind, ZambaConfig};
use crate::error::ModelError;
use crate::exec::{ActivationCheckpointing, Compute, Execution, f32};
use crate::param_table::{ParamSpec, param_table};
use crate::recompute::checkpointed;
use crate::weights::{HostTensor, WeightSource};

/// Builds parameters by module path: each is looked up in the parameter table, requested from a
/// [`WeightSource`] under its transformers name and converted to this model's layout.
pub(crate) struct ParamBuilder<'a> {
    source: &'a mut dyn WeightSource,
    device: &'a Device,
    table: HashMap<String, ParamSpec>,
    /// Module path of the component being built, e.g. `layers.3.mamba.`.
    prefix: String,
}

impl<'a> ParamBuilder<'a> {
    fn new(config: &ZambaConfig, source: &'a mut dyn WeightSource, device: &'a Device) -> Self {
        let table = param_table(config)
            .into_iter()
            .map(|spec| (spec.path.clone(), spec))
            .collect();
        Self {
            source,
            device,
            table,
            prefix: String::new(),
        }
    }

    /// Runs `build` with `name.` appended to the module path.
    fn scoped<T>(
        &mut self,
        name: &str,
        build: impl FnOnce(&mut Self) -> Result<T, ModelError>,
    ) -> Result<T, ModelError> {
        let outer = self.prefix.len();
        self.prefix.push_str(name);
        self.prefix.push('.');
        let built = build(self);
        self.prefix.truncate(outer);
        built
    }

    fn param<const D: usize>(&mut self, name: &str) -> Result<Param<Tensor<D>>, ModelError> {
        let path = format!("{}{name}", self.prefix);
        let spec = self
            .table
            .remove(&path)
            .unwrap_or_else(|| panic!("parameter {path} is not in the parameter table"));
        let host = self
            .source
            .tensor(&spec.hf_name, &spec.hf_shape, spec.init)?;
        let ours = spec.layout.to_ours(host);
        assert_eq!(ours.shape.len(), D, "{path}: rank of the declared shape");
        Ok(Param::from_tensor(to_device(ours, self.device)))
    }

    fn linear(&mut self, name: &str) -> Result<Linear, ModelError> {
        self.scoped(name, |b| {
            Ok(Linear {
                weight: b.param("weight")?,
                bias: None,
            })
        })
    }

    fn rms_norm(&mut self, name: &str, eps: f64) -> Result<RmsNorm, ModelError> {
        self.scoped(name, |b| {
            Ok(RmsNorm {
                gamma: b.param("gamma")?,
                epsilon: eps,
            })
        })
    }

    /// Checks that the model took every declared parameter.
    fn finish(self) {
        assert!(
            self.table.is_empty(),
            "declared parameters the model does not build: {:?}",
            self.table.keys().collect::<Vec<_>>()
        );
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
    fn build(b: &mut ParamBuilder, c: &ZambaConfig) -> Result<Self, ModelError> {
        Ok(Self {
            in_proj: b.linear("in_proj")?,
            conv_weight: b.param("conv_weight")?,
            conv_bias: b.param("conv_bias")?,
            x_proj_weight: b.param("x_proj_weight")?,
            dt_proj_weight: b.param("dt_proj_weight")?,
            dt_proj_bias: b.param("dt_proj_bias")?,
            a_log: b.param("a_log")?,
            d_skip: b.param("d_skip")?,
            out_proj: b.linear("out_proj")?,
            n_heads: c.n_mamba_heads,
            d_state: c.mamba_d_state,
            dt_rank: c.dt_rank(),
            reference_scan: false,
        })
    }

    /// `hidden`: `[B, L, d]` → `[B, L, d]`, in the compute type of `compute`.
    pub(crate) fn forward(&self, hidden: Tensor<3>, compute: Compute) -> Tensor<3> {
        let [batch, len, _] = hidden.dims();
        let [h, r, n] = [self.n_heads, self.dt_rank, self.d_state];
        let [di, _] = self.conv_weight.dims();
        let p = di / h;

        // x and z as two products written channel-major, [B, D, L]: the layout the conv and the
        // scan read (one [B, L, 2D] product would need a sliced, transposed copy of each).
        let [x, z] = compute.channels_first_halves(&self.in_proj, hidden);
        // The fused conv computes in f32 on the CPU; the products after it run in the compute type.
        let x = compute.cast(zamba_kernels::causal_conv1d_silu(
            x,
            compute.cast(self.conv_weight.val()),
            compute.cast(self.conv_bias.val()),
        ));

        // Per head: [dt; B; C] = W_x[h] · x_h   ([H, R+2N, P] · [B, H, P, L]) as one product per
        // (batch, head), written time-major, [B, H, L, R+2N]: x_h is packed once for all three
        // outputs, whose rows are few, and its gradient is one product. dt is a transposed view,
        // [B, H, R, L]; B and C are column slices, [B, H, L, N], the time-major layout the scan
        // reads.
        let x_heads = x.clone().reshape([batch, h, p, len]);
        let w_x = compute.cast(self.x_proj_weight.val());
        let proj = zamba_kernels::per_head_matmul_transposed(w_x, x_heads);
        let columns =
            |range: std::ops::Range<usize>| proj.clone().slice([0..batch, 0..h, 0..len, range]);
        let dt = columns(0..r).swap_dims(2, 3);
        let (b_t, c_t) = (columns(r..r + n), columns(r + n..r + 2 * n));
        let delta = zamba_kernels::per_head_matmul(compute.cast(self.dt_proj_weight.val()), dt)
            .reshape([batch, di, len]);
        // The scan's parameters in f32 (its state and sums are f32 on every backend), whatever
        // the parameters' own type (bf16 working copies in a bf16 data-parallel run).
        let a = f32(self.a_log.val()).exp().neg().reshape([di, n]);
        let d_skip = f32(self.d_skip.val()).reshape([di]);
        let dt_bias = f32(self.dt_proj_bias.val()).reshape([di]);

        let scan = if self.reference_scan {
            zamba_kernels::selective_scan_reference
        } else {
            zamba_kernels::selective_scan
        };
        // [B, D, L], gated by silu(z)
        let y = scan(zamba_kernels::ScanInputs {
            u: x,
            delta,
            a,
            b: b_t,
            c: c_t,
            d: d_skip,
            z,
            delta_bias: dt_bias,
        });
        compute.linear(&self.out_proj, y.swap_dims(1, 2))
    }
}

/// `norm` applied with the fused RMSNorm kernel (same formula as `RmsNorm::forward`), its
/// statistics in f32 whatever the compute type.
fn rms_norm<const D: usize>(norm: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    zamba_kernels::rms_norm(f32(x), f32(norm.gamma.val()), norm.epsilon)
}

/// [`rms_norm`] of `x + t`, the sum never kept (one fused op on CubeCL devices).
fn add_rms_norm(norm: &RmsNorm, x: Tensor<3>, t: Tensor<3>) -> Tensor<3> {
    zamba_kernels::add_rms_norm(f32(x), f32(t), f32(norm.gamma.val()), norm.epsilon)
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
    fn build(b: &mut ParamBuilder, c: &ZambaConfig) -> Result<Self, ModelError> {
        Ok(Self {
            input_layernorm: b.rms_norm("input_layernorm", c.rms_norm_eps)?,
            q_proj: b.linear("q_proj")?,
            k_proj: b.linear("k_proj")?,
            v_proj: b.linear("v_proj")?,
            o_proj: b.linear("o_proj")?,
            pre_ff_layernorm: b.rms_norm("pre_ff_layernorm", c.rms_norm_eps)?,
            gate_proj: b.linear("gate_proj")?,
            up_proj: b.linear("up_proj")?,
            down_proj: b.linear("down_proj")?,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            scale: c.attention_scale(),
        })
    }

    /// `x`, `x0`: `[B, L, d]` (f32) → `[B, L, d]`, in the compute type of `compute`.
    pub(crate) fn forward(&self, x: Tensor<3>, x0: Tensor<3>, compute: Compute) -> Tensor<3> {
        let [batch, len, _] = x.dims();
        expect_same_dtype(
            "shared block input",
            &[("x", x.dtype()), ("x0", x0.dtype())],
        );
        let u = rms_norm(&self.input_layernorm, Tensor::cat(vec![x, x0], 2));
        // [B, L, heads, hd]: the projections' layout, which the attention op reads in place.
        let heads = |t: Tensor<3>, n: usize| {
            let width = t.dims()[2];
            t.reshape([batch, len, n, width / n])
        };
        let q = heads(compute.linear(&self.q_proj, u.clone()), self.n_heads);
        let k = heads(compute.linear(&self.k_proj, u.clone()), self.n_kv_heads);
        let v = heads(compute.linear(&self.v_proj, u), self.n_kv_heads);
        let attn = zamba_kernels::causal_attention(q, k, v, self.scale);
        let attn = attn.reshape([batch as i64, len as i64, -1]);
        let h = rms_norm(&self.pre_ff_layernorm, compute.linear(&self.o_proj, attn));
        let gated = zamba_kernels::gelu_mul(
            compute.linear(&self.gate_proj, h.clone()),
            compute.linear(&self.up_proj, h),
        );
        compute.linear(&self.down_proj, gated)
    }
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

impl ZambaLayer {
    /// `mamba` or `hybrid` (a Mamba block fed by the shared attention block).
    fn kind(&self) -> &'static str {
        match self.hybrid_linear {
            Some(_) => "hybrid",
            None => "mamba",
        }
    }

    fn build(b: &mut ParamBuilder, kind: LayerKind, c: &ZambaConfig) -> Result<Self, ModelError> {
        Ok(Self {
            input_layernorm: b.rms_norm("input_layernorm", c.rms_norm_eps)?,
            mamba: b.scoped("mamba", |b| MambaMixer::build(b, c))?,
            hybrid_linear: match kind {
                LayerKind::Mamba => None,
                LayerKind::Hybrid => Some(b.linear("hybrid_linear")?),
            },
        })
    }
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
        let mut b = ParamBuilder::new(c, source, device);
        let embed_tokens = b.scoped("embed_tokens", |b| {
            Ok(Embedding {
                weight: b.param("weight")?,
            })
        })?;
        let layers = b.scoped("layers", |b| {
            let kinds = c.layer_kinds();
            let mut layers = Vec::with_capacity(kinds.len());
            for (i, kind) in kinds.iter().enumerate() {
                layers.push(b.scoped(&i.to_string(), |b| ZambaLayer::build(b, *kind, c))?);
            }
            Ok(layers)
        })?;
        let shared = b.scoped("shared", |b| SharedTransformer::build(b, c))?;
        let final_layernorm = b.rms_norm("final_layernorm", c.rms_norm_eps)?;
        b.finish();
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
        // The residual stream is f32, whatever the embedding's type.
        let x0 = span(Category::Layer, "embedding").run(|| f32(self.embed(tokens)));
        let mut x = x0.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            // One span per layer in the forward, and one for its backward (trace only).
            let name = || format!("layer {i} ({})", layer.kind());
            let _forward = span_with(Category::Layer, name);
            let backward = || format!("{} backward", name());
            x = mark_backward_span(x, BlockEdge::Input, Category::Layer, backward);
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
                let normed = match inputs.next() {
                    Some(t) => {
                        expect_same_dtype(
                            "hybrid layer input",
                            &[("x", x.dtype()), ("t", t.dtype())],
                        );
                        add_rms_norm(norm, x.clone(), t)
                    }
                    None => rms_norm(norm, x.clone()),
                };
                x + f32(mamba.forward(normed, compute))
            };
            x = match recompute {
                true => checkpointed(&block, inputs, run),
                false => run(&block, inputs),
            };
            x = mark_backward_span(x, BlockEdge::Output, Category::Layer, backward);
        }
        rms_norm(&self.final_layernorm, x)
    }

    /// Logits `[B, L, vocab]` (f32) with the tied embedding head.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        f32(self.logits(tokens))
    }

    /// [`forward`](Self::forward)'s logits in the compute type (bf16 under `Precision::Bf16`), as
    /// the head's product writes them: what the loss reads, without an f32 copy of
    /// `[B, L, vocab]` (the cross-entropy takes any float type and keeps its statistics in f32,
    /// so the loss and the gradient are the same as from the f32 copy).
    pub fn logits(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let compute = Compute::new(self.execution.precision);
        let h = compute.cast(self.hidden_states(tokens));
        // The tied head reads the embedding transposed, in place.
        let head = compute.cast(self.embed_tokens.weight.val().transpose());
        zamba_kernels::linear(h, head)
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
