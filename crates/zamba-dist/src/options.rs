use std::time::Duration;

/// Settings shared by every communicator.
#[derive(Clone, Debug)]
pub struct DistOptions {
    /// How long a collective (or the rendezvous) waits for the slowest rank before failing with
    /// an error that names it.
    pub timeout: Duration,
}

impl Default for DistOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
        }
    }
}
