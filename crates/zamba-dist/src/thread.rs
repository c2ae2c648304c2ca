//! Ranks as threads of one process, meeting in shared memory: for CPU tests and CPU proxy runs.
//!
//! Every rank deposits its input; the last to arrive combines all inputs in rank order; every
//! rank takes its share; when all have taken it, the group moves on to the next collective.
//! A rank that does not arrive within the time-out, or whose thread panicked or dropped its
//! communicator, fails the collective on every rank with an error naming it. A failed group
//! stays failed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::collective::{Call, Combined, combine};
use crate::cpu::{HostExchange, host_communicator};
use crate::host::Payload;
use crate::{Communicator, DistError, DistOptions, Interrupt};

/// `world` communicators, one per rank (index = rank), to be moved to one thread each.
pub fn thread_group(world: usize, opts: &DistOptions) -> Vec<Box<dyn Communicator>> {
    assert!(world >= 1, "a thread group needs at least one rank");
    let shared = Arc::new(Shared {
        timeout: opts.timeout,
        interrupt: opts.interrupt.clone(),
        state: Mutex::new(State::new(world)),
        changed: Condvar::new(),
    });
    (0..world)
        .map(|rank| {
            Box::new(ThreadCommunicator {
                rank,
                world,
                shared: shared.clone(),
                next_index: AtomicU64::new(0),
            }) as Box<dyn Communicator>
        })
        .collect()
}

/// One rank of a [`thread_group`].
pub struct ThreadCommunicator {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
    /// Index of this rank's next collective.
    next_index: AtomicU64,
}

struct Shared {
    timeout: Duration,
    interrupt: Interrupt,
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    /// Index of the collective being gathered.
    index: u64,
    calls: Vec<Option<Call>>,
    inputs: Vec<Payload>,
    result: Option<Result<Arc<Combined>, DistError>>,
    taken: Vec<bool>,
    /// Why a rank left the group (its communicator was dropped).
    left: Vec<Option<&'static str>>,
    /// The group's first failure.
    fault: Option<DistError>,
}

impl State {
    fn new(world: usize) -> Self {
        Self {
            index: 0,
            calls: vec![None; world],
            inputs: vec![Payload::Empty; world],
            result: None,
            taken: vec![false; world],
            left: vec![None; world],
            fault: None,
        }
    }

    /// All ranks took the result: start gathering the next collective.
    fn advance_if_done(&mut self) -> bool {
        if !self.taken.iter().all(|&t| t) {
            return false;
        }
        let world = self.taken.len();
        self.index += 1;
        self.calls = vec![None; world];
        self.inputs = vec![Payload::Empty; world];
        self.result = None;
        self.taken = vec![false; world];
        true
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for a change until `deadline` (looking at the interrupt in between); false once
    /// it has passed.
    fn wait<'a>(
        &self,
        state: MutexGuard<'a, State>,
        deadline: Instant,
    ) -> (MutexGuard<'a, State>, bool) {
        if Instant::now() >= deadline {
            return (state, false);
        }
        let (state, _) = self
            .changed
            .wait_timeout(state, self.interrupt.slice_until(deadline))
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (state, true)
    }

    /// Fails the group if this rank's waits must end now (a signal).
    fn check_interrupt(&self, state: &mut State, label: &str) -> Result<(), DistError> {
        match self.interrupt.reason() {
            Some(reason) => Err(self.fail(
                state,
                DistError::Interrupted {
                    op: label.to_string(),
                    reason,
                },
            )),
            None => Ok(()),
        }
    }

    fn fail(&self, state: &mut State, error: DistError) -> DistError {
        state.fault.get_or_insert(error.clone());
        self.changed.notify_all();
        state.fault.clone().unwrap_or(error)
    }
}

impl HostExchange for ThreadCommunicator {
    fn exchange(&self, call: Call, input: Payload) -> Result<Payload, DistError> {
        let shared = &*self.shared;
        let index = self.next_index.load(Ordering::Relaxed);
        let label = call.label(index);
        call.check_local(self.world, &label)?;
        self.next_index.store(index + 1, Ordering::Relaxed);
        let deadline = Instant::now() + shared.timeout;
        let mut state = shared.lock();

        // The previous collective is over once every rank has taken its result.
        while state.index < index {
            if let Some(fault) = &state.fault {
                return Err(fault.clone());
            }
            let (s, in_time) = shared.wait(state, deadline);
            state = s;
            shared.check_interrupt(&mut state, &label)?;
            if !in_time && state.index < index {
                let late = (0..self.world).filter(|&r| !state.taken[r]).collect();
                return Err(
                    shared.fail(&mut state, DistError::timeout(&label, shared.timeout, late))
                );
            }
        }
        if let Some(fault) = &state.fault {
            return Err(fault.clone());
        }
        state.calls[self.rank] = Some(call);
        state.inputs[self.rank] = input;
        if state.calls.iter().all(Option::is_some) {
            let calls: Vec<Call> = state
                .calls
                .iter()
                .map(|c| c.expect("all present"))
                .collect();
            let inputs = std::mem::replace(&mut state.inputs, vec![Payload::Empty; self.world]);
            let result = combine(&calls, inputs, &label);
            if let Err(e) = &result {
                state.fault.get_or_insert(e.clone());
            }
            state.result = Some(result);
            shared.changed.notify_all();
        }

        loop {
            if let Some(result) = &state.result {
                let mine = result.as_ref().map(|c| c.for_rank(self.rank, self.world));
                let mine = mine.map_err(|e| e.clone());
                state.taken[self.rank] = true;
                if state.advance_if_done() {
                    shared.changed.notify_all();
                }
                return mine;
            }
            if let Some(fault) = &state.fault {
                return Err(fault.clone());
            }
            if let Some(rank) =
                (0..self.world).find(|&r| state.left[r].is_some() && state.calls[r].is_none())
            {
                let detail = state.left[rank].unwrap_or_default().to_string();
                return Err(shared.fail(
                    &mut state,
                    DistError::PeerLost {
                        op: label,
                        rank,
                        detail,
                    },
                ));
            }
            let (s, in_time) = shared.wait(state, deadline);
            state = s;
            if state.result.is_none() {
                shared.check_interrupt(&mut state, &label)?;
            }
            if !in_time && state.result.is_none() && state.fault.is_none() {
                let missing = (0..self.world)
                    .filter(|&r| state.calls[r].is_none())
                    .collect();
                return Err(shared.fail(
                    &mut state,
                    DistError::timeout(&label, shared.timeout, missing),
                ));
            }
        }
    }
}

host_communicator!(ThreadCommunicator);

impl Drop for ThreadCommunicator {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.left[self.rank] = Some(if std::thread::panicking() {
            "its thread panicked"
        } else {
            "it dropped its communicator (its thread returned or failed)"
        });
        // A rank that leaves between depositing and taking must not hold the others back.
        if state.result.is_some() && !state.taken[self.rank] {
            state.taken[self.rank] = true;
            state.advance_if_done();
        }
        self.shared.changed.notify_all();
    }
}
