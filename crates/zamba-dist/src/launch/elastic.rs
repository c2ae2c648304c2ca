//! The launchers of an elastic job (several nodes, with restarts or `--nnodes MIN:MAX`) meet
//! through a store that node 0's launcher serves on `--master-port`, authenticated with the job's
//! token like the ranks' own store. Each (re)start is a round:
//!
//! 1. every launcher joins the round (`launch/R/node/N`, its `--nproc-per-node`);
//! 2. node 0 closes it — all MAX nodes came, or at least MIN and no more within the last call —
//!    and admits the largest number of them, node 0 first, on which the job can run (the job
//!    says: e.g. the global batch must divide over the ranks); the others stand by. It publishes
//!    the plan: the admitted nodes, in rank order, and the port of the ranks' store;
//! 3. the admitted nodes start their ranks; a node whose rank fails reports the cause
//!    (`launch/R/failure`, the first one wins) and every node stops its ranks when it sees it;
//!    a node whose ranks all exited 0 says so;
//! 4. node 0 decides — done, restart, give up or stop — and publishes it; every launcher reads
//!    it, acknowledges, and goes on to the next round or exits. Node 0 keeps the store up until
//!    every launcher has read a final verdict.
//!
//! Node 0 must survive: its launcher serves the store (as torchrun's c10d rendezvous). A
//! launcher that comes late waits for the next round.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::attempt::{NO_RESTART, Verdict, cause};
use super::ranks::RankPlan;
use super::supervise::{Outcome, SignalWatch};
use super::{ElasticSettings, Job, NodeRange, Settings, free_port};
use crate::DistError;
use crate::store::{StoreClient, StoreLimits, StoreServer};

/// How long one request to the store may wait before the launcher looks at its signals again.
const SLICE: Duration = Duration::from_millis(250);
/// How long node 0 keeps the store up for the others to read a final verdict.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// This launcher's connection to the others.
pub(super) struct Agents {
    store: StoreClient,
    /// Node 0's: the store, served as long as the launch lasts.
    _server: Option<StoreServer>,
    node: usize,
    nodes: NodeRange,
    nproc: usize,
    last_call: Duration,
    timeout: Duration,
    /// The current round's admitted nodes, in rank order.
    members: Vec<usize>,
    /// The round whose failure this node has reported.
    reported: Option<u32>,
}

fn key(round: u32, what: &str) -> String {
    format!("launch/{round}/{what}")
}

impl Agents {
    /// Node 0 serves the store; every launcher connects to it (waiting for node 0 to come up to
    /// the rendezvous time-out).
    pub fn connect(
        settings: &Settings,
        elastic: &ElasticSettings,
        signals: &mut SignalWatch,
    ) -> Result<Self, DistError> {
        let port = settings
            .master_port
            .expect("an elastic launch has a --master-port");
        let server = match settings.node_rank {
            0 => Some(StoreServer::bind(
                SocketAddr::new(bind_ip(&settings.master_addr, port), port),
                &settings.token,
                StoreLimits::default(),
            )?),
            _ => None,
        };
        let addr = format!("{}:{port}", settings.master_addr);
        let started = Instant::now();
        let store = loop {
            if let Some(signal) = signals.received() {
                return Err(interrupted("connecting to node 0's launcher", signal));
            }
            match StoreClient::connect(&addr, &settings.token, Duration::from_secs(1)) {
                Ok(store) => break store,
                Err(e) if started.elapsed() >= elastic.timeout => {
                    return Err(DistError::Invalid(format!(
                        "launch: node 0's launcher at {addr} did not answer within {:?} ({e}); start it with \
                         --node-rank 0 on the --master-addr host",
                        elastic.timeout
                    )));
                }
                Err(DistError::Invalid(e)) => return Err(DistError::Invalid(e)),
                Err(_) => {}
            }
        };
        Ok(Self {
            store,
            _server: server,
            node: settings.node_rank,
            nodes: settings.nodes,
            nproc: settings.nproc,
            last_call: elastic.last_call,
            timeout: elastic.timeout,
            members: Vec::new(),
            reported: None,
        })
    }

