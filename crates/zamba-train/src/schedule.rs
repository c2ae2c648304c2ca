//! Learning-rate schedules: pure functions of the optimizer step.
//!
//! Conventions shared by every kind (`T` = total optimizer steps of the run, steps `0..T`):
//! - Step 0 is the first optimizer step; `lr(0, T)` is the LR that step uses.
//! - Warmup over `W` steps is linear over steps `0..W` and reaches the peak *at* step `W − 1`
//!   (the W-th step), so the peak is always used. It starts at `peak / W` for kinds that warm up
//!   from zero (`constant`, `cosine`, `wsd`: the first step is `peak · 1/W`, never 0) and at
//!   `start_lr` for `anneal` (the first step is exactly `start_lr`). `W` = 0 or 1 means the peak
//!   is used from step 0.
//! - Decays run from the peak step to the last step `T − 1`, which uses exactly the final LR
//!   (`min_lr` / `final_lr`).
//! - Steps past the end keep the last step's LR.

use crate::schema::{MAX_LR, MAX_STEPS, check_ranges};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use std::fmt::Write as _;

/// The learning rate of every optimizer step. `kind` selects the shape, and with it which of the
/// keys below apply; all kinds span exactly `train.steps` steps, so changing the run's length
/// stretches the schedule. Step 0 is the first optimizer step; a warmup over `W` steps reaches
/// the peak at step `W − 1`, and decays end at the last step with exactly their final LR.
/// `zamba-train --config RUN.toml --dry-run` prints the LR at the milestones and plots it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ScheduleConfig {
    Constant(ConstantSchedule),
    Cosine(CosineSchedule),
    Wsd(WsdSchedule),
    Anneal(AnnealSchedule),
}

/// `lr` throughout, after an optional linear warmup from `lr / warmup_steps`. The control for
/// an anneal (continue at phase 1's final LR), or short fine-tunes.
///
/// ```toml
/// [schedule]
/// kind = "constant"
/// lr = 3e-4
/// # Steps 0..9 ramp 3e-5, 6e-5, …, 3e-4; then 3e-4 to the end.
/// warmup_steps = 10
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConstantSchedule {
    /// The learning rate after the warmup.
    #[schemars(extend("exclusiveMinimum" = 0.0), range(max = MAX_LR))]
    pub lr: f64,
    /// Steps of linear warmup from `lr / warmup_steps` to `lr`; 0 or 1 = none. At most `train.steps`.
    #[serde(default)]
    #[schemars(range(max = MAX_STEPS))]
    pub warmup_steps: usize,
}

/// Linear warmup to `peak_lr`, then a half cosine to `min_lr` at the last step. The usual
/// phase-1 schedule.
///
/// ```toml
/// [schedule]
/// kind = "cosine"
/// peak_lr = 3e-3
/// # 10% of the peak at the last step.
/// min_lr = 3e-4
/// warmup_steps = 30
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CosineSchedule {
    /// The largest LR, reached at step `warmup_steps − 1`.
    #[schemars(extend("exclusiveMinimum" = 0.0), range(max = MAX_LR))]
    pub peak_lr: f64,
    /// The LR of the last step; at most `peak_lr`.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = MAX_LR))]
    pub min_lr: f64,
    /// Steps of linear warmup from `peak_lr / warmup_steps`; 0 or 1 = none. Less than `train.steps`.
    #[serde(default)]
    #[schemars(range(max = MAX_STEPS))]
    pub warmup_steps: usize,
}

