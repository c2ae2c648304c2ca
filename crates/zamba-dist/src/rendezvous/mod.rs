//! Meeting the other ranks: who this process is ([`RendezvousInfo`], from the launcher's
//! variables), the job's token, and the [`Rendezvous`] itself — every rank connected to rank 0's
//! store, registered, and found to run the same job (the ranks' fingerprints compared).

mod env;

pub use env::{Launcher, RendezvousInfo, TOKEN_ENV, TOKEN_FILE_ENV, TokenSource};

use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::time::Duration;

use crate::store::{StoreClient, StoreLimits, StoreServer};
use crate::token::{check_token, create_token_file, wait_for_token_file};
use crate::{DistError, DistOptions, Fingerprint, Interrupt};

/// The job's token, from `ZAMBA_DIST_TOKEN` or the token file (created by rank 0, waited for
/// by the others).
pub fn resolve_token(info: &RendezvousInfo, timeout: Duration) -> Result<String, DistError> {
    token_for(info, timeout, &Interrupt::never())
}

fn token_for(
    info: &RendezvousInfo,
    timeout: Duration,
    interrupt: &Interrupt,
) -> Result<String, DistError> {
    match &info.token {
        None => Err(DistError::Invalid(
            "a multi-process job needs a shared secret: set ZAMBA_DIST_TOKEN on every rank (`zamba-train launch` does), \
             or ZAMBA_DIST_TOKEN_FILE to a path on a filesystem all nodes share (rank 0 creates it); see docs/distributed.md"
                .into(),
        )),
        Some(TokenSource::Value(token)) => {
            check_token(token, "ZAMBA_DIST_TOKEN")?;
            Ok(token.clone())
        }
        Some(TokenSource::File(path)) if info.rank == 0 => create_token_file(path),
        Some(TokenSource::File(path)) => wait_for_token_file(path, timeout, interrupt),
    }
}

/// Every rank connected to the store (rank 0 also serving it), after all have joined and
/// agreed that they run the same job. The TCP group needs it only to connect; NCCL keeps it
/// for barriers and heartbeats.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct Rendezvous {
    pub rank: usize,
    pub world: usize,
    pub token: String,
    /// `host:port` of the store.
    pub master: String,
    pub store: StoreClient,
    /// Rank 0's server, held so that it serves as long as the rendezvous lives; the others' `None`.
    pub _server: Option<StoreServer>,
    /// Where rank 0 listens: loopback for a one-node job on a loopback master, else every
    /// interface.
    pub bind_ip: IpAddr,
    /// The waits of the group after the rendezvous end early on it too.
    pub interrupt: Interrupt,
}

