//! AdamW with a no-decay group and global-norm gradient clipping, keyed by parameter path.
//!
//! Burn's own optimizer keys its state by `ParamId` (lost when weights come from a transformers
//! checkpoint) and its `Norm` clipping is per tensor; pretraining needs the global norm and state
//! that survives a reload. Moments are kept per module path (e.g. `layers.3.mamba.in_proj.weight`)
//! and saved with checkpoints, so resuming continues the exact same arithmetic.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters (PyTorch's formulation: decoupled decay `θ ← θ·(1 − lr·wd)`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Whether the (tied) embedding is decayed.
    pub decay_embeddings: bool,
}

/// Parameters exempt from weight decay: norms, biases, A_log, D (and the embedding unless
/// `decay_embeddings`).
pub fn is_decayed(path: &str, decay_embeddings: bool) -> bool {
    let leaf = path.rsplit('.').next().unwrap_or(path);
    let no_decay_leaf = matches!(
        leaf,
        "gamma" | "bias" | "conv_bias" | "dt_proj_bias" | "a_log" | "d_skip"
    );
    let is_embedding = path.starts_with("embed_tokens.");
    !no_decay_leaf && (decay_embeddings || !is_embedding)
}

/// First and second moments of one parameter, flattened.
#[derive(Debug, Clone)]
pub struct Moments {
    pub m: Tensor<1>,
    pub v: Tensor<1>,
}

pub struct AdamW {
    pub params: AdamWParams,
    /// Number of updates applied so far (bias correction uses `step + 1`).
    pub step: u64,
    pub moments: BTreeMap<String, Moments>,
}

impl AdamW {
    pub fn new(params: AdamWParams) -> Self {
        Self {
            params,
            step: 0,
            moments: BTreeMap::new(),
        }
    }

    /// One update of every parameter that has a gradient, with gradients multiplied by
    /// `grad_scale` first (the clipping factor).
    pub fn step<M: Module>(
        &mut self,
        model: M,
        grads: &GradientsParams,
        lr: f64,
        grad_scale: f64,
    ) -> M {
        self.step += 1;
        let mut mapper = UpdateMapper {
            opt: self,
            grads,
            lr,
            grad_scale,
            path: Vec::new(),
        };
        model.map(&mut mapper)
    }
}

struct UpdateMapper<'a> {
    opt: &'a mut AdamW,
    grads: &'a GradientsParams,
    lr: f64,
    grad_scale: f64,
    path: Vec<String>,
}

impl ModuleMapper for UpdateMapper<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(grad) = self.grads.get::<D>(param.id) else {
            return param;
        };
        let path = self.path.join(".");
        let (id, value, mapper) = param.consume();
        let require_grad = value.is_require_grad();
        let shape = value.dims();
        let numel: usize = shape.iter().product();
        let p = self.opt.params;
        let theta = value.inner().reshape([numel]);
        let g = grad.inner().reshape([numel]);
        let state = self.opt.moments.remove(&path).unwrap_or_else(|| Moments {
            m: theta.zeros_like(),
            v: theta.zeros_like(),
        });
        let decay = if is_decayed(&path, p.decay_embeddings) {
            p.weight_decay
        } else {
            0.0
        };
        // PyTorch: θ·(1 − lr·wd) − lr · m̂ / (sqrt(v̂) + eps), one fused pass per tensor.
        let hyper = zamba_kernels::AdamWHyper {
            lr: self.lr,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            weight_decay: decay,
            step: self.opt.step,
            grad_scale: self.grad_scale,
        };
        let (updated, m, v) = zamba_kernels::adamw_update(theta, g, state.m, state.v, &hyper);
        self.opt.moments.insert(path, Moments { m, v });
        let mut updated = Tensor::from_inner(updated.reshape(shape));
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// Global L2 norm of all gradients (one host read).
pub fn global_grad_norm<M: Module>(model: &M, grads: &GradientsParams) -> f64 {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let s = g.inner().square().sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    let mut visitor = SumSquares { grads, total: None };
    model.visit(&mut visitor);
    visitor
        .total
        .map_or(0.0, |t| (t.into_scalar::<f32>() as f64).sqrt())
}

/// The factor that brings the global norm down to `max_norm` (1 when already below, or when
/// clipping is off with `max_norm <= 0`).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Ids of all float parameters in visiting order.
pub fn param_ids<M: Module>(model: &M) -> Vec<ParamId> {
    struct Ids(Vec<ParamId>);
    impl ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.id);
        }
    }
    let mut ids = Ids(Vec::new());
    model.visit(&mut ids);
    ids.0
}
