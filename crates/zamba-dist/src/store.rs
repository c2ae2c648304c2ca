//! The rendezvous store: a small key/value server that rank 0 runs on the master, through which
//! the ranks meet (addresses, the NCCL id, barriers, heartbeats).
//!
//! It listens on a port other hosts can reach, so it trusts no one: every connection must first
//! prove that it holds the job's token, and the store proves the same to it, by challenge and
//! response (see `crate::auth`: the token never travels); anything else is dropped and logged.
//! Messages are bounded in size, a started message must arrive within a time-out, and every
//! connection has its own thread, so garbage, oversized, slow or half-open connections cost
//! the job nothing.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::auth::{HandshakeError, prove_as_client, prove_as_server};
use crate::interrupt::POLL;
use crate::wire::{FrameError, Reader, Writer, read_frame, write_frame};
use crate::{DistError, Interrupt};

const HELLO: &[u8] = b"zamba-dist store v2\0";
const ACCEPTED: &[u8] = b"ok";

/// Bounds on what a connection may send and how slowly.
#[derive(Clone, Debug)]
pub struct StoreLimits {
    /// Largest request, in bytes.
    pub max_message: usize,
    /// Time for each step of the authentication after connecting.
    pub handshake_timeout: Duration,
    /// Time for a request, once its first byte has arrived, to arrive whole.
    pub message_timeout: Duration,
    /// Connections open at once; more are refused.
    pub max_connections: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_message: 1 << 20,
            handshake_timeout: Duration::from_secs(10),
            message_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

mod tag {
    pub const SET: u8 = 1;
    pub const GET: u8 = 2;
    pub const ADD: u8 = 3;
    pub const WAIT: u8 = 4;
    pub const DELETE: u8 = 5;

    pub const OK: u8 = 0;
    pub const NOT_READY: u8 = 1;
}

/// The store's server. Dropping it closes every connection.
pub struct StoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    token: String,
    limits: StoreLimits,
    data: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
    stopping: AtomicBool,
    open: AtomicUsize,
    rejected: AtomicUsize,
    /// Clones of the open connections (by id), to shut them down when the server stops. Each
    /// connection's thread removes its entry when it ends, which closes the socket.
    connections: Mutex<HashMap<u64, TcpStream>>,
}