impl Rendezvous {
    pub(crate) fn join(info: &RendezvousInfo, opts: &DistOptions) -> Result<Self, DistError> {
        let timeout = opts.timeout;
        let token = token_for(info, timeout, &opts.interrupt)?;
        // Loopback only for a one-node job whose master is loopback: a host name that resolves
        // to 127.0.1.1 on its own node (a common /etc/hosts) must still be reachable from others.
        let single_node = info.world_size == info.local_world_size;
        let loopback = (info.master_addr.as_str(), info.master_port)
            .to_socket_addrs()
            .map(|mut addrs| addrs.all(|a| a.ip().is_loopback()))
            .unwrap_or(false);
        let bind_ip = if single_node && loopback {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        let server = if info.rank == 0 {
            let addr = std::net::SocketAddr::new(bind_ip, info.master_port);
            Some(StoreServer::bind(addr, &token, StoreLimits::default())?)
        } else {
            None
        };
        // Port 0 (a world of one run by hand): the port the server got.
        let port = match &server {
            Some(server) if info.master_port == 0 => server.local_addr().port(),
            _ => info.master_port,
        };
        let master = format!("{}:{port}", info.master_addr);
        let mut store = StoreClient::connect_with(&master, &token, timeout, &opts.interrupt)?;
        meet(&mut store, info, timeout, &opts.fingerprint)?;
        if let (0, Some(TokenSource::File(path))) = (info.rank, &info.token) {
            // Every rank has read it; it has no further use.
            let _ = std::fs::remove_file(path);
        }
        Ok(Self {
            rank: info.rank,
            world: info.world_size,
            token,
            master,
            store,
            _server: server,
            bind_ip,
            interrupt: opts.interrupt.clone(),
        })
    }
}

const VERDICT_KEY: &str = "verdict";
const SAME_JOB: &[u8] = b"ok";

/// Registers this rank with its fingerprint and waits for all others: a duplicate rank or a
/// different world size is an error; a time-out names the ranks that never showed up; then
/// rank 0 compares every fingerprint with its own and every rank returns its verdict.
fn meet(
    store: &mut StoreClient,
    info: &RendezvousInfo,
    timeout: Duration,
    fingerprint: &Fingerprint,
) -> Result<(), DistError> {
    let rank = info.rank;
    if rank == 0 {
        store.set("world_size", info.world_size.to_string().as_bytes())?;
    }
    // Set before joining, so rank 0 finds every fingerprint once all have joined.
    store.set(&format!("fingerprint/{rank}"), &fingerprint.encode())?;
    let claims = store.add(&format!("joined/{rank}"), 1)?;
    if claims != 1 {
        return Err(DistError::Invalid(format!(
            "rendezvous: two processes claim rank {rank}: check RANK / SLURM_PROCID, and that no earlier job still runs with this MASTER_PORT"
        )));
    }
    let world = store
        .get("world_size", timeout)?
        .ok_or_else(|| DistError::timeout("rendezvous: waiting for rank 0", timeout, vec![0]))?;
    let world = String::from_utf8_lossy(&world).to_string();
    if world != info.world_size.to_string() {
        return Err(DistError::Invalid(format!(
            "rendezvous: rank {rank} has world size {} but rank 0 has {world}: every rank must be launched with the same WORLD_SIZE / SLURM_NTASKS",
            info.world_size
        )));
    }
    let keys: Vec<String> = (0..info.world_size)
        .map(|r| format!("joined/{r}"))
        .collect();
    let missing = store.wait(&keys, timeout)?;
    if !missing.is_empty() {
        share_verdict(store, rank, &keys, &missing, timeout);
        let ranks = missing
            .iter()
            .filter_map(|k| k.strip_prefix("joined/")?.parse().ok())
            .collect();
        return Err(DistError::timeout(
            format!(
                "rendezvous at {}:{} (ranks that never joined)",
                info.master_addr, info.master_port
            ),
            timeout,
            ranks,
        ));
    }
    let verdict = if rank == 0 {
        let verdict = compare_fingerprints(store, info.world_size, fingerprint)?;
        store.set(
            VERDICT_KEY,
            verdict.as_deref().map_or(SAME_JOB, str::as_bytes),
        )?;
        share_verdict(store, rank, &keys, &[], timeout);
        verdict
    } else {
        let verdict = store
            .get(VERDICT_KEY, timeout)?
            .ok_or_else(|| DistError::timeout("rendezvous: rank 0's verdict", timeout, vec![0]))?;
        share_verdict(store, rank, &keys, &[], timeout);
        (verdict != SAME_JOB).then(|| String::from_utf8_lossy(&verdict).into_owned())
    };
    match verdict {
        Some(why) => Err(DistError::Invalid(why)),
        None => Ok(()),
    }
}

/// Rank 0's comparison of every rank's fingerprint with its own: `Some(message)` naming the
/// first differing key of the first rank that differs (and how many others do).
fn compare_fingerprints(
    store: &mut StoreClient,
    world: usize,
    ours: &Fingerprint,
) -> Result<Option<String>, DistError> {
    let mut differing = Vec::new();
    for rank in 1..world {
        let key = format!("fingerprint/{rank}");
        let bytes = store.get(&key, Duration::ZERO)?.ok_or_else(|| {
            DistError::Invalid(format!(
                "rendezvous: rank {rank} joined without a fingerprint"
            ))
        })?;
        let theirs = Fingerprint::decode(&bytes).map_err(|e| {
            DistError::Invalid(format!(
                "rendezvous: rank {rank}'s fingerprint is garbled: {e}"
            ))
        })?;
        if let Some(difference) = theirs.first_difference(ours) {
            differing.push((rank, difference));
        }
    }
    let Some((rank, first)) = differing.first() else {
        return Ok(None);
    };
    let others = match differing.len() {
        1 => String::new(),
        n => format!(
            " ({} more rank(s) differ from rank 0 too: {:?})",
            n - 1,
            differing[1..].iter().map(|(r, _)| *r).collect::<Vec<_>>()
        ),
    };
    Ok(Some(format!(
        "the ranks do not run the same job: {}{others}. Start every rank with the same config (and --set \
         overrides), data and zamba-train binary",
        first.describe(*rank, 0)
    )))
}

/// Rank 0 (which serves the store) keeps it up until every rank that did join has read the
/// same verdict, so each reports it instead of a lost store. Best effort, at most `timeout`.
fn share_verdict(
    store: &mut StoreClient,
    rank: usize,
    joined_keys: &[String],
    missing: &[String],
    timeout: Duration,
) {
    let read_key = |r: &str| format!("verdict_read/{r}");
    if rank != 0 {
        // Best effort: rank 0 may already have given up on us.
        let _ = store.add(&read_key(&rank.to_string()), 1);
        return;
    }
    let readers: Vec<String> = joined_keys
        .iter()
        .filter(|k| !missing.contains(k))
        .filter_map(|k| k.strip_prefix("joined/"))
        .filter(|r| *r != "0")
        .map(read_key)
        .collect();
    let _ = store.wait(&readers, timeout);
}
