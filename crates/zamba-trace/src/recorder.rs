//! The recorder: a process-wide count of recording threads (the fast path when off), and per
//! thread the stack of open spans, the capture the spans go to and the sync to run at each
//! boundary.

use std::borrow::Cow;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::category::Category;
use crate::trace::{SpanRecord, Trace};

/// Threads recording now, over every capture of the process. Zero is the common case: spans
/// then cost this one load.
static RECORDING_THREADS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD: RefCell<Option<ThreadRecorder>> = const { RefCell::new(None) };
}

/// What the threads of one capture share: the time origin, the finished spans, the tracks.
struct Shared {
    origin: Instant,
    unix_origin: f64,
    spans: Mutex<Vec<SpanRecord>>,
    tracks: Mutex<Vec<String>>,
}

impl Shared {
    /// The track named `name`, added if new: a thread started anew for each step (a
    /// communication thread) continues the track of its predecessor.
    fn add_track(&self, name: String) -> usize {
        let mut tracks = self.tracks.lock().expect("trace tracks lock");
        if let Some(existing) = tracks.iter().position(|t| *t == name) {
            return existing;
        }
        tracks.push(name);
        tracks.len() - 1
    }
}

/// The recording state of one thread.
struct ThreadRecorder {
    shared: Arc<Shared>,
    track: usize,
    sync: Option<Rc<dyn Fn()>>,
    stack: Vec<OpenSpan>,
}

struct OpenSpan {
    name: Cow<'static, str>,
    category: Category,
    start: Instant,
}

impl ThreadRecorder {
    /// Ends the open spans from stack position `depth` up, at `now`, innermost first.
    fn close_from(&mut self, depth: usize, now: Instant) {
        if depth >= self.stack.len() {
            return;
        }
        let origin = self.shared.origin;
        let mut spans = self.shared.spans.lock().expect("trace spans lock");
        while self.stack.len() > depth {
            let open = self.stack.pop().expect("an open span");
            spans.push(SpanRecord {
                name: open.name.into_owned(),
                category: open.category,
                track: self.track,
                start: open.start.saturating_duration_since(origin),
                duration: now.saturating_duration_since(open.start),
                depth: self.stack.len(),
            });
        }
    }
}

/// Starts recording on this thread into `shared` (a thread records into one capture at a time).
fn attach_thread(shared: Arc<Shared>, track: String) {
    THREAD.with_borrow_mut(|slot| {
        assert!(
            slot.is_none(),
            "zamba-trace: this thread already records into a capture; finish it first"
        );
        let track = shared.add_track(track);
        *slot = Some(ThreadRecorder {
            shared,
            track,
            sync: None,
            stack: Vec::new(),
        });
    });
    RECORDING_THREADS.fetch_add(1, Ordering::SeqCst);
}

/// Stops recording on this thread, ending its open spans now.
fn detach_thread() {
    let now = Instant::now();
    let detached =
        THREAD.with_borrow_mut(|slot| slot.take().map(|mut recorder| recorder.close_from(0, now)));
    if detached.is_some() {
        RECORDING_THREADS.fetch_sub(1, Ordering::SeqCst);
    }
}

fn set_thread_sync(sync: Rc<dyn Fn()>) {
    THREAD.with_borrow_mut(|slot| {
        if let Some(recorder) = slot {
            recorder.sync = Some(sync);
        }
    });
}

/// The capture this thread records into and the name of its track, for a helper thread to
/// join it ([`CaptureHandle::attach`]); `None` when this thread does not record.
pub fn current_capture() -> Option<(CaptureHandle, String)> {
    THREAD.with_borrow(|slot| {
        slot.as_ref().map(|recorder| {
            let tracks = recorder.shared.tracks.lock().expect("trace tracks lock");
            let handle = CaptureHandle {
                shared: recorder.shared.clone(),
            };
            (handle, tracks[recorder.track].clone())
        })
    })
}

/// Whether this thread records spans now.
pub fn recording() -> bool {
    RECORDING_THREADS.load(Ordering::Relaxed) > 0 && THREAD.with_borrow(|slot| slot.is_some())
}

/// This thread's sync if it records (`Some(None)`: records, no sync).
fn thread_sync() -> Option<Option<Rc<dyn Fn()>>> {
    THREAD.with_borrow(|slot| slot.as_ref().map(|r| r.sync.clone()))
}

/// Opens a span on this thread if it records; returns its stack position.
fn open(category: Category, name: impl FnOnce() -> Cow<'static, str>) -> Option<usize> {
    if RECORDING_THREADS.load(Ordering::Relaxed) == 0 {
        return None;
    }
    // The sync runs outside the borrow: it may be any code.
    if let Some(sync) = thread_sync()? {
        sync();
    }
    let name = name();
    let start = Instant::now();
    THREAD.with_borrow_mut(|slot| {
        let recorder = slot.as_mut()?;
        recorder.stack.push(OpenSpan {
            name,
            category,
            start,
        });
        Some(recorder.stack.len() - 1)
    })
}

