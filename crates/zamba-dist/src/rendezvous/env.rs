//! Who this process is in the job, from the variables launchers set: torchrun's (also set by
//! `zamba-train launch`) or SLURM's (`srun`). No variables: a single process.

use std::path::PathBuf;

use crate::DistError;
use crate::nodelist::expand_nodelist;

/// Environment variable holding the job's secret token.
pub const TOKEN_ENV: &str = "ZAMBA_DIST_TOKEN";
/// Environment variable naming a token file (on a filesystem all nodes share): rank 0 creates
/// it, the other ranks wait for it and read it.
pub const TOKEN_FILE_ENV: &str = "ZAMBA_DIST_TOKEN_FILE";

/// Which launcher's variables described the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher variables: one process.
    Single,
    /// torchrun / `zamba-train launch`: RANK, WORLD_SIZE, LOCAL_RANK, …
    Torchrun,
    /// `srun`: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, …
    Slurm,
}

/// Where the job's token comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `ZAMBA_DIST_TOKEN`.
    Value(String),
    /// `ZAMBA_DIST_TOKEN_FILE`.
    File(PathBuf),
}

/// This process's place in the job and how to reach the rendezvous store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RendezvousInfo {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes of this node: the GPU index by convention.
    pub local_rank: usize,
    pub local_world_size: usize,
    /// Host of the rendezvous store, which rank 0 serves.
    pub master_addr: String,
    pub master_port: u16,
    pub launcher: Launcher,
    pub token: Option<TokenSource>,
}

impl RendezvousInfo {
    /// A world of one.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            launcher: Launcher::Single,
            token: None,
        }
    }

    /// From this process's environment.
    pub fn from_env() -> Result<Self, DistError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// From variables given by `lookup` (the environment, or a map in tests). torchrun's
    /// variables win over SLURM's (torchrun started inside a SLURM allocation).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, DistError> {
        let vars = Vars(&lookup);
        let mut info = if vars.get("RANK").is_some() || vars.get("WORLD_SIZE").is_some() {
            torchrun(&vars)?
        } else if vars.get("SLURM_PROCID").is_some() {
            slurm(&vars)?
        } else {
            Self::single()
        };
        info.token = if let Some(token) = vars.get(TOKEN_ENV) {
            Some(TokenSource::Value(token))
        } else {
            vars.get(TOKEN_FILE_ENV)
                .map(|p| TokenSource::File(PathBuf::from(p)))
        };
        info.check()?;
        Ok(info)
    }

    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    fn check(&self) -> Result<(), DistError> {
        let (rank_var, world_var, local_var, local_world_var) = match self.launcher {
            Launcher::Slurm => (
                "SLURM_PROCID",
                "SLURM_NTASKS",
                "SLURM_LOCALID",
                "tasks per node",
            ),
            _ => ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
        };
        let fail = |msg: String| {
            Err(DistError::Invalid(format!(
                "{msg} ({:?} launch)",
                self.launcher
            )))
        };
        if self.world_size == 0 {
            return fail(format!("{world_var} is 0"));
        }
        if self.rank >= self.world_size {
            return fail(format!(
                "{rank_var}={} is not below {world_var}={}",
                self.rank, self.world_size
            ));
        }
        if self.local_world_size == 0 || self.local_world_size > self.world_size {
            return fail(format!(
                "{local_world_var}={} must be between 1 and {world_var}={}",
                self.local_world_size, self.world_size
            ));
        }
        if self.local_rank >= self.local_world_size {
            return fail(format!(
                "{local_var}={} is not below {local_world_var}={}",
                self.local_rank, self.local_world_size
            ));
        }
        if self.is_distributed() && self.master_port == 0 {
            return fail("the rendezvous port is 0: set MASTER_PORT to a free port".into());
        }
        Ok(())
    }
}

struct Vars<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Vars<'_> {
    /// The variable's value, trimmed; unset or blank is `None`.
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn require(&self, name: &str, why: &str) -> Result<String, DistError> {
        self.get(name)
            .ok_or_else(|| DistError::Invalid(format!("{name} is not set; {why}")))
    }

    fn number<T: std::str::FromStr>(&self, name: &str, value: &str) -> Result<T, DistError> {
        value.parse().map_err(|_| {
            DistError::Invalid(format!("{name}={value:?} is not a non-negative integer"))
        })
    }

    fn require_number<T: std::str::FromStr>(&self, name: &str, why: &str) -> Result<T, DistError> {
        let value = self.require(name, why)?;
        self.number(name, &value)
    }

    fn optional_number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, DistError> {
        self.get(name).map(|v| self.number(name, &v)).transpose()
    }
}

const TORCHRUN_VARS: &str = "a multi-process job needs RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun and `zamba-train launch` set them all)";

fn torchrun(vars: &Vars) -> Result<RendezvousInfo, DistError> {
    let world_size: usize = vars.require_number("WORLD_SIZE", TORCHRUN_VARS)?;
    if world_size == 1 {
        // `WORLD_SIZE=1` alone is a way to say "one process here", e.g. inside a SLURM job.
        let rank = vars.optional_number("RANK")?.unwrap_or(0);
        return Ok(RendezvousInfo {
            rank,
            launcher: Launcher::Torchrun,
            ..RendezvousInfo::single()
        });
    }
    Ok(RendezvousInfo {
        rank: vars.require_number("RANK", TORCHRUN_VARS)?,
        world_size,
        local_rank: vars.require_number("LOCAL_RANK", TORCHRUN_VARS)?,
        local_world_size: vars.require_number("LOCAL_WORLD_SIZE", TORCHRUN_VARS)?,
        master_addr: vars.require("MASTER_ADDR", TORCHRUN_VARS)?,
        master_port: vars.require_number("MASTER_PORT", TORCHRUN_VARS)?,
        launcher: Launcher::Torchrun,
        token: None,
    })
}

