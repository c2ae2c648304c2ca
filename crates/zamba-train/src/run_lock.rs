//! One writer per run directory.
//!
//! The trainer (rank 0) holds `<run.dir>/.zamba-train.lock` for the whole run, two ways at once:
//!
//! - an OS file lock (`flock`), which the kernel releases when the process dies, so a crash never
//!   leaves a stale lock;
//! - a *lease* written into the same file — host, pid, start time and a heartbeat rewritten every
//!   [`HEARTBEAT`] — for filesystems where `flock` is not coherent across hosts (NFSv3 without
//!   lockd, Lustre mounted with `localflock`): a lease whose heartbeat is fresh keeps another host
//!   out even when its `flock` succeeds. A lease expires [`LEASE_EXPIRY`] after its last heartbeat,
//!   or at once when its holder ran on this host and its process is gone.
//!
//! See docs/distributed.md ("One writer per run") for what is guaranteed on NFS and Lustre.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const LOCK_FILE: &str = ".zamba-train.lock";
/// How often the holder rewrites its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A lease whose heartbeat is older than this is considered abandoned. Longer than NFS's
/// attribute-cache time (60 s by default), so a cached view of a live lease never looks stale.
pub const LEASE_EXPIRY: Duration = Duration::from_secs(120);

/// Who holds (or last held) a run directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// Seconds since the Unix epoch.
    pub started: u64,
    pub heartbeat: u64,
}

impl Holder {
    fn me(now: u64) -> Self {
        Self {
            host: host_name(),
            pid: std::process::id(),
            started: now,
            heartbeat: now,
        }
    }

    /// Whether the lease still keeps others out at time `now`.
    fn is_live(&self, now: u64) -> bool {
        let fresh = now.saturating_sub(self.heartbeat) < LEASE_EXPIRY.as_secs();
        let gone_here = self.host == host_name() && !process_exists(self.pid);
        fresh && !gone_here
    }

    pub fn describe(&self) -> String {
        let now = unix_now();
        format!(
            "host {} pid {}, started {} ({} s ago), last heartbeat {} s ago",
            self.host,
            self.pid,
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(self.started)),
            now.saturating_sub(self.started),
            now.saturating_sub(self.heartbeat)
        )
    }
}

/// The held lock; released (and its heartbeat stopped) on drop.
pub struct RunLock {
    stop: Arc<AtomicBool>,
    heartbeat: Option<JoinHandle<()>>,
    file: Arc<File>,
}

impl RunLock {
    /// Takes `run_dir`'s lock, creating the directory if needed. Fails at once, naming the holder
    /// and what to do, when another trainer holds it.
    pub fn acquire(run_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating the run directory {}", run_dir.display()))?;
        let path = run_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = read_holder(&mut file).ok().flatten();
                bail!("{}", busy_message(run_dir, holder.as_ref()));
            }
            // No flock on this filesystem (e.g. Lustre with `noflock`): the lease alone decides.
            Err(std::fs::TryLockError::Error(e)) if e.kind() == ErrorKind::Unsupported => {}
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        let now = unix_now();
        if let Some(holder) = read_holder(&mut file)?
            && holder.is_live(now)
            && !(holder.host == host_name() && holder.pid == std::process::id())
        {
            bail!("{}", busy_message(run_dir, Some(&holder)));
        }
        let me = Holder::me(now);
        write_holder(&mut &file, Some(&me))
            .with_context(|| format!("writing {}", path.display()))?;
        let file = Arc::new(file);
        let stop = Arc::new(AtomicBool::new(false));
        let heartbeat = {
            let (file, stop) = (file.clone(), stop.clone());
            std::thread::Builder::new()
                .name("run-lock-heartbeat".into())
                .spawn(move || beat(&file, &stop, me, &path))
                .context("starting the run-lock heartbeat")?
        };
        Ok(Self {
            stop,
            heartbeat: Some(heartbeat),
            file,
        })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.heartbeat.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        // An empty lease marks the directory free; the flock goes with the file.
        let _ = write_holder(&mut &*self.file, None);
        let _ = self.file.unlock();
    }
}

