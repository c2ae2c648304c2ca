//! Synthetic data, the synthetic cache, tokenizer training and the CLI surface.

mod common;

use arrow_array::cast::AsArray;
use clap::Parser;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use zamba_data::synth::instruct::{self, TaskMix, expected_answer};
use zamba_data::synth::world::{Fact, World};
use zamba_data::tokenizer::{SpecialTokens, TextTokenizer};
use zamba_data::{
    DataCommand, MixtureLoader, SynthKind, SynthOptions, SyntheticCacheOptions, TokenizerSpec,
    TrainTokenizerOptions, ensure_synthetic_cache, synth, train_tokenizer,
};

/// Every row of the parquet files in `dir` as column name → value.
fn read_rows(dir: &Path) -> Vec<BTreeMap<String, String>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut rows = Vec::new();
    for file in files {
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(file).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let schema = batch.schema();
            for r in 0..batch.num_rows() {
                rows.push(
                    schema
                        .fields()
                        .iter()
                        .enumerate()
                        .map(|(c, f)| {
                            (
                                f.name().clone(),
                                batch.column(c).as_string::<i32>().value(r).to_owned(),
                            )
                        })
                        .collect(),
                );
            }
        }
    }
    rows
}

fn options(out: &Path, seed: u64) -> SynthOptions {
    let mut o = SynthOptions::new(SynthKind::All, out);
    o.seed = seed;
    o.web_docs = 3000;
    o.instruct_examples = 3000;
    o.validation_fraction = 0.1;
    o.rows_per_file = 1000;
    o
}

#[test]
fn synth_is_deterministic_with_disjoint_held_out_splits() {
    let tmp = tempfile::tempdir().unwrap();
    let reports = synth(&options(&tmp.path().join("a"), 1)).unwrap();
    synth(&options(&tmp.path().join("b"), 1)).unwrap();
    synth(&options(&tmp.path().join("c"), 2)).unwrap();
    assert_eq!(reports.len(), 4);
    for report in &reports {
        assert!(report.rows > 0, "{} is empty", report.name);
        for file in &report.files {
            let relative = file.strip_prefix(tmp.path().join("a")).unwrap();
            let a = std::fs::read(file).unwrap();
            assert_eq!(
                a,
                std::fs::read(tmp.path().join("b").join(relative)).unwrap(),
                "same seed, same bytes"
            );
        }
    }
    let web_train = read_rows(&tmp.path().join("a/web/train"));
    let web_val = read_rows(&tmp.path().join("a/web/validation"));
    let other_seed = read_rows(&tmp.path().join("c/web/train"));
    assert_ne!(web_train[0]["text"], other_seed[0]["text"]);
    assert_eq!(web_train.len() + web_val.len(), 3000);
    let held_out = web_val.len() as f64 / 3000.0;
    assert!((0.07..0.13).contains(&held_out), "{held_out}");
    let train_ids: BTreeSet<_> = web_train.iter().map(|r| r["id"].clone()).collect();
    assert!(web_val.iter().all(|r| !train_ids.contains(&r["id"])));
    assert_eq!(
        web_train[0].keys().cloned().collect::<Vec<_>>(),
        ["id", "source", "text"]
    );
    let distinct: BTreeSet<_> = web_train.iter().map(|r| r["text"].clone()).collect();
    assert!(distinct.len() > web_train.len() * 9 / 10, "documents vary");
}

