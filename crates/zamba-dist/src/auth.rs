//! Mutual authentication of a connection by challenge–response. Each side proves that it holds
//! the job token with an HMAC-SHA256, keyed by the token, of a fresh random nonce of each side;
//! the token itself never travels. The connecting side checks the other's proof before it sends
//! its own, so a stranger answering on the port (another job, a stray server) learns nothing
//! it could replay, and is named as not being what was expected.
//!
//! ```text
//! client → server   magic ‖ client nonce
//! server → client   server nonce ‖ HMAC(token, "server" ‖ magic ‖ client nonce ‖ server nonce)
//! client → server   HMAC(token, "client" ‖ magic ‖ server nonce ‖ client nonce)
//! ```
//! The protocol's `magic` is part of every proof, so a proof made for the store cannot be used
//! on the TCP group, and the role labels keep a side from reflecting the other's proof.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Interrupt;
use crate::wire::{FrameError, read_frame, write_frame};

const NONCE_BYTES: usize = 32;
const PROOF_BYTES: usize = 32;

/// Why a handshake failed.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    /// The connection failed or timed out.
    Frame(FrameError),
    /// The peer spoke another protocol (no or another magic).
    Stranger,
    /// The peer's proof is wrong: it does not hold this job's token.
    WrongToken,
    /// A wait of ours was interrupted.
    Interrupted(String),
    /// No random bytes from the OS.
    Random(String),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Frame(e) => write!(f, "{e}"),
            HandshakeError::Stranger => write!(f, "not a zamba-dist peer (no greeting)"),
            HandshakeError::WrongToken => write!(f, "wrong job token"),
            HandshakeError::Interrupted(why) => write!(f, "interrupted ({why})"),
            HandshakeError::Random(e) => write!(f, "no random bytes for the nonce: {e}"),
        }
    }
}

impl From<FrameError> for HandshakeError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Interrupted(why) => HandshakeError::Interrupted(why),
            e => HandshakeError::Frame(e),
        }
    }
}

fn nonce() -> Result<[u8; NONCE_BYTES], HandshakeError> {
    let mut bytes = [0u8; NONCE_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| HandshakeError::Random(e.to_string()))?;
    Ok(bytes)
}

fn keyed(token: &str, role: &[u8], magic: &[u8], first: &[u8], second: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("HMAC takes keys of any length");
    for part in [role, magic, first, second] {
        mac.update(&(part.len() as u32).to_le_bytes());
        mac.update(part);
    }
    mac
}

/// The connecting side. Returns once both sides have proven that they hold `token`.
pub(crate) fn prove_as_client(
    stream: &mut TcpStream,
    magic: &[u8],
    token: &str,
    deadline: Instant,
    interrupt: &Interrupt,
) -> Result<(), HandshakeError> {
    let ours = nonce()?;
    write_frame(stream, &[magic, &ours].concat(), deadline)?;
    let limit = deadline.saturating_duration_since(Instant::now());
    let reply = read_frame(
        stream,
        NONCE_BYTES + PROOF_BYTES,
        Some(deadline),
        limit,
        interrupt,
    )?;
    if reply.len() != NONCE_BYTES + PROOF_BYTES {
        return Err(HandshakeError::Stranger);
    }
    let (theirs, their_proof) = reply.split_at(NONCE_BYTES);
    keyed(token, b"server", magic, &ours, theirs)
        .verify_slice(their_proof)
        .map_err(|_| HandshakeError::WrongToken)?;
    let proof = keyed(token, b"client", magic, theirs, &ours).finalize();
    write_frame(stream, &proof.into_bytes(), deadline)?;
    Ok(())
}

/// The accepting side: the greeting must arrive within `limit` of the call, the whole exchange
/// within `limit` more.
pub(crate) fn prove_as_server(
    stream: &mut TcpStream,
    magic: &[u8],
    token: &str,
    limit: Duration,
) -> Result<(), HandshakeError> {
    let never = Interrupt::never();
    let start_deadline = Instant::now() + limit;
    let hello = read_frame(
        stream,
        magic.len() + NONCE_BYTES,
        Some(start_deadline),
        limit,
        &never,
    )
    .map_err(|e| match e {
        FrameError::TooLarge(_) => HandshakeError::Stranger,
        e => HandshakeError::Frame(e),
    })?;
    let theirs = match hello.strip_prefix(magic) {
        Some(nonce) if nonce.len() == NONCE_BYTES => nonce,
        _ => return Err(HandshakeError::Stranger),
    };
    let ours = nonce()?;
    let proof = keyed(token, b"server", magic, theirs, &ours).finalize();
    let deadline = Instant::now() + limit;
    write_frame(stream, &[&ours[..], &proof.into_bytes()].concat(), deadline)?;
    let their_proof = read_frame(stream, PROOF_BYTES, Some(deadline), limit, &never)?;
    keyed(token, b"client", magic, &ours, theirs)
        .verify_slice(&their_proof)
        .map_err(|_| HandshakeError::WrongToken)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    /// Runs a server with `server_token` and a client with `client_token`; returns both results.
    fn handshake(
        server_token: &'static str,
        client_token: &str,
    ) -> (Result<(), HandshakeError>, Result<(), HandshakeError>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            prove_as_server(
                &mut stream,
                b"test v1",
                server_token,
                Duration::from_secs(5),
            )
        });
        let mut stream = TcpStream::connect(addr).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let client = prove_as_client(
            &mut stream,
            b"test v1",
            client_token,
            deadline,
            &Interrupt::never(),
        );
        drop(stream);
        (server.join().unwrap(), client)
    }

    #[test]
    fn both_sides_prove_the_token_and_a_wrong_token_fails_on_both() {
        let (server, client) = handshake(TOKEN, TOKEN);
        server.unwrap();
        client.unwrap();
        let (server, client) = handshake(TOKEN, "another-token-0123456789abcdef");
        assert!(
            matches!(client, Err(HandshakeError::WrongToken)),
            "{client:?}"
        );
        // The client never sent a proof: the server sees it leave.
        assert!(
            matches!(server, Err(HandshakeError::Frame(_))),
            "{server:?}"
        );
    }

    #[test]
    fn proofs_depend_on_every_input() {
        let base = keyed(TOKEN, b"server", b"m", b"a", b"b")
            .finalize()
            .into_bytes();
        for other in [
            keyed(
                "another-token-0123456789abcdef",
                b"server",
                b"m",
                b"a",
                b"b",
            ),
            keyed(TOKEN, b"client", b"m", b"a", b"b"),
            keyed(TOKEN, b"server", b"n", b"a", b"b"),
            keyed(TOKEN, b"server", b"m", b"b", b"a"),
            // Lengths are part of the input: moving a byte between parts changes the proof.
            keyed(TOKEN, b"server", b"ma", b"", b"b"),
        ] {
            assert_ne!(other.finalize().into_bytes(), base);
        }
    }
}
