//! TensorBoard event files of a run: `<run.dir>/tensorboard/events.out.tfevents.*`, written by
//! rank 0 as the run goes (see [`crate::metrics::MetricsWriter`], which sends every record here
//! too).
//!
//! An event file is a TFRecord stream of `tensorboard.Event` protocol buffers: per record the
//! length (u64, little-endian), its masked CRC-32C, the bytes and their masked CRC-32C. The few
//! messages written are declared below with `prost` (field numbers from TensorBoard's
//! `event.proto`, `summary.proto` and `tensor.proto`); docs/tensorboard.md says why no
//! TensorBoard crate is used.
//!
//! **Resumption.** Each session of a run writes a new file, named so that files sort in the order
//! they were written (readers read a run's files in name order). It starts with `file_version`
//! and a `SessionLog START` at the step the session starts from. TensorBoard's readers then drop
//! what an earlier session logged at or after that step (the Python reader on the `START`, the
//! data server when a tag's step goes back): a resumed run shows each step once, with the values
//! of the session that continued from the checkpoint.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use prost::Message;

/// The folder of event files inside a run directory.
pub const TENSORBOARD_DIR: &str = "tensorboard";

/// The part of an event file's name TensorBoard looks for.
const EVENT_FILE_PREFIX: &str = "events.out.tfevents.";

