//! What `zamba-train launch` knows of the training job it starts and restarts: on how many ranks
//! the run config keeps its global batch (`batch.sequences` is global; fewer ranks accumulate
//! more micro-batches), and the ranks' arguments for each (re)start.
//!
//! A restart resumes from the newest checkpoint in `run.dir` without being told to. Only a job
//! started with `--resume DIR` needs new arguments: its restarts resume from the newest
//! checkpoint the job itself has written since, else from `DIR` again — never from a checkpoint
//! that was in `run.dir` before (a run resumed from an earlier step may have newer ones there).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Result;
use zamba_dist::launch::{Job, NodeRange};

use crate::checkpoint;
use crate::config::RunConfig;

/// A checkpoint directory as it was: its path, inode and status-change time (a checkpoint
/// rewritten at the same step is a new directory, renamed into place).
type Identity = (PathBuf, u64, i64);

pub struct TrainJob {
    /// The ranks' run config as `launch` resolved it.
    config: RunConfig,
    args: Vec<OsString>,
    /// The checkpoints of `run.dir` when the launch began, if the ranks were given `--resume`.
    before: Option<BTreeSet<Identity>>,
    /// An elastic launch, which may run on fewer ranks than the config names.
    elastic: bool,
}

impl TrainJob {
    /// The job of ranks started with `args`, whose run config is `config`; `resume`: whether
    /// `args` hold `--resume`; `elastic`: whether the launch may run on fewer ranks.
    pub fn new(
        config: RunConfig,
        args: Vec<OsString>,
        resume: bool,
        elastic: bool,
    ) -> Result<Self> {
        let before = match resume {
            true => Some(identities(&config.run.dir)?.into_iter().collect()),
            false => None,
        };
        Ok(Self {
            config,
            args,
            before,
            elastic,
        })
    }

    /// The newest complete checkpoint this job has written.
    fn newest_written(&self, before: &BTreeSet<Identity>) -> Option<PathBuf> {
        let now = identities(&self.config.run.dir).ok()?;
        now.into_iter()
            .rev()
            .find(|id| !before.contains(id))
            .map(|(path, _, _)| path)
    }

    /// How the run config's global batch divides over `world` ranks, or why it cannot.
    pub fn batch_on(&self, world: usize) -> Result<String, String> {
        let mut config = self.config.clone();
        config.runtime.world_size = world;
        config.validate().map_err(|e| e.to_string())?;
        Ok(format!(
            "the global batch of {} sequences as {} micro-batch(es) of {} per rank",
            config.global_sequences(),
            config.grad_accum_steps(),
            config.batch.micro_batch
        ))
    }

    /// Which node counts of an elastic job keep the global batch, for the log.
    pub fn node_counts(&self, nodes: NodeRange, nproc: usize) -> String {
        let (fit, unfit): (Vec<usize>, Vec<usize>) =
            (nodes.min..=nodes.max).partition(|&n| self.batch_on(n * nproc).is_ok());
        let list = |counts: &[usize]| {
            let names: Vec<String> = counts.iter().map(usize::to_string).collect();
            names.join(", ")
        };
        let global = self.config.global_sequences();
        match unfit.is_empty() {
            true => format!(
                "[launch] --nnodes {nodes}: every node count keeps the global batch of {global} sequences"
            ),
            false => format!(
                "[launch] --nnodes {nodes}: the global batch of {global} sequences divides over {} node(s) of {nproc} \
                 rank(s), not over {} (it must be a multiple of batch.micro_batch = {} × the ranks); with {} node(s) \
                 the job runs on fewer, down to a count that keeps it",
                list(&fit),
                list(&unfit),
                self.config.batch.micro_batch,
                list(&unfit),
            ),
        }
    }
}

impl Job for TrainJob {
    fn on_world(&self, world: usize) -> Result<String, String> {
        self.batch_on(world)
    }

    fn rank_args(&self, world: usize, restarts: u32) -> Vec<OsString> {
        let mut args = self.args.clone();
        if restarts > 0
            && let Some(before) = &self.before
            && let Some(newest) = self.newest_written(before)
        {
            replace_resume(&mut args, newest.into_os_string());
        }
        // The config may name the full world (the dry run's memory figures use it); an elastic
        // job's smaller world overrides it. Otherwise the ranks hold the launch to it.
        let configured = self.config.runtime.world_size;
        if self.elastic && configured != 1 && configured != world {
            args.push("--set".into());
            args.push(format!("runtime.world_size={world}").into());
        }
        args
    }
}

/// The complete checkpoints of `run_dir`, oldest first.
fn identities(run_dir: &Path) -> Result<Vec<Identity>> {
    let mut found = Vec::new();
    for (_, path) in checkpoint::list(run_dir)? {
        let meta = std::fs::metadata(&path)?;
        found.push((
            path,
            meta.ino(),
            meta.ctime_nsec() + meta.ctime() * 1_000_000_000,
        ));
    }
    Ok(found)
}

