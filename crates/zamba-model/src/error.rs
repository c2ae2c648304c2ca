//! Errors a user can cause: bad configs and bad checkpoints. Each message names what was wrong
//! and where.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
    #[error("{path}: {context}: {source}")]
    Io {
        path: String,
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl ModelError {
    pub fn io(path: &Path, context: &str, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.display().to_string(),
            context: context.to_string(),
            source,
        }
    }

    pub fn checkpoint(path: &Path, message: impl Into<String>) -> Self {
        ModelError::Checkpoint {
            path: path.display().to_string(),
            message: message.into(),
        }
    }
}
