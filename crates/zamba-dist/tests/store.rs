//! The rendezvous store: its operations, and strangers — a wrong token, garbage, an oversized
//! or stalled message, a connection that never speaks — neither crash it nor hold up the job.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use zamba_dist::store::{StoreClient, StoreLimits, StoreServer};
use zamba_dist::{Backend, Communicator, DistError, init};

fn server(limits: StoreLimits) -> StoreServer {
    StoreServer::bind("127.0.0.1:0".parse().unwrap(), TEST_TOKEN, limits).unwrap()
}

fn quick_limits() -> StoreLimits {
    StoreLimits {
        max_message: 4096,
        handshake_timeout: Duration::from_millis(500),
        message_timeout: Duration::from_millis(500),
        max_connections: 64,
    }
}

fn client(addr: SocketAddr) -> StoreClient {
    StoreClient::connect(&addr.to_string(), TEST_TOKEN, Duration::from_secs(5)).unwrap()
}

#[test]
fn set_get_add_wait_delete() {
    let server = server(StoreLimits::default());
    let mut a = client(server.local_addr());
    let mut b = client(server.local_addr());
    a.set("nccl/id", &[7u8; 128]).unwrap();
    assert_eq!(
        b.get("nccl/id", Duration::ZERO).unwrap(),
        Some(vec![7u8; 128])
    );
    assert_eq!(b.get("absent", Duration::from_millis(100)).unwrap(), None);
    assert_eq!(a.add("count", 2).unwrap(), 2);
    assert_eq!(b.add("count", 3).unwrap(), 5);

    // A get waits for a later set.
    let addr = server.local_addr();
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        client(addr).set("late", b"here").unwrap();
    });
    assert_eq!(
        b.get("late", Duration::from_secs(5)).unwrap(),
        Some(b"here".to_vec())
    );
    setter.join().unwrap();

    let keys: Vec<String> = ["late", "count", "never"].map(String::from).into();
    assert_eq!(
        a.wait(&keys, Duration::from_millis(100)).unwrap(),
        vec!["never".to_string()]
    );
    a.delete(&keys).unwrap();
    assert_eq!(a.wait(&keys, Duration::ZERO).unwrap().len(), 3);
}

#[test]
fn a_wrong_token_is_refused() {
    let server = server(quick_limits());
    let addr = server.local_addr().to_string();
    let e = StoreClient::connect(&addr, "not-the-token-0123456789", Duration::from_secs(5))
        .err()
        .expect("a wrong token must be refused");
    assert!(
        e.to_string()
            .contains("could not prove that it holds the job token"),
        "{e}"
    );
    // The store counts the client that left during the authentication once it has seen it go.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.rejected_connections() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(server.rejected_connections(), 1);
}

/// A client written from the protocol's description (crate::auth), independently of the
/// crate's: it authenticates and returns the raw connection.
fn authenticated_by_hand(addr: SocketAddr) -> TcpStream {
    use hmac::{Hmac, Mac};
    fn frame(s: &mut TcpStream, body: &[u8]) {
        s.write_all(&(body.len() as u32).to_le_bytes()).unwrap();
        s.write_all(body).unwrap();
    }
    fn read_frame(s: &mut TcpStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        body
    }
    let proof = |role: &[u8], first: &[u8], second: &[u8]| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(TEST_TOKEN.as_bytes()).unwrap();
        for part in [role, MAGIC, first, second] {
            mac.update(&(part.len() as u32).to_le_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().to_vec()
    };
    const MAGIC: &[u8] = b"zamba-dist store v2\0";
    let ours = [42u8; 32];
    let mut s = TcpStream::connect(addr).unwrap();
    frame(&mut s, &[MAGIC, &ours].concat());
    let reply = read_frame(&mut s);
    let (theirs, their_proof) = reply.split_at(32);
    assert_eq!(
        their_proof,
        proof(b"server", &ours, theirs),
        "the store's proof"
    );
    frame(&mut s, &proof(b"client", theirs, &ours));
    assert_eq!(read_frame(&mut s), b"ok");
    s
}

#[test]
fn a_stranger_on_the_port_never_receives_the_token() {
    // A stray server on the rendezvous port answers like an HTTP server and records everything.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stray = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut received = vec![0u8; 4096];
        let n = conn.read(&mut received).unwrap_or(0);
        let reply = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        let _ = conn.write_all(&[&(64u32).to_le_bytes()[..], &reply[..], &[0u8; 64][..]].concat());
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
        received.truncate(n);
        received.extend(rest);
        received
    });
    let e = StoreClient::connect(&addr, TEST_TOKEN, Duration::from_secs(5))
        .err()
        .expect("a stray server is not the store");
    assert!(
        e.to_string().contains("is not this job's rendezvous store"),
        "{e}"
    );
    let received = stray.join().unwrap();
    assert!(!received.is_empty(), "the client greeted");
    assert!(
        !received
            .windows(TEST_TOKEN.len())
            .any(|w| w == TEST_TOKEN.as_bytes()),
        "the token travelled"
    );
}

