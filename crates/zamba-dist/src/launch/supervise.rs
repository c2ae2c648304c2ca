//! Watching the ranks of this node: their output copied with a `[rank N]` prefix, signals to
//! the launcher forwarded to them, and on the first failure (or signal, or another node's
//! failure) the others stopped — SIGTERM, then SIGKILL after the grace period — and the
//! attempt's [`Outcome`], which names the rank at fault.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::DistError;
use crate::fault::FaultReport;

/// The fault reports the ranks wrote, by rank.
pub(super) type Faults = Arc<Mutex<HashMap<usize, FaultReport>>>;

/// SIGINT and SIGTERM to the launcher, received for the whole launch.
pub(super) struct SignalWatch {
    signals: Signals,
    first: Option<Signal>,
}

impl SignalWatch {
    pub fn install() -> Result<Self, DistError> {
        let signals = Signals::new([SIGINT, SIGTERM])
            .map_err(|e| DistError::io("launch: installing the SIGINT/SIGTERM handler", e))?;
        Ok(Self {
            signals,
            first: None,
        })
    }

    /// The signals received since the last call.
    pub fn pending(&mut self) -> Vec<Signal> {
        let new: Vec<Signal> = self
            .signals
            .pending()
            .map(|s| Signal::try_from(s).unwrap_or(Signal::SIGTERM))
            .collect();
        if let Some(&signal) = new.first() {
            self.first.get_or_insert(signal);
        }
        new
    }

    /// The first signal the launch received, if any: between attempts, no ranks run to forward
    /// it to, and it ends the launch.
    pub fn received(&mut self) -> Option<Signal> {
        self.pending();
        self.first
    }
}

/// How this node's part of an attempt ended.
pub(super) enum Outcome {
    /// Every rank exited 0 (also after a forwarded signal: they checkpointed).
    Done,
    /// A rank of this node died, failed or hung; the error names the rank at fault.
    Failed(DistError),
    /// The ranks were stopped because of another node's failure.
    StoppedForOtherNode,
    /// A signal, or a rank that could not be started, ended the launch: its result (no restart).
    Final(Result<(), DistError>),
}

pub(super) struct Rank {
    pub rank: usize,
    pub child: Child,
    /// Set once the process has exited and been reaped.
    pub status: Option<ExitStatus>,
}

impl Rank {
    fn signal(&self, signal: Signal) {
        // Only processes not yet reaped: their pid cannot have been reused.
        if self.status.is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
        }
    }
}

pub(super) struct Supervisor<'a> {
    pub ranks: Vec<Rank>,
    pub faults: Faults,
    signals: &'a mut SignalWatch,
    grace: Duration,
    /// The first rank that failed before any signal came, how, and when that was seen.
    failure: Option<(usize, String, Instant)>,
    /// A rank that could not be started.
    spawn_error: Option<DistError>,
    /// The first signal forwarded to the ranks.
    signalled: Option<Signal>,
    /// Another node's failure, for which the ranks were stopped.
    other_node: Option<String>,
    /// Ranks that did not exit cleanly after the signal, and how.
    unclean: Vec<(usize, String)>,
    kill_at: Option<Instant>,
}

impl<'a> Supervisor<'a> {
    pub fn new(signals: &'a mut SignalWatch, grace: Duration) -> Self {
        Self {
            ranks: Vec::new(),
            faults: Faults::default(),
            signals,
            grace,
            failure: None,
            spawn_error: None,
            signalled: None,
            other_node: None,
            unclean: Vec::new(),
            kill_at: None,
        }
    }

    /// Whether the ranks are being stopped (a failure, a signal, a rank that did not start,
    /// another node's failure).
    pub fn stopping(&self) -> bool {
        self.failure.is_some()
            || self.signalled.is_some()
            || self.spawn_error.is_some()
            || self.other_node.is_some()
    }

    /// Whether every rank started has exited.
    pub fn all_exited(&self) -> bool {
        self.ranks.iter().all(|r| r.status.is_some())
    }

    /// This node's failure, once there is one: the error naming the rank at fault.
    pub fn failure(&self) -> Option<DistError> {
        let (rank, what, _) = self.failure.as_ref()?;
        Some(self.blame(*rank, what.clone()))
    }

    /// The rank of this node that failed first, and when that was seen.
    pub fn failed_rank(&self) -> Option<(usize, Instant)> {
        self.failure.as_ref().map(|&(rank, _, seen)| (rank, seen))
    }

    /// Another node failed: the ranks are stopped, and their exits are not failures of ours.
    pub fn stop_for_other_node(&mut self, cause: String) {
        if self.stopping() {
            return;
        }
        eprintln!("[launch] {cause}; stopping this node's ranks");
        self.other_node = Some(cause);
        self.stop_ranks(Signal::SIGTERM);
    }

