//! Ranks as processes over TCP: a star through rank 0, which combines every collective in rank
//! order with the same code as the thread group, so results match it bit for bit. Simple and
//! obviously correct; for CPU multi-process runs and tests, not for speed.
//!
//! One collective, seen from rank 0: tell every rank "arrived", then ask each rank in turn to
//! send its call and input, combine, and send each rank its result. A rank that does not
//! answer within the time-out, or whose connection breaks, fails the collective; rank 0 then
//! sends every rank an error naming it. A rank only ever sends when rank 0 has asked, so no
//! rank is left blocked on a write when the group fails.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use half::bf16;

use crate::auth::{HandshakeError, prove_as_client, prove_as_server};
use crate::collective::{Call, Kind, check_calls, combine};
use crate::cpu::{HostExchange, host_communicator};
use crate::host::{Dtype, Payload};
use crate::rendezvous::Rendezvous;
use crate::wire::{
    FrameError, Reader, Writer, read_exact_by, read_frame, write_all_by, write_frame,
};
use crate::{DistError, Interrupt, ReduceOp};

const HELLO: &[u8] = b"zamba-dist tcp v2\0";
const HUB_KEY: &str = "tcp/hub";

mod msg {
    pub const ARRIVED: u8 = 1;
    pub const SEND: u8 = 2;
    pub const RESULT: u8 = 3;
    pub const ERROR: u8 = 4;
}

/// One rank of a TCP group.
pub struct TcpCommunicator {
    rank: usize,
    world: usize,
    timeout: Duration,
    interrupt: Interrupt,
    /// Rank 0: the connections to ranks 1.. (index r - 1). Other ranks: the one to rank 0.
    links: Mutex<Vec<TcpStream>>,
    next_index: AtomicU64,
    /// The group's first failure; every later call returns it.
    fault: Mutex<Option<DistError>>,
}

impl TcpCommunicator {
    /// Connects the group: rank 0 listens (on the master host, where it serves the store) and
    /// publishes its port through the store; the other ranks connect to it there, and each
    /// connection is authenticated both ways with the job token.
    pub(crate) fn connect(
        rendezvous: &mut Rendezvous,
        master_host: &str,
        timeout: Duration,
    ) -> Result<Self, DistError> {
        let (rank, world) = (rendezvous.rank, rendezvous.world);
        let interrupt = rendezvous.interrupt.clone();
        let links = if rank == 0 {
            let listener = TcpListener::bind(SocketAddr::new(rendezvous.bind_ip, 0))
                .map_err(|e| DistError::io("rank 0: listening for the TCP group", e))?;
            let port = listener
                .local_addr()
                .map_err(|e| DistError::io("rank 0: TCP group address", e))?
                .port();
            rendezvous.store.set(HUB_KEY, port.to_string().as_bytes())?;
            accept_ranks(listener, world, &rendezvous.token, timeout, &interrupt)?
        } else {
            let port = rendezvous.store.get(HUB_KEY, timeout)?.ok_or_else(|| {
                DistError::timeout("TCP group: waiting for rank 0's port", timeout, vec![0])
            })?;
            let hub = format!("{master_host}:{}", String::from_utf8_lossy(&port));
            let joining = Joining {
                rank,
                world,
                token: &rendezvous.token,
                timeout,
                interrupt: &interrupt,
            };
            vec![joining.join_hub(&hub)?]
        };
        Ok(Self {
            rank,
            world,
            timeout,
            interrupt,
            links: Mutex::new(links),
            next_index: AtomicU64::new(0),
            fault: Mutex::new(None),
        })
    }
}

