//! Checkpoints written while training goes on (`checkpoint.async`).
//!
//! At the checkpoint's step boundary every rank copies its share of the state to host memory
//! ([`super::begin`], the only part the step loop waits for) and hands it to a writer thread,
//! which writes, fsyncs and hashes that rank's files — all ranks in parallel. The writer never
//! touches the communicator: the step loop uses it every step. What needs the ranks together
//! happens on the step loop's thread, at later step boundaries ([`PendingCheckpoint::poll`]):
//! one small all-reduce per boundary asks whether every rank's files are written (or one
//! failed); once they are, the parts' digests are gathered and rank 0's writer seals the
//! checkpoint — checks every part as rank 0 sees it, writes the manifest and `COMPLETE`,
//! renames `step-N.tmp` into place — and a last all-reduce tells every rank how that went.
//! Until then the checkpoint is a `.tmp` directory that resuming ignores: a process killed
//! meanwhile leaves the previous checkpoint the newest.
//!
//! The writer holds a [`crate::signals::Shield`] (a first SIGINT/SIGTERM lets the write finish;
//! a second ends it). The caller waits for a pending write ([`PendingCheckpoint::wait`]) before
//! the next checkpoint, at the end of the run and on a signal, so that no run ends with a write
//! unreported.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use super::manifest::Entry;
use super::{HostShare, Target, WrittenPart, collect_parts, remove_partial, seal};
use crate::data_parallel::Sharding;
use crate::fault_injection::InjectedFault;
use crate::rank::RankContext;
use crate::signals::{StopSignal, check_interrupt};

/// How often a wait for the writer looks at the signal state.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// What the writer thread reports, in this order.
enum Event {
    /// This rank's files are on disk: the digest of its optimizer part, if it writes one.
    Written(Result<Option<Entry>>),
    /// Rank 0: the checkpoint is sealed (or could not be).
    Sealed(Result<()>),
}

/// Where a pending checkpoint is.
enum Stage {
    /// The ranks' writers are writing their files.
    Writing,
    /// Rank 0's writer is sealing.
    Sealing,
}

/// A checkpoint being written in the background.
pub struct PendingCheckpoint {
    /// The trainer state's step (optimizer steps done) it holds.
    pub step: u64,
    target: Target,
    sharding: Sharding,
    stage: Stage,
    /// The writer's outcomes, once received and until every rank has its own.
    written: Option<Result<Option<Entry>>>,
    sealed: Option<Result<()>>,
    started: Instant,
    /// Time the step loop has spent on this checkpoint so far, and the part of it spent waiting
    /// for the writers.
    stall: Duration,
    waited: Duration,
    events: Receiver<Event>,
    /// Rank 0: hands the gathered part digests to the writer, which seals with them.
    parts: Option<Sender<Vec<WrittenPart>>>,
    writer: Option<JoinHandle<()>>,
}

/// A sealed checkpoint and what it cost.
#[derive(Debug)]
pub struct Sealed {
    pub dir: PathBuf,
    /// The trainer state's step it holds.
    pub step: u64,
    /// Time the step loop spent on it: the host copy, the agreements at step boundaries, and
    /// any wait for the writer.
    pub stall: Duration,
    /// The part of `stall` spent waiting for the writers to finish (before the next checkpoint,
    /// at the end of the run); zero when the write ended while training went on.
    pub waited: Duration,
    /// From the start of the checkpoint to its seal.
    pub write: Duration,
}

/// Why a pending checkpoint failed: an error the ranks agreed on (the communicator works), one
/// on the way (a collective may have failed), or a second signal (which ends the wait at once,
/// leaving the writer and its `.tmp` directory to the end of the process).
enum Failure {
    Agreed(anyhow::Error),
    Other(anyhow::Error),
    Interrupted(anyhow::Error),
}

impl PendingCheckpoint {
    /// Starts the checkpoint of `share` (copied by [`super::begin`] on every rank at the same
    /// step boundary) in a writer thread. `started` is when the step loop began the checkpoint.
    pub fn start(
        ctx: &RankContext,
        target: Target,
        step: u64,
        share: HostShare,
        sharding: Sharding,
        fault: Option<InjectedFault>,
        started: Instant,
    ) -> Result<Self> {
        let (events_tx, events) = channel();
        let (parts, parts_rx) = channel::<Vec<WrittenPart>>();
        let (rank, is_main) = (ctx.rank, ctx.is_main());
        let thread_target = target.clone();
        let writer = std::thread::Builder::new()
            .name(format!("checkpoint-writer-{rank}"))
            .spawn(move || {
                let _shield = StopSignal::current().map(StopSignal::shield);
                let written = share.write(&thread_target.tmp);
                if let Some(fault) = &fault {
                    fault.check_writing(rank, step);
                }
                let ok = written.is_ok();
                if events_tx.send(Event::Written(written)).is_err() || !ok || !is_main {
                    return;
                }
                // No digests: the ranks did not all write their files; nothing to seal.
                if let Ok(parts) = parts_rx.recv() {
                    let _ = events_tx.send(Event::Sealed(seal(&thread_target, &parts)));
                }
            })
            .context("starting the checkpoint writer thread")?;
        Ok(Self {
            step,
            target,
            sharding,
            stage: Stage::Writing,
            written: None,
            sealed: None,
            stall: started.elapsed(),
            waited: Duration::ZERO,
            started,
            events,
            parts: is_main.then_some(parts),
            writer: Some(writer),
        })
    }

