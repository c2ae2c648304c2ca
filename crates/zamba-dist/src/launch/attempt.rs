//! The launch as a sequence of attempts: plan this node's ranks (alone, or with the other
//! nodes' launchers), start and watch them, and decide — alone, or on node 0 for every node of
//! an elastic job — whether the job is done, starts again, or fails.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::elastic::Agents;
use super::ranks::RankPlan;
use super::supervise::{Outcome, SignalWatch, Supervisor};
use super::{Job, Settings, free_port};
use crate::DistError;

/// What becomes of the job after an attempt.
#[derive(Debug)]
pub(super) enum Verdict {
    /// Every rank of every node exited 0.
    Done,
    /// A rank was lost (the cause); every rank starts again.
    Restart(String),
    /// A rank was lost (the cause) and no restart is left.
    GiveUp(String),
    /// The job ends with this error, without a restart (a signal, a rank that could not start).
    Stop(DistError),
}

/// Marks a failure that must not be restarted in what a node reports to the others.
pub(super) const NO_RESTART: &str = "no-restart: ";

impl Verdict {
    /// The verdict on a failure whose cause is `cause` after `restarts` of `max_restarts`.
    pub fn on_failure(cause: &str, restarts: u32, max_restarts: u32) -> Self {
        if let Some(cause) = cause.strip_prefix(NO_RESTART) {
            return Verdict::Stop(DistError::Invalid(format!("launch: {cause}")));
        }
        match (max_restarts, restarts < max_restarts) {
            (0, _) => Verdict::Stop(DistError::Invalid(format!("launch: {cause}"))),
            (_, true) => Verdict::Restart(cause.to_string()),
            (_, false) => Verdict::GiveUp(cause.to_string()),
        }
    }
}

/// A launcher error's text without its `launch: ` prefix, as a cause in the log.
pub(super) fn cause(error: &DistError) -> String {
    let text = error.to_string();
    text.strip_prefix("launch: ").unwrap_or(&text).to_string()
}

pub(super) fn run(
    settings: &Settings,
    program: &Path,
    job: &dyn Job,
    signals: &mut SignalWatch,
) -> Result<(), DistError> {
    let mut agents = match &settings.elastic {
        Some(elastic) => Some(Agents::connect(settings, elastic, signals)?),
        None => None,
    };
    let mut causes: Vec<String> = Vec::new();
    loop {
        let restarts = causes.len() as u32;
        let plan = match agents.as_mut() {
            None => Some(fixed_plan(settings, restarts)?),
            Some(agents) => agents.admit(restarts, job, signals)?,
        };
        let outcome = match &plan {
            Some(plan) => Some(watch(
                settings,
                plan,
                program,
                job,
                signals,
                agents.as_mut(),
            )?),
            None => None,
        };
        let verdict = match (agents.as_mut(), outcome) {
            (Some(agents), outcome) => {
                agents.verdict(restarts, outcome, settings.max_restarts, signals)?
            }
            (None, Some(outcome)) => decide_alone(outcome, restarts, settings.max_restarts),
            (None, None) => unreachable!("a launch without other nodes always runs its ranks"),
        };
        match verdict {
            Verdict::Done => return Ok(()),
            Verdict::Stop(error) => return Err(error),
            Verdict::Restart(cause) => {
                eprintln!(
                    "[launch] restart {} of {}: {cause}; starting every rank again (they resume from the newest \
                     checkpoint)",
                    restarts + 1,
                    settings.max_restarts
                );
                causes.push(cause);
            }
            Verdict::GiveUp(cause) => return Err(given_up(&cause, &causes)),
        }
    }
}

/// The verdict of a launch without other nodes' launchers.
fn decide_alone(outcome: Outcome, restarts: u32, max_restarts: u32) -> Verdict {
    match outcome {
        Outcome::Done | Outcome::Final(Ok(())) => Verdict::Done,
        Outcome::Final(Err(error)) => Verdict::Stop(error),
        // Without restarts, the error as the rank's failure made it.
        Outcome::Failed(error) if max_restarts == 0 => Verdict::Stop(error),
        Outcome::Failed(error) => Verdict::on_failure(&cause(&error), restarts, max_restarts),
        Outcome::StoppedForOtherNode => unreachable!("a launch without other nodes"),
    }
}

/// The error once every restart is used up: the last cause and every earlier one.
fn given_up(last: &str, earlier: &[String]) -> DistError {
    let history: Vec<String> = earlier
        .iter()
        .enumerate()
        .map(|(i, cause)| format!("restart {} after: {cause}", i + 1))
        .collect();
    DistError::Invalid(format!(
        "launch: giving up after {n} restart(s) (--max-restarts {n}): {last}. Earlier failures: {}. Fix the cause, \
         then rerun the same command: the ranks resume from the newest checkpoint",
        history.join("; "),
        n = earlier.len(),
    ))
}