#[test]
fn instruct_answers_are_checkable() {
    let tmp = tempfile::tempdir().unwrap();
    synth(&options(tmp.path(), 4)).unwrap();
    let web_docs: Vec<String> = read_rows(&tmp.path().join("web/train"))
        .into_iter()
        .map(|r| r["text"].clone())
        .collect();
    let world = World::new(4);
    let questions: BTreeMap<String, Fact> = world
        .facts
        .iter()
        .map(|&f| (world.question(f).0, f))
        .collect();
    let mut fact_questions = BTreeMap::new();
    let train = read_rows(&tmp.path().join("instruct/train"));
    let validation = read_rows(&tmp.path().join("instruct/validation"));
    let mut tasks: BTreeMap<String, usize> = BTreeMap::new();
    for row in train.iter().chain(&validation) {
        *tasks.entry(row["task"].clone()).or_default() += 1;
        assert_eq!(
            row["text"],
            format!(
                "<|user|>\n{}\n<|assistant|>\n{}",
                row["prompt"], row["answer"]
            )
        );
        match expected_answer(&row["task"], &row["prompt"]) {
            Some(expected) => assert_eq!(expected, row["answer"], "{row:?}"),
            None => {
                assert_eq!(row["task"], "fact");
                fact_questions.insert(row["prompt"].clone(), row["answer"].clone());
            }
        }
    }
    // Every fact asked about is stated (subject and object together) in some training web document.
    for (prompt, answer) in &fact_questions {
        let fact = questions[prompt];
        assert_eq!(world.question(fact).1, *answer);
        let (subject, object) = (world.subject(fact), world.object(fact));
        assert!(
            web_docs
                .iter()
                .any(|d| d.contains(subject) && d.contains(object)),
            "{prompt} is not answered by the web training set"
        );
    }
    assert!(fact_questions.len() > 50);
    for task in ["arithmetic", "sort", "copy", "reverse", "count", "fact"] {
        assert!(
            tasks.get(task).copied().unwrap_or(0) > 50,
            "task {task} is represented: {tasks:?}"
        );
    }
    let train_prompts: BTreeSet<_> = train.iter().map(|r| r["prompt"].clone()).collect();
    assert!(!validation.is_empty());
    assert!(
        validation
            .iter()
            .all(|r| !train_prompts.contains(&r["prompt"])),
        "held-out problems never appear in training"
    );
}

#[test]
fn synthetic_cache_is_built_once_and_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = SyntheticCacheOptions {
        web_docs: 1500,
        instruct_examples: 1500,
        ..Default::default()
    };
    let cache = ensure_synthetic_cache(tmp.path(), &opts).unwrap();
    let manifest = std::fs::read(cache.web_train.join("manifest.json")).unwrap();
    let again = ensure_synthetic_cache(tmp.path(), &opts).unwrap();
    assert_eq!(again.web_train, cache.web_train);
    assert_eq!(
        std::fs::read(again.web_train.join("manifest.json")).unwrap(),
        manifest,
        "not rebuilt"
    );
    let other = tempfile::tempdir().unwrap();
    let rebuilt = ensure_synthetic_cache(other.path(), &opts).unwrap();
    let fingerprint = |dir: &Path| zamba_data::Manifest::load(dir).unwrap().content_fingerprint;
    assert_eq!(
        fingerprint(&rebuilt.instruct_train),
        fingerprint(&cache.instruct_train),
        "deterministic"
    );

    let cfg = cache.mixture_config(128, 0, 0.6, 0.4);
    let mut loader = MixtureLoader::new(&cfg, 0, 1, 8, None, false).unwrap();
    assert_eq!(loader.vocab_size(), 259);
    let batch = loader.next_batch().unwrap();
    assert_eq!(batch.inputs.len(), 8 * 128);
    assert!(batch.inputs.iter().all(|&t| t < 259));
    assert_eq!(
        loader.validation_sources(),
        vec!["instruct".to_string(), "web".to_string()]
    );
    assert!(loader.validation("web", 4).unwrap().next().is_some());
}

