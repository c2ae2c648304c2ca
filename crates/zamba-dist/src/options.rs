use std::time::Duration;

use crate::{Fingerprint, Interrupt};

/// How a rank joins its group and waits.
#[derive(Clone, Debug)]
pub struct DistOptions {
    /// How long a collective (or the rendezvous) waits for the slowest rank before failing with
    /// an error that names it.
    pub timeout: Duration,
    /// Ends waits early (a signal); never by default.
    pub interrupt: Interrupt,
    /// What must be equal on every rank; the rendezvous compares it (empty: nothing compared).
    pub fingerprint: Fingerprint,
}

impl Default for DistOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            interrupt: Interrupt::never(),
            fingerprint: Fingerprint::new(),
        }
    }
}
