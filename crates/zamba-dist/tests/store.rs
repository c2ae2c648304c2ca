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
        e.to_string().contains("refused this process's token"),
        "{e}"
    );
    assert_eq!(server.rejected_connections(), 1);
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
    let mut staller = TcpStream::connect(addr).unwrap();
    let mut hello = Vec::new();
    hello.extend_from_slice(
        &((b"zamba-dist store v1\0".len() + TEST_TOKEN.len()) as u32).to_le_bytes(),
    );
    hello.extend_from_slice(b"zamba-dist store v1\0");
    hello.extend_from_slice(TEST_TOKEN.as_bytes());
    staller.write_all(&hello).unwrap();
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