/// Points the `--resume` in `args` (`--resume DIR` or `--resume=DIR`) at `dir`.
fn replace_resume(args: &mut [OsString], dir: OsString) {
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--resume" && i + 1 < args.len() {
            args[i + 1] = dir.clone();
            i += 1;
        } else if args[i].to_string_lossy().starts_with("--resume=") {
            let mut arg = OsString::from("--resume=");
            arg.push(&dir);
            args[i] = arg;
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train_job(run_dir: &Path, world_size: usize, args: &[&str], elastic: bool) -> TrainJob {
        let text = format!(
            "[run]\ndir = {:?}\n[model]\npreset = \"zamba-tiny\"\n[data]\nseq_len = 32\n\
             [data.sources.web]\npaths = [\"synthetic:web\"]\nvalidation = [\"synthetic:web\"]\nweight = 1.0\n\
             [batch]\nsequences = 8\nmicro_batch = 2\n[schedule]\nkind = \"cosine\"\npeak_lr = 1e-3\nmin_lr = 1e-4\nwarmup_steps = 2\n\
             [train]\nsteps = 10\n[runtime]\nworld_size = {world_size}\n",
            run_dir.display()
        );
        let config = RunConfig::from_toml_str(&text, run_dir, &[]).unwrap();
        let resume = args.contains(&"--resume");
        TrainJob::new(
            config,
            args.iter().map(OsString::from).collect(),
            resume,
            elastic,
        )
        .unwrap()
    }

    fn write_checkpoint(run_dir: &Path, step: u64) -> PathBuf {
        let dir = checkpoint::checkpoints_dir(run_dir).join(format!("step-{step:08}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("COMPLETE"), b"").unwrap();
        dir
    }

    #[test]
    fn a_restart_resumes_from_the_newest_checkpoint_this_job_wrote() {
        let tmp = tempfile::tempdir().unwrap();
        let run_dir = tmp.path();
        // An older run's checkpoint beyond the one this job resumes from.
        write_checkpoint(run_dir, 10);
        let args = [
            "--config",
            "run.toml",
            "--resume",
            "elsewhere/step-00000004",
        ];
        let job = train_job(run_dir, 1, &args, false);
        let given: Vec<OsString> = args.iter().map(OsString::from).collect();
        assert_eq!(job.rank_args(1, 1), given, "nothing written yet: DIR again");
        let ours = write_checkpoint(run_dir, 6);
        assert_eq!(job.rank_args(1, 0), given, "the first start as given");
        let restarted = job.rank_args(1, 1);
        assert_eq!(
            restarted[3],
            ours.into_os_string(),
            "not the older run's step 10"
        );
        // Rewritten by this job (removed and renamed into place): its own now.
        let rewritten = write_checkpoint(run_dir, 10);
        assert_eq!(job.rank_args(1, 2)[3], rewritten.into_os_string());
        // Without --resume the ranks find the newest checkpoint themselves.
        let plain = ["--config", "run.toml"];
        let plain_job = train_job(run_dir, 1, &plain, false);
        assert_eq!(plain_job.rank_args(1, 1), plain.map(OsString::from));
    }

    #[test]
    fn a_smaller_world_keeps_the_global_batch_or_says_why_not() {
        let tmp = tempfile::tempdir().unwrap();
        let job = train_job(tmp.path(), 4, &["--config", "run.toml"], true);
        assert_eq!(
            job.batch_on(2).unwrap(),
            "the global batch of 8 sequences as 2 micro-batch(es) of 2 per rank"
        );
        let why = job.batch_on(3).unwrap_err();
        assert!(
            why.contains("not divisible by batch.micro_batch (2) × runtime.world_size (3)"),
            "{why}"
        );
        // The config names 4 ranks: an elastic job's smaller world is passed on to the ranks; a
        // launch of fixed size is held to the config by the ranks.
        let args = job.rank_args(2, 1);
        assert_eq!(
            args[2..],
            ["--set", "runtime.world_size=2"].map(OsString::from)
        );
        assert_eq!(job.rank_args(4, 1).len(), 2);
        let fixed = train_job(tmp.path(), 4, &["--config", "run.toml"], false);
        assert_eq!(fixed.rank_args(2, 0).len(), 2);
        let counts = job.node_counts(NodeRange { min: 2, max: 4 }, 1);
        assert!(
            counts.contains("divides over 2, 4 node(s) of 1 rank(s), not over 3"),
            "{counts}"
        );
    }

    #[test]
    fn resume_is_pointed_at_the_new_checkpoint_in_both_spellings() {
        let mut args: Vec<OsString> = ["--config", "a.toml", "--resume", "old", "--resume=old"]
            .map(OsString::from)
            .into();
        replace_resume(&mut args, "new".into());
        assert_eq!(
            args,
            ["--config", "a.toml", "--resume", "new", "--resume=new"].map(OsString::from)
        );
    }
}
