//! The plan of a sweep: every point's overrides, name, run directory and resolved config.

use super::SweepArgs;
use super::naming::point_names;
use super::spec::SweepSpec;
use crate::config::{ConfigError, RunConfig};
use anyhow::{Context, Result, anyhow};
use std::path::PathBuf;

/// One point of a sweep, ready to run.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepPoint {
    pub index: usize,
    /// Directory name built from the overrides.
    pub name: String,
    pub overrides: Vec<(String, toml::Value)>,
    /// The resolved config of this point.
    pub config_path: PathBuf,
    pub run_dir: PathBuf,
}

/// All points of a sweep with their configs written.
#[derive(Clone, Debug)]
pub struct SweepPlan {
    pub out_dir: PathBuf,
    pub keys: Vec<String>,
    pub points: Vec<SweepPoint>,
}

/// Quotes a TOML value as a `--set` argument value.
fn override_arg(key: &str, v: &toml::Value) -> String {
    format!("{key}={v}")
}

/// The sweep directory: `--out`, or the base config's `run.dir`.
pub fn sweep_dir(args: &SweepArgs) -> Result<PathBuf> {
    let base = RunConfig::load(&args.config, &args.set).map_err(anyhow::Error::new)?;
    out_dir_of(args, &base)
}

fn out_dir_of(args: &SweepArgs, base: &RunConfig) -> Result<PathBuf> {
    let dir = args.out.clone().unwrap_or_else(|| base.run.dir.clone());
    std::path::absolute(&dir)
        .with_context(|| format!("resolving the sweep directory {}", dir.display()))
}

/// Expands the sweep, checks every point's config, and writes `OUT/configs/<name>.toml`.
pub fn plan(args: &SweepArgs) -> Result<SweepPlan> {
    let spec = SweepSpec::load(&args.sweep)?;
    let base = RunConfig::load(&args.config, &args.set).map_err(anyhow::Error::new)?;
    let out_dir = out_dir_of(args, &base)?;
    let keys = spec.keys();
    let raw_points = spec.points();
    let names = point_names(&keys, &raw_points);
    let configs_dir = out_dir.join("configs");
    std::fs::create_dir_all(&configs_dir)
        .with_context(|| format!("creating {}", configs_dir.display()))?;
    let mut points = Vec::with_capacity(raw_points.len());
    for (index, (overrides, name)) in raw_points.into_iter().zip(names).enumerate() {
        let run_dir = out_dir.join(&name);
        let mut sets = args.set.clone();
        sets.extend(overrides.iter().map(|(k, v)| override_arg(k, v)));
        sets.push(override_arg(
            "run.dir",
            &toml::Value::String(run_dir.to_string_lossy().into_owned()),
        ));
        sets.push(override_arg(
            "run.name",
            &toml::Value::String(format!("{}/{name}", base.run.name)),
        ));
        let config = RunConfig::load(&args.config, &sets)
            .map_err(|e: ConfigError| anyhow!("sweep point {index} ({name}): {e}"))?;
        let config_path = configs_dir.join(format!("{name}.toml"));
        let text = config.to_toml_string().map_err(anyhow::Error::new)?;
        std::fs::write(&config_path, text)
            .with_context(|| format!("writing {}", config_path.display()))?;
        points.push(SweepPoint {
            index,
            name,
            overrides,
            config_path,
            run_dir,
        });
    }
    Ok(SweepPlan {
        out_dir,
        keys,
        points,
    })
}