/// Warmup–stable–decay: warmup to `peak_lr`, constant, then a decay to `min_lr` over the last
/// `decay_steps` steps (or `ceil(decay_fraction × train.steps)` steps; exactly one of the two).
/// A run can be extended before its decay starts.
///
/// ```toml
/// [schedule]
/// kind = "wsd"
/// peak_lr = 3e-3
/// min_lr = 3e-5
/// warmup_steps = 30
/// # The last 20% of the steps decay, shaped 1 − √p.
/// decay_fraction = 0.2
/// decay_shape = "1-sqrt"
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WsdSchedule {
    /// The LR of the stable phase.
    #[schemars(extend("exclusiveMinimum" = 0.0), range(max = MAX_LR))]
    pub peak_lr: f64,
    /// The LR of the last step; at most `peak_lr`, and > 0 for `decay_shape = "exponential"`.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = MAX_LR))]
    pub min_lr: f64,
    /// Steps of linear warmup from `peak_lr / warmup_steps`; 0 or 1 = none.
    #[serde(default)]
    #[schemars(range(max = MAX_STEPS))]
    pub warmup_steps: usize,
    /// Length of the decay in steps; `warmup_steps` + `decay_steps` ≤ `train.steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_STEPS))]
    pub decay_steps: Option<usize>,
    /// Length of the decay as a fraction of `train.steps` (rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("exclusiveMinimum" = 0.0), range(max = 1.0))]
    pub decay_fraction: Option<f64>,
    /// Shape of the decay over its progress `p` from 0 to 1.
    #[serde(default)]
    pub decay_shape: DecayShape,
}

/// Shape of a WSD decay as a function of its progress `p` ∈ [0, 1]:
/// `lr = min + (peak − min) · f(p)`, except `exponential`, which interpolates geometrically
/// `lr = peak · (min / peak)^p` (so it needs `min_lr > 0`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DecayShape {
    /// f = 1 − p
    #[default]
    Linear,
    /// f = (1 + cos πp) / 2
    Cosine,
    /// f = 1 − √p
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
    /// lr = peak · (min / peak)^p
    Exponential,
}

/// Phase-2 annealing: a linear re-warm from `start_lr` (step 0) to `peak_lr` (step
/// `warmup_steps − 1`), then a fast decay to `final_lr` at the last step. Usually with `[init]`.
///
/// ```toml
/// [schedule]
/// kind = "anneal"
/// # From phase 1's final LR to 0.75 × its peak over 10 steps…
/// start_lr = 3e-4
/// peak_lr = 2.25e-3
/// warmup_steps = 10
/// # …then an exponential decay (half-life 15 steps) that ends at 1e-5.
/// final_lr = 1e-5
/// decay = "exponential"
/// half_life_steps = 15
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AnnealSchedule {
    /// The LR of step 0 (usually phase 1's final LR); at most `peak_lr`.
    #[schemars(range(min = 0.0, max = MAX_LR))]
    pub start_lr: f64,
    /// The LR at the end of the re-warm.
    #[schemars(extend("exclusiveMinimum" = 0.0), range(max = MAX_LR))]
    pub peak_lr: f64,
    /// Steps of the re-warm; at least 2 unless `start_lr` = `peak_lr`, and less than `train.steps`.
    #[schemars(range(max = MAX_STEPS))]
    pub warmup_steps: usize,
    /// The LR of the last step; at most `peak_lr`.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = MAX_LR))]
    pub final_lr: f64,
    /// Shape of the decay after the peak.
    #[serde(default)]
    pub decay: AnnealDecay,
    /// For `decay = "exponential"`: steps over which the distance to `final_lr` halves (or give
    /// `decay_rate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("exclusiveMinimum" = 0.0), range(max = MAX_STEPS as f64))]
    pub half_life_steps: Option<f64>,
    /// For `decay = "exponential"`: per-step factor `r` (same as a half-life of ln 2 / −ln r).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("exclusiveMinimum" = 0.0, "exclusiveMaximum" = 1.0))]
    pub decay_rate: Option<f64>,
}

/// Decay of an anneal after its peak, with `k` = steps since the peak and `K` = steps from the
/// peak to the last step:
/// - `exponential`: `final + (peak − final) · (r^k − r^K) / (1 − r^K)` with `r = 2^(−1/half_life)`:
///   an exponential with that half-life, shifted and rescaled so the last step is exactly
///   `final_lr` (the correction `r^K` is negligible when K ≫ half-life);
/// - `linear` / `cosine`: as [`DecayShape`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AnnealDecay {
    /// an exponential with `half_life_steps` (or `decay_rate`), shifted to end exactly at `final_lr`
    #[default]
    Exponential,
    /// f = 1 − p, with p the progress from the peak to the last step
    Linear,
    /// f = (1 + cos πp) / 2
    Cosine,
}

/// A schedule that makes no sense; `field` is the key inside `[schedule]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "schedule.{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ScheduleError {}

fn invalid(field: &str, message: String) -> Result<(), ScheduleError> {
    Err(ScheduleError {
        field: field.to_owned(),
        message,
    })
}