/// Ends this thread's open spans from stack position `depth` up (after the sync).
fn close(depth: usize) {
    if let Some(sync) = thread_sync().flatten() {
        sync();
    }
    let now = Instant::now();
    THREAD.with_borrow_mut(|slot| {
        if let Some(recorder) = slot {
            recorder.close_from(depth, now);
        }
    });
}

/// An open span; it ends when dropped (and ends every span opened inside it that is still open).
#[must_use = "a span ends when its guard is dropped"]
pub struct Span {
    depth: Option<usize>,
    /// Spans belong to the thread that opened them.
    _thread_bound: PhantomData<*const ()>,
}

impl Span {
    /// Runs `f` inside this span, then ends it.
    pub fn run<T>(self, f: impl FnOnce() -> T) -> T {
        let out = f();
        drop(self);
        out
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(depth) = self.depth {
            close(depth);
        }
    }
}

/// Opens a span named `name` of `category` on this thread, if it records (see the crate docs
/// for the cost when it does not).
#[inline]
pub fn span(category: Category, name: &'static str) -> Span {
    Span {
        depth: open(category, || Cow::Borrowed(name)),
        _thread_bound: PhantomData,
    }
}

/// [`span`] with a name built only when this thread records (e.g. `|| format!("layer {i}")`).
#[inline]
pub fn span_with(category: Category, name: impl FnOnce() -> String) -> Span {
    Span {
        depth: open(category, || Cow::Owned(name())),
        _thread_bound: PhantomData,
    }
}

/// Opens a span that [`end`] closes later, from other code on this thread (e.g. a layer's
/// backward, opened by the autodiff node at its output and closed by the one at its input).
pub fn begin(category: Category, name: impl FnOnce() -> String) {
    let _ = open(category, || Cow::Owned(name()));
}

/// Ends the innermost open span of this thread named `name` of `category`, and whatever is still
/// open inside it. Does nothing when there is no such span (e.g. it began before the capture).
pub fn end(category: Category, name: &str) {
    if RECORDING_THREADS.load(Ordering::Relaxed) == 0 {
        return;
    }
    let depth = THREAD.with_borrow(|slot| {
        slot.as_ref()?
            .stack
            .iter()
            .rposition(|open| open.category == category && open.name == name)
    });
    if let Some(depth) = depth {
        close(depth);
    }
}

/// Recording of the spans of the thread that started it (and of threads attached to it), until
/// [`finish`](Capture::finish). Dropped unfinished, it stops recording and discards the spans.
pub struct Capture {
    shared: Arc<Shared>,
    finished: bool,
    _thread_bound: PhantomData<*const ()>,
}

impl Capture {
    /// Starts recording this thread's spans on a track named `track` (e.g. `rank 0`).
    ///
    /// # Panics
    /// If this thread already records into another capture.
    pub fn start(track: impl Into<String>) -> Capture {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            origin: Instant::now(),
            unix_origin: since_epoch.as_secs_f64(),
            spans: Mutex::new(Vec::new()),
            tracks: Mutex::new(Vec::new()),
        });
        attach_thread(shared.clone(), track.into());
        Capture {
            shared,
            finished: false,
            _thread_bound: PhantomData,
        }
    }

    /// Runs `sync` at every span boundary of this thread while it records: before a span's start
    /// and before its end are read, so that on an asynchronous device (CUDA) a span measures
    /// the work queued inside it, not the time to queue it. Never runs outside a capture.
    pub fn with_sync(self, sync: impl Fn() + 'static) -> Capture {
        set_thread_sync(Rc::new(sync));
        self
    }

    /// A handle through which other threads join this capture.
    pub fn handle(&self) -> CaptureHandle {
        CaptureHandle {
            shared: self.shared.clone(),
        }
    }

    /// Stops recording (ending this thread's open spans now) and returns every span recorded:
    /// this thread's, and those attached threads finished before now.
    pub fn finish(mut self) -> Trace {
        detach_thread();
        self.finished = true;
        let spans = std::mem::take(&mut *self.shared.spans.lock().expect("trace spans lock"));
        let tracks = self
            .shared
            .tracks
            .lock()
            .expect("trace tracks lock")
            .clone();
        Trace::new(tracks, spans, self.shared.unix_origin)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if !self.finished {
            detach_thread();
        }
    }
}

/// A capture, for other threads to record into (see [`Capture::handle`]).
#[derive(Clone)]
pub struct CaptureHandle {
    shared: Arc<Shared>,
}

impl CaptureHandle {
    /// Records this thread's spans into the capture, on a track named `track`, until the
    /// returned guard drops.
    ///
    /// # Panics
    /// If this thread already records into a capture.
    pub fn attach(&self, track: impl Into<String>) -> Attached {
        attach_thread(self.shared.clone(), track.into());
        Attached {
            _thread_bound: PhantomData,
        }
    }
}

/// This thread's membership in a capture; see [`CaptureHandle::attach`].
pub struct Attached {
    _thread_bound: PhantomData<*const ()>,
}

impl Attached {
    /// As [`Capture::with_sync`], for this thread.
    pub fn with_sync(self, sync: impl Fn() + 'static) -> Attached {
        set_thread_sync(Rc::new(sync));
        self
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        detach_thread();
    }
}
