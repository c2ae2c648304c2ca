//! SIGINT and SIGTERM. The training loop reads [`StopSignal::requested`] after each step: the
//! ranks agree on it, checkpoint at the same step and exit 0. Every *wait* consults
//! [`StopSignal::abort_reason`] too, so that a signal is never ignored while a rank waits:
//!
//! - while the run starts (token file, rendezvous, the shared run directory, verifying
//!   checkpoints): the wait ends at once;
//! - in a step (a collective waiting for another rank): the others got the signal too and come
//!   within moments, so the wait goes on for `dist.signal_grace_s`, then ends — the other rank
//!   hung, and no checkpoint can be agreed;
//! - while a checkpoint is written (shielded): it goes on, so the checkpoint is completed;
//! - a second signal ends every wait at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use signal_hook::consts::{SIGINT, SIGTERM};

#[derive(Default)]
struct State {
    /// Signals received since the run began: (name, when) of the first, and how many.
    first: Option<(&'static str, Instant)>,
    count: usize,
    starting: bool,
    grace: Duration,
}

static SIGNAL: OnceLock<Result<&'static StopSignal, String>> = OnceLock::new();

/// The process's signal state, shared by every rank it runs.
pub struct StopSignal {
    state: Mutex<State>,
    /// Open [`Shield`]s: checkpoints being written.
    shields: AtomicUsize,
}

impl StopSignal {
    /// The process's handler, installed on first use (a thread receives the signals).
    pub fn installed() -> Result<&'static StopSignal> {
        let installed = SIGNAL.get_or_init(|| {
            let signal: &'static StopSignal = Box::leak(Box::new(StopSignal {
                state: Mutex::new(State::default()),
                shields: AtomicUsize::new(0),
            }));
            let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
                .map_err(|e| format!("installing the SIGINT/SIGTERM handler: {e}"))?;
            std::thread::Builder::new()
                .name("zamba-train-signals".into())
                .spawn(move || {
                    for number in signals.forever() {
                        signal.record(if number == SIGINT {
                            "SIGINT"
                        } else {
                            "SIGTERM"
                        });
                    }
                })
                .map_err(|e| format!("starting the signal thread: {e}"))?;
            Ok(signal)
        });
        installed.clone().map_err(anyhow::Error::msg)
    }

    /// The installed handler, if any (commands other than training do not install one, so
    /// that a signal ends them the default way).
    pub fn current() -> Option<&'static StopSignal> {
        SIGNAL
            .get()
            .and_then(|installed| installed.as_ref().ok().copied())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, name: &'static str) {
        let mut state = self.lock();
        state.first.get_or_insert((name, Instant::now()));
        state.count += 1;
        let first = state.count == 1;
        drop(state);
        if first {
            eprintln!(
                "{name} received: finishing this step, then checkpointing (a second signal stops at once)"
            );
        }
    }

    /// A new run of this process: no signal yet, starting up; waits of a step give up
    /// `grace` after a signal.
    pub fn begin_run(&self, grace: Duration) {
        *self.lock() = State {
            first: None,
            count: 0,
            starting: true,
            grace,
        };
    }

    /// The run has started training: from now on a first signal means "checkpoint, then stop".
    pub fn training_started(&self) {
        self.lock().starting = false;
    }

    /// Whether a signal asked the run to stop.
    pub fn requested(&self) -> bool {
        self.lock().count > 0
    }

    /// Why waits must end now, if they must (see the module's documentation).
    pub fn abort_reason(&self) -> Option<String> {
        let state = self.lock();
        let (name, at) = state.first?;
        if state.count >= 2 {
            return Some(format!("{name}, then a second signal"));
        }
        if state.starting {
            return Some(name.to_string());
        }
        if self.shields.load(Ordering::SeqCst) > 0 || at.elapsed() < state.grace {
            return None;
        }
        Some(format!(
            "{name} {:.0} s ago, and the other ranks did not come (dist.signal_grace_s)",
            at.elapsed().as_secs_f64()
        ))
    }

    /// `Err` naming `what` when waits must end now.
    pub fn check(&self, what: &str) -> Result<()> {
        match self.abort_reason() {
            Some(reason) => bail!("interrupted ({reason}) while {what}"),
            None => Ok(()),
        }
    }

    /// Keeps a first signal from ending waits until the guard is dropped (a checkpoint write).
    pub fn shield(&self) -> Shield<'_> {
        self.shields.fetch_add(1, Ordering::SeqCst);
        Shield(self)
    }
}

/// See [`StopSignal::shield`].
pub struct Shield<'a>(&'a StopSignal);

impl Drop for Shield<'_> {
    fn drop(&mut self) {
        self.0.shields.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `Err` when a signal means that what is being waited for must be given up (outside a
/// training run: never).
pub fn check_interrupt(what: &str) -> Result<()> {
    match StopSignal::current() {
        Some(signal) => signal.check(what),
        None => Ok(()),
    }
}
