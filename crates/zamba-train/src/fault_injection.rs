//! `ZAMBA_INJECT_FAULT`: one rank fails at a chosen step, to test what survives a lost rank —
//! the launcher's `--max-restarts`, a SLURM restart loop — without pulling a cable.
//!
//! `KIND:rank=R:step=S[:restarts=any]` fires on rank R before its step S (0-based: after S
//! steps), on the job's first start only (`ZAMBA_RESTART_COUNT`, set by `zamba-train launch`,
//! unset or 0), or on every start with `restarts=any`. Kinds:
//! - `kill`: the rank SIGKILLs itself, as a crash or the out-of-memory killer would;
//! - `exit`: it exits with status 1 after an error message;
//! - `hang`: it stops making progress and ignores SIGTERM, as a process stuck in a driver call:
//!   the other ranks' time-out (`dist.timeout_s`) and the launcher's SIGKILL end it;
//! - `kill-writing`: the rank SIGKILLs itself while the checkpoint of step S (after S steps) is
//!   being written, once its files are on disk and before the checkpoint is sealed — with
//!   `checkpoint.async`, while the step loop trains on.

use std::time::Duration;

use anyhow::{Result, bail};
use zamba_dist::launch::RESTART_COUNT_ENV;

pub const FAULT_ENV: &str = "ZAMBA_INJECT_FAULT";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Kill,
    Exit,
    Hang,
    KillWriting,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectedFault {
    pub kind: FaultKind,
    pub rank: usize,
    pub step: u64,
    /// Fire on every start, not only the first.
    pub every_start: bool,
}

impl InjectedFault {
    /// The fault `ZAMBA_INJECT_FAULT` asks for, if it applies to this start of the job.
    pub fn from_env() -> Result<Option<Self>> {
        let Ok(text) = std::env::var(FAULT_ENV) else {
            return Ok(None);
        };
        let fault = Self::parse(&text)?;
        let restarts = std::env::var(RESTART_COUNT_ENV).unwrap_or_default();
        let first_start = matches!(restarts.trim(), "" | "0");
        Ok((fault.every_start || first_start).then_some(fault))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let usage = "expected KIND:rank=R:step=S[:restarts=any] with KIND kill, exit, hang or kill-writing, e.g. kill:rank=1:step=5";
        let mut parts = text.split(':');
        let kind = match parts.next().map(str::trim) {
            Some("kill") => FaultKind::Kill,
            Some("exit") => FaultKind::Exit,
            Some("hang") => FaultKind::Hang,
            Some("kill-writing") => FaultKind::KillWriting,
            _ => bail!("{FAULT_ENV}={text:?}: {usage}"),
        };
        let (mut rank, mut step, mut every_start) = (None, None, false);
        for part in parts {
            match part.trim().split_once('=') {
                Some(("rank", r)) => rank = r.parse().ok(),
                Some(("step", s)) => step = s.parse().ok(),
                Some(("restarts", "any")) => every_start = true,
                _ => bail!("{FAULT_ENV}={text:?}: {part:?} is not understood; {usage}"),
            }
        }
        match (rank, step) {
            (Some(rank), Some(step)) => Ok(Self {
                kind,
                rank,
                step,
                every_start,
            }),
            _ => bail!("{FAULT_ENV}={text:?}: rank and step must be whole numbers; {usage}"),
        }
    }

    /// Fails the way it says if `rank` is about to take step `step`.
    pub fn check(&self, rank: usize, step: u64) {
        if rank != self.rank || step != self.step || self.kind == FaultKind::KillWriting {
            return;
        }
        let how = match self.kind {
            FaultKind::Kill | FaultKind::KillWriting => "kills itself",
            FaultKind::Exit => "exits with status 1",
            FaultKind::Hang => "hangs",
        };
        eprintln!("{FAULT_ENV}: rank {rank} fails before step {step}: it {how}");
        match self.kind {
            FaultKind::Kill | FaultKind::KillWriting => kill_self(),
            FaultKind::Exit => std::process::exit(1),
            FaultKind::Hang => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
        }
    }

    /// A `kill-writing` fault kills the process if `rank` has just written its files of the
    /// checkpoint of step `step`.
    pub fn check_writing(&self, rank: usize, step: u64) {
        if self.kind == FaultKind::KillWriting && rank == self.rank && step == self.step {
            eprintln!(
                "{FAULT_ENV}: rank {rank} kills itself while the checkpoint of step {step} is being written"
            );
            kill_self();
        }
    }
}

fn kill_self() {
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_bad_ones_say_the_form() {
        assert_eq!(
            InjectedFault::parse("kill:rank=1:step=5").unwrap(),
            InjectedFault {
                kind: FaultKind::Kill,
                rank: 1,
                step: 5,
                every_start: false
            }
        );
        let writing = InjectedFault::parse("kill-writing:rank=0:step=3").unwrap();
        assert!(writing.kind == FaultKind::KillWriting && writing.step == 3);
        let hang = InjectedFault::parse("hang:step=2:rank=0:restarts=any").unwrap();
        assert!(hang.every_start && hang.kind == FaultKind::Hang && hang.step == 2);
        for bad in [
            "crash:rank=1:step=2",
            "kill:rank=1",
            "kill:rank=x:step=2",
            "exit:rank=1:step=2:when=now",
        ] {
            let e = InjectedFault::parse(bad).unwrap_err().to_string();
            assert!(e.contains("KIND:rank=R:step=S"), "{bad}: {e}");
        }
    }
}
