//! Joining the job: the token, the rendezvous store, and the communicator the trainer uses.

use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::time::Duration;

use crate::rendezvous::{RendezvousInfo, TokenSource};
use crate::store::{StoreClient, StoreLimits, StoreServer};
use crate::tcp::TcpCommunicator;
use crate::token::{check_token, create_token_file, read_token_file};
use crate::{Communicator, DistError, DistOptions, SingleRank};

/// Which communicator a multi-process job uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Processes over TCP (CPU ranks).
    Tcp,
    /// NCCL on CUDA device `device_index` (the rank's GPU; by convention its local rank).
    /// Needs a build with the `cuda` feature.
    Nccl { device_index: usize },
}

/// The communicator for this process: a [`SingleRank`] for a world of one (no sockets, no
/// token), else the chosen backend, after every rank has met at the rendezvous store.
pub fn init(
    info: &RendezvousInfo,
    backend: Backend,
    opts: &DistOptions,
) -> Result<Box<dyn Communicator>, DistError> {
    if !info.is_distributed() {
        return Ok(Box::new(SingleRank));
    }
    let mut rendezvous = Rendezvous::join(info, opts.timeout)?;
    match backend {
        Backend::Tcp => {
            let comm = TcpCommunicator::connect(
                info.rank,
                info.world_size,
                &mut rendezvous.store,
                &info.master_addr,
                &rendezvous.token,
                rendezvous.bind_ip,
                opts.timeout,
            )?;
            // Every rank has joined the TCP group: the store is no longer needed.
            Ok(Box::new(comm))
        }
        #[cfg(feature = "cuda")]
        Backend::Nccl { device_index } => Ok(Box::new(crate::nccl::NcclCommunicator::new(
            rendezvous,
            device_index,
            opts.timeout,
        )?)),
        #[cfg(not(feature = "cuda"))]
        Backend::Nccl { .. } => Err(DistError::Invalid(
            "the NCCL backend needs a zamba-train built with `--features cuda`".into(),
        )),
    }
}

/// The job's token, from `ZAMBA_DIST_TOKEN` or the token file (created by rank 0, waited for
/// by the others).
pub fn resolve_token(info: &RendezvousInfo, timeout: Duration) -> Result<String, DistError> {
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
        Some(TokenSource::File(path)) => read_token_file(path, timeout),
    }
}

/// Every rank connected to the store (rank 0 also serving it), after all have joined. The TCP
/// group needs it only to connect; NCCL keeps it for barriers and heartbeats.
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
}

impl Rendezvous {
    pub(crate) fn join(info: &RendezvousInfo, timeout: Duration) -> Result<Self, DistError> {
        let token = resolve_token(info, timeout)?;
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
        let mut store = StoreClient::connect(&master, &token, timeout)?;
        meet(&mut store, info, timeout)?;
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
        })
    }
}

/// Registers this rank and waits for all others: a duplicate rank or a different world size
/// is an error; a time-out names the ranks that never showed up.
fn meet(
    store: &mut StoreClient,
    info: &RendezvousInfo,
    timeout: Duration,
) -> Result<(), DistError> {
    let rank = info.rank;
    if rank == 0 {
        store.set("world_size", info.world_size.to_string().as_bytes())?;
    }
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
    Ok(())
}

/// After a failed rendezvous, rank 0 (which serves the store) keeps it up until every rank that
/// did join has read the same verdict, so each names the absent ranks instead of a lost store.
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
