//! Sampling (temperature, top-k, top-p, seeded) and batched generation on top of
//! [`crate::decode::Decoder`]. The filters follow transformers' logits warpers: temperature,
//! then top-k (ties with the k-th value kept), then top-p (the smallest set of most likely tokens
//! whose probability reaches p, at least one token).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::ZambaModel;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (0 < p ≤ 1).
    pub top_p: Option<f64>,
}

impl SamplingParams {
    pub const GREEDY: SamplingParams = SamplingParams {
        temperature: 0.0,
        top_k: None,
        top_p: None,
    };

    /// Rejects values transformers would reject too, with the flag's name.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "--temperature must be a finite number >= 0 (0 = greedy), got {}",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return Err("--top-k must be at least 1".into());
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(format!("--top-p must be in (0, 1], got {p}"));
        }
        Ok(())
    }
}

/// The candidate tokens and their probabilities after temperature, top-k and top-p, most likely
/// first (ties by lower id). `temperature` must be > 0.
pub fn filtered_distribution(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    let mut keep = order.len();
    if let Some(k) = params.top_k
        && k < keep
    {
        let kth = logits[order[k - 1] as usize];
        keep = order
            .iter()
            .take_while(|&&t| logits[t as usize] >= kth)
            .count();
    }
    let scaled: Vec<f64> = order[..keep]
        .iter()
        .map(|&t| logits[t as usize] as f64 / params.temperature)
        .collect();
    let max = scaled[0];
    let weights: Vec<f64> = scaled.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut probs: Vec<(u32, f64)> = order[..keep]
        .iter()
        .zip(&weights)
        .map(|(&t, w)| (t, w / total))
        .collect();
    if let Some(p) = params.top_p {
        let mut cumulative = 0.0;
        let mut cut = probs.len();
        for (i, (_, prob)) in probs.iter().enumerate() {
            cumulative += prob;
            if cumulative >= p {
                cut = i + 1;
                break;
            }
        }
        probs.truncate(cut.max(1));
        let kept: f64 = probs.iter().map(|(_, q)| q).sum();
        for (_, q) in &mut probs {
            *q /= kept;
        }
    }
    probs
}

/// Index of the largest logit (the lowest id among ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws tokens with its own seeded generator.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let probs = filtered_distribution(logits, &self.params);
        let u: f64 = self.rng.random();
        let mut cumulative = 0.0;
        for &(token, p) in &probs {
            cumulative += p;
            if u < cumulative {
                return token;
            }
        }
        probs.last().expect("at least one candidate").0
    }
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Row `i` samples with seed `seed + i`.
    pub seed: u64,
    /// Generation of a row stops after it emits one of these (the token is kept).
    pub stop_tokens: Vec<u32>,
}