    /// Forwards signals, reaps exited ranks, stops the others after a failure and escalates to
    /// SIGKILL once the grace period is over. Returns [`stopping`](Self::stopping).
    pub fn poll(&mut self) -> bool {
        for signal in self.signals.pending() {
            eprintln!(
                "[launch] received {}, forwarding it to the ranks",
                signal.as_str()
            );
            self.signalled.get_or_insert(signal);
            self.stop_ranks(signal);
        }
        let mut newly_failed = false;
        for rank in self.ranks.iter_mut().filter(|r| r.status.is_none()) {
            let Ok(Some(status)) = rank.child.try_wait() else {
                continue;
            };
            rank.status = Some(status);
            if status.success() {
                continue;
            }
            let what = describe(&status);
            if self.signalled.is_some() || self.other_node.is_some() {
                self.unclean.push((rank.rank, what));
            } else if self.failure.is_none() {
                eprintln!(
                    "[launch] rank {} (pid {}) {what}; stopping the other ranks",
                    rank.rank,
                    rank.child.id()
                );
                self.failure = Some((rank.rank, what, Instant::now()));
                newly_failed = true;
            }
        }
        if newly_failed {
            self.stop_ranks(Signal::SIGTERM);
        }
        if self.kill_at.is_some_and(|t| Instant::now() >= t) {
            if self.ranks.iter().any(|r| r.status.is_none()) {
                eprintln!(
                    "[launch] ranks still running {:?} after the signal: SIGKILL",
                    self.grace
                );
            }
            self.terminate(Signal::SIGKILL);
            self.kill_at = None;
        }
        self.stopping()
    }

    /// A rank could not be started: the started ones are stopped.
    pub fn abandon(&mut self, error: DistError) {
        self.spawn_error = Some(error);
        self.stop_ranks(Signal::SIGTERM);
    }

    /// Sends `signal` to the running ranks and arms SIGKILL after the grace period.
    fn stop_ranks(&mut self, signal: Signal) {
        self.terminate(signal);
        self.kill_at.get_or_insert(Instant::now() + self.grace);
    }

    fn terminate(&self, signal: Signal) {
        for rank in &self.ranks {
            rank.signal(signal);
        }
    }

    /// How the attempt ended on this node, once every rank has exited.
    pub fn outcome(mut self) -> Outcome {
        if let Some(error) = self.spawn_error.take() {
            return Outcome::Final(Err(error));
        }
        if let Some(error) = self.failure() {
            return Outcome::Failed(error);
        }
        if self.other_node.is_some() {
            return Outcome::StoppedForOtherNode;
        }
        match (self.signalled, self.unclean.as_slice()) {
            (Some(signal), [_, ..]) => {
                let how: Vec<String> = self
                    .unclean
                    .iter()
                    .map(|(rank, what)| format!("rank {rank} {what}"))
                    .collect();
                Outcome::Final(Err(DistError::Invalid(format!(
                    "launch: stopped by {}; not every rank exited cleanly: {}",
                    signal.as_str(),
                    how.join(", ")
                ))))
            }
            (Some(_), []) => Outcome::Final(Ok(())),
            (None, _) => Outcome::Done,
        }
    }

    /// The error for rank `failed`'s failure: the rank(s) it blamed, if it reported any.
    fn blame(&self, failed: usize, what: String) -> DistError {
        let faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        match faults.get(&failed) {
            Some(report) if !report.blamed.contains(&failed) => DistError::PeerLost {
                op: "launch".into(),
                rank: report.blamed[0],
                detail: format!(
                    "rank {failed} gave up on it ({}), then {what}; the other ranks were stopped",
                    report.error
                ),
            },
            _ => DistError::PeerLost {
                op: "launch".into(),
                rank: failed,
                detail: format!("it {what}; the other ranks were stopped"),
            },
        }
    }
}

fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => {
            let name = Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("?");
            format!("was killed by signal {sig} ({name})")
        }
        _ => format!("ended with {status}"),
    }
}

/// Where a rank's output goes.
pub(super) struct Output {
    pub rank: usize,
    pub to_stderr: bool,
    /// Fault reports found in the output are kept here instead of being copied.
    pub faults: Faults,
    /// Told the rank when the pipe has closed (its last line copied).
    pub done: mpsc::Sender<usize>,
}

/// Copies a rank's output to ours, line by line, each line prefixed; keeps its fault report.
pub(super) fn forward_lines(pipe: Option<impl Read + Send + 'static>, out: Output) {
    let Some(pipe) = pipe else { return };
    let prefix = format!("[rank {}] ", out.rank);
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            if let Some(report) = FaultReport::parse(text.trim_end_matches('\n')) {
                let mut faults = out.faults.lock().unwrap_or_else(|p| p.into_inner());
                faults.insert(out.rank, report);
                continue;
            }
            if line.last() != Some(&b'\n') {
                line.push(b'\n');
            }
            let mut sink: Box<dyn Write> = if out.to_stderr {
                Box::new(std::io::stderr().lock())
            } else {
                Box::new(std::io::stdout().lock())
            };
            let _ = sink.write_all(prefix.as_bytes());
            let _ = sink.write_all(&line);
            let _ = sink.flush();
        }
        let _ = out.done.send(out.rank);
    });
}