    /// Joins round `round`: where this node's ranks stand in it, or `None` if it stands by.
    pub fn admit(
        &mut self,
        round: u32,
        job: &dyn Job,
        signals: &mut SignalWatch,
    ) -> Result<Option<RankPlan>, DistError> {
        let joined = key(round, &format!("node/{}", self.node));
        self.store.set(&joined, self.nproc.to_string().as_bytes())?;
        let plan_key = key(round, "plan");
        if self.node == 0 {
            let plan = self.close_round(round, job, signals)?;
            self.store.set(&plan_key, plan.encode().as_bytes())?;
        }
        let text = self.wait_for(&plan_key, Some(signals), "waiting for node 0's plan")?;
        let (members, port) = match RoundPlan::decode(&text)? {
            RoundPlan::Refused(why) => return Err(DistError::Invalid(why)),
            RoundPlan::Start { members, port } => (members, port),
        };
        let position = members.iter().position(|&n| n == self.node);
        let plan = position.map(|index| RankPlan {
            world: members.len() * self.nproc,
            first_rank: index * self.nproc,
            master_port: port,
            restarts: round,
        });
        if plan.is_none() {
            eprintln!(
                "[launch] node {} stands by in attempt {round} (nodes {members:?} run it); it joins a restart",
                self.node
            );
        }
        self.members = members;
        Ok(plan)
    }

    /// Node 0: waits for the nodes of round `round` and chooses those that run it.
    fn close_round(
        &mut self,
        round: u32,
        job: &dyn Job,
        signals: &mut SignalWatch,
    ) -> Result<RoundPlan, DistError> {
        let keys = self.node_keys(round, "node");
        let started = Instant::now();
        let mut enough_since = None;
        let present = loop {
            if let Some(signal) = signals.received() {
                return Err(interrupted("waiting for the nodes to start", signal));
            }
            let present = self.present(&keys, SLICE)?;
            if present.len() == self.nodes.max {
                break present;
            }
            if present.len() >= self.nodes.min {
                if enough_since.get_or_insert_with(Instant::now).elapsed() >= self.last_call {
                    break present;
                }
            } else if started.elapsed() >= self.timeout {
                return Ok(RoundPlan::Refused(format!(
                    "launch: attempt {round} waited {:?} for at least {} node(s), but only node(s) {present:?} came \
                     (--nnodes {}); start one launcher per node, with the same --master-addr, --master-port and token",
                    self.timeout, self.nodes.min, self.nodes
                )));
            }
        };
        for &n in &present {
            let value = self
                .store
                .get(&keys[n], Duration::ZERO)?
                .unwrap_or_default();
            let theirs = String::from_utf8_lossy(&value).to_string();
            if theirs != self.nproc.to_string() {
                return Ok(RoundPlan::Refused(format!(
                    "launch: node {n} starts {theirs} rank(s) (--nproc-per-node) but node 0 starts {}: every node \
                     must start the same number",
                    self.nproc
                )));
            }
        }
        self.choose_members(round, present, job)
    }

    /// The most of the `present` nodes (node 0 first) on which the job can run.
    fn choose_members(
        &self,
        round: u32,
        present: Vec<usize>,
        job: &dyn Job,
    ) -> Result<RoundPlan, DistError> {
        let mut refused = Vec::new();
        for count in (self.nodes.min..=present.len()).rev() {
            let world = count * self.nproc;
            match job.on_world(world) {
                Ok(how) => {
                    let members = present[..count].to_vec();
                    let how = match how.is_empty() {
                        true => String::new(),
                        false => format!(": {how}"),
                    };
                    eprintln!(
                        "[launch] attempt {round}: node(s) {members:?} of --nnodes {}, {world} ranks{how}",
                        self.nodes
                    );
                    if let Some(why) = refused.first() {
                        eprintln!("[launch] node(s) {:?} stand by: {why}", &present[count..]);
                    }
                    return Ok(RoundPlan::Start {
                        members,
                        port: free_port("0.0.0.0")?,
                    });
                }
                Err(why) => refused.push(format!("with {count} node(s) ({world} ranks), {why}")),
            }
        }
        Ok(RoundPlan::Refused(format!(
            "launch: the job cannot run on the nodes that came to attempt {round} ({present:?}; --nnodes {}): {}",
            self.nodes,
            refused.join("; ")
        )))
    }

    /// Tells the other nodes (once per round) that this node failed, and why.
    pub fn report_failure(&mut self, round: u32, cause: &str) -> Result<(), DistError> {
        if self.reported == Some(round) {
            return Ok(());
        }
        self.reported = Some(round);
        eprintln!("[launch] telling the other nodes: {cause}");
        if self.store.add(&key(round, "failures"), 1)? == 1 {
            self.store.set(&key(round, "failure"), cause.as_bytes())?;
        }
        Ok(())
    }

