//! Tokenization: round trips, parity with Python `tokenizers`, determinism, resume, bad input.

mod common;

use common::*;
use flate2::Compression;
use flate2::write::GzEncoder;
use std::io::Write;
use std::path::Path;
use zamba_data::manifest::TokenDtype;
use zamba_data::shard::read_documents;
use zamba_data::tokenizer::byte;
use zamba_data::{TokenizeOptions, TokenizerSpec, tokenize};

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn decode_bytes(tokens: &[u32]) -> String {
    String::from_utf8(tokens.iter().map(|&t| u8::try_from(t).unwrap()).collect()).unwrap()
}

#[test]
fn round_trip_all_input_formats_into_several_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let parquet_docs = numbered_docs("parquet", 300);
    write_text_parquet(&tmp.path().join("a.parquet"), &parquet_docs);
    let jsonl = tmp.path().join("b.jsonl.gz");
    let mut gz = GzEncoder::new(
        std::fs::File::create(&jsonl).unwrap(),
        Compression::default(),
    );
    writeln!(
        gz,
        r#"{{"id":"d1","text":"héllo wörld","source":"dolma-cc"}}"#
    )
    .unwrap();
    writeln!(gz).unwrap();
    writeln!(gz, r#"{{"id":"d2","text":null}}"#).unwrap();
    writeln!(gz, r#"{{"id":"d3","text":"line\nbreak"}}"#).unwrap();
    gz.finish().unwrap();
    std::fs::write(tmp.path().join("c.txt"), "a whole file\nis one document\n").unwrap();

    let out = tmp.path().join("tok");
    let manifest = tokenize_byte(
        vec![
            tmp.path().join("a.parquet"),
            jsonl,
            tmp.path().join("c.txt"),
        ],
        &out,
        1000,
        5000,
    );

    let mut docs = Vec::new();
    for shard in &manifest.shards {
        let shard_docs = read_documents(&out.join(&shard.file)).unwrap();
        assert_eq!(shard_docs.len() as u64, shard.docs);
        assert_eq!(
            shard_docs.iter().map(|d| d.0.len() as u64).sum::<u64>(),
            shard.tokens
        );
        assert_eq!(
            shard.row_groups.iter().map(|r| r.tokens).sum::<u64>(),
            shard.tokens
        );
        assert!(
            shard.row_groups.len() > 1,
            "row groups are cut by token count"
        );
        docs.extend(shard_docs);
    }
    assert!(manifest.shards.len() > 3, "shards are cut by token count");
    assert_eq!(manifest.settings.token_dtype, TokenDtype::U16);
    assert_eq!(docs.len(), 300 + 2 + 1, "the null-text record is skipped");
    assert_eq!(manifest.total_docs, docs.len() as u64);
    for (i, text) in parquet_docs.iter().enumerate() {
        let (tokens, source, id) = &docs[i];
        assert_eq!(*tokens.last().unwrap(), byte::EOS);
        assert_eq!(decode_bytes(&tokens[..tokens.len() - 1]), *text);
        assert_eq!(source, "a");
        assert_eq!(id.as_deref(), Some(i.to_string().as_str()));
    }
    assert_eq!(
        decode_bytes(&docs[300].0[..docs[300].0.len() - 1]),
        "héllo wörld"
    );
    assert_eq!(
        (docs[300].1.as_str(), docs[300].2.as_deref()),
        ("dolma-cc", Some("d1"))
    );
    assert_eq!(
        decode_bytes(&docs[301].0[..docs[301].0.len() - 1]),
        "line\nbreak"
    );
    assert_eq!(
        decode_bytes(&docs[302].0[..docs[302].0.len() - 1]),
        "a whole file\nis one document\n"
    );
    assert_eq!(docs[302].2.as_deref(), Some("c.txt"));
}

#[test]
fn token_counts_match_python_tokenizers() {
    let fix = fixtures();
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fix.join("expected_token_counts.json")).unwrap(),
    )
    .unwrap();
    let counts = expected["token_counts"].as_object().unwrap();
    assert!(counts.len() >= 3);
    let tmp = tempfile::tempdir().unwrap();
    for (name, count) in counts {
        let out = tmp.path().join(name);
        let opts = TokenizeOptions::new(
            vec![fix.join(name).to_string_lossy().into_owned()],
            &out,
            TokenizerSpec::File(fix.join("bpe-1000.json")),
        );
        let manifest = tokenize(&opts).unwrap();
        assert_eq!(manifest.vocab_size(), 1000);
        // One document per txt file; the manifest count includes the appended EOS.
        assert_eq!(manifest.total_docs, 1);
        assert_eq!(manifest.total_tokens, count.as_u64().unwrap() + 1, "{name}");
        let docs = read_documents(&out.join(&manifest.shards[0].file)).unwrap();
        assert_eq!(
            *docs[0].0.last().unwrap(),
            manifest.settings.tokenizer.eos_id
        );
    }
}

