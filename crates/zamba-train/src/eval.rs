//! Held-out evaluation: next-token loss and perplexity per data source, and exact-match accuracy
//! of greedy answers on the synthetic instruct set. The functions here are the core of
//! `zamba-train eval` and can serve any loop that has a model and a loader.

use std::collections::BTreeMap;

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
        let mean = cross_entropy(model.forward(inputs), targets).reshape([1]);
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

/// The first `limit` held-out examples of the synthetic instruct set `section` generates.
pub fn synthetic_instruct_examples(section: &SyntheticSection, limit: usize) -> Vec<QaExample> {
    let world = World::new(section.seed);
    (0..section.instruct_examples)
        .map(|i| {
            instruct::example(
                &world,
                section.seed,
                i,
                section.web_docs,
                section.validation_fraction,
            )
        })
        .filter(|ex| instruct::is_validation(section.seed, &ex.key, section.validation_fraction))
        .take(limit)
        .map(|ex| QaExample {
            task: ex.task.to_owned(),
            prompt: ex.chat_prompt(),
            answer: ex.answer,
        })
        .collect()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Tally {
    pub examples: usize,
    pub correct: usize,
    pub accuracy: f64,
}

impl Tally {
    fn add(&mut self, correct: bool) {
        self.examples += 1;
        self.correct += usize::from(correct);
        self.accuracy = self.correct as f64 / self.examples as f64;
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
