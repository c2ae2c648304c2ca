//! Proof that every rank sees the same run directory. Under ZeRO-1 each rank writes its part of
//! every checkpoint into `run.dir`, and any rank may resume from any checkpoint: with a
//! node-local `run.dir` (scratch on each node) the checkpoints would be scattered over the
//! nodes and none could be resumed. So at start rank 0 writes a fresh nonce into `run.dir`, and
//! every rank must read it back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use burn::tensor::Tensor;
use zamba_dist::ReduceOp;

use crate::rank::RankContext;
use crate::signals::check_interrupt;

/// How long a rank looks for the nonce file: enough for a network filesystem's caches.
const PATIENCE: Duration = Duration::from_secs(10);

/// Every rank checks that it reads, in `run_dir`, the nonce rank 0 just wrote there
/// (collective; a world of one has nothing to prove). Rank 0 must have created `run_dir`.
pub fn prove_shared(ctx: &RankContext, run_dir: &Path) -> Result<()> {
    if ctx.world_size == 1 {
        return Ok(());
    }
    let written = match ctx.is_main() {
        true => write_nonce(run_dir).map(Some),
        false => Ok(None),
    };
    let written = ctx.agree(written, "writing the shared-directory check into run.dir")?;
    let nonce = ctx
        .comm
        .broadcast_bytes(written.clone().map(String::into_bytes), 0)?;
    let nonce = String::from_utf8(nonce).context("the nonce from rank 0 is not UTF-8")?;
    let path = nonce_path(run_dir, &nonce);
    let seen = sees(&path, &nonce);
    let blind = ranks_without(ctx, seen.is_ok())?;
    if ctx.is_main() {
        let _ = std::fs::remove_file(&path);
    }
    if blind.is_empty() {
        return Ok(());
    }
    let own = match seen {
        Err(e) => format!(" (this rank: {e:#})"),
        Ok(()) => String::new(),
    };
    bail!(
        "run.dir {} is not one directory shared by every rank: rank(s) {blind:?} cannot read the file {} that rank 0 \
         wrote there{own}. A data-parallel run needs run.dir on a filesystem every node mounts (NFS, Lustre, …) at a \
         path that resolves to the same directory everywhere: with node-local directories each node would keep its own \
         parts of every checkpoint and none could be resumed",
        run_dir.display(),
        path.display()
    )
}

fn nonce_path(run_dir: &Path, nonce: &str) -> PathBuf {
    run_dir.join(format!(".zamba-shared-check-{nonce}"))
}

fn write_nonce(run_dir: &Path) -> Result<String> {
    let nonce = zamba_dist::generate_token()?;
    let path = nonce_path(run_dir, &nonce);
    std::fs::write(&path, &nonce).with_context(|| format!("writing {}", path.display()))?;
    std::fs::File::open(&path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(nonce)
}

/// Reads `path` until it holds `nonce`, for up to [`PATIENCE`].
fn sees(path: &Path, nonce: &str) -> Result<()> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        check_interrupt("checking that run.dir is shared")?;
        let last = match std::fs::read(path) {
            Ok(bytes) if bytes == nonce.as_bytes() => return Ok(()),
            Ok(_) => "it holds another value".to_string(),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            bail!("{}: {last}", path.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The ranks whose `ok` is false (one all-reduce of a one-hot vector per rank).
fn ranks_without(ctx: &RankContext, ok: bool) -> Result<Vec<usize>> {
    let mut flags = vec![0f32; ctx.world_size];
    flags[ctx.rank] = f32::from(!ok);
    let flags = Tensor::<1>::from_floats(flags.as_slice(), &ctx.compute_device());
    let all = ctx
        .comm
        .all_reduce(flags, ReduceOp::Sum)?
        .into_data()
        .try_into_vec_as::<f32>()
        .map_err(|e| anyhow::anyhow!("the shared-directory verdicts: {e:?}"))?;
    Ok(all
        .iter()
        .enumerate()
        .filter(|(_, flag)| **flag > 0.0)
        .map(|(rank, _)| rank)
        .collect())
}
