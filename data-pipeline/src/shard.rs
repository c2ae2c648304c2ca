//! Tokenized parquet shards: one row per document, columns `tokens` (list of u16/u32, EOS included),
//! `source` (string), `id` (nullable string) and, for data tokenized with a loss mask, `loss_mask`
//! (list of bool, one per token: whether the token is a training target); zstd-compressed, row
//! groups of a bounded token count.

use crate::error::DataError;
use crate::fsutil::{HashingWriter, tmp_path};
use crate::manifest::{RowGroupInfo, ShardInfo, TokenDtype};
use anyhow::{Context, Result, bail};
use arrow_array::cast::AsArray;
use arrow_array::types::{UInt16Type, UInt32Type};
use arrow_array::{
    ArrayRef, BooleanArray, ListArray, RecordBatch, StringArray, UInt16Array, UInt32Array,
};
use arrow_buffer::{OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn shard_file_name(index: usize) -> String {
    format!("shard-{index:05}.parquet")
}

/// Name of the optional per-token loss mask column.
pub const LOSS_MASK_COLUMN: &str = "loss_mask";

fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, false)))
}

pub fn schema(dtype: TokenDtype, with_mask: bool) -> SchemaRef {
    let item = match dtype {
        TokenDtype::U16 => DataType::UInt16,
        TokenDtype::U32 => DataType::UInt32,
    };
    let mut fields = vec![
        Field::new("tokens", list_of(item), false),
        Field::new("source", DataType::Utf8, false),
        Field::new("id", DataType::Utf8, true),
    ];
    if with_mask {
        fields.push(Field::new(
            LOSS_MASK_COLUMN,
            list_of(DataType::Boolean),
            false,
        ));
    }
    Arc::new(Schema::new(fields))
}

fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("zstd level 3 is valid"),
        ))
        // Row groups are cut by token count in `flush_row_group`, never by row count.
        .set_max_row_group_row_count(None)
        // Token ids have too many distinct values for dictionaries to pay; `source` has few.
        .set_dictionary_enabled(false)
        .set_column_dictionary_enabled(ColumnPath::from("source"), true)
        .build()
}

#[derive(Default)]
struct RowGroupBuffer {
    tokens: Vec<u32>,
    mask: Vec<bool>,
    offsets: Vec<i32>,
    sources: Vec<String>,
    ids: Vec<Option<String>>,
}

struct OpenShard {
    writer: ArrowWriter<HashingWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
    file: String,
    docs: u64,
    tokens: u64,
    row_groups: Vec<RowGroupInfo>,
}

/// Streams documents into numbered shards. A shard is written under a `.tmp` name and renamed
/// only once complete and fsynced, so a crash never leaves a truncated file that looks finished.
pub struct ShardWriter {
    dir: PathBuf,
    dtype: TokenDtype,
    with_mask: bool,
    shard_tokens: u64,
    row_group_tokens: u64,
    next_index: usize,
    open: Option<OpenShard>,
    buffer: RowGroupBuffer,
}

impl ShardWriter {
    pub fn new(
        dir: &Path,
        dtype: TokenDtype,
        with_mask: bool,
        shard_tokens: u64,
        row_group_tokens: u64,
        first_index: usize,
    ) -> Self {
        Self {
            dir: dir.to_path_buf(),
            dtype,
            with_mask,
            shard_tokens: shard_tokens.max(1),
            row_group_tokens: row_group_tokens.max(1),
            next_index: first_index,
            open: None,
            buffer: RowGroupBuffer {
                offsets: vec![0],
                ..Default::default()
            },
        }
    }