impl StoreServer {
    /// Listens on `addr` (port 0: any free port) for clients holding `token`.
    pub fn bind(addr: SocketAddr, token: &str, limits: StoreLimits) -> Result<Self, DistError> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            DistError::io(
                format!(
                    "the rendezvous store cannot listen on {addr} (another job on this port? set MASTER_PORT to a free port)"
                ),
                e,
            )
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| DistError::io("rendezvous store address", e))?;
        let shared = Arc::new(Shared {
            token: token.to_string(),
            limits,
            data: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            rejected: AtomicUsize::new(0),
            connections: Mutex::new(HashMap::new()),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("zamba-dist-store".into())
                .spawn(move || accept_loop(listener, shared))
                .map_err(|e| DistError::io("starting the rendezvous store", e))?
        };
        Ok(Self {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections dropped so far for a failed authentication or a bad message.
    pub fn rejected_connections(&self) -> usize {
        self.shared.rejected.load(Ordering::Relaxed)
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        // Wake the acceptor, which then sees `stopping`.
        let wake = SocketAddr::new(loopback_of(self.addr), self.addr.port());
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        for (_, conn) in lock(&self.shared.connections).drain() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn loopback_of(addr: SocketAddr) -> std::net::IpAddr {
    match addr {
        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = conn else { continue };
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        if shared.open.load(Ordering::SeqCst) >= shared.limits.max_connections {
            reject(&shared, &peer, "too many open connections");
            continue;
        }
        let id = next_id;
        next_id += 1;
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.connections).insert(id, clone);
        }
        shared.open.fetch_add(1, Ordering::SeqCst);
        let conn_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("zamba-dist-store-conn".into())
            .spawn(move || {
                serve(stream, &peer, &conn_shared);
                lock(&conn_shared.connections).remove(&id);
                conn_shared.open.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            // The closure and its stream are gone; drop the clone too, closing the socket.
            lock(&shared.connections).remove(&id);
            shared.open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Logs a dropped connection: the first few, then one in a hundred, so a flood cannot fill
/// the log.
fn reject(shared: &Shared, peer: &str, why: &str) {
    let n = shared.rejected.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= 10 || n.is_multiple_of(100) {
        eprintln!(
            "zamba-dist: rendezvous store dropped a connection from {peer}: {why} ({n} dropped so far)"
        );
    }
}

fn serve(mut stream: TcpStream, peer: &str, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let limits = &shared.limits;
    match prove_as_server(&mut stream, HELLO, &shared.token, limits.handshake_timeout) {
        Ok(()) => {
            let deadline = Instant::now() + limits.message_timeout;
            if write_frame(&mut stream, ACCEPTED, deadline).is_err() {
                return;
            }
        }
        Err(HandshakeError::Frame(FrameError::Io(e))) if is_disconnect(&e) => {
            return reject(
                shared,
                peer,
                "it left during the authentication (a wrong job token, or not a zamba-dist client)",
            );
        }
        Err(e) => return reject(shared, peer, &format!("authentication failed: {e}")),
    }
    loop {
        let request = match read_frame(
            &mut stream,
            limits.max_message,
            None,
            limits.message_timeout,
            &Interrupt::never(),
        ) {
            Ok(r) => r,
            Err(FrameError::Io(e)) if is_disconnect(&e) => return,
            Err(e) => return reject(shared, peer, &format!("bad request: {e}")),
        };
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let reply = match handle(&request, shared) {
            Ok(reply) => reply,
            Err(why) => return reject(shared, peer, &format!("malformed request: {why}")),
        };
        if write_frame(&mut stream, &reply, Instant::now() + limits.message_timeout).is_err() {
            return;
        }
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// Longest a request may ask the server to wait.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

fn handle(request: &[u8], shared: &Shared) -> Result<Vec<u8>, String> {
    let mut r = Reader(request);
    let mut reply = Writer::default();
    match r.u8()? {
        tag::SET => {
            let key = r.string()?;
            let value = r.bytes()?.to_vec();
            r.finish()?;
            lock(&shared.data).insert(key, value);
            shared.changed.notify_all();
            reply.u8(tag::OK);
        }
        tag::GET => {
            let key = r.string()?;
            let wait = Duration::from_millis(r.u64()?).min(MAX_WAIT);
            r.finish()?;
            let data = wait_for(shared, std::slice::from_ref(&key), wait);
            match data.get(&key) {
                Some(value) => reply.u8(tag::OK).bytes(value),
                None => reply.u8(tag::NOT_READY),
            };
        }
        tag::ADD => {
            let key = r.string()?;
            let delta = r.i64()?;
            r.finish()?;
            let mut data = lock(&shared.data);
            let old =
                match data.get(&key) {
                    None => 0,
                    Some(v) => i64::from_le_bytes(v.as_slice().try_into().map_err(|_| {
                        format!("add on key {key:?}, which does not hold a counter")
                    })?),
                };
            let new = old.wrapping_add(delta);
            data.insert(key, new.to_le_bytes().to_vec());
            drop(data);
            shared.changed.notify_all();
            reply.u8(tag::OK).i64(new);
        }
        tag::WAIT => {
            let keys = read_keys(&mut r)?;
            let wait = Duration::from_millis(r.u64()?).min(MAX_WAIT);
            r.finish()?;
            let data = wait_for(shared, &keys, wait);
            let missing: Vec<&String> = keys.iter().filter(|k| !data.contains_key(*k)).collect();
            if missing.is_empty() {
                reply.u8(tag::OK);
            } else {
                reply.u8(tag::NOT_READY).u32(missing.len() as u32);
                for key in missing {
                    reply.bytes(key.as_bytes());
                }
            }
        }
        tag::DELETE => {
            let keys = read_keys(&mut r)?;
            r.finish()?;
            let mut data = lock(&shared.data);
            for key in &keys {
                data.remove(key);
            }
            reply.u8(tag::OK);
        }
        other => return Err(format!("unknown request type {other}")),
    }
    Ok(reply.0)
}

fn read_keys(r: &mut Reader) -> Result<Vec<String>, String> {
    let n = r.u32()? as usize;
    if n > r.0.len() / 4 {
        return Err(format!(
            "{n} keys announced in a {}-byte request",
            r.0.len()
        ));
    }
    (0..n).map(|_| r.string()).collect()
}

/// Waits until all `keys` are present, the wait is over, or the server stops.
fn wait_for<'a>(
    shared: &'a Shared,
    keys: &[String],
    wait: Duration,
) -> MutexGuard<'a, HashMap<String, Vec<u8>>> {
    let deadline = Instant::now() + wait;
    let mut data = lock(&shared.data);
    loop {
        let all = keys.iter().all(|k| data.contains_key(k));
        let now = Instant::now();
        if all || now >= deadline || shared.stopping.load(Ordering::SeqCst) {
            return data;
        }
        data = shared
            .changed
            .wait_timeout(data, deadline - now)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0;
    }
}

/// A connection to the store. Rank 0 serves the store, so losing it means losing rank 0.
pub struct StoreClient {
    stream: TcpStream,
    addr: String,
    /// Extra time a reply may take beyond the wait it was asked for.
    io_timeout: Duration,
    interrupt: Interrupt,
    /// Set when a call was interrupted half-way: the connection is out of step, and unusable.
    broken: Option<DistError>,
}

/// Longest wait one request asks the server for: longer waits are several requests, so that
/// the client looks at its interrupt in between.
const WAIT_SLICE: Duration = Duration::from_millis(500);

impl StoreClient {
    /// Connects to `addr` (`host:port`) and authenticates with `token` (both ways), retrying
    /// while the server is not up yet, for at most `timeout`.
    pub fn connect(addr: &str, token: &str, timeout: Duration) -> Result<Self, DistError> {
        Self::connect_with(addr, token, timeout, &Interrupt::never())
    }

    /// As [`connect`](Self::connect); every wait of this client, now and later, ends early when
    /// `interrupt` fires.
    pub fn connect_with(
        addr: &str,
        token: &str,
        timeout: Duration,
        interrupt: &Interrupt,
    ) -> Result<Self, DistError> {
        let op = format!("connecting to the rendezvous store at {addr} (served by rank 0)");
        let mut stream = connect_retrying(addr, timeout, interrupt, &op)?;
        let _ = stream.set_nodelay(true);
        let io_timeout = timeout.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let deadline = Instant::now() + io_timeout;
        let failed = |detail: String| DistError::PeerLost {
            op: format!("joining the rendezvous store at {addr}"),
            rank: 0,
            detail,
        };
        match prove_as_client(&mut stream, HELLO, token, deadline, interrupt) {
            Ok(()) => {}
            Err(HandshakeError::WrongToken | HandshakeError::Stranger) => {
                return Err(DistError::Invalid(format!(
                    "the process at {addr} is not this job's rendezvous store: it could not prove that it holds the \
                     job token (nothing secret was sent to it). Every rank of a job must have the same ZAMBA_DIST_TOKEN \
                     (or ZAMBA_DIST_TOKEN_FILE); or another program listens on MASTER_PORT"
                )));
            }
            Err(HandshakeError::Interrupted(reason)) => {
                return Err(DistError::Interrupted { op, reason });
            }
            Err(e) => return Err(failed(e.to_string())),
        }
        let answer = read_frame(&mut stream, 64, Some(deadline), io_timeout, interrupt)
            .map_err(|e| failed(e.to_string()))?;
        if answer != ACCEPTED {
            return Err(failed(format!(
                "unexpected answer {:?}",
                String::from_utf8_lossy(&answer)
            )));
        }
        Ok(Self {
            stream,
            addr: addr.to_string(),
            io_timeout,
            interrupt: interrupt.clone(),
            broken: None,
        })
    }

    fn call(&mut self, request: Writer, wait: Duration, what: &str) -> Result<Vec<u8>, DistError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let op = format!("rendezvous store {what}");
        self.interrupt.check(&op)?;
        let deadline = Instant::now() + wait + self.io_timeout;
        let lost = |e: FrameError| match e {
            FrameError::TimedOut => DistError::Timeout {
                op: op.clone(),
                timeout_s: (wait + self.io_timeout).as_secs_f64(),
                ranks: vec![0],
            },
            FrameError::Interrupted(reason) => DistError::Interrupted {
                op: op.clone(),
                reason,
            },
            e => DistError::PeerLost {
                op: op.clone(),
                rank: 0,
                detail: format!("the store at {} (served by rank 0): {e}", self.addr),
            },
        };
        let reply = write_frame(&mut self.stream, &request.0, deadline)
            .and_then(|()| {
                read_frame(
                    &mut self.stream,
                    1 << 30,
                    Some(deadline),
                    self.io_timeout + wait,
                    &self.interrupt,
                )
            })
            .map_err(lost);
        if let Err(e @ DistError::Interrupted { .. }) = &reply {
            self.broken = Some(e.clone());
        }
        reply
    }

    /// Repeats `attempt` (one request that may wait up to the slice it is given) until it
    /// yields a value or `wait` has passed; `None` then.
    fn in_slices<T>(
        &mut self,
        wait: Duration,
        mut attempt: impl FnMut(&mut Self, Duration) -> Result<Option<T>, DistError>,
    ) -> Result<Option<T>, DistError> {
        let deadline = Instant::now() + wait;
        loop {
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(WAIT_SLICE);
            if let Some(value) = attempt(self, slice)? {
                return Ok(Some(value));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), DistError> {
        let mut w = Writer::default();
        w.u8(tag::SET).bytes(key.as_bytes()).bytes(value);
        self.call(w, Duration::ZERO, &format!("set {key}"))
            .map(|_| ())
    }

    /// The value of `key`, waiting up to `wait` for it to be set; `None` if it was not.
    pub fn get(&mut self, key: &str, wait: Duration) -> Result<Option<Vec<u8>>, DistError> {
        self.in_slices(wait, |client, slice| client.get_once(key, slice))
    }

    fn get_once(&mut self, key: &str, wait: Duration) -> Result<Option<Vec<u8>>, DistError> {
        let mut w = Writer::default();
        w.u8(tag::GET)
            .bytes(key.as_bytes())
            .u64(wait.as_millis() as u64);
        let reply = self.call(w, wait, &format!("get {key}"))?;
        let mut r = Reader(&reply);
        let parsed = (|| -> Result<Option<Vec<u8>>, String> {
            match r.u8()? {
                tag::OK => Ok(Some(r.bytes()?.to_vec())),
                _ => Ok(None),
            }
        })();
        parsed.map_err(|e| self.garbled(e))
    }

    /// Adds `delta` to the counter at `key` (0 if unset); returns the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64, DistError> {
        let mut w = Writer::default();
        w.u8(tag::ADD).bytes(key.as_bytes()).i64(delta);
        let reply = self.call(w, Duration::ZERO, &format!("add {key}"))?;
        let mut r = Reader(&reply);
        let parsed = (|| -> Result<i64, String> {
            r.u8()?;
            r.i64()
        })();
        parsed.map_err(|e| self.garbled(e))
    }

    /// Waits up to `wait` for all `keys`; returns those still missing.
    pub fn wait(&mut self, keys: &[String], wait: Duration) -> Result<Vec<String>, DistError> {
        let mut missing = keys.to_vec();
        let done = self.in_slices(wait, |client, slice| {
            missing = client.wait_once(keys, slice)?;
            Ok(missing.is_empty().then_some(()))
        })?;
        Ok(if done.is_some() { Vec::new() } else { missing })
    }

    fn wait_once(&mut self, keys: &[String], wait: Duration) -> Result<Vec<String>, DistError> {
        let mut w = Writer::default();
        w.u8(tag::WAIT).u32(keys.len() as u32);
        for key in keys {
            w.bytes(key.as_bytes());
        }
        w.u64(wait.as_millis() as u64);
        let reply = self.call(w, wait, "wait")?;
        let mut r = Reader(&reply);
        let parsed = (|| -> Result<Vec<String>, String> {
            match r.u8()? {
                tag::OK => Ok(Vec::new()),
                _ => read_keys(&mut r),
            }
        })();
        parsed.map_err(|e| self.garbled(e))
    }

    pub fn delete(&mut self, keys: &[String]) -> Result<(), DistError> {
        let mut w = Writer::default();
        w.u8(tag::DELETE).u32(keys.len() as u32);
        for key in keys {
            w.bytes(key.as_bytes());
        }
        self.call(w, Duration::ZERO, "delete").map(|_| ())
    }

    fn garbled(&self, why: String) -> DistError {
        DistError::Invalid(format!(
            "the rendezvous store at {} sent a garbled reply: {why}",
            self.addr
        ))
    }
}

/// A TCP connection to `addr`, retried (backing off up to a second, or [`POLL`] when
/// `interrupt` can fire) until `timeout` has passed.
fn connect_retrying(
    addr: &str,
    timeout: Duration,
    interrupt: &Interrupt,
    op: &str,
) -> Result<TcpStream, DistError> {
    let deadline = Instant::now() + timeout;
    let longest = if interrupt.is_active() {
        POLL
    } else {
        Duration::from_secs(1)
    };
    let mut delay = Duration::from_millis(20).min(longest);
    loop {
        interrupt.check(op)?;
        let last_error = match resolve(addr) {
            Ok(sockets) => match connect_any(&sockets, deadline) {
                Ok(stream) => return Ok(stream),
                Err(e) => e,
            },
            Err(e) => e,
        };
        if Instant::now() + delay >= deadline {
            return Err(DistError::Timeout {
                op: format!("{op}: {last_error}"),
                timeout_s: timeout.as_secs_f64(),
                ranks: vec![0],
            });
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(longest);
    }
}

fn resolve(addr: &str) -> Result<Vec<SocketAddr>, String> {
    addr.to_socket_addrs()
        .map(|a| a.collect())
        .map_err(|e| format!("cannot resolve {addr}: {e}"))
}

fn connect_any(sockets: &[SocketAddr], deadline: Instant) -> Result<TcpStream, String> {
    let mut last = format!("{sockets:?} resolved to no address");
    for socket in sockets {
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or(Duration::from_millis(1))
            .min(Duration::from_secs(5))
            .max(Duration::from_millis(1));
        match TcpStream::connect_timeout(socket, left) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = format!("{socket}: {e}"),
        }
    }
    Err(last)
}