    /// The first failure a node reported in round `round`, if any.
    pub fn failure(&mut self, round: u32) -> Result<Option<String>, DistError> {
        let value = self.store.get(&key(round, "failure"), Duration::ZERO)?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Reports how round `round` ended here (`None`: this node stood by) and returns node 0's
    /// verdict on it.
    pub fn verdict(
        &mut self,
        round: u32,
        outcome: Option<Outcome>,
        max_restarts: u32,
        signals: &mut SignalWatch,
    ) -> Result<Verdict, DistError> {
        let standing_by = outcome.is_none();
        match outcome {
            Some(Outcome::Failed(error)) => self.report_failure(round, &cause(&error))?,
            Some(Outcome::Final(Err(error))) => {
                self.report_failure(round, &format!("{NO_RESTART}{}", cause(&error)))?
            }
            Some(Outcome::Done | Outcome::Final(Ok(()))) => {
                self.store
                    .set(&key(round, &format!("done/{}", self.node)), b"")?;
            }
            Some(Outcome::StoppedForOtherNode) | None => {}
        }
        let verdict_key = key(round, "verdict");
        if self.node == 0 {
            let verdict = self.decide(round, max_restarts)?;
            self.store.set(&verdict_key, &encode(&verdict))?;
        }
        // Only a node without ranks waits for the verdict as long as an attempt runs; a signal
        // ends that wait. The others hear within a time-out once their ranks have ended.
        let interruptible = standing_by.then_some(signals);
        let text = self.wait_for(&verdict_key, interruptible, "waiting for node 0's verdict")?;
        let verdict = decode(&text, round, max_restarts)?;
        self.store
            .set(&key(round, &format!("ack/{}", self.node)), b"")?;
        if self.node == 0 && !matches!(verdict, Verdict::Restart(_)) {
            // Every launcher that joined the round, late ones too, reads the verdict before the
            // store goes.
            let joined = self.present(&self.node_keys(round, "node"), Duration::ZERO)?;
            let acks: Vec<String> = joined
                .iter()
                .map(|n| key(round, &format!("ack/{n}")))
                .collect();
            let _ = self.store.wait(&acks, ACK_WAIT);
        }
        Ok(verdict)
    }

    /// `launch/R/WHAT/N` for every node N.
    fn node_keys(&self, round: u32, what: &str) -> Vec<String> {
        (0..self.nodes.max)
            .map(|n| key(round, &format!("{what}/{n}")))
            .collect()
    }

    /// The nodes whose key of `keys` (one per node) is set, waiting up to `wait` for all.
    fn present(&mut self, keys: &[String], wait: Duration) -> Result<Vec<usize>, DistError> {
        let missing = self.store.wait(keys, wait)?;
        Ok((0..keys.len())
            .filter(|&n| !missing.contains(&keys[n]))
            .collect())
    }

    /// Node 0: the verdict on round `round`, once a node failed or every admitted node is done.
    fn decide(&mut self, round: u32, max_restarts: u32) -> Result<Verdict, DistError> {
        let done: Vec<String> = self
            .members
            .iter()
            .map(|n| key(round, &format!("done/{n}")))
            .collect();
        let started = Instant::now();
        loop {
            if let Some(cause) = self.failure(round)? {
                return Ok(Verdict::on_failure(&cause, round, max_restarts));
            }
            let missing = self.store.wait(&done, SLICE)?;
            if missing.is_empty() {
                return Ok(Verdict::Done);
            }
            if started.elapsed() >= self.timeout {
                return Ok(Verdict::Stop(DistError::Invalid(format!(
                    "launch: node 0's ranks are done, but {missing:?} were not reported within {:?}: the launchers \
                     of those nodes hung or were lost",
                    self.timeout
                ))));
            }
        }
    }

    /// The value of `key`, waiting as long as node 0's store lives (and, given `signals`, until
    /// the launcher gets a signal).
    fn wait_for(
        &mut self,
        key: &str,
        mut signals: Option<&mut SignalWatch>,
        what: &str,
    ) -> Result<String, DistError> {
        loop {
            if let Some(signal) = signals.as_deref_mut().and_then(SignalWatch::received) {
                return Err(interrupted(what, signal));
            }
            if let Some(value) = self.store.get(key, SLICE)? {
                return Ok(String::from_utf8_lossy(&value).into_owned());
            }
        }
    }
}

fn interrupted(what: &str, signal: nix::sys::signal::Signal) -> DistError {
    DistError::Interrupted {
        op: format!("launch: {what}"),
        reason: signal.as_str().to_string(),
    }
}

/// Node 0 listens on loopback when the master address is loopback (all nodes on one host),
/// else on every interface.
fn bind_ip(master_addr: &str, port: u16) -> IpAddr {
    let loopback = (master_addr, port)
        .to_socket_addrs()
        .map(|mut addrs| addrs.all(|a| a.ip().is_loopback()))
        .unwrap_or(false);
    match loopback {
        true => IpAddr::V4(Ipv4Addr::LOCALHOST),
        false => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    }
}

/// Node 0's plan for a round.
#[derive(Debug, PartialEq)]
enum RoundPlan {
    Start {
        /// The nodes that run the attempt, in rank order (node 0 first).
        members: Vec<usize>,
        /// The port of the ranks' rendezvous store on node 0.
        port: u16,
    },
    /// The job cannot start: why.
    Refused(String),
}

impl RoundPlan {
    fn encode(&self) -> String {
        let list = |nodes: &[usize]| {
            let names: Vec<String> = nodes.iter().map(usize::to_string).collect();
            names.join(",")
        };
        match self {
            RoundPlan::Start { members, port } => format!("start {} {port}", list(members)),
            RoundPlan::Refused(why) => format!("refused {why}"),
        }
    }

