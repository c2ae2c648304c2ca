//! Raw document inputs: parquet (FineWeb/Zyda), JSON lines optionally gzipped (Dolma), plain text.
//!
//! Inputs are streamed record by record so memory stays bounded however large the files are;
//! a record index lets an interrupted run skip what it already processed.

use anyhow::{Context, Result, bail};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    Parquet,
    JsonLines,
    JsonLinesGz,
    Text,
}

impl InputKind {
    pub fn of(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_string_lossy().to_lowercase();
        if name.ends_with(".parquet") {
            Some(Self::Parquet)
        } else if name.ends_with(".jsonl.gz")
            || name.ends_with(".json.gz")
            || name.ends_with(".ndjson.gz")
        {
            Some(Self::JsonLinesGz)
        } else if name.ends_with(".jsonl") || name.ends_with(".json") || name.ends_with(".ndjson") {
            Some(Self::JsonLines)
        } else if name.ends_with(".txt") {
            Some(Self::Text)
        } else {
            None
        }
    }
}

const SUPPORTED: &str = ".parquet, .jsonl, .jsonl.gz, .json.gz, .txt";

#[derive(Clone, Debug)]
pub struct InputFile {
    pub path: PathBuf,
    pub kind: InputKind,
    pub bytes: u64,
}

/// Which fields hold the text, the document id and its source (missing id/source fields are fine).
/// With `messages`, documents are conversations read from that field instead of text.
#[derive(Clone, Debug)]
pub struct Columns {
    pub text: String,
    pub id: String,
    pub source: String,
    pub messages: Option<String>,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            text: "text".into(),
            id: "id".into(),
            source: "source".into(),
            messages: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Doc {
    /// Empty for a conversation.
    pub text: String,
    /// The conversation (the messages field as JSON) when reading a messages column.
    pub messages: Option<serde_json::Value>,
    pub id: Option<String>,
    pub source: Option<String>,
    /// Index of the record (parquet row, JSON line, text file) inside its input.
    pub record: u64,
}

/// Expands paths, directories (recursively) and globs into supported input files, in a stable order.
pub fn resolve_inputs(patterns: &[String]) -> Result<Vec<InputFile>> {
    if patterns.is_empty() {
        bail!("no inputs given: pass one or more parquet/jsonl/txt files, directories or globs");
    }
    let mut files: Vec<PathBuf> = Vec::new();
    for pattern in patterns {
        let path = Path::new(pattern);
        let mut found = Vec::new();
        if path.is_dir() {
            collect_dir(path, &mut found)?;
            if found.is_empty() {
                bail!("input directory {pattern} contains no supported files ({SUPPORTED})");
            }
        } else if path.exists() {
            if InputKind::of(path).is_none() {
                bail!("input {pattern} has an unsupported type; expected one of {SUPPORTED}");
            }
            found.push(path.to_path_buf());
        } else {
            let matches: Vec<PathBuf> = glob::glob(pattern)
                .with_context(|| format!("input pattern {pattern} is not a valid glob"))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("expanding input pattern {pattern}"))?;
            if matches.is_empty() {
                bail!("input {pattern} matches no files (check the path or glob)");
            }
            let total = matches.len();
            found.extend(
                matches
                    .into_iter()
                    .filter(|p| p.is_file() && InputKind::of(p).is_some()),
            );
            if found.is_empty() {
                bail!(
                    "input pattern {pattern} matches {total} paths but none is a supported file ({SUPPORTED})"
                );
            }
            found.sort();
        }
        files.extend(found);
    }
    let mut seen = std::collections::HashSet::new();
    files.retain(|p| seen.insert(p.clone()));
    files
        .into_iter()
        .map(|path| {
            let bytes = std::fs::metadata(&path)
                .with_context(|| format!("reading metadata of {}", path.display()))?
                .len();
            let kind = InputKind::of(&path).expect("filtered to supported kinds");
            Ok(InputFile { path, kind, bytes })
        })
        .collect()
}

