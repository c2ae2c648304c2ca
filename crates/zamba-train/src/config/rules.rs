//! How a run config is checked. A key's own range is declared once, on its field
//! (`#[schemars(range(min = 1, max = …))]`, `#[schemars(extend("exclusiveMinimum" = 0.0))]`,
//! `length(min = 1)`): [`crate::schema::check_ranges`] enforces it and the reference prints it.
//! Rules that involve more than one key are each section's [`Section::validate`].

use super::RunConfig;
use super::error::ConfigError;

/// A section of the run config.
pub trait Section {
    /// Rules across keys (of this section, or between it and others); the ranges of single
    /// keys are declared on the fields. Errors name the key to change.
    fn validate(&self, _run: &RunConfig) -> Result<(), ConfigError> {
        Ok(())
    }
}
