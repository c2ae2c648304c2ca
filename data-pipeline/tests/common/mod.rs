#![allow(dead_code)]

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zamba_data::{Manifest, TokenizeOptions, TokenizerSpec, tokenize};

pub fn write_text_parquet(path: &Path, texts: &[String]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("text", DataType::Utf8, true),
        Field::new("id", DataType::Int64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(texts.iter())),
        Arc::new(Int64Array::from_iter_values(0..texts.len() as i64)),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// Documents whose text names their index, so order can be read back from tokens.
pub fn numbered_docs(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix} {i:05} {}", "lorem ipsum ".repeat(1 + i % 7)))
        .collect()
}

pub fn tokenize_byte(
    inputs: Vec<PathBuf>,
    out: &Path,
    row_group_tokens: u64,
    shard_tokens: u64,
) -> Manifest {
    let mut opts = TokenizeOptions::new(
        inputs
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
        out,
        TokenizerSpec::Byte,
    );
    opts.row_group_tokens = row_group_tokens;
    opts.shard_tokens = shard_tokens;
    tokenize(&opts).unwrap()
}

/// A tokenized source of numbered documents.
pub fn numbered_source(root: &Path, name: &str, docs: usize) -> PathBuf {
    let raw = root.join(format!("{name}.parquet"));
    write_text_parquet(&raw, &numbered_docs(name, docs));
    let out = root.join(name);
    tokenize_byte(vec![raw], &out, 2048, 20_000);
    out
}

pub fn error_text(e: &anyhow::Error) -> String {
    format!("{e:#}")
}