/// Continues each prompt (all non-empty) until a stop token or `max_new_tokens`. All rows advance
/// together, one token per step: a row still reading its prompt feeds the next prompt token, a row
/// past it feeds its last sampled token.
pub fn generate(model: &ZambaModel, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Vec<Vec<u32>> {
    assert!(
        prompts.iter().all(|p| !p.is_empty()),
        "every prompt needs at least one token"
    );
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut decoder = model.decoder(prompts.len(), longest + opts.max_new_tokens);
    let mut samplers: Vec<Sampler> = (0..prompts.len())
        .map(|i| Sampler::new(opts.sampling, opts.seed.wrapping_add(i as u64)))
        .collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut done: Vec<bool> = vec![opts.max_new_tokens == 0; prompts.len()];
    let mut t = 0;
    while !done.iter().all(|&d| d) {
        let tokens: Vec<u32> = prompts
            .iter()
            .zip(&out)
            .map(|(p, o)| p.get(t).or(o.last()).copied().unwrap_or(0))
            .collect();
        let logits = decoder.step(&tokens);
        let vocab = logits.dims()[1];
        let logits = logits
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 logits");
        for (row, prompt) in prompts.iter().enumerate() {
            if done[row] || t + 1 < prompt.len() {
                continue;
            }
            let next = samplers[row].sample(&logits[row * vocab..(row + 1) * vocab]);
            out[row].push(next);
            done[row] = opts.stop_tokens.contains(&next) || out[row].len() >= opts.max_new_tokens;
        }
        t += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
        }
    }

    #[test]
    fn top_k_and_top_p_keep_the_right_tokens() {
        // softmax of ln([4, 3, 2, 1] / 10) = [0.4, 0.3, 0.2, 0.1], tokens in a shuffled order.
        let logits = [2f32.ln(), 4f32.ln(), 1f32.ln(), 3f32.ln()];
        let all = filtered_distribution(&logits, &params(1.0, None, None));
        let ids: Vec<u32> = all.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![1, 3, 0, 2]);
        for ((_, p), want) in all.iter().zip([0.4, 0.3, 0.2, 0.1]) {
            assert!((p - want).abs() < 1e-6);
        }
        // top-k 2: {1, 3} renormalised to 4/7, 3/7.
        let k2 = filtered_distribution(&logits, &params(1.0, Some(2), None));
        assert_eq!(k2.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!((k2[0].1 - 4.0 / 7.0).abs() < 1e-6);
        // top-p 0.7: 0.4 + 0.3 reaches 0.7 → {1, 3}; top-p 0.71 needs the third token.
        let p7 = filtered_distribution(&logits, &params(1.0, None, Some(0.7 - 1e-9)));
        assert_eq!(p7.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        let p71 = filtered_distribution(&logits, &params(1.0, None, Some(0.71)));
        assert_eq!(p71.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3, 0]);
        assert!((p71[2].1 - 0.2 / 0.9).abs() < 1e-6);
        // A tiny p still keeps the most likely token.
        let tiny = filtered_distribution(&logits, &params(1.0, None, Some(1e-6)));
        assert_eq!(tiny, vec![(1, 1.0)]);
        // top-k 2 then top-p 0.5 of the renormalised {4/7, 3/7}: the first alone (4/7 ≥ 0.5).
        let both = filtered_distribution(&logits, &params(1.0, Some(2), Some(0.5)));
        assert_eq!(both, vec![(1, 1.0)]);
        // Temperature 2 flattens: probabilities ∝ sqrt([4, 3, 2, 1]).
        let warm = filtered_distribution(&logits, &params(2.0, None, None));
        let z: f64 = [4f64, 3., 2., 1.].iter().map(|v| v.sqrt()).sum();
        assert!((warm[0].1 - 2.0 / z).abs() < 1e-6);
    }

    #[test]
    fn top_k_keeps_ties_at_the_kth_value() {
        let logits = [1.0f32, 3.0, 1.0, 0.0];
        let k2 = filtered_distribution(&logits, &params(1.0, Some(2), None));
        assert_eq!(k2.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 0, 2]);
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let logits = [2f32.ln(), 4f32.ln(), 1f32.ln(), 3f32.ln()];
        let p = params(1.0, None, None);
        let draw = |seed| {
            let mut s = Sampler::new(p, seed);
            (0..20000).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
        };
        let a = draw(5);
        assert_eq!(a, draw(5), "same seed, same tokens");
        assert_ne!(a, draw(6));
        for (token, want) in [(1u32, 0.4), (3, 0.3), (0, 0.2), (2, 0.1)] {
            let share = a.iter().filter(|&&t| t == token).count() as f64 / a.len() as f64;
            assert!(
                (share - want).abs() < 0.015,
                "token {token}: {share} vs {want}"
            );
        }
        let mut greedy = Sampler::new(SamplingParams::GREEDY, 0);
        assert_eq!(greedy.sample(&logits), 1);
        assert_eq!(argmax(&[1.0, 5.0, 5.0]), 1, "lowest id among ties");
    }

    #[test]
    fn invalid_parameters_name_the_flag() {
        assert!(
            params(-1.0, None, None)
                .validate()
                .unwrap_err()
                .contains("--temperature")
        );
        assert!(
            params(1.0, Some(0), None)
                .validate()
                .unwrap_err()
                .contains("--top-k")
        );
        assert!(
            params(1.0, None, Some(1.5))
                .validate()
                .unwrap_err()
                .contains("--top-p")
        );
        assert!(params(0.7, Some(40), Some(0.9)).validate().is_ok());
    }
}