#[test]
fn output_is_deterministic_across_thread_counts() {
    let tmp = tempfile::tempdir().unwrap();
    write_text_parquet(&tmp.path().join("a.parquet"), &numbered_docs("x", 500));
    let run = |threads: usize, out: &str| {
        let mut opts = TokenizeOptions::new(
            vec![tmp.path().join("a.parquet").to_string_lossy().into_owned()],
            tmp.path().join(out),
            TokenizerSpec::File(fixtures().join("bpe-1000.json")),
        );
        opts.threads = Some(threads);
        opts.shard_tokens = 3000;
        tokenize(&opts).unwrap()
    };
    let one = run(1, "t1");
    let two = run(2, "t2");
    assert!(one.shards.len() > 1);
    assert_eq!(one.content_fingerprint, two.content_fingerprint);
    assert_eq!(one.shards, two.shards);
}

#[test]
fn interrupted_run_resumes_without_redoing_finished_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs: Vec<_> = (0..3)
        .map(|i| {
            let p = tmp.path().join(format!("in{i}.parquet"));
            write_text_parquet(&p, &numbered_docs(&format!("file{i}"), 200));
            p.to_string_lossy().into_owned()
        })
        .collect();
    let options = |out: &Path| {
        let mut o = TokenizeOptions::new(inputs.clone(), out, TokenizerSpec::Byte);
        o.shard_tokens = 4000;
        o.row_group_tokens = 1000;
        o
    };
    let reference = tokenize(&options(&tmp.path().join("reference"))).unwrap();
    assert!(reference.shards.len() > 5);

    let out = tmp.path().join("resumed");
    let mut first = options(&out);
    first.interrupt_after_shards = Some(3);
    assert!(tokenize(&first).is_err());
    assert!(
        !out.join("manifest.json").exists(),
        "an interrupted run must not look complete"
    );
    let finished: Vec<_> = (0..3)
        .map(|i| {
            std::fs::metadata(out.join(format!("shard-{i:05}.parquet")))
                .unwrap()
                .modified()
                .unwrap()
        })
        .collect();
    // Debris of a crash: a half-written shard and one renamed but not journaled.
    std::fs::write(out.join("shard-00003.parquet.tmp"), b"half").unwrap();
    std::fs::write(out.join("shard-00004.parquet"), b"unjournaled").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));

    let resumed = tokenize(&options(&out)).unwrap();
    assert_eq!(
        resumed.shards, reference.shards,
        "resumed output equals an uninterrupted run"
    );
    assert_eq!(resumed.content_fingerprint, reference.content_fingerprint);
    for (i, before) in finished.iter().enumerate() {
        let after = std::fs::metadata(out.join(format!("shard-{i:05}.parquet")))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(*before, after, "finished shard {i} was rewritten");
    }
    assert!(!out.join("shard-00003.parquet.tmp").exists());
    assert!(!out.join("progress.json").exists());

    // Finished: a rerun returns the manifest; other settings on the same directory are refused.
    assert_eq!(tokenize(&options(&out)).unwrap(), resumed);
    let mut other = options(&out);
    other.shard_tokens = 999;
    assert!(error_text(&tokenize(&other).unwrap_err()).contains("different inputs or settings"));
}

/// Each bad input fails before any output exists, with a message naming the file and the problem.
fn assert_rejected(inputs: Vec<String>, tokenizer: TokenizerSpec, expected: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let err = tokenize(&TokenizeOptions::new(inputs, &out, tokenizer)).unwrap_err();
    let text = error_text(&err);
    for e in expected {
        assert!(text.contains(e), "error {text:?} should mention {e:?}");
    }
    assert!(!out.exists(), "no output may be left after {text:?}");
}