#[test]
fn trained_tokenizer_is_a_standard_tokenizer_json() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = options(&tmp.path().join("raw"), 0);
    o.kind = SynthKind::Web;
    synth(&o).unwrap();
    let out = tmp.path().join("tok/tokenizer.json");
    let opts = TrainTokenizerOptions::new(
        vec![
            tmp.path()
                .join("raw/web/train")
                .to_string_lossy()
                .into_owned(),
        ],
        &out,
        600,
    );
    assert_eq!(train_tokenizer(&opts).unwrap(), 600);
    let tok =
        TextTokenizer::load(&TokenizerSpec::File(out.clone()), &SpecialTokens::default()).unwrap();
    assert_eq!(tok.info.vocab_size, 600);
    assert_eq!(tok.info.eos_id, 0, "<|endoftext|> is found as EOS");
    let text = "Notes on a city: the market is busy.";
    let ids = tok.encode(text).unwrap();
    assert!(
        ids.len() < text.len() / 2,
        "merges were learned: {} ids",
        ids.len()
    );
    let hf = tokenizers::Tokenizer::from_file(&out).unwrap();
    assert_eq!(hf.decode(&ids, false).unwrap(), text);

    let small = TrainTokenizerOptions::new(
        vec![
            tmp.path()
                .join("raw/web/train")
                .to_string_lossy()
                .into_owned(),
        ],
        tmp.path().join("x.json"),
        100,
    );
    assert!(format!("{:#}", train_tokenizer(&small).unwrap_err()).contains("too small"));
}

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    data: DataCommand,
}

#[test]
fn cli_parses_and_runs_the_subcommands() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    let out = tmp.path().join("tok");
    let parse = |args: &[&str]| {
        Cli::try_parse_from(std::iter::once("data").chain(args.iter().copied()))
            .unwrap()
            .data
    };
    let raw_s = raw.to_string_lossy().into_owned();
    zamba_data::run(parse(&[
        "synth",
        "--kind",
        "web",
        "--out",
        &raw_s,
        "--web-docs",
        "200",
        "--seed",
        "3",
    ]))
    .unwrap();
    let input = raw.join("web/train").to_string_lossy().into_owned();
    let out_s = out.to_string_lossy().into_owned();
    zamba_data::run(parse(&[
        "tokenize",
        "--tokenizer",
        "byte",
        "--out",
        &out_s,
        "--text-column",
        "text",
        "--no-progress",
        &input,
    ]))
    .unwrap();
    assert!(out.join("manifest.json").exists());
    let tok_s = tmp.path().join("t.json").to_string_lossy().into_owned();
    zamba_data::run(parse(&[
        "train-tokenizer",
        "--out",
        &tok_s,
        "--vocab-size",
        "300",
        &input,
    ]))
    .unwrap();
    assert!(tmp.path().join("t.json").exists());
    let bad = parse(&[
        "tokenize",
        "--tokenizer",
        "byte",
        "--out",
        &out_s,
        "--text-column",
        "body",
        &input,
    ]);
    assert!(zamba_data::run(bad).is_err());
    assert!(
        Cli::try_parse_from(["data", "tokenize", "--out", "x", "in.parquet"]).is_err(),
        "--tokenizer is required"
    );
}