    /// At a step boundary (collective: every rank calls it at the same boundaries): advances the
    /// checkpoint as far as the writers have come, without waiting for them. `Some` once it is
    /// sealed. On an error — a rank's write or the seal failed — every rank returns one, and the
    /// partial directory is removed.
    pub fn poll(&mut self, ctx: &RankContext) -> Result<Option<Sealed>> {
        self.advance(ctx, false)
    }

    /// Waits until the checkpoint is sealed (collective), honouring a second signal.
    pub fn wait(mut self, ctx: &RankContext) -> Result<Sealed> {
        Ok(self
            .advance(ctx, true)?
            .expect("a waited-for checkpoint is sealed or failed"))
    }

    fn advance(&mut self, ctx: &RankContext, wait: bool) -> Result<Option<Sealed>> {
        let began = Instant::now();
        let result = self.advance_stages(ctx, wait);
        self.stall += began.elapsed();
        if wait {
            self.waited += began.elapsed();
        }
        let failure = match result {
            Ok(false) => return Ok(None),
            Ok(true) => {
                self.join();
                return Ok(Some(Sealed {
                    dir: self.target.final_dir.clone(),
                    step: self.step,
                    stall: self.stall,
                    waited: self.waited,
                    write: self.started.elapsed(),
                }));
            }
            Err(failure) => failure,
        };
        // The writer must be done before its files are removed; an agreed failure leaves
        // every rank able to meet once more, so that rank 0 removes the directory last.
        self.parts = None;
        if let Failure::Interrupted(e) = failure {
            return Err(e);
        }
        self.join();
        let e = match failure {
            Failure::Agreed(e) => {
                let _ = ctx.count([false]);
                e
            }
            Failure::Other(e) | Failure::Interrupted(e) => e,
        };
        remove_partial(ctx, &self.target.tmp, self.sharding);
        Err(e).with_context(|| format!("writing checkpoint {}", self.target.tmp.display()))
    }

    /// Goes through the stages as far as the writers allow; `true` once sealed.
    fn advance_stages(&mut self, ctx: &RankContext, wait: bool) -> Result<bool, Failure> {
        if let Stage::Writing = self.stage {
            if self.written.is_none() {
                self.written = self.receive(wait)?.map(|event| match event {
                    Event::Written(result) => result,
                    Event::Sealed(_) => Err(anyhow!("the checkpoint writer sealed before writing")),
                });
            }
            let Some(written) = agreed(ctx, &mut self.written, "writing the checkpoint's files")?
            else {
                return Ok(false);
            };
            let parts = collect_parts(ctx, Ok(written), self.sharding).map_err(Failure::Other)?;
            if let Some(to_writer) = &self.parts {
                to_writer
                    .send(parts)
                    .map_err(|_| Failure::Other(anyhow!("the checkpoint writer thread ended")))?;
            }
            self.stage = Stage::Sealing;
        }
        if self.sealed.is_none() {
            self.sealed = match ctx.is_main() {
                true => self.receive(wait)?.map(|event| match event {
                    Event::Sealed(result) => result,
                    Event::Written(_) => Err(anyhow!("the checkpoint writer reported twice")),
                }),
                false => Some(Ok(())),
            };
        }
        Ok(agreed(ctx, &mut self.sealed, "sealing the checkpoint")?.is_some())
    }

    /// The writer's next event: waited for (honouring a second signal), or `None` if it has not
    /// come yet and `wait` is false.
    fn receive(&mut self, wait: bool) -> Result<Option<Event>, Failure> {
        let gone = || {
            Failure::Other(anyhow!(
                "the checkpoint writer thread stopped without a result"
            ))
        };
        if !wait {
            return match self.events.try_recv() {
                Ok(event) => Ok(Some(event)),
                Err(TryRecvError::Empty) => Ok(None),
                Err(TryRecvError::Disconnected) => Err(gone()),
            };
        }
        loop {
            match self.events.recv_timeout(SIGNAL_POLL) {
                Ok(event) => return Ok(Some(event)),
                Err(RecvTimeoutError::Timeout) => {
                    check_interrupt("waiting for the checkpoint to be written")
                        .map_err(Failure::Interrupted)?
                }
                Err(RecvTimeoutError::Disconnected) => return Err(gone()),
            }
        }
    }

    fn join(&mut self) {
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// This rank's `outcome` (taken out) once every rank's has come (collective): `None` while some
/// rank's has not, an error on every rank as soon as one rank's is an error.
fn agreed<T>(
    ctx: &RankContext,
    outcome: &mut Option<Result<T>>,
    what: &str,
) -> Result<Option<T>, Failure> {
    let failed = matches!(outcome, Some(Err(_)));
    let [pending, failures] = ctx
        .count([outcome.is_none(), failed])
        .map_err(Failure::Other)?;
    if failures > 0 {
        return Err(Failure::Agreed(match outcome.take() {
            Some(Err(e)) => e,
            _ => anyhow!("{what} failed on another rank (see its log)"),
        }));
    }
    match pending {
        0 => Ok(outcome.take().map(|r| r.expect("not failed"))),
        _ => Ok(None),
    }
}
