//! Starting this node's ranks of one attempt: each a copy of the program with the rendezvous
//! environment, in its own process group, killed with the launcher, its output forwarded.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;

use nix::sys::signal::Signal;

use super::supervise::{Faults, Output, Rank, forward_lines};
use super::{RESTART_COUNT_ENV, Settings};
use crate::DistError;
use crate::fault::FAULT_LINES_ENV;
use crate::rendezvous::{TOKEN_ENV, TOKEN_FILE_ENV};

/// Where this node's ranks stand in one attempt.
pub(super) struct RankPlan {
    pub world: usize,
    pub first_rank: usize,
    /// The port of the ranks' rendezvous store, on the master.
    pub master_port: u16,
    /// Restarts before this attempt.
    pub restarts: u32,
}

impl RankPlan {
    pub fn last_rank(&self, settings: &Settings) -> usize {
        self.first_rank + settings.nproc - 1
    }

    /// Starts local rank `local` with `args`.
    pub fn spawn(
        &self,
        settings: &Settings,
        program: &Path,
        args: &[OsString],
        local: usize,
        done: &mpsc::Sender<usize>,
        faults: &Faults,
    ) -> Result<Rank, DistError> {
        let rank = self.first_rank + local;
        let mut command = Command::new(program);
        command
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", self.world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", settings.nproc.to_string())
            .env("MASTER_ADDR", &settings.master_addr)
            .env("MASTER_PORT", self.master_port.to_string())
            .env(TOKEN_ENV, &settings.token)
            .env_remove(TOKEN_FILE_ENV)
            .env(FAULT_LINES_ENV, "1")
            .env(RESTART_COUNT_ENV, self.restarts.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches the launcher only, which
            // forwards it once.
            .process_group(0);
        if let Some(threads) = settings.rayon_threads {
            command.env("RAYON_NUM_THREADS", threads.to_string());
        }
        let launcher = nix::unistd::getpid();
        // SAFETY: between fork and exec the closure only makes async-signal-safe system calls
        // (prctl, getppid) and allocates nothing: its errors are plain errno values.
        unsafe {
            command.pre_exec(move || {
                // Die with the launcher, even if it is SIGKILLed.
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                if nix::unistd::getppid() != launcher {
                    // The launcher exited before this child armed its death signal.
                    return Err(nix::errno::Errno::ESRCH.into());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            DistError::io(
                format!("launch: starting rank {rank} ({})", program.display()),
                e,
            )
        })?;
        let pipes = [
            (
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
                false,
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
                true,
            ),
        ];
        for (pipe, to_stderr) in pipes {
            let out = Output {
                rank,
                to_stderr,
                faults: faults.clone(),
                done: done.clone(),
            };
            forward_lines(pipe, out);
        }
        Ok(Rank {
            rank,
            child,
            status: None,
        })
    }
}