    /// Appends one document (with one mask value per token when the writer keeps masks); returns
    /// the shard it completed, if any.
    pub fn push(
        &mut self,
        tokens: &[u32],
        mask: Option<&[bool]>,
        source: &str,
        id: Option<&str>,
    ) -> Result<Option<ShardInfo>> {
        match mask {
            Some(m) => assert!(
                self.with_mask && m.len() == tokens.len(),
                "one mask value per token, and only for a writer with masks"
            ),
            None => assert!(!self.with_mask, "this writer keeps a mask per token"),
        }
        if self.open.is_none() {
            self.open = Some(self.open_next()?);
        }
        let buffer = &mut self.buffer;
        buffer.tokens.extend_from_slice(tokens);
        buffer.mask.extend_from_slice(mask.unwrap_or_default());
        let end = i32::try_from(buffer.tokens.len())
            .context("a row group exceeds 2^31 tokens; lower --row-group-tokens")?;
        buffer.offsets.push(end);
        buffer.sources.push(source.to_owned());
        buffer.ids.push(id.map(str::to_owned));
        let open = self.open.as_mut().expect("opened above");
        open.docs += 1;
        open.tokens += tokens.len() as u64;
        if self.buffer.tokens.len() as u64 >= self.row_group_tokens {
            self.flush_row_group()?;
        }
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.tokens >= self.shard_tokens)
        {
            return self.finish_shard().map(Some);
        }
        Ok(None)
    }

    /// Completes the last, partially filled shard.
    pub fn finish(mut self) -> Result<Option<ShardInfo>> {
        if self.open.is_some() {
            self.finish_shard().map(Some)
        } else {
            Ok(None)
        }
    }

    fn open_next(&mut self) -> Result<OpenShard> {
        let file = shard_file_name(self.next_index);
        self.next_index += 1;
        let path = self.dir.join(&file);
        let tmp = tmp_path(&path);
        let handle = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let writer = ArrowWriter::try_new(
            HashingWriter::new(handle),
            schema(self.dtype, self.with_mask),
            Some(writer_properties()),
        )
        .with_context(|| format!("starting parquet writer for {}", tmp.display()))?;
        Ok(OpenShard {
            writer,
            tmp,
            path,
            file,
            docs: 0,
            tokens: 0,
            row_groups: Vec::new(),
        })
    }

    fn flush_row_group(&mut self) -> Result<()> {
        let buffer = std::mem::replace(
            &mut self.buffer,
            RowGroupBuffer {
                offsets: vec![0],
                ..Default::default()
            },
        );
        let docs = buffer.sources.len() as u64;
        if docs == 0 {
            return Ok(());
        }
        let tokens = buffer.tokens.len() as u64;
        let schema = schema(self.dtype, self.with_mask);
        let DataType::List(item) = schema.field(0).data_type().clone() else {
            unreachable!("tokens is a list")
        };
        let values: ArrayRef = match self.dtype {
            // Ids were checked against the vocabulary, which fits u16 when this dtype was chosen.
            TokenDtype::U16 => Arc::new(UInt16Array::from_iter_values(
                buffer.tokens.iter().map(|&t| t as u16),
            )),
            TokenDtype::U32 => Arc::new(UInt32Array::from(buffer.tokens)),
        };
        let offsets = OffsetBuffer::new(ScalarBuffer::from(buffer.offsets));
        let list = ListArray::new(item, offsets.clone(), values, None);
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(list),
            Arc::new(StringArray::from_iter_values(buffer.sources)),
            Arc::new(StringArray::from(buffer.ids)),
        ];
        if self.with_mask {
            let DataType::List(mask_item) = schema.field(3).data_type().clone() else {
                unreachable!("loss_mask is a list")
            };
            let mask: ArrayRef = Arc::new(BooleanArray::from(buffer.mask));
            columns.push(Arc::new(ListArray::new(mask_item, offsets, mask, None)));
        }
        let batch = RecordBatch::try_new(schema, columns).context("building a shard row group")?;
        let open = self
            .open
            .as_mut()
            .expect("a shard is open while rows are buffered");
        open.writer
            .write(&batch)
            .with_context(|| format!("writing {}", open.tmp.display()))?;
        open.writer
            .flush()
            .with_context(|| format!("writing {}", open.tmp.display()))?;
        open.row_groups.push(RowGroupInfo { docs, tokens });
        Ok(())
    }

    fn finish_shard(&mut self) -> Result<ShardInfo> {
        self.flush_row_group()?;
        let open = self.open.take().expect("finish_shard needs an open shard");
        let hashing = open
            .writer
            .into_inner()
            .with_context(|| format!("finishing {}", open.tmp.display()))?;
        let (file, blake3, bytes) = hashing.finish();
        file.sync_all()
            .with_context(|| format!("syncing {}", open.tmp.display()))?;
        drop(file);
        std::fs::rename(&open.tmp, &open.path)
            .with_context(|| format!("renaming {} into place", open.tmp.display()))?;
        Ok(ShardInfo {
            file: open.file,
            docs: open.docs,
            tokens: open.tokens,
            bytes,
            blake3,
            row_groups: open.row_groups,
        })
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        // An unfinished shard is never valid output.
        if let Some(open) = self.open.take() {
            let _ = std::fs::remove_file(&open.tmp);
        }
    }
}

/// Random access to the row groups of one shard; the footer is parsed once.
pub struct ShardReader {
    path: PathBuf,
    metadata: ArrowReaderMetadata,
    /// Index of the `loss_mask` column, if the shard has one.
    mask_column: Option<usize>,
}

