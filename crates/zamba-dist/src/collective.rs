//! What a collective is and how the CPU communicators compute it: every rank describes its call
//! ([`Call`]), the calls are checked against each other, and the inputs are combined in rank order.
//! The thread group and the TCP communicator both go through [`combine`], so their results are
//! the same bit for bit, and the same on every rank.

use std::sync::Arc;

use half::bf16;

use crate::host::{Dtype, Payload};
use crate::{DistError, ReduceOp};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    AllReduce(ReduceOp),
    ReduceScatter(ReduceOp),
    AllGather,
    Broadcast { root: usize },
    BroadcastBytes { root: usize },
    Barrier,
}

/// One rank's call: which collective, and the shape of its input. `len` counts elements
/// (bytes for `BroadcastBytes`, where only the root's length is known).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Call {
    pub kind: Kind,
    pub dtype: Option<Dtype>,
    pub len: usize,
}

impl Call {
    pub(crate) fn name(&self) -> &'static str {
        match self.kind {
            Kind::AllReduce(_) => "all_reduce",
            Kind::ReduceScatter(_) => "reduce_scatter",
            Kind::AllGather => "all_gather",
            Kind::Broadcast { .. } => "broadcast",
            Kind::BroadcastBytes { .. } => "broadcast_bytes",
            Kind::Barrier => "barrier",
        }
    }

    /// How the call appears in errors: `all_reduce #12`, the 12th collective of the group.
    pub(crate) fn label(&self, index: u64) -> String {
        format!("{} #{index}", self.name())
    }

    fn describe(&self) -> String {
        let dtype = match self.dtype {
            Some(Dtype::F32) => "f32",
            Some(Dtype::Bf16) => "bf16",
            None => "bytes",
        };
        match self.kind {
            Kind::AllReduce(op) | Kind::ReduceScatter(op) => {
                format!("{}({op:?}, {} {dtype})", self.name(), self.len)
            }
            Kind::Broadcast { root } => format!("broadcast(root {root}, {} {dtype})", self.len),
            Kind::BroadcastBytes { root } => format!("broadcast_bytes(root {root})"),
            Kind::AllGather => format!("all_gather({} {dtype})", self.len),
            Kind::Barrier => "barrier".into(),
        }
    }

    /// Checks what one rank can check alone.
    pub(crate) fn check_local(&self, world: usize, label: &str) -> Result<(), DistError> {
        match self.kind {
            Kind::ReduceScatter(_) if self.len % world != 0 => Err(DistError::Invalid(format!(
                "{label}: the tensor's length {} is not a multiple of the world size {world}",
                self.len
            ))),
            Kind::Broadcast { root } | Kind::BroadcastBytes { root } if root >= world => {
                Err(DistError::Invalid(format!(
                    "{label}: root {root} is not a rank of a world of {world}"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Whether another rank's call is the same collective on the same shape.
    fn matches(&self, other: &Call) -> bool {
        match (self.kind, other.kind) {
            (Kind::BroadcastBytes { root: a }, Kind::BroadcastBytes { root: b }) => a == b,
            _ => self == other,
        }
    }
}

/// Every rank's call must match rank 0's.
pub(crate) fn check_calls(calls: &[Call], label: &str) -> Result<(), DistError> {
    for (rank, call) in calls.iter().enumerate().skip(1) {
        if !call.matches(&calls[0]) {
            return Err(DistError::Invalid(format!(
                "{label}: ranks called different collectives: rank 0 called {}, rank {rank} called {}",
                calls[0].describe(),
                call.describe()
            )));
        }
    }
    Ok(())
}

/// A collective's result, shared by all ranks.
#[derive(Debug)]
pub(crate) enum Combined {
    /// Every rank receives the same values.
    Same(Payload),
    /// Rank `r` receives chunk `r` (reduce-scatter).
    Chunks(Payload),
}

impl Combined {
    /// What rank `rank` of `world` receives.
    pub(crate) fn for_rank(&self, rank: usize, world: usize) -> Payload {
        match self {
            Combined::Same(p) => p.clone(),
            Combined::Chunks(p) => match p {
                Payload::F32(v) => Payload::F32(chunk(v, rank, world).to_vec()),
                Payload::Bf16(v) => Payload::Bf16(chunk(v, rank, world).to_vec()),
                other => other.clone(),
            },
        }
    }
}

fn chunk<T>(values: &[T], rank: usize, world: usize) -> &[T] {
    let n = values.len() / world;
    &values[rank * n..(rank + 1) * n]
}

/// Computes the collective from every rank's (checked) call and input, in rank order.
pub(crate) fn combine(
    calls: &[Call],
    inputs: Vec<Payload>,
    label: &str,
) -> Result<Arc<Combined>, DistError> {
    check_calls(calls, label)?;
    let combined = match calls[0].kind {
        Kind::AllReduce(op) => Combined::Same(reduce(&inputs, op, label)?),
        Kind::ReduceScatter(op) => Combined::Chunks(reduce(&inputs, op, label)?),
        Kind::AllGather => Combined::Same(concatenate(inputs, label)?),
        Kind::Broadcast { root } | Kind::BroadcastBytes { root } => {
            let mut inputs = inputs;
            Combined::Same(std::mem::replace(&mut inputs[root], Payload::Empty))
        }
        Kind::Barrier => Combined::Same(Payload::Empty),
    };
    Ok(Arc::new(combined))
}

fn reduce(inputs: &[Payload], op: ReduceOp, label: &str) -> Result<Payload, DistError> {
    match &inputs[0] {
        Payload::F32(_) => {
            let slices = typed(inputs, label, |p| match p {
                Payload::F32(v) => Some(v.as_slice()),
                _ => None,
            })?;
            Ok(Payload::F32(reduce_values(&slices, op, |x| x, |x| x)))
        }
        Payload::Bf16(_) => {
            let slices = typed(inputs, label, |p| match p {
                Payload::Bf16(v) => Some(v.as_slice()),
                _ => None,
            })?;
            Ok(Payload::Bf16(reduce_values(
                &slices,
                op,
                bf16::to_f32,
                bf16::from_f32,
            )))
        }
        other => Err(internal(label, other)),
    }
}

fn typed<'a, T>(
    inputs: &'a [Payload],
    label: &str,
    get: impl Fn(&'a Payload) -> Option<&'a [T]>,
) -> Result<Vec<&'a [T]>, DistError> {
    inputs
        .iter()
        .map(|p| get(p).ok_or_else(|| internal(label, p)))
        .collect()
}

fn internal(label: &str, payload: &Payload) -> DistError {
    DistError::Invalid(format!(
        "{label}: internal error: unexpected input of {}",
        payload.describe()
    ))
}

/// Reduces in rank order, accumulating in f32 (bf16 is rounded once, at the end). `Max`
/// propagates NaN.
fn reduce_values<T: Copy>(
    inputs: &[&[T]],
    op: ReduceOp,
    to_f32: impl Fn(T) -> f32,
    from_f32: impl Fn(f32) -> T,
) -> Vec<T> {
    let mut acc: Vec<f32> = inputs[0].iter().map(|&x| to_f32(x)).collect();
    for input in &inputs[1..] {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => {
                for (a, &x) in acc.iter_mut().zip(input.iter()) {
                    *a += to_f32(x);
                }
            }
            ReduceOp::Max => {
                for (a, &x) in acc.iter_mut().zip(input.iter()) {
                    let x = to_f32(x);
                    if x > *a || x.is_nan() {
                        *a = x;
                    }
                }
            }
        }
    }
    if op == ReduceOp::Avg {
        let world = inputs.len() as f32;
        for a in acc.iter_mut() {
            *a /= world;
        }
    }
    acc.into_iter().map(from_f32).collect()
}

fn concatenate(inputs: Vec<Payload>, label: &str) -> Result<Payload, DistError> {
    let mut inputs = inputs.into_iter();
    let first = inputs.next().expect("a group has at least one rank");
    match first {
        Payload::F32(mut all) => {
            for p in inputs {
                match p {
                    Payload::F32(v) => all.extend_from_slice(&v),
                    other => return Err(internal(label, &other)),
                }
            }
            Ok(Payload::F32(all))
        }
        Payload::Bf16(mut all) => {
            for p in inputs {
                match p {
                    Payload::Bf16(v) => all.extend_from_slice(&v),
                    other => return Err(internal(label, &other)),
                }
            }
            Ok(Payload::Bf16(all))
        }
        other => Err(internal(label, &other)),
    }
}