    fn decode(text: &str) -> Result<Self, DistError> {
        let garbled = || DistError::Invalid(format!("launch: node 0's plan {text:?} is garbled"));
        if let Some(why) = text.strip_prefix("refused ") {
            return Ok(RoundPlan::Refused(why.to_string()));
        }
        let parts: Vec<&str> = text
            .strip_prefix("start ")
            .ok_or_else(garbled)?
            .split(' ')
            .collect();
        let [members, port] = parts[..] else {
            return Err(garbled());
        };
        let list = |s: &str| -> Result<Vec<usize>, DistError> {
            s.split(',')
                .map(|n| n.parse().map_err(|_| garbled()))
                .collect()
        };
        Ok(RoundPlan::Start {
            members: list(members)?,
            port: port.parse().map_err(|_| garbled())?,
        })
    }
}

fn encode(verdict: &Verdict) -> Vec<u8> {
    let text = match verdict {
        Verdict::Done => "done".to_string(),
        Verdict::Restart(cause) => format!("restart {cause}"),
        Verdict::GiveUp(cause) => format!("give-up {cause}"),
        Verdict::Stop(error) => format!("stop {}", cause(error)),
    };
    text.into_bytes()
}

fn decode(text: &str, round: u32, max_restarts: u32) -> Result<Verdict, DistError> {
    let (kind, rest) = text.split_once(' ').unwrap_or((text, ""));
    match kind {
        "done" => Ok(Verdict::Done),
        "restart" => Ok(Verdict::Restart(rest.to_string())),
        "give-up" => Ok(Verdict::GiveUp(rest.to_string())),
        "stop" => Ok(Verdict::Stop(DistError::Invalid(format!("launch: {rest}")))),
        _ => Err(DistError::Invalid(format!(
            "launch: node 0's verdict on attempt {round} {text:?} is garbled (--max-restarts {max_restarts})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_and_verdicts_survive_the_store() {
        for plan in [
            RoundPlan::Start {
                members: vec![0, 2],
                port: 41234,
            },
            RoundPlan::Refused("launch: node 1 starts 4 rank(s)".into()),
        ] {
            assert_eq!(RoundPlan::decode(&plan.encode()).unwrap(), plan);
        }
        assert!(RoundPlan::decode("start 0").is_err());
        let cause = "lost rank 3: it exited with status 1; the other ranks were stopped";
        for verdict in [
            Verdict::Done,
            Verdict::Restart(cause.into()),
            Verdict::GiveUp(cause.into()),
        ] {
            let text = String::from_utf8(encode(&verdict)).unwrap();
            let back = decode(&text, 0, 2).unwrap();
            assert_eq!(format!("{back:?}"), format!("{verdict:?}"));
        }
        let stop = Verdict::Stop(DistError::Invalid(format!("launch: {cause}")));
        let text = String::from_utf8(encode(&stop)).unwrap();
        let Verdict::Stop(error) = decode(&text, 0, 2).unwrap() else {
            panic!("{text}");
        };
        assert_eq!(error.to_string(), format!("launch: {cause}"));
        assert!(decode("maybe", 0, 2).is_err());
    }

    #[test]
    fn a_failure_restarts_while_restarts_are_left_and_never_after_a_signal() {
        let cause = "lost rank 1: it was killed by signal 9 (SIGKILL)";
        assert!(matches!(
            Verdict::on_failure(cause, 0, 2),
            Verdict::Restart(c) if c == cause
        ));
        assert!(matches!(
            Verdict::on_failure(cause, 1, 2),
            Verdict::Restart(_)
        ));
        assert!(matches!(
            Verdict::on_failure(cause, 2, 2),
            Verdict::GiveUp(_)
        ));
        // Without restarts, the failure as it is.
        let Verdict::Stop(error) = Verdict::on_failure(cause, 0, 0) else {
            panic!("no restarts");
        };
        assert_eq!(error.to_string(), format!("launch: {cause}"));
        let signalled = format!("{NO_RESTART}stopped by SIGTERM; not every rank exited cleanly");
        let Verdict::Stop(error) = Verdict::on_failure(&signalled, 0, 5) else {
            panic!("a signal is never restarted");
        };
        assert_eq!(
            error.to_string(),
            "launch: stopped by SIGTERM; not every rank exited cleanly"
        );
    }
}
