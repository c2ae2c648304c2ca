//! zamba-train as a library: the run config, LR schedules, the training loop, optimizer,
//! checkpoints, metric plots and sweeps, export to transformers, generation and evaluation,
//! shared by the `zamba-train` binary and its tests.

pub mod artifacts;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod cost_model;
pub mod data_parallel;
pub mod device;
pub mod eval;
pub mod eval_cmd;
pub mod export;
pub mod fault_injection;
pub mod fingerprint;
pub mod generate;
pub mod launch;
pub mod memory;
pub mod memory_plan;
pub mod metrics;
pub mod optim;
mod overlap;
pub mod peak;
pub mod plot;
pub mod profile;
pub mod rank;
pub mod restart;
pub mod resume;
pub mod run_lock;
pub mod samples;
pub mod schedule;
pub mod schema;
pub mod selftest;
pub mod shared_dir;
pub mod signals;
pub mod step;
pub mod sweep;
pub mod tensorboard;
pub mod train;