const SLURM_VARS: &str = "srun sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, SLURM_TASKS_PER_NODE and SLURM_JOB_NODELIST for each task";

/// The first port of the range ports are derived from SLURM job ids in (below Linux's
/// ephemeral ports, 32768 and up).
const SLURM_PORT_BASE: u64 = 10_000;
const SLURM_PORT_SPAN: u64 = 20_000;

fn slurm(vars: &Vars) -> Result<RendezvousInfo, DistError> {
    let world_size: usize = match vars
        .get("SLURM_NTASKS")
        .or_else(|| vars.get("SLURM_NPROCS"))
    {
        Some(v) => vars.number("SLURM_NTASKS", &v)?,
        None => {
            return Err(DistError::Invalid(format!(
                "SLURM_NTASKS is not set; {SLURM_VARS}"
            )));
        }
    };
    let in_step = vars
        .get("SLURM_STEP_ID")
        .or_else(|| vars.get("SLURM_STEPID"))
        .is_some();
    if !in_step {
        if world_size > 1 {
            return Err(DistError::Invalid(format!(
                "SLURM_NTASKS={world_size} but this process was not started by srun (SLURM_STEP_ID is not set): \
                 start the trainer with `srun zamba-train …` (one task per GPU), or set WORLD_SIZE=1 to run one process here"
            )));
        }
        return Ok(RendezvousInfo::single());
    }
    let rank = vars.require_number("SLURM_PROCID", SLURM_VARS)?;
    let local_rank = vars.require_number("SLURM_LOCALID", SLURM_VARS)?;
    let local_world_size = slurm_local_world_size(vars)?;
    let master_addr = match vars.get("MASTER_ADDR") {
        Some(addr) => addr,
        None => {
            let (name, list) = [
                "SLURM_STEP_NODELIST",
                "SLURM_JOB_NODELIST",
                "SLURM_NODELIST",
            ]
            .iter()
            .find_map(|n| vars.get(n).map(|v| (*n, v)))
            .ok_or_else(|| {
                DistError::Invalid(format!(
                    "SLURM_JOB_NODELIST is not set (and MASTER_ADDR neither); {SLURM_VARS}"
                ))
            })?;
            expand_nodelist(&list)
                .map_err(|e| DistError::Invalid(format!("{name}: {e}")))?
                .swap_remove(0)
        }
    };
    let master_port = match vars.get("MASTER_PORT") {
        Some(port) => vars.number("MASTER_PORT", &port)?,
        None => {
            let job: u64 = vars.require_number(
                "SLURM_JOB_ID",
                "the rendezvous port is derived from it when MASTER_PORT is not set",
            )?;
            (SLURM_PORT_BASE + job % SLURM_PORT_SPAN) as u16
        }
    };
    Ok(RendezvousInfo {
        rank,
        world_size,
        local_rank,
        local_world_size,
        master_addr,
        master_port,
        launcher: Launcher::Slurm,
        token: None,
    })
}

/// Tasks on this node: SLURM_NTASKS_PER_NODE, else this node's entry (SLURM_NODEID) of
/// SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE (`8(x2),4` = 8, 8, 4).
fn slurm_local_world_size(vars: &Vars) -> Result<usize, DistError> {
    if let Some(n) = vars.optional_number("SLURM_NTASKS_PER_NODE")? {
        return Ok(n);
    }
    let (name, list) = ["SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"]
        .iter()
        .find_map(|n| vars.get(n).map(|v| (*n, v)))
        .ok_or_else(|| {
            DistError::Invalid(format!(
                "neither SLURM_NTASKS_PER_NODE nor SLURM_TASKS_PER_NODE is set; {SLURM_VARS}"
            ))
        })?;
    let per_node = expand_tasks_per_node(&list)
        .map_err(|why| DistError::Invalid(format!("{name}={list:?}: {why}")))?;
    let node: usize = vars.require_number("SLURM_NODEID", SLURM_VARS)?;
    per_node.get(node).copied().ok_or_else(|| {
        DistError::Invalid(format!(
            "SLURM_NODEID={node} but {name}={list:?} lists {} node(s)",
            per_node.len()
        ))
    })
}

/// `2(x3),1` → [2, 2, 2, 1].
pub(crate) fn expand_tasks_per_node(list: &str) -> Result<Vec<usize>, String> {
    let mut counts = Vec::new();
    for item in list.split(',') {
        let item = item.trim();
        let (count, repeat) = match item.split_once("(x") {
            Some((count, rest)) => {
                let repeat = rest.strip_suffix(')').ok_or("a `(x` without `)`")?;
                (
                    count,
                    repeat
                        .parse::<usize>()
                        .map_err(|_| format!("bad repeat in `{item}`"))?,
                )
            }
            None => (item, 1),
        };
        let count = count
            .parse::<usize>()
            .map_err(|_| format!("`{item}` is not a task count"))?;
        if repeat > 1 << 20 {
            return Err(format!("`{item}` repeats too often"));
        }
        counts.extend(std::iter::repeat_n(count, repeat));
    }
    Ok(counts)
}
