//! AdamW with a no-decay group and global-norm gradient clipping, keyed by parameter path.
//!
//! Burn's own optimizer keys its state by `ParamId` (lost when weights come from a transformers
//! checkpoint) and its `Norm` clipping is per tensor; pretraining needs the global norm and state
//! that survives a reload and a change of world size. Moments are kept per module path (e.g.
//! `layers.3.mamba.in_proj.weight`) and element range (a ZeRO-1 rank holds parts of parameters,
//! see [`crate::data_parallel`]) and saved with checkpoints, as are the f32 master weights of a
//! bf16 run, so resuming continues the exact same arithmetic. The global norm is computed by the data-parallel layer from per-rank partial sums.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};
use zamba_kernels::{AdamWHyper, adamw_update, adamw_update_with_working};
use zamba_model::param_table::{DecayGroup, decay_group};

use crate::config::OptimizerSection;

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

impl From<&OptimizerSection> for AdamWParams {
    fn from(o: &OptimizerSection) -> Self {
        Self {
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            decay_embeddings: o.decay_embeddings,
        }
    }
}

impl AdamWParams {
    /// The kernel's hyper-parameters of update number `step` of one tensor.
    fn hyper(&self, lr: f64, weight_decay: f64, step: u64, grad_scale: f64) -> AdamWHyper {
        AdamWHyper {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay,
            step,
            grad_scale,
        }
    }
}

/// Whether a parameter is decayed: its group in the model's parameter table
/// (`zamba_model::param_table`: norms, biases, A_log and D never; the embedding only with
/// `decay_embeddings`). Parameters of other modules (tests' toy models) follow Burn's names:
/// norm gains and biases are not decayed.
pub fn is_decayed(path: &str, decay_embeddings: bool) -> bool {
    match decay_group(path) {
        Some(DecayGroup::Decay) => true,
        Some(DecayGroup::NoDecay) => false,
        Some(DecayGroup::Embedding) => decay_embeddings,
        None => !matches!(path.rsplit('.').next(), Some("gamma" | "beta" | "bias")),
    }
}

/// First and second moments of one parameter's elements `range` (of its flattened elements),
/// flat. Under ZeRO-1 a rank holds a part of a parameter; otherwise `range` is all of it.
#[derive(Debug, Clone)]
pub struct Moments {
    pub range: Range<usize>,
    pub m: Tensor<1>,
    pub v: Tensor<1>,
}

/// f32 master weights of one parameter's elements `range` (of its flattened elements), flat:
/// what AdamW updates when the working parameters are bf16.
#[derive(Debug, Clone)]
pub struct Master {
    pub range: Range<usize>,
    pub value: Tensor<1>,
}

/// A part of one parameter to update: its current value and (averaged) gradient, flat.
pub struct SegmentUpdate<'a> {
    /// Module path of the parameter.
    pub path: &'a str,
    pub range: Range<usize>,
    pub value: Tensor<1>,
    pub grad: Tensor<1>,
}

pub struct AdamW {
    pub params: AdamWParams,
    /// Number of updates applied so far (bias correction uses `step + 1`).
    pub step: u64,
    /// Keyed by module path (e.g. `layers.3.mamba.in_proj.weight`).
    pub moments: BTreeMap<String, Moments>,
    /// f32 master weights of the same ranges as the moments, by module path, where the working
    /// parameters are bf16 (see [`crate::data_parallel`]); empty otherwise.
    pub master: BTreeMap<String, Master>,
}

impl AdamW {
    pub fn new(params: AdamWParams) -> Self {
        Self {
            params,
            step: 0,
            moments: BTreeMap::new(),
            master: BTreeMap::new(),
        }
    }

    /// One update of every segment, with gradients multiplied by `grad_scale` first (the
    /// clipping factor); returns the new values in the order given. Moments start at zero on the
    /// first update; after that every segment must have them (a checkpoint restores them all).
    pub fn update(
        &mut self,
        segments: Vec<SegmentUpdate>,
        lr: f64,
        grad_scale: f64,
    ) -> Vec<Tensor<1>> {
        self.update_each(segments, lr, grad_scale, None)
            .into_iter()
            .map(|(value, _)| value)
            .collect()
    }

    /// [`update`](Self::update) of f32 master weights that also returns each new value rounded to
    /// `working` (the bf16 working parameters): written by the update's own pass on CubeCL
    /// devices, cast after it elsewhere (the same values).
    pub fn update_with_working(
        &mut self,
        segments: Vec<SegmentUpdate>,
        lr: f64,
        grad_scale: f64,
        working: DType,
    ) -> Vec<(Tensor<1>, Tensor<1>)> {
        self.update_each(segments, lr, grad_scale, Some(working))
            .into_iter()
            .map(|(value, copy)| (value, copy.expect("a copy is made when asked for")))
            .collect()
    }

    fn update_each(
        &mut self,
        segments: Vec<SegmentUpdate>,
        lr: f64,
        grad_scale: f64,
        working: Option<DType>,
    ) -> Vec<(Tensor<1>, Option<Tensor<1>>)> {
        let first = self.step == 0;
        self.step += 1;
        segments
            .into_iter()
            .map(|s| {
                let state = self.take_moments(&s, first);
                let p = self.params;
                let decay = if is_decayed(s.path, p.decay_embeddings) {
                    p.weight_decay
                } else {
                    0.0
                };
                // PyTorch: θ·(1 − lr·wd) − lr · m̂ / (sqrt(v̂) + eps), one fused pass per tensor.
                let hyper = p.hyper(lr, decay, self.step, grad_scale);
                let (updated, m, v, copy) = match working {
                    Some(dtype) => {
                        let (updated, m, v, copy) = adamw_update_with_working(
                            s.value, s.grad, state.m, state.v, &hyper, dtype,
                        );
                        (updated, m, v, Some(copy))
                    }
                    None => {
                        let (updated, m, v) =
                            adamw_update(s.value, s.grad, state.m, state.v, &hyper);
                        (updated, m, v, None)
                    }
                };
                self.moments.insert(
                    s.path.to_owned(),
                    Moments {
                        range: s.range,
                        m,
                        v,
                    },
                );
                (updated, copy)
            })
            .collect()
    }

    /// The moments of segment `s`, taken out: zeros on the `first` update.
    fn take_moments(&mut self, s: &SegmentUpdate, first: bool) -> Moments {
        match self.moments.remove(s.path) {
            Some(state) => {
                assert_eq!(
                    state.range, s.range,
                    "moments of {} cover other elements",
                    s.path
                );
                state
            }
            None if first => Moments {
                range: s.range.clone(),
                m: s.value.zeros_like(),
                v: s.value.zeros_like(),
            },
            None => panic!(
                "no AdamW moments for {} after {} updates",
                s.path,
                self.step - 1
            ),
        }
    }
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
