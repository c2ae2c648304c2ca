//! Waiting that a signal can end: every wait of the rendezvous and of the collectives looks at
//! the rank's [`Interrupt`] at least every [`POLL`], so a rank asked to stop (SIGINT/SIGTERM)
//! leaves a wait within a fraction of a second instead of at its time-out.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::DistError;

/// How often a wait looks at its interrupt.
pub(crate) const POLL: Duration = Duration::from_millis(100);

type Check = dyn Fn() -> Option<String> + Send + Sync;

/// Says whether a rank must stop waiting now, and why. The caller decides the policy (e.g. the
/// trainer: at once during start-up, after a grace period during a step); this crate asks.
#[derive(Clone, Default)]
pub struct Interrupt(Option<Arc<Check>>);

impl Interrupt {
    /// An interrupt that `check` decides: `Some(reason)` ends every wait in progress.
    pub fn new(check: impl Fn() -> Option<String> + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(check)))
    }

    /// Never interrupts (the default).
    pub fn never() -> Self {
        Self(None)
    }

    pub(crate) fn is_active(&self) -> bool {
        self.0.is_some()
    }

    /// Why waiting must stop now, if it must.
    pub fn reason(&self) -> Option<String> {
        self.0.as_ref().and_then(|check| check())
    }

    /// `Err(Interrupted)` for `op` if waiting must stop now.
    pub(crate) fn check(&self, op: &str) -> Result<(), DistError> {
        match self.reason() {
            Some(reason) => Err(DistError::Interrupted {
                op: op.to_string(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// The next slice of a wait that ends at `deadline`: at most [`POLL`] when this interrupt
    /// can fire, so that it is looked at often enough.
    pub(crate) fn slice_until(&self, deadline: Instant) -> Duration {
        let left = deadline.saturating_duration_since(Instant::now());
        if self.is_active() {
            left.min(POLL)
        } else {
            left
        }
    }
}

impl fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Some(_) => "Interrupt(active)",
            None => "Interrupt(never)",
        })
    }
}