fn collect_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_dir(&path, out)?;
        } else if InputKind::of(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

/// Checks an input before any output is written: it opens, is not empty, and has a string text column.
pub fn inspect(input: &InputFile, cols: &Columns) -> Result<()> {
    let path = &input.path;
    match input.kind {
        InputKind::Parquet => {
            let builder = open_parquet(path)?;
            content_column_index(path, builder.schema().fields(), cols)?;
            if builder.metadata().file_metadata().num_rows() == 0 {
                bail!("empty input: {} has no rows", path.display());
            }
        }
        InputKind::JsonLines | InputKind::JsonLinesGz => {
            let mut reader = open_lines(path, input.kind, None)?;
            let mut line = String::new();
            let mut number = 0u64;
            loop {
                line.clear();
                number += 1;
                if reader
                    .read_line(&mut line)
                    .with_context(|| format!("reading {}", path.display()))?
                    == 0
                {
                    bail!("empty input: {} contains no JSON records", path.display());
                }
                if !line.trim().is_empty() {
                    parse_json_doc(&line, path, number, cols)?;
                    break;
                }
            }
        }
        InputKind::Text => {
            if input.bytes == 0 {
                bail!("empty input: {} is an empty file", path.display());
            }
        }
    }
    Ok(())
}

/// Calls `f` for every document from record `skip` on; `f` returns false to stop early.
/// `progress` receives input bytes processed (compressed bytes for compressed inputs).
pub fn for_each_doc(
    input: &InputFile,
    cols: &Columns,
    skip: u64,
    progress: &dyn Fn(u64),
    f: &mut dyn FnMut(Doc) -> Result<bool>,
) -> Result<()> {
    match input.kind {
        InputKind::Parquet => parquet_docs(input, cols, skip, progress, f),
        InputKind::JsonLines | InputKind::JsonLinesGz => json_docs(input, cols, skip, progress, f),
        InputKind::Text => {
            if skip == 0 {
                let bytes = std::fs::read(&input.path)
                    .with_context(|| format!("reading {}", input.path.display()))?;
                let text = String::from_utf8(bytes).map_err(|e| {
                    anyhow::anyhow!("{} is not valid UTF-8 text ({e})", input.path.display())
                })?;
                progress(input.bytes);
                let id = input
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned());
                if cols.messages.is_some() {
                    bail!(
                        "{}: a .txt file holds no conversations; --messages-column needs parquet or JSON lines",
                        input.path.display()
                    );
                }
                f(Doc {
                    text,
                    messages: None,
                    id,
                    source: None,
                    record: 0,
                })?;
            }
            Ok(())
        }
    }
}

fn open_parquet(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| {
        anyhow::anyhow!("{} is not a readable parquet file ({e}); it may be corrupt or truncated — re-download or regenerate it", path.display())
    })
}

