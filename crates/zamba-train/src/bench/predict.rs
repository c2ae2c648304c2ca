//! `bench model --device cuda --predict`: the GPU cost model's prediction of the step
//! `bench model` would run (`zamba_train::cost_model`); no GPU needed, no model built.

use anyhow::{Result, bail};
use zamba_model::ZambaConfig;
use zamba_model::params::ParamCounts;
use zamba_train::cost_model::{Fractions, Workload, predict};
use zamba_train::device::DeviceChoice;

use super::model::ModelArgs;

pub(super) fn run(a: &ModelArgs, config: &ZambaConfig) -> Result<()> {
    if !matches!(a.device, DeviceChoice::Cuda(_)) {
        bail!(
            "--predict models a CUDA GPU (the one --card names); pass --device cuda (no GPU is \
             needed), not --device {}",
            a.device
        );
    }
    if a.world > 1 {
        bail!("--predict models the one-rank step; leave out --world");
    }
    if a.batch == 0 || a.seq_len == 0 || a.micro_batches == 0 {
        bail!("--predict needs --batch, --seq-len and --micro-batches of at least 1");
    }
    let fractions = match &a.fractions {
        Some(spec) => Fractions::of(a.kernels)
            .with_overrides(spec)
            .map_err(anyhow::Error::msg)?,
        None => Fractions::of(a.kernels),
    };
    let workload = Workload {
        config,
        batch: a.batch,
        seq_len: a.seq_len,
        micro_batches: a.micro_batches,
        precision: a.precision,
        checkpointing: a.activation_checkpointing,
    };
    let prediction = predict(&workload, a.card, a.kernels, fractions);
    println!(
        "model {} ({} parameters), {} micro-batch(es) of batch {} × seq {}, precision {}, \
         activation checkpointing {}: predicted by the cost model (no GPU used)",
        a.preset,
        ParamCounts::of(config).total(),
        a.micro_batches,
        a.batch,
        a.seq_len,
        a.precision,
        a.activation_checkpointing
    );
    print!("{}", prediction.table());
    if a.json || a.json_file.is_some() {
        let mut json = serde_json::json!({
            "preset": a.preset,
            "batch": a.batch,
            "seq_len": a.seq_len,
            "micro_batches": a.micro_batches,
            "precision": a.precision.to_string(),
            "activation_checkpointing": a.activation_checkpointing.to_string(),
        });
        let fields = prediction.to_json();
        json.as_object_mut()
            .expect("an object")
            .extend(fields.as_object().expect("an object").clone());
        if a.json {
            println!("{json}");
        }
        if let Some(path) = &a.json_file {
            std::fs::write(path, serde_json::to_string_pretty(&json)?).map_err(|e| {
                anyhow::anyhow!("writing the prediction to {}: {e}", path.display())
            })?;
        }
    }
    Ok(())
}