/// Writes one session's event file.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates the next event file in `<run_dir>/tensorboard/` for a session that starts at
    /// optimizer step `start_step`.
    pub fn create(run_dir: &Path, start_step: u64) -> Result<Self> {
        let dir = run_dir.join(TENSORBOARD_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let host = gethostname::gethostname()
            .to_string_lossy()
            .replace('/', "_");
        let name = format!(
            "{EVENT_FILE_PREFIX}{:06}.{host}.{}.step{start_step}",
            next_sequence(&dir)?,
            std::process::id()
        );
        let path = dir.join(name);
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut writer = Self {
            file: BufWriter::new(file),
            path,
        };
        writer.record(0, What::FileVersion("brain.Event:2".into()))?;
        let start = SessionLog {
            status: SessionStatus::Start as i32,
            ..Default::default()
        };
        writer.record(start_step, What::SessionLog(start))?;
        writer.flush()?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars `(tag, value)` at `step`, as one event; non-finite values are left out.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        let value: Vec<SummaryValue> = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| SummaryValue {
                tag: tag.clone(),
                metadata: None,
                value: Some(ValueKind::SimpleValue(*v as f32)),
            })
            .collect();
        if value.is_empty() {
            return Ok(());
        }
        self.record(step, What::Summary(Summary { value }))?;
        self.flush()
    }

    /// `markdown` under `tag` at `step`, shown by TensorBoard's Text dashboard.
    pub fn text(&mut self, step: u64, tag: &str, markdown: &str) -> Result<()> {
        let metadata = SummaryMetadata {
            plugin_data: Some(PluginData {
                plugin_name: "text".into(),
                content: Vec::new(),
            }),
            data_class: DATA_CLASS_TENSOR,
        };
        let tensor = TensorProto {
            dtype: DT_STRING,
            tensor_shape: Some(TensorShape::default()),
            string_val: vec![markdown.as_bytes().to_vec()],
        };
        let value = vec![SummaryValue {
            tag: tag.into(),
            metadata: Some(metadata),
            value: Some(ValueKind::Tensor(tensor)),
        }];
        self.record(step, What::Summary(Summary { value }))?;
        self.flush()
    }

    fn record(&mut self, step: u64, what: What) -> Result<()> {
        let event = Event {
            wall_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            step: step as i64,
            what: Some(what),
        };
        let bytes = event.encode_to_vec();
        let len = (bytes.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(bytes.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc(&len).to_le_bytes());
        record.extend_from_slice(&bytes);
        record.extend_from_slice(&masked_crc(&bytes).to_le_bytes());
        self.file
            .write_all(&record)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// One more than the largest sequence number of this writer's files in `dir` (0 if none).
fn next_sequence(dir: &Path) -> Result<u64> {
    let mut next = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name();
        let sequence = name
            .to_str()
            .and_then(|n| n.strip_prefix(EVENT_FILE_PREFIX))
            .and_then(|rest| rest.split('.').next())
            .and_then(|digits| digits.parse::<u64>().ok());
        if let Some(sequence) = sequence {
            next = next.max(sequence + 1);
        }
    }
    Ok(next)
}

/// The CRC-32C of TFRecord framing, "masked" (rotated and offset) as TensorFlow does so that a
/// CRC of data that itself holds CRCs stays well distributed.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// `DataType.DT_STRING` of tensor.proto's `types.proto`.
const DT_STRING: i32 = 7;
/// `DataClass.DATA_CLASS_TENSOR` of summary.proto.
const DATA_CLASS_TENSOR: i32 = 2;

#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5, 7")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

#[derive(Clone, PartialEq, Message)]
struct SessionLog {
    #[prost(enumeration = "SessionStatus", tag = "1")]
    status: i32,
    #[prost(string, tag = "2")]
    checkpoint_path: String,
    #[prost(string, tag = "3")]
    msg: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
enum SessionStatus {
    Unspecified = 0,
    Start = 1,
}

#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(message, optional, tag = "9")]
    metadata: Option<SummaryMetadata>,
    #[prost(oneof = "ValueKind", tags = "2, 8")]
    value: Option<ValueKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum ValueKind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

#[derive(Clone, PartialEq, Message)]
struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    plugin_data: Option<PluginData>,
    #[prost(int32, tag = "4")]
    data_class: i32,
}

#[derive(Clone, PartialEq, Message)]
struct PluginData {
    #[prost(string, tag = "1")]
    plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    content: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    string_val: Vec<Vec<u8>>,
}

/// A scalar's shape: no dimensions.
#[derive(Clone, PartialEq, Message)]
struct TensorShape {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events of a file, checking every record's framing and CRCs.
    fn read_events(path: &Path) -> Vec<Event> {
        let bytes = std::fs::read(path).unwrap();
        let mut events = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(len_bytes), "length CRC at byte {at}");
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data), "data CRC at byte {at}");
            events.push(Event::decode(data).unwrap());
            at += 16 + len;
        }
        events
    }

    #[test]
    fn the_crc_is_crc32c_masked_as_tensorflow_masks_it() {
        // CRC-32C's check value, and TensorFlow's mask: rotate right by 15, add 0xa282ead8.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // (0xe3069283 >> 15 | 0xe3069283 << 17) + 0xa282ead8, mod 2^32.
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn a_session_file_starts_with_its_version_and_start_step_and_holds_the_values() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(dir.path(), 7).unwrap();
        writer
            .scalars(
                7,
                &[("train/loss".into(), 2.5), ("train/mfu".into(), f64::NAN)],
            )
            .unwrap();
        writer
            .scalars(8, &[("train/loss".into(), f64::NAN)])
            .unwrap();
        writer.text(7, "config", "    [run]").unwrap();
        let events = read_events(writer.path());
        assert_eq!(events.len(), 4, "version, start, one scalar event, text");
        assert_eq!(
            events[0].what,
            Some(What::FileVersion("brain.Event:2".into()))
        );
        match &events[1].what {
            Some(What::SessionLog(log)) => assert_eq!(log.status, SessionStatus::Start as i32),
            other => panic!("expected a SessionLog, got {other:?}"),
        }
        assert_eq!(events[1].step, 7);
        let Some(What::Summary(summary)) = &events[2].what else {
            panic!("expected a summary")
        };
        assert_eq!(summary.value.len(), 1, "the NaN left out");
        assert_eq!(summary.value[0].tag, "train/loss");
        assert_eq!(summary.value[0].value, Some(ValueKind::SimpleValue(2.5)));
        let Some(What::Summary(text)) = &events[3].what else {
            panic!("expected a summary")
        };
        let Some(ValueKind::Tensor(tensor)) = &text.value[0].value else {
            panic!("expected a tensor")
        };
        assert_eq!(tensor.string_val, vec![b"    [run]".to_vec()]);
    }

    #[test]
    fn later_sessions_get_files_that_sort_after_the_earlier_ones() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = [0, 50, 20]
            .into_iter()
            .map(|step| {
                EventWriter::create(dir.path(), step)
                    .unwrap()
                    .path()
                    .to_path_buf()
            })
            .collect();
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(
            sorted, paths,
            "name order is creation order, whatever the steps"
        );
        let name = paths[2].file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("events.out.tfevents.000002."), "{name}");
        assert!(name.ends_with(".step20"), "{name}");
    }
}