impl ShardReader {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening shard {}", path.display()))?;
        let metadata =
            ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).map_err(|e| {
                anyhow::anyhow!(
                    "shard {} is not a readable parquet file ({e}); re-run `data tokenize` for it",
                    path.display()
                )
            })?;
        let ok = metadata
            .schema()
            .field_with_name("tokens")
            .ok()
            .is_some_and(|f| matches!(f.data_type(), DataType::List(item) if matches!(item.data_type(), DataType::UInt16 | DataType::UInt32)));
        if !ok {
            bail!(
                "{} is not a token shard: it has no `tokens` list<u16|u32> column",
                path.display()
            );
        }
        let mask_column = metadata.schema().index_of(LOSS_MASK_COLUMN).ok();
        Ok(Self {
            path: path.to_path_buf(),
            metadata,
            mask_column,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn num_row_groups(&self) -> usize {
        self.metadata.metadata().num_row_groups()
    }

    /// Appends the row group's tokens to `tokens` and one length per document to `doc_lens`,
    /// failing if any id is >= `vocab_limit`. With `mask`, also appends one loss-mask value per
    /// token (all true for a shard without a mask column).
    pub fn read_row_group(
        &self,
        row_group: usize,
        vocab_limit: u32,
        tokens: &mut Vec<u32>,
        doc_lens: &mut Vec<u32>,
        mut mask: Option<&mut Vec<bool>>,
    ) -> Result<()> {
        if row_group >= self.num_row_groups() {
            bail!(
                "{} has {} row groups, the manifest expects at least {}; the shard changed after tokenization",
                self.path.display(),
                self.num_row_groups(),
                row_group + 1
            );
        }
        let file = File::open(&self.path)
            .with_context(|| format!("opening shard {}", self.path.display()))?;
        let builder =
            ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.metadata.clone());
        let mask_column = self.mask_column.filter(|_| mask.is_some());
        let columns: Vec<usize> = std::iter::once(0).chain(mask_column).collect();
        let projection = ProjectionMask::roots(builder.parquet_schema(), columns);
        let reader = builder
            .with_projection(projection)
            .with_row_groups(vec![row_group])
            .with_batch_size(1 << 16)
            .build()
            .with_context(|| format!("reading {}", self.path.display()))?;
        let start = tokens.len();
        for batch in reader {
            let batch = batch.map_err(|e| anyhow::anyhow!("reading {} row group {row_group}: {e}; the shard is corrupt — re-run `data tokenize`", self.path.display()))?;
            let list = batch.column(0).as_list::<i32>();
            let offsets = list.value_offsets();
            let (lo, hi) = (offsets[0] as usize, offsets[offsets.len() - 1] as usize);
            let values = list.values();
            if let Some(v) = values.as_primitive_opt::<UInt16Type>() {
                tokens.extend(v.values()[lo..hi].iter().map(|&t| t as u32));
            } else if let Some(v) = values.as_primitive_opt::<UInt32Type>() {
                tokens.extend_from_slice(&v.values()[lo..hi]);
            } else {
                bail!(
                    "{} has token type {}, expected u16 or u32",
                    self.path.display(),
                    values.data_type()
                );
            }
            doc_lens.extend(offsets.windows(2).map(|w| (w[1] - w[0]) as u32));
            if let Some(mask) = mask.as_deref_mut() {
                if mask_column.is_some() {
                    let list = batch.column(1).as_list::<i32>();
                    let offsets = list.value_offsets();
                    let values = list.values().as_boolean();
                    let (lo, hi) = (offsets[0] as usize, offsets[offsets.len() - 1] as usize);
                    mask.extend((lo..hi).map(|i| values.value(i)));
                } else {
                    mask.resize(mask.len() + (hi - lo), true);
                }
            }
        }
        if let Some(&id) = tokens[start..].iter().max()
            && id >= vocab_limit
        {
            return Err(DataError::TokenOutOfVocab {
                file: self.path.clone(),
                row_group,
                id,
                vocab: vocab_limit,
            }
            .into());
        }
        Ok(())
    }
}

/// The loss mask of every document of a shard (None for a shard without masks); for tests and
/// inspection.
pub fn read_document_masks(path: &Path) -> Result<Option<Vec<Vec<bool>>>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    let Ok(column) = builder.schema().index_of(LOSS_MASK_COLUMN) else {
        return Ok(None);
    };
    let projection = ProjectionMask::roots(builder.parquet_schema(), [column]);
    let mut masks = Vec::new();
    for batch in builder.with_projection(projection).build()? {
        let list = batch?.column(0).as_list::<i32>().clone();
        for row in 0..arrow_array::Array::len(&list) {
            masks.push(
                list.value(row)
                    .as_boolean()
                    .iter()
                    .map(|v| v == Some(true))
                    .collect(),
            );
        }
    }
    Ok(Some(masks))
}

/// One shard row: (tokens, source, id).
pub type ShardRow = (Vec<u32>, String, Option<String>);

/// Every document of a shard; for tests and inspection, not for training.
pub fn read_documents(path: &Path) -> Result<Vec<ShardRow>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let mut docs = Vec::new();
    for batch in reader {
        let batch = batch?;
        let list = batch.column(0).as_list::<i32>();
        let sources = batch.column(1).as_string::<i32>();
        let ids = batch.column(2).as_string::<i32>();
        for row in 0..batch.num_rows() {
            let values = list.value(row);
            let tokens: Vec<u32> = if let Some(v) = values.as_primitive_opt::<UInt16Type>() {
                v.values().iter().map(|&t| t as u32).collect()
            } else {
                values.as_primitive::<UInt32Type>().values().to_vec()
            };
            let id = (!arrow_array::Array::is_null(ids, row)).then(|| ids.value(row).to_owned());
            docs.push((tokens, sources.value(row).to_owned(), id));
        }
    }
    Ok(docs)
}