fn is_string(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

/// The text column, or the messages column when reading conversations.
fn content_column_index(
    path: &Path,
    fields: &arrow_schema::Fields,
    cols: &Columns,
) -> Result<usize> {
    let Some(name) = &cols.messages else {
        return text_column_index(path, fields, &cols.text);
    };
    let Some((index, field)) = fields.find(name) else {
        let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
        bail!(
            "{} has no messages column {name:?} (columns: {}); pass --messages-column with the right name",
            path.display(),
            names.join(", ")
        );
    };
    let ok = is_string(field.data_type())
        || matches!(
            field.data_type(),
            DataType::List(_) | DataType::LargeList(_)
        );
    if !ok {
        bail!(
            "column {name:?} in {} has type {}, expected a list of messages (or JSON text)",
            path.display(),
            field.data_type()
        );
    }
    Ok(index)
}

fn text_column_index(path: &Path, fields: &arrow_schema::Fields, name: &str) -> Result<usize> {
    let Some((index, field)) = fields.find(name) else {
        let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
        bail!(
            "{} has no text column {name:?} (columns: {}); pass --text-column with the right name",
            path.display(),
            names.join(", ")
        );
    };
    if !is_string(field.data_type()) {
        bail!(
            "column {name:?} in {} has type {}, expected a string column; pass --text-column with the text column",
            path.display(),
            field.data_type()
        );
    }
    Ok(index)
}

fn parquet_docs(
    input: &InputFile,
    cols: &Columns,
    skip: u64,
    progress: &dyn Fn(u64),
    f: &mut dyn FnMut(Doc) -> Result<bool>,
) -> Result<()> {
    let path = &input.path;
    let builder = open_parquet(path)?;
    let fields = builder.schema().fields().clone();
    let text_index = content_column_index(path, &fields, cols)?;
    let mut roots = vec![text_index];
    roots.extend(fields.find(&cols.id).map(|(i, _)| i));
    roots.extend(
        fields
            .find(&cols.source)
            .map(|(i, _)| i)
            .filter(|&i| is_string(fields[i].data_type())),
    );
    let total_rows = builder.metadata().file_metadata().num_rows().max(1) as u64;
    // Skip whole row groups via the footer, then the remainder inside the first kept group.
    let mut first_group = 0;
    let mut remaining = skip;
    for group in builder.metadata().row_groups() {
        let rows = group.num_rows() as u64;
        if remaining < rows {
            break;
        }
        remaining -= rows;
        first_group += 1;
    }
    let groups: Vec<usize> = (first_group..builder.metadata().num_row_groups()).collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder
        .with_projection(mask)
        .with_row_groups(groups)
        .with_offset(remaining as usize)
        .with_batch_size(1024)
        .build()
        .with_context(|| format!("reading {}", path.display()))?;
    let mut record = skip;
    for batch in reader {
        let batch = batch.map_err(|e| {
            anyhow::anyhow!(
                "reading {} near row {record}: {e}; the file may be corrupt or truncated",
                path.display()
            )
        })?;
        let rows = batch.num_rows() as u64;
        if !emit_batch(&batch, cols, &mut record, f)
            .with_context(|| format!("reading {}", path.display()))?
        {
            return Ok(());
        }
        progress(input.bytes * rows / total_rows);
    }
    Ok(())
}

fn emit_batch(
    batch: &RecordBatch,
    cols: &Columns,
    record: &mut u64,
    f: &mut dyn FnMut(Doc) -> Result<bool>,
) -> Result<bool> {
    let content = cols.messages.as_ref().unwrap_or(&cols.text);
    let text = batch
        .column_by_name(content)
        .expect("projected content column");
    let id = batch.column_by_name(&cols.id);
    let source = batch.column_by_name(&cols.source);
    for row in 0..batch.num_rows() {
        let index = *record;
        *record += 1;
        if text.is_null(row) {
            continue;
        }
        let (text, messages) = if cols.messages.is_some() {
            let messages =
                messages_at(text.as_ref(), row).with_context(|| format!("row {index}"))?;
            (String::new(), Some(messages))
        } else {
            (
                string_at(text.as_ref(), row)
                    .expect("string column")
                    .to_owned(),
                None,
            )
        };
        let doc = Doc {
            text,
            messages,
            id: id.and_then(|c| id_at(c.as_ref(), row)),
            source: source
                .and_then(|c| string_at(c.as_ref(), row))
                .map(str::to_owned),
            record: index,
        };
        if !f(doc)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A conversation cell as JSON: a list column converted value by value, or a JSON string parsed.
fn messages_at(col: &dyn Array, row: usize) -> Result<serde_json::Value> {
    if let Some(text) = string_at(col, row) {
        return serde_json::from_str(text).context("the messages text is not valid JSON");
    }
    arrow_to_json(col, row)
}

/// One value of an arrow array as JSON (strings, numbers, booleans, lists, structs, nulls).
fn arrow_to_json(col: &dyn Array, row: usize) -> Result<serde_json::Value> {
    use serde_json::Value as J;
    if col.is_null(row) {
        return Ok(J::Null);
    }
    if let Some(s) = string_at(col, row) {
        return Ok(J::String(s.to_owned()));
    }
    if let Some(list) = col.as_list_opt::<i32>() {
        let items = list.value(row);
        return (0..items.len())
            .map(|i| arrow_to_json(items.as_ref(), i))
            .collect();
    }
    if let Some(list) = col.as_list_opt::<i64>() {
        let items = list.value(row);
        return (0..items.len())
            .map(|i| arrow_to_json(items.as_ref(), i))
            .collect();
    }
    if let Some(st) = col.as_struct_opt() {
        let mut map = serde_json::Map::new();
        for (field, column) in st.fields().iter().zip(st.columns()) {
            map.insert(field.name().clone(), arrow_to_json(column.as_ref(), row)?);
        }
        return Ok(J::Object(map));
    }
    if let Some(b) = col.as_boolean_opt() {
        return Ok(J::Bool(b.value(row)));
    }
    if let Some(id) = id_at(col, row) {
        return Ok(J::Number(id.parse().expect("integer")));
    }
    if let Some(f) = col.as_primitive_opt::<Float64Type>() {
        return Ok(serde_json::Number::from_f64(f.value(row)).map_or(J::Null, J::Number));
    }
    if let Some(f) = col.as_primitive_opt::<Float32Type>() {
        return Ok(serde_json::Number::from_f64(f.value(row).into()).map_or(J::Null, J::Number));
    }
    bail!(
        "the messages column holds a value of type {}, which has no JSON form here",
        col.data_type()
    )
}

fn string_at(col: &dyn Array, row: usize) -> Option<&str> {
    if col.is_null(row) {
        return None;
    }
    if let Some(a) = col.as_string_opt::<i32>() {
        Some(a.value(row))
    } else if let Some(a) = col.as_string_opt::<i64>() {
        Some(a.value(row))
    } else {
        col.as_string_view_opt().map(|a| a.value(row))
    }
}

fn id_at(col: &dyn Array, row: usize) -> Option<String> {
    if col.is_null(row) {
        return None;
    }
    if let Some(s) = string_at(col, row) {
        return Some(s.to_owned());
    }
    if let Some(a) = col.as_primitive_opt::<Int64Type>() {
        return Some(a.value(row).to_string());
    }
    if let Some(a) = col.as_primitive_opt::<UInt64Type>() {
        return Some(a.value(row).to_string());
    }
    if let Some(a) = col.as_primitive_opt::<Int32Type>() {
        return Some(a.value(row).to_string());
    }
    col.as_primitive_opt::<UInt32Type>()
        .map(|a| a.value(row).to_string())
}

/// Counts bytes read from the underlying (possibly compressed) file for progress reporting.
struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn open_lines(
    path: &Path,
    kind: InputKind,
    count: Option<Arc<AtomicU64>>,
) -> Result<Box<dyn BufRead>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let counted = CountingReader {
        inner: file,
        count: count.unwrap_or_default(),
    };
    Ok(if kind == InputKind::JsonLinesGz {
        Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::read::MultiGzDecoder::new(BufReader::new(counted)),
        ))
    } else {
        Box::new(BufReader::with_capacity(1 << 20, counted))
    })
}