#[test]
fn bad_inputs_are_rejected_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).to_string_lossy().into_owned();

    // Missing text column (parquet and JSON), non-string text column.
    write_text_parquet(&tmp.path().join("good.parquet"), &numbered_docs("g", 10));
    let mut opts = TokenizeOptions::new(
        vec![p("good.parquet")],
        tmp.path().join("o1"),
        TokenizerSpec::Byte,
    );
    opts.columns.text = "content".into();
    let text = error_text(&tokenize(&opts).unwrap_err());
    assert!(
        text.contains("good.parquet")
            && text.contains("\"content\"")
            && text.contains("columns: text, id"),
        "{text}"
    );
    assert!(!tmp.path().join("o1").exists());
    opts.columns.text = "id".into();
    let text = error_text(&tokenize(&opts).unwrap_err());
    assert!(
        text.contains("good.parquet")
            && text.contains("\"id\"")
            && text.contains("Int64")
            && text.contains("expected a string"),
        "{text}"
    );

    std::fs::write(tmp.path().join("nofield.jsonl"), "{\"body\": \"x\"}\n").unwrap();
    assert_rejected(
        vec![p("nofield.jsonl")],
        TokenizerSpec::Byte,
        &["nofield.jsonl:1", "no text field \"text\"", "body"],
    );
    std::fs::write(tmp.path().join("number.jsonl"), "\n{\"text\": 42}\n").unwrap();
    assert_rejected(
        vec![p("number.jsonl")],
        TokenizerSpec::Byte,
        &["number.jsonl:2", "a number", "expected a string"],
    );

    // Corrupt and truncated parquet.
    std::fs::write(
        tmp.path().join("garbage.parquet"),
        b"this is not parquet at all, just bytes",
    )
    .unwrap();
    assert_rejected(
        vec![p("garbage.parquet")],
        TokenizerSpec::Byte,
        &["garbage.parquet", "corrupt or truncated"],
    );
    let good = std::fs::read(tmp.path().join("good.parquet")).unwrap();
    std::fs::write(
        tmp.path().join("truncated.parquet"),
        &good[..good.len() / 2],
    )
    .unwrap();
    assert_rejected(
        vec![p("good.parquet"), p("truncated.parquet")],
        TokenizerSpec::Byte,
        &["truncated.parquet", "corrupt or truncated"],
    );

    // A valid footer over corrupt pages: found while reading, after the checks; still no output.
    let mut damaged = good.clone();
    damaged[4..40].fill(0xff);
    std::fs::write(tmp.path().join("damaged.parquet"), &damaged).unwrap();
    assert_rejected(
        vec![p("damaged.parquet")],
        TokenizerSpec::Byte,
        &["damaged.parquet", "corrupt"],
    );

    // Empty inputs.
    std::fs::write(tmp.path().join("empty.jsonl"), "\n\n").unwrap();
    assert_rejected(
        vec![p("empty.jsonl")],
        TokenizerSpec::Byte,
        &["empty input", "empty.jsonl"],
    );
    std::fs::write(tmp.path().join("empty.txt"), "").unwrap();
    assert_rejected(
        vec![p("empty.txt")],
        TokenizerSpec::Byte,
        &["empty input", "empty.txt"],
    );
    write_text_parquet(&tmp.path().join("zero.parquet"), &[]);
    assert_rejected(
        vec![p("zero.parquet")],
        TokenizerSpec::Byte,
        &["empty input", "zero.parquet"],
    );

    // A tokenizer file that does not parse.
    std::fs::write(tmp.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    assert_rejected(
        vec![p("good.parquet")],
        TokenizerSpec::File(tmp.path().join("tokenizer.json")),
        &["tokenizer.json", "does not parse"],
    );

    // A glob matching nothing, and no inputs at all.
    assert_rejected(
        vec![p("missing-*.parquet")],
        TokenizerSpec::Byte,
        &["missing-*.parquet", "matches no files"],
    );
    assert_rejected(vec![], TokenizerSpec::Byte, &["no inputs"]);
}

#[test]
fn special_tokens_are_discovered_or_given() {
    let tmp = tempfile::tempdir().unwrap();
    let input = fixtures()
        .join("multilingual.txt")
        .to_string_lossy()
        .into_owned();
    let bpe = TokenizerSpec::File(fixtures().join("bpe-1000.json"));
    // bpe-1000 has <|endoftext|> (found as EOS) but no BOS token.
    let mut opts = TokenizeOptions::new(vec![input.clone()], tmp.path().join("a"), bpe.clone());
    opts.add_bos = true;
    let text = error_text(&tokenize(&opts).unwrap_err());
    assert!(
        text.contains("no known begin-of-document token") && text.contains("--bos-id"),
        "{text}"
    );
    assert!(!tmp.path().join("a").exists());
    opts.special.bos_id = Some(5);
    opts.special.eos_id = Some(7);
    let manifest = tokenize(&opts).unwrap();
    assert_eq!(
        (
            manifest.settings.tokenizer.bos_id,
            manifest.settings.tokenizer.eos_id
        ),
        (Some(5), 7)
    );
    let tokens =
        &read_documents(&tmp.path().join("a").join(&manifest.shards[0].file)).unwrap()[0].0;
    assert_eq!((tokens[0], *tokens.last().unwrap()), (5, 7));
    let mut bad = TokenizeOptions::new(vec![input], tmp.path().join("b"), bpe);
    bad.special.eos = Some("<missing>".into());
    assert!(
        error_text(&tokenize(&bad).unwrap_err()).contains("\"<missing>\" is not in the vocabulary")
    );
}
