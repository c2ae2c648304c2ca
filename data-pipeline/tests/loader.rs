//! The mixture loader: determinism, shares, world-size independence, resume, shuffling, errors.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use zamba_data::tokenizer::byte;
use zamba_data::{Batch, DataConfig, DataError, LoaderState, MixtureLoader, SourceConfig};

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    sources: BTreeMap<String, PathBuf>,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let sources = [("alpha", 600), ("beta", 300), ("gamma", 60)]
        .into_iter()
        .map(|(name, docs)| (name.to_owned(), numbered_source(&root, name, docs)))
        .collect();
    Fixture {
        _tmp: tmp,
        root,
        sources,
    }
}

fn config(f: &Fixture, weights: &[(&str, f64)], seq_len: usize, seed: u64) -> DataConfig {
    DataConfig {
        sources: weights
            .iter()
            .map(|(name, w)| {
                let path = f.sources[*name].to_string_lossy().into_owned();
                (
                    name.to_string(),
                    SourceConfig {
                        paths: vec![path.clone()],
                        weight: *w,
                        validation: vec![path],
                    },
                )
            })
            .collect(),
        seq_len,
        seed,
        shuffle_blocks: 4,
        prefetch: 3,
        model_vocab_size: None,
    }
}

fn batches(
    cfg: &DataConfig,
    rank: usize,
    world: usize,
    global: usize,
    resume: Option<LoaderState>,
    n: usize,
) -> (Vec<Batch>, LoaderState) {
    let mut loader = MixtureLoader::new(cfg, rank, world, global, resume, false).unwrap();
    let out = (0..n).map(|_| loader.next_batch().unwrap()).collect();
    (out, loader.state())
}

/// Splits a token stream at EOS and reads the document numbers ("name 00042 ...").
fn doc_numbers(tokens: &[u32]) -> Vec<(String, u32)> {
    tokens
        .split(|&t| t == byte::EOS)
        .filter_map(|doc| {
            let text = String::from_utf8(doc.iter().map(|&t| t as u8).collect()).ok()?;
            let mut parts = text.split(' ');
            let (name, number) = (parts.next()?, parts.next()?.parse().ok()?);
            Some((name.to_owned(), number))
        })
        .collect()
}

#[test]
fn batches_are_deterministic_and_seed_dependent() {
    let f = fixture();
    let cfg = config(&f, &[("alpha", 0.5), ("beta", 0.5)], 64, 7);
    let (a, _) = batches(&cfg, 0, 1, 8, None, 20);
    let (b, _) = batches(&cfg, 0, 1, 8, None, 20);
    assert_eq!(a, b);
    let (c, _) = batches(
        &config(&f, &[("alpha", 0.5), ("beta", 0.5)], 64, 8),
        0,
        1,
        8,
        None,
        20,
    );
    assert_ne!(a, c);
    for batch in &a {
        assert_eq!(
            (batch.rows, batch.seq_len, batch.inputs.len()),
            (8, 64, 8 * 64)
        );
        for r in 0..batch.rows {
            let row = r * 64;
            assert_eq!(
                batch.inputs[row + 1..row + 64],
                batch.targets[row..row + 63],
                "targets are inputs shifted by one"
            );
        }
    }
}

