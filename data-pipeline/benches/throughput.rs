//! Throughput of the data pipeline (run: `cargo bench -p zamba-data --bench throughput`).
//!
//! 1. Tokenization MB/s of the synthetic web set with the fixture BPE and the byte tokenizer,
//!    on 1 thread and on all cores (compare with scripts/bench_python_tokenizers.py on the same file).
//! 2. Mixture loader tokens/s on one core (the prefetch thread does all the work).
//!
//! Files are kept in $ZAMBA_BENCH_DIR (default target/zamba-data-bench) so Python can read the same input.

use std::path::PathBuf;
use std::time::Instant;
use zamba_data::{
    DataConfig, MixtureLoader, SourceConfig, SynthKind, SynthOptions, TokenizeOptions,
    TokenizerSpec, synth, tokenize,
};

fn main() -> anyhow::Result<()> {
    let dir = std::env::var_os("ZAMBA_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/zamba-data-bench")
        });
    let web_docs: u64 = std::env::var("ZAMBA_BENCH_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let raw = dir.join("raw");
    if !raw.join("web/train").exists() {
        let mut o = SynthOptions::new(SynthKind::Web, &raw);
        o.web_docs = web_docs;
        o.rows_per_file = web_docs;
        synth(&o)?;
    }
    let input = raw.join("web/train/part-00000.parquet");
    println!(
        "input: {} ({:.1} MB on disk)",
        input.display(),
        std::fs::metadata(&input)?.len() as f64 / 1e6
    );

    let bpe = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bpe-1000.json");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut byte_dir = None;
    for (name, spec) in [
        ("bpe-1000", TokenizerSpec::File(bpe)),
        ("byte", TokenizerSpec::Byte),
    ] {
        for threads in [1, cores] {
            let out = dir.join(format!("tok-{name}-{threads}"));
            let _ = std::fs::remove_dir_all(&out);
            let mut opts = TokenizeOptions::new(
                vec![input.to_string_lossy().into_owned()],
                &out,
                spec.clone(),
            );
            opts.threads = Some(threads);
            let start = Instant::now();
            let manifest = tokenize(&opts)?;
            let secs = start.elapsed().as_secs_f64();
            let text_bytes = text_bytes(&input)?;
            println!(
                "tokenize {name:9} threads={threads}: {:.1} MB/s of text, {:.2} M tokens/s ({} docs, {} tokens, {secs:.2}s)",
                text_bytes as f64 / secs / 1e6,
                manifest.total_tokens as f64 / secs / 1e6,
                manifest.total_docs,
                manifest.total_tokens
            );
            if name == "byte" {
                byte_dir = Some(out);
            }
        }
    }

    let byte_dir = byte_dir.expect("byte run happened");
    for (seq_len, global) in [(2048usize, 64usize), (512, 256)] {
        let config = DataConfig {
            sources: [(
                "web".to_owned(),
                SourceConfig {
                    paths: vec![byte_dir.to_string_lossy().into_owned()],
                    weight: 1.0,
                    validation: vec![],
                },
            )]
            .into(),
            seq_len,
            seed: 0,
            shuffle_blocks: 16,
            prefetch: 4,
            model_vocab_size: None,
        };
        let mut loader = MixtureLoader::new(&config, 0, 1, global, None, false)?;
        loader.next_batch()?;
        let start = Instant::now();
        let mut tokens = 0u64;
        while start.elapsed().as_secs_f64() < 5.0 {
            let batch = loader.next_batch()?;
            tokens += batch.inputs.len() as u64;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "loader seq_len={seq_len} batch={global}: {:.1} M tokens/s ({:.2} epochs)",
            tokens as f64 / secs / 1e6,
            loader.epochs()["web"]
        );
    }
    Ok(())
}

fn text_bytes(path: &std::path::Path) -> anyhow::Result<u64> {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(path)?,
    )?
    .build()?;
    let mut total = 0u64;
    for batch in reader {
        let batch = batch?;
        let col = batch
            .column_by_name("text")
            .expect("text column")
            .as_string::<i32>();
        total += (0..col.len())
            .map(|i| col.value(i).len() as u64)
            .sum::<u64>();
    }
    Ok(total)
}
