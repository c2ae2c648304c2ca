//! Held-out evaluation: next-token loss and perplexity per data source, and exact-match accuracy
//! of greedy answers on the synthetic instruct set. The functions here are the core of
//! `zamba-train eval` and can serve any loop that has a model and a loader.

use std::collections::{BTreeMap, HashSet};

use anyhow::Result;
use burn::tensor::Tensor;
use indicatif::ProgressBar;
use serde::Serialize;
use zamba_data::synth::instruct;
use zamba_data::synth::world::World;
use zamba_data::{Batch, MixtureLoader};
use zamba_model::generate::{GenerateOptions, SamplingParams, generate};
use zamba_model::{IGNORE_INDEX, ZambaModel, cross_entropy};

use crate::batch::micro_batch;
use crate::config::SyntheticSection;

/// Loss of one source's held-out set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceLoss {
    /// Mean next-token cross-entropy (nats) over every target that counts.
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Targets counted (masked targets excluded).
    pub tokens: u64,
    pub sequences: u64,
}

/// Mean loss over `source`'s held-out set, in batches of `rows` sequences, on at most
/// `max_batches` batches; `progress` advances by each batch's sequences.
pub fn held_out_loss(
    model: &ZambaModel,
    loader: &MixtureLoader,
    source: &str,
    rows: usize,
    max_batches: Option<usize>,
    progress: &ProgressBar,
) -> Result<SourceLoss> {
    let batches = loader
        .validation(source, rows)?
        .take(max_batches.unwrap_or(usize::MAX));
    let sums = loss_sums(model, batches, |batch| progress.inc(batch.rows as u64))?;
    let loss = sums.loss.into_scalar::<f32>() as f64 / sums.tokens.max(1) as f64;
    Ok(SourceLoss {
        loss,
        perplexity: loss.exp(),
        tokens: sums.tokens,
        sequences: sums.sequences,
    })
}

/// The summed loss of some held-out batches, before dividing by the tokens.
pub struct LossSums {
    /// Σ over batches of (mean loss × counted targets), shape `[1]`, on the model's device
    /// (no host sync per batch).
    pub loss: Tensor<1>,
    /// Targets counted (masked targets excluded).
    pub tokens: u64,
    pub sequences: u64,
}

/// Forward passes over `batches` (on a model without autodiff); `on_batch` sees each batch.
pub fn loss_sums(
    model: &ZambaModel,
    batches: impl Iterator<Item = Result<Batch>>,
    mut on_batch: impl FnMut(&Batch),
) -> Result<LossSums> {
    let device = model.embed_tokens.weight.device();
    let mut sums = LossSums {
        loss: Tensor::zeros([1], &device),
        tokens: 0,
        sequences: 0,
    };
    for batch in batches {
        let batch = batch?;
        let (inputs, targets) = micro_batch(&batch, 0, batch.rows, &device);
        let counted = crate::batch::target_ids(&batch, 0..batch.rows * batch.seq_len)
            .iter()
            .filter(|&&t| t != IGNORE_INDEX)
            .count() as u64;
        let mean = cross_entropy(model.logits(inputs), targets).reshape([1]);
        sums.loss = sums.loss + mean * counted as f64;
        sums.tokens += counted;
        sums.sequences += batch.rows as u64;
        on_batch(&batch);
    }
    Ok(sums)
}

/// A question with one right answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QaExample {
    pub task: String,
    /// The text the model is prompted with (ends where the answer starts).
    pub prompt: String,
    pub answer: String,
}

/// The first `limit` distinct held-out problems of the synthetic instruct set `section`
/// generates (a problem drawn twice counts once, so the examples are independent).
pub fn synthetic_instruct_examples(section: &SyntheticSection, limit: usize) -> Vec<QaExample> {
    let world = World::new(section.seed);
    let mix = section.options().tasks;
    let mut seen = HashSet::new();
    (0..section.instruct_examples)
        .map(|i| {
            instruct::example(
                &world,
                section.seed,
                i,
                &mix,
                section.web_docs,
                section.validation_fraction,
            )
        })
        .filter(|ex| instruct::is_validation(section.seed, &ex.key, section.validation_fraction))
        .filter(|ex| seen.insert(ex.key.clone()))
        .take(limit)
        .map(|ex| QaExample {
            task: ex.task.to_owned(),
            prompt: ex.chat_prompt(),
            answer: ex.answer,
        })
        .collect()
}

/// Correct answers out of some examples.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Tally {
    pub examples: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// 95% confidence interval of the accuracy (Wilson score interval).
    pub ci95: Interval,
}

impl Tally {
    fn add(&mut self, correct: bool) {
        self.examples += 1;
        self.correct += usize::from(correct);
        self.accuracy = self.correct as f64 / self.examples as f64;
        self.ci95 = wilson_interval(self.correct, self.examples, Z_95);
    }
}

/// A closed interval `[low, high]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

/// The standard normal's 0.975 quantile: a two-sided 95% interval.
pub const Z_95: f64 = 1.959_963_984_540_054;