#[test]
fn mixture_token_shares_hold_within_two_percent_over_1000_batches() {
    let f = fixture();
    for weights in [
        [0.6, 0.3, 0.1],
        [0.02, 0.9, 0.08],
        [1.0, 1.0, 1.0],
        [0.0, 0.25, 0.75],
    ] {
        let named = [
            ("alpha", weights[0]),
            ("beta", weights[1]),
            ("gamma", weights[2]),
        ];
        let cfg = config(&f, &named, 16, 3);
        let total_weight: f64 = weights.iter().sum();
        let (all, _) = batches(&cfg, 0, 1, 12, None, 1000);
        let mut tokens: BTreeMap<String, u64> = BTreeMap::new();
        for batch in &all {
            for (name, t) in &batch.source_tokens {
                *tokens.entry(name.clone()).or_default() += t;
            }
            // Cumulatively every source stays within one row of its exact share, so each batch is within two.
            let rows_so_far = 12.0 * (batch.step + 1) as f64;
            for (name, w) in named {
                let rows = batch.source_tokens[name] as f64 / 16.0;
                assert!(
                    (rows - 12.0 * w / total_weight).abs() < 2.0,
                    "{weights:?} step {}: {name} has {rows} rows",
                    batch.step
                );
                let cumulative = tokens[name] as f64 / 16.0;
                assert!(
                    (cumulative - rows_so_far * w / total_weight).abs() < 1.0 + 1e-9,
                    "{weights:?} step {}: {name}",
                    batch.step
                );
            }
        }
        let sum: u64 = tokens.values().sum();
        assert_eq!(sum, 1000 * 12 * 16);
        for (name, w) in named {
            let share = tokens[name] as f64 / sum as f64;
            assert!(
                (share - w / total_weight).abs() <= 0.02,
                "{weights:?}: {name} share {share}"
            );
        }
    }
}

#[test]
fn global_batch_does_not_depend_on_world_size() {
    let f = fixture();
    let cfg = config(&f, &[("alpha", 0.5), ("beta", 0.3), ("gamma", 0.2)], 32, 11);
    let (single, single_state) = batches(&cfg, 0, 1, 8, None, 12);
    for world in [2, 4] {
        let parts: Vec<(Vec<Batch>, LoaderState)> = (0..world)
            .map(|rank| batches(&cfg, rank, world, 8, None, 12))
            .collect();
        for step in 0..12 {
            let mut inputs = Vec::new();
            let mut targets = Vec::new();
            for (rank_batches, _) in &parts {
                assert_eq!(rank_batches[step].rows, 8 / world);
                inputs.extend_from_slice(&rank_batches[step].inputs);
                targets.extend_from_slice(&rank_batches[step].targets);
            }
            assert_eq!(inputs, single[step].inputs, "world {world} step {step}");
            assert_eq!(targets, single[step].targets, "world {world} step {step}");
        }
        for (_, state) in &parts {
            assert_eq!(
                *state, single_state,
                "the state is the same on every rank and world size"
            );
        }
    }
}

#[test]
fn every_row_names_its_window_and_a_run_uses_each_window_once() {
    let f = fixture();
    let cfg = config(&f, &[("alpha", 0.6), ("beta", 0.4)], 32, 9);
    let (single, state) = batches(&cfg, 0, 1, 8, None, 30);
    // (source, window) → the row's inputs and targets, over the whole run.
    let mut rows: BTreeMap<(u16, u64), (Vec<u32>, Vec<u32>)> = BTreeMap::new();
    for batch in &single {
        for r in 0..batch.rows {
            let span = r * 32..(r + 1) * 32;
            let id = (batch.row_sources[r], batch.row_windows[r]);
            let row = (
                batch.inputs[span.clone()].to_vec(),
                batch.targets[span].to_vec(),
            );
            assert!(rows.insert(id, row).is_none(), "{id:?} used twice");
        }
    }
    for (index, name) in ["alpha", "beta"].iter().enumerate() {
        let windows: Vec<u64> = rows
            .keys()
            .filter(|(s, _)| *s == index as u16)
            .map(|&(_, w)| w)
            .collect();
        // None skipped: the source's first windows, up to its cursor.
        assert_eq!(
            windows,
            (0..state.sources[*name].windows).collect::<Vec<_>>()
        );
        // The ids are the rows' places in the stream: window w's last target is window w+1's
        // first input.
        for w in 1..windows.len() as u64 {
            let (before, after) = (&rows[&(index as u16, w - 1)], &rows[&(index as u16, w)]);
            assert_eq!(before.1[31], after.0[0], "{name} windows {} and {w}", w - 1);
        }
    }
    // The same ids on two ranks, in the global batch's row order.
    let halves: Vec<Vec<Batch>> = (0..2).map(|r| batches(&cfg, r, 2, 8, None, 30).0).collect();
    for (step, whole) in single.iter().enumerate() {
        let ids = |b: &Batch| -> Vec<(u16, u64)> {
            b.row_sources
                .iter()
                .copied()
                .zip(b.row_windows.iter().copied())
                .collect()
        };
        assert_eq!(
            [ids(&halves[0][step]), ids(&halves[1][step])].concat(),
            ids(whole),
            "step {step}"
        );
    }
}

