//! Which ranks are at fault when a device collective (NCCL) times out. NCCL itself cannot say:
//! every rank just waits. So each rank publishes, through the rendezvous store, how many
//! collectives it has entered and a beat counter, from a thread of its own; on a time-out a
//! rank compares: ranks behind it never reached the collective, ranks whose beat stopped are
//! dead or frozen.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::DistError;
use crate::store::StoreClient;

fn key(rank: usize) -> String {
    format!("heartbeat/{rank}")
}

/// The interval between beats for a group time-out: a tenth of it, within 0.2–10 s.
pub(crate) fn interval_for(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_millis(200), Duration::from_secs(10))
}

/// This rank's beating thread; stops when dropped.
pub(crate) struct Heartbeat {
    /// Collectives this rank has entered; the owner updates it.
    pub progress: Arc<AtomicU64>,
    pub interval: Duration,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Starts beating on its own connection to the store.
    pub fn start(mut store: StoreClient, rank: usize, interval: Duration) -> Self {
        let progress = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (progress, stop) = (progress.clone(), stop.clone());
            std::thread::Builder::new()
                .name("zamba-dist-heartbeat".into())
                .spawn(move || {
                    let mut beat = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let value = format!("{} {beat}", progress.load(Ordering::SeqCst));
                        if store.set(&key(rank), value.as_bytes()).is_err() {
                            return; // The store (rank 0) is gone; collectives will say so.
                        }
                        beat += 1;
                        std::thread::sleep(interval);
                    }
                })
                .ok()
        };
        Self {
            progress,
            interval,
            stop,
            thread,
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Every rank's (collectives entered, beat), `None` for a rank that never beat.
fn snapshot(store: &mut StoreClient, world: usize) -> Result<Vec<Option<(u64, u64)>>, DistError> {
    (0..world)
        .map(|rank| {
            let value = store.get(&key(rank), Duration::ZERO)?;
            Ok(value.and_then(|v| {
                let text = String::from_utf8(v).ok()?;
                let (progress, beat) = text.split_once(' ')?;
                Some((progress.parse().ok()?, beat.parse().ok()?))
            }))
        })
        .collect()
}

/// The ranks that stall collective number `my_progress`: those that have not entered it, and
/// those whose beat does not advance over a few intervals. Losing the store means losing
/// rank 0.
pub(crate) fn find_culprits(
    store: &mut StoreClient,
    world: usize,
    my_progress: u64,
    interval: Duration,
) -> Result<Vec<usize>, DistError> {
    let before = snapshot(store, world)?;
    std::thread::sleep(interval * 3);
    let after = snapshot(store, world)?;
    Ok((0..world)
        .filter(|&rank| match (before[rank], after[rank]) {
            (Some((_, beat_before)), Some((progress, beat_after))) => {
                progress < my_progress || beat_after == beat_before
            }
            _ => true,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StoreLimits, StoreServer};

    const TOKEN: &str = "heartbeat-test-token-0123";

    #[test]
    fn names_ranks_that_are_behind_or_silent() {
        let server = StoreServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            TOKEN,
            StoreLimits::default(),
        )
        .unwrap();
        let addr = server.local_addr().to_string();
        let client = || StoreClient::connect(&addr, TOKEN, Duration::from_secs(5)).unwrap();
        let interval = Duration::from_millis(50);
        // Ranks 0 and 1 beat; rank 1 is one collective behind. Rank 2 beat once, then froze.
        let beats: Vec<Heartbeat> = (0..2)
            .map(|r| Heartbeat::start(client(), r, interval))
            .collect();
        beats[0].progress.store(5, Ordering::SeqCst);
        beats[1].progress.store(4, Ordering::SeqCst);
        client().set(&key(2), b"5 0").unwrap();
        // Rank 3 never beat at all.
        std::thread::sleep(interval * 2);
        let culprits = find_culprits(&mut client(), 4, 5, interval).unwrap();
        assert_eq!(culprits, vec![1, 2, 3]);
        beats[1].progress.store(5, Ordering::SeqCst);
        std::thread::sleep(interval * 2);
        assert_eq!(
            find_culprits(&mut client(), 2, 5, interval).unwrap(),
            Vec::<usize>::new()
        );
    }
}