fn accept_ranks(
    listener: TcpListener,
    world: usize,
    token: &str,
    timeout: Duration,
    interrupt: &Interrupt,
) -> Result<Vec<TcpStream>, DistError> {
    let deadline = Instant::now() + timeout;
    listener
        .set_nonblocking(true)
        .map_err(|e| DistError::io("rank 0: TCP group listener", e))?;
    let (joined_tx, joined) = mpsc::channel::<(usize, TcpStream)>();
    let mut links: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
    while links.iter().any(Option::is_none) {
        interrupt.check("TCP group: waiting for ranks to connect")?;
        if Instant::now() >= deadline {
            let missing = (1..world).filter(|&r| links[r - 1].is_none()).collect();
            return Err(DistError::timeout(
                "TCP group: waiting for ranks to connect",
                timeout,
                missing,
            ));
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                // Each newcomer is checked on its own thread: a silent stranger holds up no one.
                let tx = joined_tx.clone();
                let token = token.to_string();
                std::thread::spawn(move || {
                    match check_newcomer(
                        stream,
                        world,
                        &token,
                        timeout.min(Duration::from_secs(10)),
                    ) {
                        Ok(joined) => {
                            let _ = tx.send(joined);
                        }
                        Err(why) => eprintln!(
                            "zamba-dist: TCP group dropped a connection from {peer}: {why}"
                        ),
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(DistError::io("rank 0: accepting TCP group connections", e)),
        }
        while let Ok((rank, mut stream)) = joined.try_recv() {
            let reply = if links[rank - 1].is_some() {
                b"duplicate".as_slice()
            } else {
                b"ok"
            };
            let sent = write_frame(&mut stream, reply, Instant::now() + Duration::from_secs(5));
            if reply == b"ok" && sent.is_ok() {
                links[rank - 1] = Some(stream);
            } else {
                eprintln!("zamba-dist: TCP group dropped a second connection claiming rank {rank}");
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(links
        .into_iter()
        .map(|l| l.expect("all ranks joined"))
        .collect())
}

/// Authenticates a newcomer, then reads its rank and world size.
fn check_newcomer(
    mut stream: TcpStream,
    world: usize,
    token: &str,
    limit: Duration,
) -> Result<(usize, TcpStream), String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    prove_as_server(&mut stream, HELLO, token, limit).map_err(|e| match e {
        HandshakeError::Frame(FrameError::Io(_)) => {
            "it left during the authentication (a wrong job token?)".to_string()
        }
        e => format!("authentication failed: {e}"),
    })?;
    let deadline = Some(Instant::now() + limit);
    let never = Interrupt::never();
    let claim = read_frame(&mut stream, 8, deadline, limit, &never)
        .map_err(|e| format!("no rank after the authentication: {e}"))?;
    let mut r = Reader(&claim);
    let parsed = (|| -> Result<(usize, usize), String> {
        let rank = r.u32()? as usize;
        let their_world = r.u32()? as usize;
        r.finish()?;
        Ok((rank, their_world))
    })();
    let (rank, their_world) = parsed.map_err(|e| format!("malformed rank claim: {e}"))?;
    if rank == 0 || rank >= world || their_world != world {
        let _ = write_frame(&mut stream, b"wrong rank", Instant::now() + limit);
        return Err(format!(
            "it claims rank {rank} of {their_world}, this group has {world} ranks"
        ));
    }
    Ok((rank, stream))
}

/// A rank other than 0 joining the group.
struct Joining<'a> {
    rank: usize,
    world: usize,
    token: &'a str,
    timeout: Duration,
    interrupt: &'a Interrupt,
}

impl Joining<'_> {
    fn join_hub(&self, hub: &str) -> Result<TcpStream, DistError> {
        let op = format!("TCP group: joining rank 0 at {hub}");
        let lost = |detail: String| DistError::PeerLost {
            op: op.clone(),
            rank: 0,
            detail,
        };
        let addr = hub
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| lost(format!("cannot resolve {hub:?}")))?;
        let deadline = Instant::now() + self.timeout;
        let mut stream =
            TcpStream::connect_timeout(&addr, self.timeout).map_err(|e| lost(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        match prove_as_client(&mut stream, HELLO, self.token, deadline, self.interrupt) {
            Ok(()) => {}
            Err(HandshakeError::Interrupted(reason)) => {
                return Err(DistError::Interrupted { op, reason });
            }
            Err(HandshakeError::WrongToken | HandshakeError::Stranger) => {
                return Err(DistError::Invalid(format!(
                    "{op}: the process there could not prove that it holds the job token; \
                     every rank of a job must have the same token"
                )));
            }
            Err(e) => return Err(lost(e.to_string())),
        }
        let mut claim = Writer::default();
        claim.u32(self.rank as u32).u32(self.world as u32);
        write_frame(&mut stream, &claim.0, deadline).map_err(|e| lost(e.to_string()))?;
        let reply = read_frame(
            &mut stream,
            64,
            Some(deadline),
            self.timeout,
            self.interrupt,
        )
        .map_err(|e| lost(e.to_string()))?;
        if reply != b"ok" {
            return Err(DistError::Invalid(format!(
                "TCP group: rank 0 refused rank {} ({}): the same world size on every rank, one process per rank",
                self.rank,
                String::from_utf8_lossy(&reply)
            )));
        }
        Ok(stream)
    }
}

impl HostExchange for TcpCommunicator {
    fn exchange(&self, call: Call, input: Payload) -> Result<Payload, DistError> {
        let index = self.next_index.load(Ordering::Relaxed);
        let label = call.label(index);
        call.check_local(self.world, &label)?;
        self.next_index.store(index + 1, Ordering::Relaxed);
        if let Some(fault) = &*lock(&self.fault) {
            return Err(fault.clone());
        }
        let mut links = lock(&self.links);
        let result = if self.rank == 0 {
            self.lead(&mut links, call, input, index, &label)
        } else {
            self.follow(&mut links[0], call, input, index, &label)
        };
        if let Err(e) = &result {
            lock(&self.fault).get_or_insert(e.clone());
        }
        result
    }
}

host_communicator!(TcpCommunicator);

/// `mutex` locked; a thread that panicked holding it left nothing half-written that matters
/// here (a failed collective fails the group).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl TcpCommunicator {
    /// Rank 0's side of a collective.
    fn lead(
        &self,
        links: &mut [TcpStream],
        call: Call,
        input: Payload,
        index: u64,
        label: &str,
    ) -> Result<Payload, DistError> {
        let start = Instant::now();
        let gather_deadline = start + self.timeout;
        let result = (|| -> Result<Payload, DistError> {
            let mut arrived = Writer::default();
            arrived.u8(msg::ARRIVED).u64(index);
            for (i, link) in links.iter_mut().enumerate() {
                write_message(link, &arrived.0, gather_deadline, &self.interrupt)
                    .map_err(|e| self.link_error(e, i + 1, label))?;
            }
            let mut calls = vec![call];
            let mut inputs = vec![input];
            for (i, link) in links.iter_mut().enumerate() {
                let rank = i + 1;
                write_message(link, &[msg::SEND], gather_deadline, &self.interrupt)
                    .map_err(|e| self.link_error(e, rank, label))?;
                let (their_call, their_index) = read_call(link, gather_deadline, &self.interrupt)
                    .map_err(|e| self.link_error(e, rank, label))?;
                let payload = read_payload(link, &their_call, gather_deadline, &self.interrupt)
                    .map_err(|e| self.link_error(e, rank, label))?;
                if their_index != index {
                    return Err(DistError::Invalid(format!(
                        "{label}: rank {rank} is at collective #{their_index}, rank 0 at #{index}: the ranks called different sequences of collectives"
                    )));
                }
                check_calls(&[call, their_call], label)?;
                calls.push(their_call);
                inputs.push(payload);
            }
            let combined = combine(&calls, inputs, label)?;
            let send_deadline = Instant::now() + self.timeout;
            for (i, link) in links.iter_mut().enumerate() {
                let mut out = Writer::default();
                out.u8(msg::RESULT);
                write_payload(&mut out, &combined.for_rank(i + 1, self.world));
                write_message(link, &out.0, send_deadline, &self.interrupt)
                    .map_err(|e| self.link_error(e, i + 1, label))?;
            }
            Ok(combined.for_rank(0, self.world))
        })();
        if let Err(e) = &result {
            // Tell everyone why, so every rank's error names the same culprit.
            let mut out = Writer::default();
            out.u8(msg::ERROR);
            encode_error(&mut out, e);
            let deadline = Instant::now() + self.timeout.min(Duration::from_secs(5));
            for link in links.iter_mut() {
                let _ = write_message(link, &out.0, deadline, &Interrupt::never());
            }
        }
        result
    }

    /// A non-root rank's side of a collective.
    fn follow(
        &self,
        hub: &mut TcpStream,
        call: Call,
        input: Payload,
        index: u64,
        label: &str,
    ) -> Result<Payload, DistError> {
        // Rank 0 must reach the collective within the time-out; after that it is rank 0 that
        // applies the time-out to everyone, so this rank waits longer before blaming it.
        let message = read_message(hub, Instant::now() + self.timeout, &self.interrupt)
            .map_err(|e| self.link_error(e, 0, label))?;
        let arrived = Instant::now();
        let mut r = Reader(&message);
        match r.u8().map_err(|e| garbled(label, e))? {
            msg::ARRIVED => {}
            msg::ERROR => return Err(decode_error(&mut r).unwrap_or_else(|e| garbled(label, e))),
            other => return Err(garbled(label, format!("unexpected message {other}"))),
        }
        let rank0_index = r.u64().map_err(|e| garbled(label, e))?;
        if rank0_index != index {
            return Err(DistError::Invalid(format!(
                "{label}: rank 0 is at collective #{rank0_index}, rank {} at #{index}: the ranks called different sequences of collectives",
                self.rank
            )));
        }
        let patience = arrived + 3 * self.timeout;
        loop {
            let message = read_message(hub, patience, &self.interrupt)
                .map_err(|e| self.link_error(e, 0, label))?;
            let mut r = Reader(&message);
            match r.u8().map_err(|e| garbled(label, e))? {
                msg::SEND => {
                    let mut out = Writer::default();
                    write_call(&mut out, &call, index);
                    write_payload(&mut out, &input);
                    write_all_by(hub, &out.0, patience, &self.interrupt)
                        .map_err(|e| self.link_error(e, 0, label))?;
                }
                msg::RESULT => return read_payload_body(&mut r, label),
                msg::ERROR => {
                    return Err(decode_error(&mut r).unwrap_or_else(|e| garbled(label, e)));
                }
                other => return Err(garbled(label, format!("unexpected message {other}"))),
            }
        }
    }

    fn link_error(&self, e: FrameError, rank: usize, label: &str) -> DistError {
        match e {
            FrameError::TimedOut => DistError::timeout(label, self.timeout, vec![rank]),
            FrameError::Interrupted(reason) => DistError::Interrupted {
                op: label.to_string(),
                reason,
            },
            e => DistError::PeerLost {
                op: label.to_string(),
                rank,
                detail: format!("its connection failed ({e}); the process died or was killed"),
            },
        }
    }
}

fn garbled(label: &str, why: String) -> DistError {
    DistError::Invalid(format!("{label}: garbled message from rank 0: {why}"))
}

/// Messages from rank 0 to the others: a `u64` length, then the body.
fn write_message(
    link: &mut TcpStream,
    body: &[u8],
    deadline: Instant,
    interrupt: &Interrupt,
) -> Result<(), FrameError> {
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    write_all_by(link, &out, deadline, interrupt)
}

fn read_message(
    link: &mut TcpStream,
    deadline: Instant,
    interrupt: &Interrupt,
) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 8];
    read_exact_by(link, &mut len, Some(deadline), interrupt)?;
    let len = u64::from_le_bytes(len);
    let mut body = vec![0u8; usize::try_from(len).map_err(|_| FrameError::TooLarge(len))?];
    read_exact_by(link, &mut body, Some(deadline), interrupt)?;
    Ok(body)
}

fn write_call(out: &mut Writer, call: &Call, index: u64) {
    let (kind, op, root) = match call.kind {
        Kind::AllReduce(op) => (1, op, 0),
        Kind::ReduceScatter(op) => (2, op, 0),
        Kind::AllGather => (3, ReduceOp::Sum, 0),
        Kind::Broadcast { root } => (4, ReduceOp::Sum, root),
        Kind::BroadcastBytes { root } => (5, ReduceOp::Sum, root),
        Kind::Barrier => (6, ReduceOp::Sum, 0),
    };
    let op = match op {
        ReduceOp::Sum => 0,
        ReduceOp::Avg => 1,
        ReduceOp::Max => 2,
    };
    let dtype = match call.dtype {
        None => 0,
        Some(Dtype::F32) => 1,
        Some(Dtype::Bf16) => 2,
    };
    out.u8(kind)
        .u8(op)
        .u8(dtype)
        .u32(root as u32)
        .u64(call.len as u64)
        .u64(index);
}

const CALL_BYTES: usize = 3 + 4 + 8 + 8;

fn read_call(
    link: &mut TcpStream,
    deadline: Instant,
    interrupt: &Interrupt,
) -> Result<(Call, u64), FrameError> {
    let mut buf = [0u8; CALL_BYTES];
    read_exact_by(link, &mut buf, Some(deadline), interrupt)?;
    let bad = |what: &str| {
        FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            what.to_string(),
        ))
    };
    let mut r = Reader(&buf);
    let (kind, op, dtype) = (r.u8(), r.u8(), r.u8());
    let (root, len, index) = (r.u32(), r.u64(), r.u64());
    let [kind, op, dtype] = [kind, op, dtype].map(|v| v.unwrap_or(u8::MAX));
    let (root, len, index) = (
        root.unwrap_or(0) as usize,
        len.unwrap_or(0) as usize,
        index.unwrap_or(0),
    );
    let op = match op {
        0 => ReduceOp::Sum,
        1 => ReduceOp::Avg,
        2 => ReduceOp::Max,
        _ => return Err(bad("unknown reduce op")),
    };
    let kind = match kind {
        1 => Kind::AllReduce(op),
        2 => Kind::ReduceScatter(op),
        3 => Kind::AllGather,
        4 => Kind::Broadcast { root },
        5 => Kind::BroadcastBytes { root },
        6 => Kind::Barrier,
        _ => return Err(bad("unknown collective")),
    };
    let dtype = match dtype {
        0 => None,
        1 => Some(Dtype::F32),
        2 => Some(Dtype::Bf16),
        _ => return Err(bad("unknown dtype")),
    };
    Ok((Call { kind, dtype, len }, index))
}