/// A decay from `peak` down to `end` (min_lr / final_lr, named `field`).
fn decays_down(field: &str, end: f64, peak: f64) -> Result<(), ScheduleError> {
    if end > peak {
        return invalid(
            field,
            format!("({end}) is above peak_lr ({peak}); a decay must go down"),
        );
    }
    Ok(())
}

impl WsdSchedule {
    fn validate(&self, total_steps: usize) -> Result<(), ScheduleError> {
        decays_down("min_lr", self.min_lr, self.peak_lr)?;
        match (self.decay_steps, self.decay_fraction) {
            (Some(_), Some(_)) => {
                return invalid(
                    "decay_fraction",
                    "give either decay_steps or decay_fraction, not both".into(),
                );
            }
            (None, None) => {
                return invalid(
                    "decay_steps",
                    "missing: give decay_steps or decay_fraction (the decay's length)".into(),
                );
            }
            _ => {}
        }
        let (w, d) = (self.warmup_steps, self.decay_len(total_steps));
        if d + w > total_steps {
            return invalid(
                "decay_steps",
                format!(
                    "warmup ({w}) + decay ({d}) steps exceed the run's {total_steps} steps (train.steps)"
                ),
            );
        }
        if self.decay_shape == DecayShape::Exponential && self.min_lr <= 0.0 {
            return invalid(
                "min_lr",
                "must be > 0 for decay_shape = \"exponential\" (a geometric decay never reaches 0)"
                    .into(),
            );
        }
        Ok(())
    }
}

impl AnnealSchedule {
    fn validate(&self) -> Result<(), ScheduleError> {
        decays_down("final_lr", self.final_lr, self.peak_lr)?;
        if self.start_lr > self.peak_lr {
            return invalid(
                "start_lr",
                format!(
                    "({}) is above peak_lr ({}); the re-warm must go up",
                    self.start_lr, self.peak_lr
                ),
            );
        }
        let w = self.warmup_steps;
        if w < 2 && self.start_lr != self.peak_lr {
            return invalid(
                "warmup_steps",
                format!(
                    "is {w}; a re-warm from start_lr to peak_lr needs at least 2 steps (or set start_lr = peak_lr)"
                ),
            );
        }
        match (self.decay, self.half_life_steps, self.decay_rate) {
            (AnnealDecay::Exponential, Some(_), Some(_)) => invalid(
                "decay_rate",
                "give either half_life_steps or decay_rate, not both".into(),
            ),
            (AnnealDecay::Exponential, None, None) => invalid(
                "half_life_steps",
                "missing: decay = \"exponential\" needs half_life_steps or decay_rate".into(),
            ),
            (AnnealDecay::Linear | AnnealDecay::Cosine, Some(_), _) => invalid(
                "half_life_steps",
                "only applies to decay = \"exponential\"".into(),
            ),
            (AnnealDecay::Linear | AnnealDecay::Cosine, _, Some(_)) => invalid(
                "decay_rate",
                "only applies to decay = \"exponential\"".into(),
            ),
            _ => Ok(()),
        }
    }
}

/// LR of step `s` of a linear warmup over `w` steps from `start` (step 0) to `peak` (step w − 1).
fn warmup(s: usize, w: usize, start: f64, peak: f64) -> f64 {
    if w <= 1 {
        return peak;
    }
    start + (peak - start) * s as f64 / (w - 1) as f64
}

/// Index of the step that uses the peak LR after a warmup of `w` steps.
fn peak_step(w: usize) -> usize {
    w.max(1) - 1
}

/// Progress in [0, 1] of step `s` through a decay starting at step `from` and ending at `last`.
fn progress(s: usize, from: usize, last: usize) -> f64 {
    if last <= from {
        return 0.0;
    }
    (s.saturating_sub(from)) as f64 / (last - from) as f64
}

impl DecayShape {
    fn lr(self, p: f64, peak: f64, min: f64) -> f64 {
        match self {
            DecayShape::Linear => min + (peak - min) * (1.0 - p),
            DecayShape::Cosine => min + (peak - min) * 0.5 * (1.0 + (PI * p).cos()),
            DecayShape::OneMinusSqrt => min + (peak - min) * (1.0 - p.sqrt()),
            DecayShape::Exponential => peak * (min / peak).powf(p),
        }
    }
}

