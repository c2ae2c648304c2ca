//! Blocking socket I/O with deadlines, and length-prefixed frames with a size bound.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::Interrupt;
use crate::interrupt::POLL;

/// Why reading a frame failed.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The peer closed the connection (cleanly or by reset) or another I/O error.
    Io(io::Error),
    /// The deadline passed.
    TimedOut,
    /// The frame announced more bytes than allowed.
    TooLarge(u64),
    /// The rank's interrupt fired (a signal), with its reason.
    Interrupted(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                write!(f, "connection closed")
            }
            FrameError::Io(e) => write!(f, "{e}"),
            FrameError::TimedOut => write!(f, "timed out"),
            FrameError::TooLarge(n) => write!(f, "message of {n} bytes is over the limit"),
            FrameError::Interrupted(why) => write!(f, "interrupted ({why})"),
        }
    }
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Fills `buf`, failing with `TimedOut` once `deadline` passes (`None`: wait for ever) and with
/// `Interrupted` as soon as `interrupt` fires.
pub(crate) fn read_exact_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Option<Instant>,
    interrupt: &Interrupt,
) -> Result<(), FrameError> {
    let mut filled = 0;
    while filled < buf.len() {
        if let Some(why) = interrupt.reason() {
            return Err(FrameError::Interrupted(why));
        }
        let timeout = match deadline {
            Some(d) => Some(remaining(d).ok_or(FrameError::TimedOut)?),
            None => None,
        };
        let timeout = match (timeout, interrupt.is_active()) {
            (Some(t), true) => Some(t.min(POLL)),
            (None, true) => Some(POLL),
            (t, false) => t,
        };
        stream.set_read_timeout(timeout).map_err(FrameError::Io)?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => filled += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(())
}

/// Writes all of `buf`, failing with `TimedOut` once `deadline` passes and with `Interrupted`
/// as soon as `interrupt` fires (a write blocks only while the peer does not read).
pub(crate) fn write_all_by(
    stream: &mut TcpStream,
    buf: &[u8],
    deadline: Instant,
    interrupt: &Interrupt,
) -> Result<(), FrameError> {
    let mut written = 0;
    while written < buf.len() {
        if let Some(why) = interrupt.reason() {
            return Err(FrameError::Interrupted(why));
        }
        let timeout = remaining(deadline).ok_or(FrameError::TimedOut)?;
        let timeout = match interrupt.is_active() {
            true => timeout.min(POLL),
            false => timeout,
        };
        stream
            .set_write_timeout(Some(timeout))
            .map_err(FrameError::Io)?;
        match stream.write(&buf[written..]) {
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(())
}

/// Reads one `u32`-length-prefixed frame of at most `max_len` bytes. The first byte may take
/// until `start_deadline` (`None`: any time, an idle connection); once it has come, the whole
/// frame must follow within `body_timeout`, so a slow or stalled sender cannot hold a reader.
/// `interrupt` ends the wait at once.
pub(crate) fn read_frame(
    stream: &mut TcpStream,
    max_len: usize,
    start_deadline: Option<Instant>,
    body_timeout: Duration,
    interrupt: &Interrupt,
) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    read_exact_by(stream, &mut header[..1], start_deadline, interrupt)?;
    let body_deadline = Instant::now() + body_timeout;
    read_exact_by(stream, &mut header[1..], Some(body_deadline), interrupt)?;
    let len = u32::from_le_bytes(header) as u64;
    if len > max_len as u64 {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    read_exact_by(stream, &mut body, Some(body_deadline), interrupt)?;
    Ok(body)
}

pub(crate) fn write_frame(
    stream: &mut TcpStream,
    body: &[u8],
    deadline: Instant,
) -> Result<(), FrameError> {
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(body.len() as u64))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(body);
    write_all_by(stream, &frame, deadline, &Interrupt::never())
}

/// Builds a message: fixed-width little-endian integers and length-prefixed byte strings.
#[derive(Default)]
pub(crate) struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }
}

/// Reads a message built by [`Writer`]; every read is bounds-checked.
pub(crate) struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "message truncated: needed {n} more bytes, {} left",
                self.0.len()
            ));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "a key is not UTF-8".to_string())
    }
    pub fn finish(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} unexpected trailing bytes", self.0.len()))
        }
    }
}