mod payload_tag {
    pub const EMPTY: u8 = 0;
    pub const F32: u8 = 1;
    pub const BF16: u8 = 2;
    pub const BYTES: u8 = 3;
}

fn write_payload(out: &mut Writer, payload: &Payload) {
    match payload {
        Payload::Empty => {
            out.u8(payload_tag::EMPTY).u64(0);
        }
        Payload::F32(v) => {
            out.u8(payload_tag::F32).u64(v.len() as u64);
            out.0.reserve(4 * v.len());
            for x in v {
                out.0.extend_from_slice(&x.to_le_bytes());
            }
        }
        Payload::Bf16(v) => {
            out.u8(payload_tag::BF16).u64(v.len() as u64);
            out.0.reserve(2 * v.len());
            for x in v {
                out.0.extend_from_slice(&x.to_bits().to_le_bytes());
            }
        }
        Payload::Bytes(v) => {
            out.u8(payload_tag::BYTES).u64(v.len() as u64);
            out.0.extend_from_slice(v);
        }
    }
}

/// Reads a rank's input, whose size its call bounds.
fn read_payload(
    link: &mut TcpStream,
    call: &Call,
    deadline: Instant,
    interrupt: &Interrupt,
) -> Result<Payload, FrameError> {
    let mut head = [0u8; 9];
    read_exact_by(link, &mut head, Some(deadline), interrupt)?;
    let tag = head[0];
    let count = u64::from_le_bytes(head[1..].try_into().expect("8 bytes"));
    let element = match tag {
        payload_tag::EMPTY => 0,
        payload_tag::F32 => 4,
        payload_tag::BF16 => 2,
        payload_tag::BYTES => 1,
        _ => return Err(FrameError::Io(std::io::ErrorKind::InvalidData.into())),
    };
    // Authenticated peers still only get to send what their call announced.
    if tag != payload_tag::EMPTY && count != call.len as u64 {
        return Err(FrameError::TooLarge(count));
    }
    let mut bytes = vec![0u8; (count * element) as usize];
    read_exact_by(link, &mut bytes, Some(deadline), interrupt)?;
    Ok(decode_values(tag, &bytes))
}