#[test]
fn resume_reproduces_following_batches_exactly_even_on_another_world_size() {
    let f = fixture();
    let cfg = config(&f, &[("alpha", 0.7), ("gamma", 0.3)], 48, 5);
    let (straight, _) = batches(&cfg, 0, 1, 4, None, 40);
    let (_, state) = batches(&cfg, 0, 1, 4, None, 15);
    let json = serde_json::to_string(&state).unwrap();
    assert!(json.len() < 512, "state is small: {json}");
    let restored: LoaderState = serde_json::from_str(&json).unwrap();
    let (resumed, _) = batches(&cfg, 0, 1, 4, Some(restored.clone()), 25);
    assert_eq!(resumed, straight[15..]);
    // Saved with one rank, resumed on two.
    let halves: Vec<Vec<Batch>> = (0..2)
        .map(|r| batches(&cfg, r, 2, 4, Some(restored.clone()), 25).0)
        .collect();
    for (i, whole) in straight[15..].iter().enumerate() {
        assert_eq!(
            [halves[0][i].inputs.clone(), halves[1][i].inputs.clone()].concat(),
            whole.inputs
        );
    }
}

#[test]
fn resuming_on_changed_data_needs_explicit_permission() {
    let f = fixture();
    let cfg = config(&f, &[("alpha", 0.5), ("beta", 0.5)], 32, 1);
    let (_, state) = batches(&cfg, 0, 1, 4, None, 5);
    let changed = config(&f, &[("alpha", 0.8), ("beta", 0.2)], 32, 1);
    let err = MixtureLoader::new(&changed, 0, 1, 4, Some(state.clone()), false)
        .err()
        .expect("mismatch must fail");
    assert!(
        matches!(
            err.downcast_ref::<DataError>(),
            Some(DataError::FingerprintMismatch { .. })
        ),
        "{err:#}"
    );
    assert!(format!("{err:#}").contains("allow"));
    let mut loader = MixtureLoader::new(&changed, 0, 1, 4, Some(state.clone()), true).unwrap();
    loader.next_batch().unwrap();
    let after = loader.state();
    assert_ne!(after.fingerprint, state.fingerprint);
    assert!(
        after.sources["alpha"].windows > state.sources["alpha"].windows,
        "sources continue from their saved position"
    );
    // The same mixture written with other weight units is the same data.
    let scaled = config(&f, &[("alpha", 2.0), ("beta", 2.0)], 32, 1);
    assert!(MixtureLoader::new(&scaled, 0, 1, 4, Some(state.clone()), false).is_ok());
    // A different seq_len is different data too.
    let err = MixtureLoader::new(
        &config(&f, &[("alpha", 0.5), ("beta", 0.5)], 64, 1),
        0,
        1,
        4,
        Some(state),
        false,
    )
    .err()
    .unwrap();
    assert!(matches!(
        err.downcast_ref::<DataError>(),
        Some(DataError::FingerprintMismatch { .. })
    ));
}

