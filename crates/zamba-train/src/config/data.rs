//! `[data]`: the data pipeline's own [`DataConfig`], checked against the rest of the run.

use super::RunConfig;
use super::error::ConfigError;
use super::rules::Section;
use super::synthetic;
use zamba_data::DataConfig;

impl Section for DataConfig {
    fn validate(&self, run: &RunConfig) -> Result<(), ConfigError> {
        if self.sources.values().all(|s| s.weight == 0.0) {
            return Err(ConfigError::invalid(
                "data.sources",
                "all source weights are 0; give at least one source a positive weight",
            ));
        }
        let model_vocab = run.model.config.vocab_size;
        if let Some(v) = self.model_vocab_size
            && v as usize != model_vocab
        {
            return Err(ConfigError::invalid(
                "data.model_vocab_size",
                format!(
                    "is {v} but model.vocab_size is {model_vocab}; leave it out (the trainer sets it from the model)"
                ),
            ));
        }
        synthetic::check_references(self)?;
        // The pipeline's own checks, as a backstop for anything added there later.
        DataConfig::validate(self).map_err(|e| ConfigError::invalid("data", e.to_string()))
    }
}
