//! The sweep file: `[grid]` and `[zip]` tables of config keys and their values, expanded into points.

use crate::config::closest;
use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeSet;
use std::path::Path;

/// The parsed sweep file: keys in sorted order, each with its values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SweepSpec {
    pub grid: Vec<(String, Vec<toml::Value>)>,
    pub zip: Vec<(String, Vec<toml::Value>)>,
}

impl SweepSpec {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read sweep file {}", path.display()))?;
        Self::from_toml_str(&text).with_context(|| format!("sweep file {}", path.display()))
    }

    pub fn from_toml_str(text: &str) -> Result<Self> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| anyhow!("not valid TOML: {e}"))?;
        let mut spec = SweepSpec::default();
        for (section, value) in table {
            let target = match section.as_str() {
                "grid" => &mut spec.grid,
                "zip" => &mut spec.zip,
                other => {
                    let hint = closest(other, ["grid", "zip"])
                        .map(|s| format!("; did you mean `{s}`?"))
                        .unwrap_or_default();
                    bail!(
                        "unknown section `{other}`: a sweep file has only [grid] and [zip]{hint}"
                    );
                }
            };
            let toml::Value::Table(t) = value else {
                bail!("`{section}` must be a table of \"section.key\" = [values]")
            };
            flatten(&section, "", &t, target)?;
        }
        if spec.grid.is_empty() && spec.zip.is_empty() {
            bail!("no values to sweep: add a [grid] or [zip] table of \"section.key\" = [values]");
        }
        let mut seen = BTreeSet::new();
        for (key, values) in spec.grid.iter().chain(&spec.zip) {
            if !seen.insert(key.as_str()) {
                bail!("`{key}` is in both [grid] and [zip]; sweep each key once");
            }
            if !key.contains('.') {
                bail!("`{key}`: sweep keys are config keys like optimizer.weight_decay");
            }
            if key == "run.dir" || key == "run.name" {
                bail!(
                    "`{key}` is set by the sweep for each point; use --out to choose where runs go"
                );
            }
            if values.is_empty() {
                bail!("`{key}` has an empty list of values");
            }
        }
        if let Some((first, first_values)) = spec.zip.first() {
            for (key, values) in &spec.zip[1..] {
                if values.len() != first_values.len() {
                    bail!(
                        "[zip] lists must have equal lengths: `{first}` has {} values but `{key}` has {}",
                        first_values.len(),
                        values.len()
                    );
                }
            }
        }
        Ok(spec)
    }

    /// Every key the sweep sets, grid keys first.
    pub fn keys(&self) -> Vec<String> {
        self.grid
            .iter()
            .chain(&self.zip)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The points: the cartesian product of the grid axes and the zipped tuples (one axis),
    /// first key varying slowest. Each point lists (key, value) in [`keys`](Self::keys) order.
    pub fn points(&self) -> Vec<Vec<(String, toml::Value)>> {
        let mut axes: Vec<Vec<Vec<(String, toml::Value)>>> = self
            .grid
            .iter()
            .map(|(k, vs)| vs.iter().map(|v| vec![(k.clone(), v.clone())]).collect())
            .collect();
        if let Some((_, first)) = self.zip.first() {
            axes.push(
                (0..first.len())
                    .map(|i| {
                        self.zip
                            .iter()
                            .map(|(k, vs)| (k.clone(), vs[i].clone()))
                            .collect()
                    })
                    .collect(),
            );
        }
        let mut points: Vec<Vec<(String, toml::Value)>> = vec![Vec::new()];
        for axis in axes {
            points = points
                .into_iter()
                .flat_map(|p| {
                    axis.iter()
                        .map(move |choice| [p.clone(), choice.clone()].concat())
                })
                .collect();
        }
        points
    }
}

/// `[grid]` keys may be quoted ("a.b") or TOML dotted keys (a.b → nested tables): both give "a.b".
fn flatten(
    section: &str,
    prefix: &str,
    table: &toml::Table,
    out: &mut Vec<(String, Vec<toml::Value>)>,
) -> Result<()> {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Array(values) => out.push((key, values.clone())),
            toml::Value::Table(t) => flatten(section, &key, t, out)?,
            other => bail!("[{section}] `{key}` must be a list of values, e.g. [{other}]"),
        }
    }
    Ok(())
}