/// Wilson score interval of a binomial proportion, `successes` of `trials`, at `z` standard
/// errors. Unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse to a
/// point at 0 or `trials` successes, which is where exact-match scores of small models sit.
/// Zero trials give the uninformative [0, 1].
pub fn wilson_interval(successes: usize, trials: usize, z: f64) -> Interval {
    if trials == 0 {
        return Interval {
            low: 0.0,
            high: 1.0,
        };
    }
    let n = trials as f64;
    let p = successes as f64 / n;
    let z2 = z * z;
    let denominator = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denominator;
    let half_width = z / denominator * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Interval {
        low: (centre - half_width).max(0.0),
        high: (centre + half_width).min(1.0),
    }
}

/// Exact-match accuracy of greedy answers, overall and per task, with a few answers shown.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ExactMatch {
    pub overall: Tally,
    pub by_task: BTreeMap<String, Tally>,
    /// The first examples with the model's answer.
    pub samples: Vec<(QaExample, String)>,
}

const SAMPLES_SHOWN: usize = 8;

/// Prompts the model with each example (through the tokenizer's template, which adds what
/// precedes a document), decodes greedily until EOS or a few tokens past the answer's length,
/// and compares the trimmed output with the answer.
pub fn exact_match(
    model: &ZambaModel,
    tokenizer: &tokenizers::Tokenizer,
    eos: u32,
    examples: &[QaExample],
    batch_size: usize,
    progress: &ProgressBar,
) -> Result<ExactMatch> {
    let encode = |text: &str, special: bool| -> Result<Vec<u32>> {
        Ok(tokenizer
            .encode(text, special)
            .map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?
            .get_ids()
            .to_vec())
    };
    let mut result = ExactMatch::default();
    for chunk in examples.chunks(batch_size.max(1)) {
        let prompts: Vec<Vec<u32>> = chunk
            .iter()
            .map(|ex| encode(&ex.prompt, true))
            .collect::<Result<_>>()?;
        let longest_answer = chunk
            .iter()
            .map(|ex| encode(&ex.answer, false).map(|ids| ids.len()))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(0);
        let opts = GenerateOptions {
            max_new_tokens: longest_answer + 4,
            sampling: SamplingParams::GREEDY,
            seed: 0,
            stop_tokens: vec![eos],
        };
        for (ex, ids) in chunk.iter().zip(generate(model, &prompts, &opts)) {
            let output = tokenizer
                .decode(&ids, true)
                .map_err(|e| anyhow::anyhow!("decoding an answer: {e}"))?;
            let output = output.trim().to_owned();
            let correct = output == ex.answer;
            result.overall.add(correct);
            result
                .by_task
                .entry(ex.task.clone())
                .or_default()
                .add(correct);
            if result.samples.len() < SAMPLES_SHOWN {
                result.samples.push((ex.clone(), output));
            }
        }
        progress.inc(chunk.len() as u64);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: Interval, low: f64, high: f64, tolerance: f64) {
        assert!(
            (got.low - low).abs() <= tolerance && (got.high - high).abs() <= tolerance,
            "{got:?}, expected [{low}, {high}]"
        );
    }

    #[test]
    fn wilson_interval_matches_hand_computed_values() {
        // Newcombe (1998)'s worked example 81/263 → [0.2553, 0.3662]; 0/10 and 5/10 by hand.
        close(wilson_interval(81, 263, Z_95), 0.2553, 0.3662, 1e-4);
        close(wilson_interval(0, 10, Z_95), 0.0, 0.2775, 1e-4);
        close(wilson_interval(5, 10, Z_95), 0.2366, 0.7634, 1e-4);
        // Closed forms: at 0 successes the upper end is (z²/n) / (1 + z²/n), at n successes the
        // interval mirrors it.
        let r = Z_95 * Z_95 / 256.0;
        close(wilson_interval(0, 256, Z_95), 0.0, r / (1.0 + r), 1e-12);
        close(wilson_interval(256, 256, Z_95), 1.0 / (1.0 + r), 1.0, 1e-12);
        // 57/128 worked by hand: centre (p + z²/2n)/(1 + z²/n), half-width
        // z/(1 + z²/n)·√(p(1−p)/n + z²/4n²).
        close(
            wilson_interval(57, 128, Z_95),
            0.362_055_25,
            0.531_756_61,
            1e-8,
        );
        close(wilson_interval(0, 0, Z_95), 0.0, 1.0, 0.0);
    }

    #[test]
    fn tally_keeps_accuracy_and_interval_current() {
        let mut tally = Tally::default();
        for correct in [
            true, false, false, false, true, false, false, false, false, false,
        ] {
            tally.add(correct);
        }
        assert_eq!((tally.correct, tally.examples), (2, 10));
        assert!((tally.accuracy - 0.2).abs() < 1e-12);
        assert_eq!(tally.ci95, wilson_interval(2, 10, Z_95));
        assert!(tally.ci95.low < 0.2 && 0.2 < tally.ci95.high);
        let json = serde_json::to_value(&tally).unwrap();
        assert_eq!(json["ci95"]["low"], tally.ci95.low);
        assert_eq!(json["ci95"]["high"], tally.ci95.high);
    }
}
