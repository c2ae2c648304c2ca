//! zamba-train as a library: the run config, LR schedules, the training loop, optimizer,
//! checkpoints, metric plots and sweeps, shared by the `zamba-train` binary and its tests.

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod sweep;
pub mod train;