#[test]
fn documents_are_shuffled_each_epoch_and_epochs_are_counted() {
    let f = fixture();
    // One small source; with one row per step the inputs concatenate to the source's stream.
    let cfg = config(&f, &[("gamma", 1.0)], 50, 9);
    let mut loader = MixtureLoader::new(&cfg, 0, 1, 1, None, false).unwrap();
    let epoch_tokens = loader.sources()[0].tokens as usize;
    let mut stream = Vec::new();
    while stream.len() < 2 * epoch_tokens {
        stream.extend(loader.next_batch().unwrap().inputs);
    }
    let first = doc_numbers(&stream[..epoch_tokens]);
    let second = doc_numbers(&stream[epoch_tokens..2 * epoch_tokens]);
    for epoch in [&first, &second] {
        let numbers: BTreeSet<u32> = epoch.iter().map(|(_, n)| *n).collect();
        assert_eq!(numbers.len(), 60, "each epoch holds every document once");
        assert_eq!(epoch.len(), 60);
    }
    let order: Vec<u32> = first.iter().map(|d| d.1).collect();
    assert_ne!(order, (0..60).collect::<Vec<_>>(), "not in file order");
    assert_ne!(
        order,
        second.iter().map(|d| d.1).collect::<Vec<_>>(),
        "reshuffled per epoch"
    );
    let epochs = loader.epochs()["gamma"];
    assert!((2.0..2.1).contains(&epochs), "{epochs}");
}

#[test]
fn validation_is_sequential_and_split_evenly_across_ranks() {
    let f = fixture();
    let cfg = config(&f, &[("alpha", 1.0), ("beta", 1.0)], 40, 0);
    let loader = MixtureLoader::new(&cfg, 0, 1, 2, None, false).unwrap();
    assert_eq!(loader.validation_sources(), ["alpha", "beta"]);
    let whole: Vec<Batch> = loader
        .validation("beta", 16)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for b in &whole {
        assert!(
            b.row_sources.iter().all(|&s| s == 1),
            "rows are labelled with beta's index"
        );
        assert_eq!(b.source_tokens["beta"], (b.rows * 40) as u64);
    }
    let windows: usize = whole.iter().map(|b| b.rows).sum();
    assert_eq!(
        windows as u64,
        (loader.sources()[1].validation_tokens - 1) / 40
    );
    let inputs: Vec<u32> = whole.iter().flat_map(|b| b.inputs.clone()).collect();
    let numbers: Vec<u32> = doc_numbers(&inputs).iter().map(|d| d.1).collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "validation reads in file order"
    );
    let mut parts = Vec::new();
    for rank in 0..3 {
        let l = MixtureLoader::new(&cfg, rank, 3, 3, None, false).unwrap();
        let v = l.validation("beta", 16).unwrap();
        assert_eq!(v.windows(), windows as u64 / 3);
        parts.push(
            v.map(Result::unwrap)
                .flat_map(|b| b.inputs)
                .collect::<Vec<u32>>(),
        );
    }
    // Window w goes to rank w % 3.
    for (w, window) in inputs.chunks(40).take(windows / 3 * 3).enumerate() {
        assert_eq!(&parts[w % 3][(w / 3) * 40..(w / 3 + 1) * 40], window);
    }
    assert!(loader.validation("gamma", 4).is_err());
}

fn expect_err(cfg: &DataConfig) -> String {
    format!(
        "{:#}",
        MixtureLoader::new(cfg, 0, 1, 4, None, false)
            .err()
            .expect("config must be rejected")
    )
}