/// Rewrites the heartbeat every [`HEARTBEAT`] until stopped.
fn beat(file: &File, stop: &AtomicBool, mut me: Holder, path: &Path) {
    while !stop.load(Ordering::SeqCst) {
        std::thread::park_timeout(HEARTBEAT);
        if stop.load(Ordering::SeqCst) {
            break;
        }
        me.heartbeat = unix_now();
        if let Err(e) = write_holder(&mut &*file, Some(&me)) {
            eprintln!(
                "warning: could not renew the run lock {}: {e}",
                path.display()
            );
        }
    }
}

/// The live holder of `run_dir`, if another trainer is running there (for sweeps: a point that
/// is running elsewhere is not started again).
pub fn live_holder(run_dir: &Path) -> Option<Holder> {
    let path = run_dir.join(LOCK_FILE);
    let mut file = OpenOptions::new().read(true).write(true).open(path).ok()?;
    let locked = matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock));
    let holder = read_holder(&mut file).ok().flatten();
    let _ = file.unlock();
    match holder {
        Some(h) if locked || h.is_live(unix_now()) => Some(h),
        _ if locked => Some(Holder {
            host: "unknown".into(),
            pid: 0,
            started: 0,
            heartbeat: 0,
        }),
        _ => None,
    }
}

fn busy_message(run_dir: &Path, holder: Option<&Holder>) -> String {
    let who = holder.map_or("another process".into(), Holder::describe);
    format!(
        "{} is in use by another trainer ({who}); nothing was written. Wait for it to finish or stop it \
         (SIGTERM checkpoints and exits), or use another run.dir. A holder on another host that died without \
         releasing the directory is ignored {} s after its last heartbeat",
        run_dir.display(),
        LEASE_EXPIRY.as_secs()
    )
}

fn read_holder(file: &mut File) -> Result<Option<Holder>> {
    let mut text = String::new();
    file.rewind()?;
    file.read_to_string(&mut text)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    // A half-written lease (a crash mid-write) is no lease.
    Ok(serde_json::from_str(&text).ok())
}

fn write_holder(file: &mut &File, holder: Option<&Holder>) -> std::io::Result<()> {
    let text = holder.map_or(String::new(), |h| {
        serde_json::to_string(h).expect("a holder serializes")
    });
    file.rewind()?;
    file.set_len(0)?;
    file.write_all(text.as_bytes())?;
    file.sync_data()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn host_name() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

fn process_exists(pid: u32) -> bool {
    // Signal 0 checks for existence without sending anything; EPERM means it exists.
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None) {
        Ok(()) => true,
        Err(e) => e == nix::errno::Errno::EPERM,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let lock = RunLock::acquire(dir.path()).unwrap();
        let err = RunLock::acquire(dir.path()).err().unwrap().to_string();
        assert!(err.contains("in use by another trainer"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(live_holder(dir.path()).is_some());
        drop(lock);
        assert!(live_holder(dir.path()).is_none());
        let _again = RunLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn leases_expire_after_the_heartbeat_stops_or_when_their_process_is_gone() {
        let now = unix_now();
        let other_host = Holder {
            host: "some-other-node".into(),
            pid: 1,
            started: now - 1000,
            heartbeat: now - 5,
        };
        assert!(other_host.is_live(now));
        assert!(!other_host.is_live(now + LEASE_EXPIRY.as_secs()));
        let dead_here = Holder {
            host: host_name(),
            pid: u32::MAX / 2,
            ..other_host.clone()
        };
        assert!(
            !dead_here.is_live(now),
            "a dead local process holds nothing"
        );

        // A live lease from another host keeps us out even though flock succeeds.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(LOCK_FILE),
            serde_json::to_string(&other_host).unwrap(),
        )
        .unwrap();
        let err = RunLock::acquire(dir.path()).err().unwrap().to_string();
        assert!(err.contains("some-other-node"), "{err}");
        // An expired one does not.
        let expired = Holder {
            heartbeat: now - LEASE_EXPIRY.as_secs() - 1,
            ..other_host
        };
        std::fs::write(
            dir.path().join(LOCK_FILE),
            serde_json::to_string(&expired).unwrap(),
        )
        .unwrap();
        let _lock = RunLock::acquire(dir.path()).unwrap();
    }
}
