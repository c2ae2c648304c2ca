//! Heap accounting for memory reports: a global allocator that counts live and peak bytes.
//!
//! The `zamba-train` binary installs [`CountingAlloc`] (two relaxed atomic operations per
//! allocation); [`heap`] reads the counters, [`reset_peak`] starts a new peak window. Without
//! the allocator installed both read zero.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting bytes.
pub struct CountingAlloc;

// SAFETY (the impl and every `unsafe` block in it): each method passes its arguments, with the
// caller's promises about them, to the same method of `System` and returns its result; the
// counters only observe.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

/// Heap bytes `(live now, peak since the last reset_peak)`.
pub fn heap() -> (usize, usize) {
    (LIVE.load(Ordering::Relaxed), PEAK.load(Ordering::Relaxed))
}

/// Starts a new peak window at the current live size.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Peak resident set size of the process (Linux `VmHWM`), if available.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the kernel's peak-RSS mark to the current RSS (Linux); false where unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Makes the C allocator keep freed memory for reuse instead of returning it to the OS.
///
/// A training step frees and re-allocates the same large activation buffers every step. glibc
/// serves blocks above its mmap threshold (128 KB, adapting up to 32 MB) with fresh `mmap`s and
/// unmaps them on free, so every step page-faults its activations in again and the kernel zeroes
/// each page: work that grows with the activations and buys nothing. With mmap off and trimming
/// off, freed blocks go back to malloc's free lists and the next step reuses them; the resident
/// size stays at the step's peak. No effect outside glibc, or when `ZAMBA_RETAIN_FREED_MEMORY=0`
/// (for measuring what it buys). Call once, before allocating much.
pub fn retain_freed_memory() {
    if std::env::var("ZAMBA_RETAIN_FREED_MEMORY").is_ok_and(|v| v == "0") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; both values are valid for these options.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
