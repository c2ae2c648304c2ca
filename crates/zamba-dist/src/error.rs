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
    /// A failure inside the collective library (NCCL) that no single rank is known to have caused.
    #[error("{op}: {detail}")]
    Backend { op: String, detail: String },
    /// A wait ended early because the rank was asked to stop (a signal).
    #[error("{op}: interrupted ({reason})")]
    Interrupted { op: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl DistError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        DistError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn timeout(
        op: impl Into<String>,
        timeout: std::time::Duration,
        ranks: Vec<usize>,
    ) -> Self {
        DistError::Timeout {
            op: op.into(),
            timeout_s: timeout.as_secs_f64(),
            ranks,
        }
    }
}

/// A group that failed keeps returning its first error to every later call on every rank.
impl Clone for DistError {
    fn clone(&self) -> Self {
        match self {
            DistError::Timeout {
                op,
                timeout_s,
                ranks,
            } => DistError::Timeout {
                op: op.clone(),
                timeout_s: *timeout_s,
                ranks: ranks.clone(),
            },
            DistError::PeerLost { op, rank, detail } => DistError::PeerLost {
                op: op.clone(),
                rank: *rank,
                detail: detail.clone(),
            },
            DistError::Backend { op, detail } => DistError::Backend {
                op: op.clone(),
                detail: detail.clone(),
            },
            DistError::Interrupted { op, reason } => DistError::Interrupted {
                op: op.clone(),
                reason: reason.clone(),
            },
            DistError::Invalid(msg) => DistError::Invalid(msg.clone()),
            DistError::Io { context, source } => DistError::Io {
                context: context.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
        }
    }
}
