//! Recurrent decoding against the full forward pass, and generation.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use zamba_model::generate::{GenerateOptions, SamplingParams, argmax, generate};
use zamba_model::{RandomInit, ZambaConfig, ZambaModel, load_hf};

fn full_logits(model: &ZambaModel, tokens: &[u32], device: &Device) -> Vec<Vec<f32>> {
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, vec![1, tokens.len()]), device);
    let logits = model.forward(input);
    let vocab = logits.dims()[2];
    let flat = logits.into_data().try_into_vec::<f32>().unwrap();
    flat.chunks(vocab).map(<[f32]>::to_vec).collect()
}

/// Feeds rows of equal length through one decoder; logits per row per position.
fn recurrent_logits(model: &ZambaModel, rows: &[Vec<u32>], capacity: usize) -> Vec<Vec<Vec<f32>>> {
    let mut decoder = model.decoder(rows.len(), capacity);
    let mut out = vec![Vec::new(); rows.len()];
    for t in 0..rows[0].len() {
        let tokens: Vec<u32> = rows.iter().map(|r| r[t]).collect();
        let logits = decoder.step(&tokens);
        let vocab = logits.dims()[1];
        let flat = logits.into_data().try_into_vec::<f32>().unwrap();
        for (r, chunk) in flat.chunks(vocab).enumerate() {
            out[r].push(chunk.to_vec());
        }
    }
    out
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

#[test]
fn recurrent_decoding_equals_the_full_forward_at_every_position() {
    let device = Device::flex();
    for name in ["zamba-tiny-h2", "zamba-tiny-h1"] {
        let dir = fixture(name);
        let (_, model) = load_hf(&dir, &device).unwrap();
        let tokens: Vec<u32> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokens.json")).unwrap())
                .unwrap();
        let full = full_logits(&model, &tokens, &device);
        // Capacity 3 forces the key/value caches to grow several times.
        let steps = recurrent_logits(&model, std::slice::from_ref(&tokens), 3);
        let diff = max_diff(&steps[0], &full);
        assert_eq!(steps[0].len(), tokens.len());
        assert!(diff < 1e-4, "{name}: max |Δlogit| = {diff}");
    }
}

#[test]
fn batched_rows_and_grouped_kv_heads_decode_like_the_forward() {
    let device = Device::flex();
    let config = ZambaConfig {
        num_key_value_heads: 2,
        ..ZambaConfig::preset("zamba-tiny").unwrap()
    };
    let model = ZambaModel::from_source(&config, &mut RandomInit::new(3), &device).unwrap();
    let rows: Vec<Vec<u32>> = vec![
        (0..24).map(|i| (i * 37 + 5) % 512).collect(),
        (0..24).map(|i| (i * 11 + 200) % 512).collect(),
    ];
    let steps = recurrent_logits(&model, &rows, 64);
    for (row, got) in rows.iter().zip(&steps) {
        let diff = max_diff(got, &full_logits(&model, row, &device));
        assert!(diff < 1e-4, "max |Δlogit| = {diff}");
    }
}

/// A random model with large weights, so that its logits are far apart (greedy choices are not
/// decided by rounding).
fn sharp_model(device: &Device) -> ZambaModel {
    let config = ZambaConfig {
        initializer_range: 0.3,
        ..ZambaConfig::preset("zamba-tiny").unwrap()
    };
    ZambaModel::from_source(&config, &mut RandomInit::new(8), device).unwrap()
}

#[test]
fn greedy_generation_matches_argmax_of_the_full_forward_and_is_deterministic() {
    let device = Device::flex();
    let model = sharp_model(&device);
    // Prompts of different lengths share one batch.
    let prompts = vec![vec![1u32, 50, 60, 70, 80], vec![1u32, 9], vec![300u32]];
    let opts = GenerateOptions {
        max_new_tokens: 6,
        sampling: SamplingParams::GREEDY,
        seed: 0,
        stop_tokens: vec![],
    };
    let out = generate(&model, &prompts, &opts);
    assert_eq!(out, generate(&model, &prompts, &opts));
    for (prompt, continuation) in prompts.iter().zip(&out) {
        // Reference: rerun the whole prefix through the full forward for every new token.
        let mut seq = prompt.clone();
        for _ in 0..6 {
            let logits = full_logits(&model, &seq, &device);
            seq.push(argmax(logits.last().unwrap()));
        }
        assert_eq!(&seq[prompt.len()..], &continuation[..]);
    }
    // A stop token ends a row early and is kept.
    let first = out[0][0];
    let stopped = generate(
        &model,
        &prompts[..1],
        &GenerateOptions {
            stop_tokens: vec![first],
            ..opts.clone()
        },
    );
    assert_eq!(stopped, vec![vec![first]]);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let device = Device::flex();
    let model = sharp_model(&device);
    let prompts = vec![vec![1u32, 2, 3]];
    let opts = |seed| GenerateOptions {
        max_new_tokens: 12,
        sampling: SamplingParams {
            temperature: 1.5,
            top_k: Some(100),
            top_p: Some(0.95),
        },
        seed,
        stop_tokens: vec![],
    };
    let a = generate(&model, &prompts, &opts(1));
    assert_eq!(a, generate(&model, &prompts, &opts(1)));
    assert_ne!(a, generate(&model, &prompts, &opts(2)));
}
