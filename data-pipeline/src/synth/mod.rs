//! `data synth`: deterministic synthetic `web` and `instruct` data written as raw parquet in the
//! same schema as open-web dumps (`text`, `id`, `source`), each with a train and a validation split.

pub mod instruct;
pub mod web;
pub mod world;

use crate::fsutil::tmp_path;
use anyhow::{Context, Result, bail};
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use instruct::TaskMix;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use world::World;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthKind {
    Web,
    Instruct,
    All,
}

#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub kind: SynthKind,
    pub out: PathBuf,
    pub seed: u64,
    /// Web documents in both splits together.
    pub web_docs: u64,
    /// Instruct examples in both splits together.
    pub instruct_examples: u64,
    /// The tasks the instruct examples pose.
    pub tasks: TaskMix,
    /// Expected share of documents/examples held out for validation.
    pub validation_fraction: f64,
    pub rows_per_file: u64,
}

impl SynthOptions {
    pub fn new(kind: SynthKind, out: impl Into<PathBuf>) -> Self {
        Self {
            kind,
            out: out.into(),
            seed: 0,
            web_docs: 20_000,
            instruct_examples: 20_000,
            tasks: TaskMix::Standard,
            validation_fraction: 0.05,
            rows_per_file: 50_000,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SplitReport {
    /// e.g. `web/train`.
    pub name: String,
    pub dir: PathBuf,
    pub rows: u64,
    pub files: Vec<PathBuf>,
}

struct Row {
    text: String,
    id: String,
    extra: Vec<String>,
}

/// Generates the requested sets under `opts.out/{web,instruct}/{train,validation}/part-NNNNN.parquet`.
pub fn synth(opts: &SynthOptions) -> Result<Vec<SplitReport>> {
    if !(0.0..1.0).contains(&opts.validation_fraction) {
        bail!(
            "--validation-fraction must be in [0, 1), got {}",
            opts.validation_fraction
        );
    }
    if opts.rows_per_file == 0 {
        bail!("rows per file must be positive");
    }
    let world = World::new(opts.seed);
    let mut reports = Vec::new();
    if matches!(opts.kind, SynthKind::Web | SynthKind::All) {
        if opts.web_docs == 0 {
            bail!("--web-docs must be positive to generate the web set");
        }
        let rows: Vec<(bool, Row)> = (0..opts.web_docs)
            .into_par_iter()
            .map(|i| {
                let validation = web::is_validation(opts.seed, i, opts.validation_fraction);
                (
                    validation,
                    Row {
                        text: web::document(&world, opts.seed, i),
                        id: format!("synth-web-{i}"),
                        extra: Vec::new(),
                    },
                )
            })
            .collect();
        reports.extend(write_splits(opts, "web", "synth-web", &[], rows)?);
    }
    if matches!(opts.kind, SynthKind::Instruct | SynthKind::All) {
        if opts.instruct_examples == 0 {
            bail!("--instruct-examples must be positive to generate the instruct set");
        }
        let rows: Vec<(bool, Row)> = (0..opts.instruct_examples)
            .into_par_iter()
            .map(|i| {
                let ex = instruct::example(
                    &world,
                    opts.seed,
                    i,
                    &opts.tasks,
                    opts.web_docs,
                    opts.validation_fraction,
                );
                let validation =
                    instruct::is_validation(opts.seed, &ex.key, opts.validation_fraction);
                let row = Row {
                    text: ex.chat_text(),
                    id: format!("synth-instruct-{i}"),
                    extra: vec![ex.task.to_owned(), ex.prompt, ex.answer],
                };
                (validation, row)
            })
            .collect();
        reports.extend(write_splits(
            opts,
            "instruct",
            "synth-instruct",
            &["task", "prompt", "answer"],
            rows,
        )?);
    }
    Ok(reports)
}

fn write_splits(
    opts: &SynthOptions,
    set: &str,
    source: &str,
    extra: &[&str],
    rows: Vec<(bool, Row)>,
) -> Result<Vec<SplitReport>> {
    let (validation, train): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(v, _)| *v);
    let mut reports = Vec::new();
    for (split, rows) in [("train", train), ("validation", validation)] {
        let rows: Vec<Row> = rows.into_iter().map(|(_, r)| r).collect();
        let dir = opts.out.join(set).join(split);
        // Build the split under a temporary name and swap it in, so a failure leaves no partial split.
        let tmp = tmp_path(&dir);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut files = Vec::new();
        for (index, chunk) in rows.chunks(opts.rows_per_file as usize).enumerate() {
            let name = format!("part-{index:05}.parquet");
            write_raw_parquet(&tmp.join(&name), source, extra, chunk)?;
            files.push(dir.join(name));
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("replacing {}", dir.display()))?;
        }
        std::fs::rename(&tmp, &dir)
            .with_context(|| format!("moving {} into place", dir.display()))?;
        reports.push(SplitReport {
            name: format!("{set}/{split}"),
            dir,
            rows: rows.len() as u64,
            files,
        });
    }
    Ok(reports)
}

fn write_raw_parquet(path: &Path, source: &str, extra: &[&str], rows: &[Row]) -> Result<()> {
    let mut fields = vec![
        Field::new("text", DataType::Utf8, false),
        Field::new("id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
    ];
    fields.extend(
        extra
            .iter()
            .map(|name| Field::new(*name, DataType::Utf8, false)),
    );
    let schema = Arc::new(Schema::new(fields));
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.text.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.id.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|_| source))),
    ];
    for i in 0..extra.len() {
        columns.push(Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.extra[i].as_str()),
        )));
    }
    let batch = RecordBatch::try_new(schema.clone(), columns).context("building synthetic rows")?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("valid zstd level"),
        ))
        .set_max_row_group_row_count(Some(8192))
        .build();
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut writer = ArrowWriter::try_new(file, schema, Some(props))
        .with_context(|| format!("writing {}", path.display()))?;
    writer
        .write(&batch)
        .with_context(|| format!("writing {}", path.display()))?;
    writer
        .close()
        .with_context(|| format!("finishing {}", path.display()))?;
    Ok(())
}