/// Parses one JSON line; Ok(None) when the text field is null (skipped, as in parquet).
fn parse_json_doc(line: &str, path: &Path, number: u64, cols: &Columns) -> Result<Option<Doc>> {
    let value: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("{}:{number}: not valid JSON", path.display()))?;
    let serde_json::Value::Object(mut map) = value else {
        bail!(
            "{}:{number}: expected a JSON object per line",
            path.display()
        );
    };
    if let Some(name) = &cols.messages {
        let messages = match map.remove(name) {
            Some(serde_json::Value::Null) => return Ok(None),
            Some(value) => value,
            None => {
                let keys: Vec<&str> = map.keys().map(String::as_str).collect();
                bail!(
                    "{}:{number}: no messages field {name:?} (fields: {}); pass --messages-column with the right name",
                    path.display(),
                    keys.join(", ")
                )
            }
        };
        return Ok(Some(Doc {
            text: String::new(),
            messages: Some(messages),
            id: json_id(map.remove(&cols.id)),
            source: match map.remove(&cols.source) {
                Some(serde_json::Value::String(s)) => Some(s),
                _ => None,
            },
            record: number - 1,
        }));
    }
    let text = match map.remove(&cols.text) {
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Null) => return Ok(None),
        Some(other) => bail!(
            "{}:{number}: field {:?} is {}, expected a string; pass --text-column with the text field",
            path.display(),
            cols.text,
            json_kind(&other)
        ),
        None => {
            let keys: Vec<&str> = map.keys().map(String::as_str).collect();
            bail!(
                "{}:{number}: no text field {:?} (fields: {}); pass --text-column with the right name",
                path.display(),
                cols.text,
                keys.join(", ")
            )
        }
    };
    let id = json_id(map.remove(&cols.id));
    let source = match map.remove(&cols.source) {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    Ok(Some(Doc {
        text,
        messages: None,
        id,
        source,
        record: number - 1,
    }))
}

fn json_id(value: Option<serde_json::Value>) -> Option<String> {
    match value {
        Some(serde_json::Value::String(s)) => Some(s),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn json_docs(
    input: &InputFile,
    cols: &Columns,
    skip: u64,
    progress: &dyn Fn(u64),
    f: &mut dyn FnMut(Doc) -> Result<bool>,
) -> Result<()> {
    let path = &input.path;
    let count = Arc::new(AtomicU64::new(0));
    let mut reader = open_lines(path, input.kind, Some(count.clone()))?;
    let mut line = String::new();
    let mut number = 0u64;
    let mut reported = 0u64;
    loop {
        line.clear();
        let n = reader.read_line(&mut line).with_context(|| {
            format!(
                "reading {} after line {number}; the file may be corrupt, truncated or not UTF-8",
                path.display()
            )
        })?;
        if n == 0 {
            break;
        }
        number += 1;
        if number <= skip || line.trim().is_empty() {
            continue;
        }
        if let Some(doc) = parse_json_doc(&line, path, number, cols)?
            && !f(doc)?
        {
            return Ok(());
        }
        let now = count.load(Ordering::Relaxed);
        if now - reported >= 1 << 20 {
            progress(now - reported);
            reported = now;
        }
    }
    progress(count.load(Ordering::Relaxed) - reported);
    Ok(())
}
