//! Watching the ranks of this node: their output copied with a `[rank N]` prefix, signals to
//! the launcher forwarded to them, and on the first failure (or signal) the others stopped —
//! SIGTERM, then SIGKILL after the grace period — and a summary that names the rank at fault.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use signal_hook::iterator::Signals;

use crate::DistError;
use crate::fault::FaultReport;

/// The fault reports the ranks wrote, by rank.
pub(super) type Faults = Arc<Mutex<HashMap<usize, FaultReport>>>;

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

pub(super) struct Supervisor {
    pub ranks: Vec<Rank>,
    pub faults: Faults,
    signals: Signals,
    grace: Duration,
    /// The first rank that failed before any signal came, and how.
    failure: Option<(usize, String)>,
    /// A rank that could not be started.
    spawn_error: Option<DistError>,
    /// The first signal forwarded to the ranks.
    signalled: Option<Signal>,
    /// Ranks that did not exit cleanly after the signal, and how.
    unclean: Vec<(usize, String)>,
    kill_at: Option<Instant>,
}

impl Supervisor {
    pub fn new(signals: Signals, grace: Duration) -> Self {
        Self {
            ranks: Vec::new(),
            faults: Faults::default(),
            signals,
            grace,
            failure: None,
            spawn_error: None,
            signalled: None,
            unclean: Vec::new(),
            kill_at: None,
        }
    }

    /// Whether the ranks are being stopped (a failure, a signal, a rank that did not start).
    pub fn stopping(&self) -> bool {
        self.failure.is_some() || self.signalled.is_some() || self.spawn_error.is_some()
    }

    /// Forwards signals, reaps exited ranks, stops the others after a failure and escalates to
    /// SIGKILL once the grace period is over. Returns [`stopping`](Self::stopping).
    pub fn poll(&mut self) -> bool {
        for signal in self.signals.pending() {
            let signal = Signal::try_from(signal).unwrap_or(Signal::SIGTERM);
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
            if self.signalled.is_some() {
                self.unclean.push((rank.rank, what));
            } else if self.failure.is_none() {
                eprintln!(
                    "[launch] rank {} (pid {}) {what}; stopping the other ranks",
                    rank.rank,
                    rank.child.id()
                );
                self.failure = Some((rank.rank, what));
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

    /// Polls until every rank has exited.
    pub fn wait_all(&mut self) {
        loop {
            self.poll();
            if self.ranks.iter().all(|r| r.status.is_some()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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

    /// The launch's result once every rank has exited.
    pub fn outcome(mut self) -> Result<(), DistError> {
        if let Some(error) = self.spawn_error.take() {
            return Err(error);
        }
        if let Some((rank, what)) = self.failure.take() {
            return Err(self.blame(rank, what));
        }
        match (self.signalled, self.unclean.as_slice()) {
            (Some(signal), [_, ..]) => {
                let how: Vec<String> = self
                    .unclean
                    .iter()
                    .map(|(rank, what)| format!("rank {rank} {what}"))
                    .collect();
                Err(DistError::Invalid(format!(
                    "launch: stopped by {}; not every rank exited cleanly: {}",
                    signal.as_str(),
                    how.join(", ")
                )))
            }
            _ => Ok(()),
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
    pub done: mpsc::Sender<()>,
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
        let _ = out.done.send(());
    });
}