#[test]
fn bad_configs_and_data_are_rejected_clearly() {
    let f = fixture();
    let mut cfg = config(&f, &[("alpha", 0.5), ("beta", 0.5)], 32, 0);
    cfg.sources.get_mut("beta").unwrap().weight = -1.0;
    assert!(expect_err(&cfg).contains("\"beta\" has weight -1"));
    let cfg = config(&f, &[("alpha", 0.0), ("beta", 0.0)], 32, 0);
    assert!(expect_err(&cfg).contains("all source weights are zero"));

    let mut cfg = config(&f, &[("alpha", 1.0)], 32, 0);
    let pattern = f.root.join("nothing-*").to_string_lossy().into_owned();
    cfg.sources.get_mut("alpha").unwrap().paths = vec![pattern.clone()];
    let text = expect_err(&cfg);
    assert!(
        text.contains(&pattern) && text.contains("matches no shard"),
        "{text}"
    );

    let mut cfg = config(&f, &[("alpha", 1.0)], 32, 0);
    cfg.model_vocab_size = Some(100);
    assert!(expect_err(&cfg).contains("model_vocab_size is 100"));

    // Sources tokenized with different tokenizers.
    let bpe_dir = f.root.join("bpe");
    let mut opts = zamba_data::TokenizeOptions::new(
        vec![f.root.join("beta.parquet").to_string_lossy().into_owned()],
        &bpe_dir,
        zamba_data::TokenizerSpec::File(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bpe-1000.json"),
        ),
    );
    opts.row_group_tokens = 1000;
    zamba_data::tokenize(&opts).unwrap();
    let mut cfg = config(&f, &[("alpha", 1.0), ("beta", 1.0)], 32, 0);
    cfg.sources.get_mut("beta").unwrap().paths = vec![bpe_dir.to_string_lossy().into_owned()];
    let err = MixtureLoader::new(&cfg, 0, 1, 4, None, false)
        .err()
        .unwrap();
    assert!(
        matches!(
            err.downcast_ref::<DataError>(),
            Some(DataError::TokenizerMismatch { .. })
        ),
        "{err:#}"
    );
    assert!(format!("{err:#}").contains("bpe-1000.json"));

    // Global batch not divisible by the world size.
    let cfg = config(&f, &[("alpha", 1.0)], 32, 0);
    assert!(
        format!(
            "{:#}",
            MixtureLoader::new(&cfg, 0, 3, 4, None, false)
                .err()
                .unwrap()
        )
        .contains("multiple of the world size")
    );
}

#[test]
fn out_of_vocabulary_ids_surface_in_the_training_thread() {
    let f = fixture();
    // A manifest that claims a smaller vocabulary than the ids its shards hold.
    let dir = &f.sources["gamma"];
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    manifest["tokenizer"]["vocab_size"] = serde_json::json!(200);
    std::fs::write(&path, serde_json::to_string(&manifest).unwrap()).unwrap();
    let cfg = config(&f, &[("gamma", 1.0)], 32, 0);
    let mut loader = MixtureLoader::new(&cfg, 0, 1, 4, None, false).unwrap();
    assert_eq!(loader.vocab_size(), 200);
    let err = loader.next_batch().unwrap_err();
    assert!(
        matches!(
            err.downcast_ref::<DataError>(),
            Some(DataError::TokenOutOfVocab { vocab: 200, .. })
        ),
        "{err:#}"
    );
    assert!(
        format!("{err:#}").contains("shard-00000.parquet"),
        "{err:#}"
    );
    assert!(loader.next_batch().is_err(), "the loader stays failed");
}

#[test]
fn data_config_reads_from_json_with_defaults_and_relative_paths() {
    let f = fixture();
    let path = f.root.join("phase1.json");
    std::fs::write(&path, r#"{"seq_len": 64, "sources": {"web": {"paths": ["alpha"], "weight": 1, "validation": ["beta"]}}}"#).unwrap();
    let cfg = DataConfig::load(&path).unwrap();
    assert_eq!(
        (
            cfg.seed,
            cfg.shuffle_blocks,
            cfg.prefetch,
            cfg.model_vocab_size
        ),
        (0, 16, 4, None)
    );
    assert_eq!(
        cfg.sources["web"].paths,
        vec![f.root.join("alpha").to_string_lossy().into_owned()]
    );
    let mut loader = MixtureLoader::new(&cfg, 0, 1, 2, None, false).unwrap();
    assert_eq!(loader.next_batch().unwrap().rows, 2);
    std::fs::write(&path, r#"{"seq_len": 64, "sources": {}, "typo_field": 1}"#).unwrap();
    assert!(format!("{:#}", DataConfig::load(&path).unwrap_err()).contains("typo_field"));
}