#[test]
fn a_weighted_task_mix_poses_only_its_tasks_in_proportion() {
    let world = World::new(3);
    let mix: TaskMix = "copy=1,add=1,fact=2,sort=0".parse().unwrap();
    let mut tasks: BTreeMap<&str, usize> = BTreeMap::new();
    let mut splits: [BTreeSet<String>; 2] = Default::default();
    for i in 0..4000 {
        let ex = instruct::example(&world, 3, i, &mix, 5000, 0.05);
        *tasks.entry(ex.task).or_default() += 1;
        let held_out = instruct::is_validation(3, &ex.key, 0.1);
        splits[usize::from(held_out)].insert(ex.prompt.clone());
        match ex.task {
            "copy" => assert_eq!(expected_answer("copy", &ex.prompt).unwrap(), ex.answer),
            "add" => {
                assert_eq!(expected_answer("add", &ex.prompt).unwrap(), ex.answer);
                let body = ex.prompt.strip_prefix("What is ").unwrap();
                let (a, b) = body.strip_suffix('?').unwrap().split_once(" + ").unwrap();
                let (a, b): (u32, u32) = (a.parse().unwrap(), b.parse().unwrap());
                assert!(a < 100 && b < 10, "{}", ex.prompt);
            }
            "fact" => {
                let fact = *world
                    .facts
                    .iter()
                    .find(|&&f| world.question(f).0 == ex.prompt)
                    .expect("a question about a fact of the world");
                assert_eq!(world.question(fact).1, ex.answer);
            }
            other => panic!("task {other} is not in the mix"),
        }
    }
    assert!(splits[0].is_disjoint(&splits[1]) && !splits[1].is_empty());
    for (task, share) in [("copy", 0.25), ("add", 0.25), ("fact", 0.5)] {
        let got = tasks[task] as f64 / 4000.0;
        assert!((got - share).abs() < 0.03, "{task}: {tasks:?}");
    }
    let copy_only = TaskMix::weighted([("copy", 1.0)]).unwrap();
    assert!(
        (0..20).all(|i| instruct::example(&world, 3, i, &copy_only, 5000, 0.05).task == "copy")
    );
}

/// The standard mix's examples are those the generator has always written (docs and tests
/// measured on the quickstart's data depend on them): a hash of the first 300, taken before
/// task mixes existed.
#[test]
fn the_standard_mix_is_unchanged() {
    let world = World::new(0);
    let mut hasher = blake3::Hasher::new();
    for i in 0..300 {
        let ex = instruct::example(&world, 0, i, &TaskMix::Standard, 20_000, 0.05);
        hasher.update(ex.task.as_bytes());
        hasher.update(ex.chat_text().as_bytes());
        hasher.update(ex.key.as_bytes());
    }
    assert_eq!(hasher.finalize().to_hex().as_str(), STANDARD_MIX_HASH);
}

const STANDARD_MIX_HASH: &str = "e8740d2c07618b79507e64a7e0dd369e6982bdc2f0202af5d8445b50b9e28d30";

#[test]
fn bad_task_mixes_are_refused_with_the_reason() {
    for (text, needle) in [
        (
            "copy=1,cpy=2",
            "unknown instruct task \"cpy\"; the tasks are arithmetic, sort",
        ),
        ("copy=-1", "expected a finite number ≥ 0"),
        ("copy=inf", "expected a finite number ≥ 0"),
        ("copy=0,fact=0", "no instruct task has a positive weight"),
        ("copy", "is not task=weight"),
        ("copy=x", "is not a number"),
    ] {
        let e = text.parse::<TaskMix>().unwrap_err();
        assert!(e.contains(needle), "{text}: {e}");
    }
    assert_eq!("standard".parse::<TaskMix>().unwrap(), TaskMix::Standard);
    // Order does not matter.
    assert_eq!(
        "fact=2,copy=1".parse::<TaskMix>().unwrap(),
        "copy=1,fact=2".parse::<TaskMix>().unwrap()
    );
}

#[test]
fn the_cache_of_a_task_mix_is_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let standard = SyntheticCacheOptions {
        web_docs: 300,
        instruct_examples: 300,
        ..Default::default()
    };
    let copy_only = SyntheticCacheOptions {
        tasks: TaskMix::weighted([("copy", 1.0)]).unwrap(),
        ..standard.clone()
    };
    let a = ensure_synthetic_cache(tmp.path(), &standard).unwrap();
    let b = ensure_synthetic_cache(tmp.path(), &copy_only).unwrap();
    assert_ne!(a.dir, b.dir);
    let fingerprint = |dir: &Path| zamba_data::Manifest::load(dir).unwrap().content_fingerprint;
    assert_ne!(
        fingerprint(&a.instruct_train),
        fingerprint(&b.instruct_train)
    );
    assert_eq!(fingerprint(&a.web_train), fingerprint(&b.web_train));
}
