use thiserror::Error;

/// Why a collective or the rendezvous failed. Messages name the ranks at fault.
#[derive(Debug, Error)]
pub enum DistError {
    #[error("{op}: timed out after {timeout_s} s waiting for rank(s) {ranks:?}; they hung or died")]
    Timeout {
        op: String,
        timeout_s: f64,
        ranks: Vec<usize>,
    },
    #[error("{op}: lost rank {rank}: {detail}")]
    PeerLost {
        op: String,
        rank: usize,
        detail: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}