impl WsdSchedule {
    /// Number of decay steps in a run of `total` steps.
    pub fn decay_len(&self, total: usize) -> usize {
        match (self.decay_steps, self.decay_fraction) {
            (Some(d), _) => d,
            (None, Some(f)) => (f * total as f64).ceil() as usize,
            (None, None) => 0,
        }
    }
}

impl AnnealSchedule {
    /// The per-step exponential factor `r`, from `half_life_steps` or `decay_rate`.
    fn rate(&self) -> f64 {
        match (self.half_life_steps, self.decay_rate) {
            (Some(h), _) => 0.5f64.powf(1.0 / h),
            (None, Some(r)) => r,
            // Validation requires one of them for exponential decays; a plain halving per step otherwise.
            (None, None) => 0.5,
        }
    }
}

impl ScheduleConfig {
    /// The LR of optimizer step `step` (0 = first step) in a run of `total_steps` steps.
    pub fn lr(&self, step: usize, total_steps: usize) -> f64 {
        let last = total_steps.max(1) - 1;
        let s = step.min(last);
        match self {
            ScheduleConfig::Constant(c) => {
                let w = c.warmup_steps;
                if s < w {
                    warmup(s, w, c.lr / w as f64, c.lr)
                } else {
                    c.lr
                }
            }
            ScheduleConfig::Cosine(c) => {
                let w = c.warmup_steps;
                if s < w {
                    return warmup(s, w, c.peak_lr / w as f64, c.peak_lr);
                }
                DecayShape::Cosine.lr(progress(s, peak_step(w), last), c.peak_lr, c.min_lr)
            }
            ScheduleConfig::Wsd(c) => {
                let w = c.warmup_steps;
                if s < w {
                    return warmup(s, w, c.peak_lr / w as f64, c.peak_lr);
                }
                // The decay's first point (p = 0, the peak) is the step before its `d` decayed steps.
                let from = last
                    .saturating_sub(c.decay_len(total_steps))
                    .max(peak_step(w));
                if s <= from {
                    c.peak_lr
                } else {
                    c.decay_shape
                        .lr(progress(s, from, last), c.peak_lr, c.min_lr)
                }
            }
            ScheduleConfig::Anneal(c) => {
                let w = c.warmup_steps;
                if s < w {
                    return warmup(s, w, c.start_lr, c.peak_lr);
                }
                let from = peak_step(w);
                match c.decay {
                    AnnealDecay::Linear => {
                        DecayShape::Linear.lr(progress(s, from, last), c.peak_lr, c.final_lr)
                    }
                    AnnealDecay::Cosine => {
                        DecayShape::Cosine.lr(progress(s, from, last), c.peak_lr, c.final_lr)
                    }
                    AnnealDecay::Exponential => {
                        let (k, big_k) = ((s - from) as f64, (last.saturating_sub(from)) as f64);
                        if big_k == 0.0 {
                            return c.peak_lr;
                        }
                        let r = c.rate();
                        let tail = r.powf(big_k);
                        c.final_lr + (c.peak_lr - c.final_lr) * (r.powf(k) - tail) / (1.0 - tail)
                    }
                }
            }
        }
    }

    /// The configured peak LR (the largest LR of the schedule).
    pub fn peak_lr(&self) -> f64 {
        match self {
            ScheduleConfig::Constant(c) => c.lr,
            ScheduleConfig::Cosine(c) => c.peak_lr,
            ScheduleConfig::Wsd(c) => c.peak_lr,
            ScheduleConfig::Anneal(c) => c.peak_lr,
        }
    }

    pub fn warmup_steps(&self) -> usize {
        match self {
            ScheduleConfig::Constant(c) => c.warmup_steps,
            ScheduleConfig::Cosine(c) => c.warmup_steps,
            ScheduleConfig::Wsd(c) => c.warmup_steps,
            ScheduleConfig::Anneal(c) => c.warmup_steps,
        }
    }