fn decode_values(tag: u8, bytes: &[u8]) -> Payload {
    match tag {
        payload_tag::F32 => Payload::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        ),
        payload_tag::BF16 => Payload::Bf16(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes(c.try_into().expect("2 bytes"))))
                .collect(),
        ),
        payload_tag::BYTES => Payload::Bytes(bytes.to_vec()),
        _ => Payload::Empty,
    }
}

fn read_payload_body(r: &mut Reader, label: &str) -> Result<Payload, DistError> {
    let parsed = (|| -> Result<Payload, String> {
        let tag = r.u8()?;
        let count = r.u64()? as usize;
        let element = match tag {
            payload_tag::EMPTY => 0,
            payload_tag::F32 => 4,
            payload_tag::BF16 => 2,
            payload_tag::BYTES => 1,
            other => return Err(format!("unknown payload type {other}")),
        };
        let need = count.checked_mul(element).ok_or("payload size overflows")?;
        if r.0.len() != need {
            return Err(format!("payload of {} bytes, expected {need}", r.0.len()));
        }
        Ok(decode_values(tag, r.0))
    })();
    parsed.map_err(|e| garbled(label, e))
}

fn encode_error(out: &mut Writer, e: &DistError) {
    match e {
        DistError::Timeout {
            op,
            timeout_s,
            ranks,
        } => {
            out.u8(1)
                .bytes(op.as_bytes())
                .u64(timeout_s.to_bits())
                .u32(ranks.len() as u32);
            for &r in ranks {
                out.u32(r as u32);
            }
        }
        DistError::PeerLost { op, rank, detail } => {
            out.u8(2)
                .bytes(op.as_bytes())
                .u32(*rank as u32)
                .bytes(detail.as_bytes());
        }
        other => {
            out.u8(3).bytes(other.to_string().as_bytes());
        }
    }
}

fn decode_error(r: &mut Reader) -> Result<DistError, String> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    Ok(match r.u8()? {
        1 => {
            let op = text(r.bytes()?);
            let timeout_s = f64::from_bits(r.u64()?);
            let n = r.u32()? as usize;
            let ranks = (0..n)
                .map(|_| r.u32().map(|v| v as usize))
                .collect::<Result<_, _>>()?;
            DistError::Timeout {
                op,
                timeout_s,
                ranks,
            }
        }
        2 => DistError::PeerLost {
            op: text(r.bytes()?),
            rank: r.u32()? as usize,
            detail: text(r.bytes()?),
        },
        _ => DistError::Invalid(text(r.bytes()?)),
    })
}