/// One node, or the nodes of a fixed-size job without restarts: the same place every attempt.
fn fixed_plan(settings: &Settings, restarts: u32) -> Result<RankPlan, DistError> {
    let master_port = match settings.master_port {
        Some(port) => port,
        None => free_port(&settings.master_addr)?,
    };
    Ok(RankPlan {
        world: settings.nodes.max * settings.nproc,
        first_rank: settings.node_rank * settings.nproc,
        master_port,
        restarts,
    })
}

/// How often an elastic node tells node 0 of its failure and looks for the others'.
const EXCHANGE_EVERY: Duration = Duration::from_millis(250);
/// How long the output of a failed rank may take to arrive (its fault report among it).
const FLUSH: Duration = Duration::from_secs(2);

/// Starts this node's ranks of an attempt and watches them until every one has exited; with
/// other nodes, reports this node's failure to them and stops on theirs.
fn watch(
    settings: &Settings,
    plan: &RankPlan,
    program: &Path,
    job: &dyn Job,
    signals: &mut SignalWatch,
    mut agents: Option<&mut Agents>,
) -> Result<Outcome, DistError> {
    let args = job.rank_args(plan.world, plan.restarts);
    let mut supervisor = Supervisor::new(signals, settings.grace);
    let (done_tx, done_rx) = mpsc::channel();
    for local in 0..settings.nproc {
        if supervisor.poll() {
            break;
        }
        match plan.spawn(
            settings,
            program,
            &args,
            local,
            &done_tx,
            &supervisor.faults,
        ) {
            Ok(rank) => supervisor.ranks.push(rank),
            Err(e) => {
                supervisor.abandon(e);
                break;
            }
        }
    }
    drop(done_tx);
    if supervisor.ranks.len() == settings.nproc && !supervisor.stopping() {
        log_started(settings, plan);
    }
    let mut pipes = ClosedPipes::default();
    let mut next_exchange = Instant::now();
    let mut lost_store = None;
    while !supervisor.all_exited() {
        supervisor.poll();
        pipes.collect(&done_rx, Duration::from_millis(20));
        if let Some(agents) = agents.as_deref_mut()
            && lost_store.is_none()
            && Instant::now() >= next_exchange
        {
            next_exchange = Instant::now() + EXCHANGE_EVERY;
            if let Err(e) = exchange(agents, &mut supervisor, &pipes, plan.restarts) {
                supervisor
                    .stop_for_other_node(format!("lost the launchers' store on node 0 ({e})"));
                lost_store = Some(e);
            }
        }
    }
    // Output threads end when the ranks' pipes close; wait a moment for their last lines (a
    // rank's fault report among them).
    let deadline = Instant::now() + FLUSH;
    while pipes.total < 2 * supervisor.ranks.len() && Instant::now() < deadline {
        pipes.collect(&done_rx, deadline.saturating_duration_since(Instant::now()));
    }
    match lost_store {
        Some(e) => Err(e),
        None => Ok(supervisor.outcome()),
    }
}

fn log_started(settings: &Settings, plan: &RankPlan) {
    let restart = match plan.restarts {
        0 => String::new(),
        n => format!(", restart {n}"),
    };
    eprintln!(
        "[launch] started ranks {}..{} of {} (node {} of {}{restart}), rendezvous at {}:{}",
        plan.first_rank,
        plan.last_rank(settings),
        plan.world,
        plan.first_rank / settings.nproc,
        plan.world / settings.nproc,
        settings.master_addr,
        plan.master_port
    );
}

/// Reports this node's failure once its rank's last output has arrived (so that the cause names
/// the rank it blames), and stops the ranks when another node reported one.
fn exchange(
    agents: &mut Agents,
    supervisor: &mut Supervisor,
    pipes: &ClosedPipes,
    round: u32,
) -> Result<(), DistError> {
    if let Some((rank, seen)) = supervisor.failed_rank()
        && (pipes.closed(rank) || seen.elapsed() >= FLUSH)
        && let Some(error) = supervisor.failure()
    {
        agents.report_failure(round, &cause(&error))?;
    }
    if !supervisor.stopping()
        && let Some(cause) = agents.failure(round)?
    {
        supervisor.stop_for_other_node(format!("another node failed: {cause}"));
    }
    Ok(())
}

/// The ranks' output pipes that have closed.
#[derive(Default)]
struct ClosedPipes {
    by_rank: HashMap<usize, usize>,
    total: usize,
}

impl ClosedPipes {
    /// Takes the pipes closed since the last call, waiting up to `wait` for the first.
    fn collect(&mut self, done: &mpsc::Receiver<usize>, wait: Duration) {
        let mut next = match done.recv_timeout(wait) {
            Ok(rank) => Some(rank),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Every pipe has closed; only the wait is left.
                std::thread::sleep(wait);
                None
            }
        };
        while let Some(rank) = next {
            *self.by_rank.entry(rank).or_default() += 1;
            self.total += 1;
            next = done.try_recv().ok();
        }
    }

    /// Whether both of `rank`'s pipes have closed.
    fn closed(&self, rank: usize) -> bool {
        self.by_rank.get(&rank).is_some_and(|&n| n >= 2)
    }
}