/// Sends `bytes` to the store and reports whether the store closed the connection within
/// `within`.
fn closed_after(addr: SocketAddr, bytes: &[u8], within: Duration) -> bool {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(bytes).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
    false
}

#[test]
fn garbage_oversized_and_stalled_messages_are_dropped() {
    let server = server(quick_limits());
    let addr = server.local_addr();
    let within = Duration::from_secs(3);
    // Not a frame at all: the length prefix claims 4 GB.
    assert!(closed_after(addr, &[0xff; 64], within));
    // A frame, but not the greeting.
    assert!(closed_after(addr, b"\x05\x00\x00\x00hello", within));
    // Silent after connecting: dropped after the handshake time-out.
    assert!(closed_after(addr, b"", within));
    // A greeting that stops half way.
    assert!(closed_after(addr, b"\x40\x00\x00\x00zamba", within));
    assert!(server.rejected_connections() >= 4);

    // An authenticated client that sends an oversized request, then one that stalls mid-request.
    let mut good = client(addr);
    let mut raw = client(addr);
    good.set("k", b"v").unwrap();
    drop(raw.set("big", &vec![0u8; 10_000]).unwrap_err());
    let mut staller = authenticated_by_hand(addr);
    staller.write_all(&[100, 0]).unwrap();
    // The stalled request holds up no one.
    let t = Instant::now();
    assert_eq!(good.get("k", Duration::ZERO).unwrap(), Some(b"v".to_vec()));
    assert!(t.elapsed() < Duration::from_millis(300));
}

#[test]
fn a_world_2_job_finishes_despite_strangers_at_the_store() {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let results: Vec<Outputs> = std::thread::scope(|s| {
        // Strangers connect as soon as rank 0's store is up, and one stays half-open.
        let attacker = s.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut half_open = loop {
                if let Ok(c) = TcpStream::connect(addr) {
                    break c;
                }
                assert!(Instant::now() < deadline, "the store never came up");
                std::thread::sleep(Duration::from_millis(10));
            };
            half_open.write_all(&[0x10]).unwrap();
            for junk in [&[0xffu8; 32][..], b"GET / HTTP/1.1\r\n\r\n", &[0u8; 3]] {
                if let Ok(mut c) = TcpStream::connect(addr) {
                    let _ = c.write_all(junk);
                }
            }
            let wrong = StoreClient::connect(
                &addr.to_string(),
                "a-guess-at-the-token-000000",
                Duration::from_secs(2),
            );
            assert!(wrong.is_err());
            half_open
        });
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                s.spawn(move || {
                    if rank == 1 {
                        std::thread::sleep(Duration::from_millis(400));
                    }
                    let comm: Box<dyn Communicator> =
                        init(&loopback_info(rank, 2, port), Backend::Tcp, &opts(20_000)).unwrap();
                    exercise(&*comm)
                })
            })
            .collect();
        let outputs = ranks.into_iter().map(|h| h.join().unwrap()).collect();
        drop(attacker.join().unwrap());
        outputs
    });
    // The same results as an undisturbed job (exercise also checks them against the reference).
    let comms = zamba_dist::thread_group(2, &opts(10_000));
    let undisturbed: Vec<Outputs> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| s.spawn(move || exercise(&*c)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results, undisturbed);
}

#[test]
fn the_store_is_lost_with_rank_0() {
    let server = server(StoreLimits::default());
    let mut c = client(server.local_addr());
    drop(server);
    let e = c.get("anything", Duration::from_millis(100)).unwrap_err();
    assert!(matches!(e, DistError::PeerLost { rank: 0, .. }), "{e}");
}