    /// The step at which the peak LR is first used (the last warmup step).
    pub fn peak_step(&self) -> usize {
        peak_step(self.warmup_steps())
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ScheduleConfig::Constant(_) => "constant",
            ScheduleConfig::Cosine(_) => "cosine",
            ScheduleConfig::Wsd(_) => "wsd",
            ScheduleConfig::Anneal(_) => "anneal",
        }
    }

    /// Rejects schedules that cannot be what the user meant in a run of `total_steps` steps:
    /// the ranges declared on the keys, the warmup that every kind shares, then the kind's own rules.
    pub fn validate(&self, total_steps: usize) -> Result<(), ScheduleError> {
        check_ranges(self, "").map_err(|e| ScheduleError {
            field: if e.key.is_empty() {
                "kind".into()
            } else {
                e.key
            },
            message: e.message,
        })?;
        if total_steps == 0 {
            return invalid(
                "kind",
                "the run has 0 steps (train.steps must be > 0)".into(),
            );
        }
        let w = self.warmup_steps();
        let decays = !matches!(self, ScheduleConfig::Constant(_));
        if w > total_steps || (decays && w >= total_steps && total_steps > 1) {
            return invalid(
                "warmup_steps",
                format!(
                    "is {w} but the run has {total_steps} steps (train.steps); the warmup must end before the last step{}",
                    if decays {
                        " so the decay can reach its final LR"
                    } else {
                        ""
                    }
                ),
            );
        }
        match self {
            ScheduleConfig::Constant(_) => Ok(()),
            ScheduleConfig::Cosine(c) => decays_down("min_lr", c.min_lr, c.peak_lr),
            ScheduleConfig::Wsd(c) => c.validate(total_steps),
            ScheduleConfig::Anneal(c) => c.validate(),
        }
    }

    /// A few lines describing the schedule over a run of `total_steps` steps: first step, end of
    /// warmup, quartiles, last step and the largest LR used.
    pub fn summary(&self, total_steps: usize) -> String {
        let total = total_steps.max(1);
        let last = total - 1;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "LR schedule: {} over {total} steps, warmup {} steps",
            self.describe(),
            self.warmup_steps()
        );
        let mut points: Vec<(String, usize)> = vec![("first step".into(), 0)];
        if self.warmup_steps() > 1 {
            points.push(("end of warmup".into(), self.peak_step().min(last)));
        }
        for q in [25, 50, 75] {
            points.push((format!("{q}% of steps"), last * q / 100));
        }
        points.push(("last step".into(), last));
        points.sort_by_key(|(_, s)| *s);
        for (label, step) in points {
            let _ = writeln!(
                out,
                "  {label:<14} step {step:>9}  lr {:.6e}",
                self.lr(step, total)
            );
        }
        // Every kind rises during its warmup and never rises after it (`validate` holds the end
        // LRs to at most the peak), so the largest LR is at one of these steps: no need to
        // evaluate all of a long run's steps.
        let (peak_at, peak) = [0, self.peak_step().min(last), last]
            .into_iter()
            .map(|s| (s, self.lr(s, total)))
            .fold((0, f64::MIN), |a, b| if b.1 > a.1 { b } else { a });
        let _ = writeln!(out, "  {:<14} step {peak_at:>9}  lr {peak:.6e}", "peak");
        out
    }

    fn describe(&self) -> String {
        let lr = |x: f64| {
            if x == 0.0 {
                "0".to_owned()
            } else {
                format!("{x:e}")
            }
        };
        match self {
            ScheduleConfig::Constant(c) => format!("constant lr {}", lr(c.lr)),
            ScheduleConfig::Cosine(c) => format!("cosine {} → {}", lr(c.peak_lr), lr(c.min_lr)),
            ScheduleConfig::Wsd(c) => format!(
                "wsd {} → {} ({:?} decay)",
                lr(c.peak_lr),
                lr(c.min_lr),
                c.decay_shape
            ),
            ScheduleConfig::Anneal(c) => {
                let decay = match (c.decay, c.half_life_steps, c.decay_rate) {
                    (AnnealDecay::Exponential, Some(h), _) => {
                        format!("exponential decay, half-life {h} steps")
                    }
                    (AnnealDecay::Exponential, None, Some(r)) => {
                        format!("exponential decay, rate {r}/step")
                    }
                    (d, _, _) => format!("{d:?} decay"),
                };
                format!(
                    "anneal {} → {} → {} ({decay})",
                    lr(c.start_lr),
                    lr(c.peak_lr),
                    lr(c.final_lr)
                )
            }
        }
    }
}
