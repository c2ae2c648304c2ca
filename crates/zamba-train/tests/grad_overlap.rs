//! Gradient reduction overlapped with the backward (`dist.overlap_grad_reduce`): on ranks as
//! threads, overlapped and non-overlapped steps give the same parameters bit for bit (plain data
//! parallelism and ZeRO-1, f32 and bf16), and so do processes over TCP; the first buckets'
//! collectives start while the backward of the last micro-batch still runs.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Int, Tensor};
use zamba_dist::{Communicator, DistError, DistOptions, ReduceOp, thread_group};
use zamba_model::{
    ActivationCheckpointing, Execution, Precision, RandomInit, ZambaConfig, ZambaModel,
    random_tokens,
};
use zamba_train::data_parallel::{DataParallel, Sharding};
use zamba_train::optim::{AdamW, AdamWParams};
use zamba_train::step::{StepContext, StepEvent, StepObserver, StepSettings, train_step};

/// Small buckets, so that the tiny model fills several.
const BUCKET_BYTES: usize = 32 << 10;
const WORLD: usize = 2;

fn model(precision: Precision) -> ZambaModel {
    let device = Device::flex().autodiff();
    let config = ZambaConfig::preset("zamba-tiny").unwrap();
    ZambaModel::from_source(&config, &mut RandomInit::new(0), &device)
        .unwrap()
        .with_execution(Execution {
            precision,
            checkpointing: ActivationCheckpointing::Layers,
        })
}

fn layout(
    model: &ZambaModel,
    sharding: Sharding,
    precision: Precision,
    rank: usize,
) -> DataParallel {
    DataParallel::new(model, BUCKET_BYTES, sharding, rank, WORLD)
        .with_reduction_order(&model.gradient_order())
        .with_precision(precision)
}

/// This rank's micro-batches of step `step`: 2 of 1 × 16 random tokens.
fn micro_batches(rank: usize, step: usize) -> Vec<(Tensor<2, Int>, Tensor<2, Int>)> {
    let device = Device::flex().autodiff();
    let tokens =
        |i: usize| random_tokens((1000 * step + 10 * rank + i) as u64, 512, [1, 16], &device);
    (0..2).map(|m| (tokens(2 * m), tokens(2 * m + 1))).collect()
}

/// Every parameter's bits, in visiting order.
fn param_bits(model: &ZambaModel) -> Vec<Vec<u32>> {
    struct Bits(Vec<Vec<u32>>);
    impl ModuleVisitor for Bits {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let values = param.val().into_data().convert::<f32>();
            let values = values.try_to_vec::<f32>().unwrap();
            self.0.push(values.iter().map(|v| v.to_bits()).collect());
        }
    }
    let mut bits = Bits(Vec::new());
    model.visit(&mut bits);
    bits.0
}

/// What a rank ends with: its parameters' bits and each step's loss and norm bits.
type RankEnd = (Vec<Vec<u32>>, Vec<(u64, u64)>);

/// Three steps of 2 micro-batches on each of 2 thread ranks; each rank's end.
fn train(sharding: Sharding, precision: Precision, overlap: bool) -> Vec<RankEnd> {
    let comms = thread_group(WORLD, &DistOptions::default());
    std::thread::scope(|scope| {
        let ranks: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                scope.spawn(move || rank_train(comm.as_ref(), sharding, precision, overlap))
            })
            .collect();
        ranks
            .into_iter()
            .map(|r| r.join().unwrap().unwrap())
            .collect()
    })
}

fn rank_train(
    comm: &dyn Communicator,
    sharding: Sharding,
    precision: Precision,
    overlap: bool,
) -> Result<RankEnd> {
    let rank = comm.rank();
    let compute = Device::flex();
    let model = model(precision);
    let dp = layout(&model, sharding, precision, rank);
    let mut optimizer = AdamW::new(AdamWParams {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        decay_embeddings: false,
    });
    let mut model = dp.prepare(model, &mut optimizer, comm, &compute)?;
    let device = Device::flex().autodiff();
    let ctx = StepContext {
        comm,
        device: &device,
        compute: &compute,
        dp: &dp,
        overlap,
    };
    // Clipping on: the norm (a sum over every bucket) scales every update.
    let settings = StepSettings {
        lr: 1e-2,
        clip_grad_norm: 0.5,
        skip: &|_, _| None,
        stop: None,
    };
    let mut agreed = Vec::new();
    for step in 0..3 {
        let batches = micro_batches(rank, step).into_iter();
        let outcome;
        (model, outcome) = train_step(model, &mut optimizer, batches, &ctx, &settings, &mut ())?;
        agreed.push((outcome.loss.to_bits(), outcome.grad_norm.to_bits()));
    }
    Ok((param_bits(&model), agreed))
}

#[test]
fn overlapped_and_non_overlapped_steps_give_the_same_parameters_bit_for_bit() {
    assert!(
        layout(&model(Precision::Fp32), Sharding::Zero1, Precision::Fp32, 0).bucket_count() >= 3,
        "the test needs several buckets"
    );
    for sharding in [Sharding::Replicated, Sharding::Zero1] {
        for precision in [Precision::Fp32, Precision::Bf16] {
            let after = train(sharding, precision, false);
            let overlapped = train(sharding, precision, true);
            let case = format!("ZeRO {}, {precision}", sharding.stage());
            assert_eq!(after[0].0, after[1].0, "{case}: ranks agree");
            assert_eq!(overlapped[0].1, after[0].1, "{case}: losses and norms");
            assert_eq!(overlapped[0].0, after[0].0, "{case}: parameters");
            assert_eq!(overlapped[1].0, after[1].0, "{case}: rank 1's parameters");
            // The steps changed something: the comparison is not of untouched weights.
            assert_ne!(after[0].0, param_bits(&model(precision)), "{case}");
        }
    }
}

/// A rank's communicator that counts the gradient collectives (reduce-scatters) begun.
struct Counting {
    inner: Box<dyn Communicator>,
    begun: Arc<AtomicUsize>,
}

impl Communicator for Counting {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce(&self, t: Tensor<1>, op: ReduceOp) -> Result<Tensor<1>, DistError> {
        self.inner.all_reduce(t, op)
    }
    fn reduce_scatter(&self, t: Tensor<1>, op: ReduceOp) -> Result<Tensor<1>, DistError> {
        self.begun.fetch_add(1, Ordering::SeqCst);
        self.inner.reduce_scatter(t, op)
    }
    fn all_gather(&self, shard: Tensor<1>) -> Result<Tensor<1>, DistError> {
        self.inner.all_gather(shard)
    }
    fn broadcast(&self, t: Tensor<1>, root: usize) -> Result<Tensor<1>, DistError> {
        self.inner.broadcast(t, root)
    }
    fn broadcast_bytes(&self, b: Option<Vec<u8>>, root: usize) -> Result<Vec<u8>, DistError> {
        self.inner.broadcast_bytes(b, root)
    }
    fn barrier(&self) -> Result<(), DistError> {
        self.inner.barrier()
    }
}

/// At the end of the backward ([`StepEvent::Gradients`]), the gradient collectives begun so
/// far. With overlap it waits for the first one: the buckets left when the backward ends are
/// handed over only after this event, so a collective begun by then was begun from gradients
/// the backward handed out while it ran.
struct AtBackwardEnd {
    begun: Arc<AtomicUsize>,
    wait_for_first: bool,
    seen: Option<usize>,
}

impl StepObserver for AtBackwardEnd {
    fn observe(&mut self, event: StepEvent) -> Result<()> {
        if event != StepEvent::Gradients {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.wait_for_first && self.begun.load(Ordering::SeqCst) == 0 {
            if Instant::now() > deadline {
                bail!("no gradient collective began from the backward's gradients");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.seen = Some(self.begun.load(Ordering::SeqCst));
        Ok(())
    }
}

/// One ZeRO-1 step on 2 thread ranks: per rank, the collectives begun at the end of the
/// backward, and the number of buckets.
fn begun_at_backward_end(overlap: bool) -> Vec<(usize, usize)> {
    let comms = thread_group(WORLD, &DistOptions::default());
    std::thread::scope(|scope| {
        let ranks: Vec<_> = comms
            .into_iter()
            .map(|inner| {
                scope.spawn(move || -> Result<(usize, usize)> {
                    let begun = Arc::new(AtomicUsize::new(0));
                    let comm = Counting {
                        inner,
                        begun: begun.clone(),
                    };
                    let (precision, compute) = (Precision::Fp32, Device::flex());
                    let model = model(precision);
                    let dp = layout(&model, Sharding::Zero1, precision, comm.rank());
                    let mut optimizer = AdamW::new(AdamWParams {
                        beta1: 0.9,
                        beta2: 0.95,
                        eps: 1e-8,
                        weight_decay: 0.0,
                        decay_embeddings: false,
                    });
                    let model = dp.prepare(model, &mut optimizer, &comm, &compute)?;
                    let device = Device::flex().autodiff();
                    let ctx = StepContext {
                        comm: &comm,
                        device: &device,
                        compute: &compute,
                        dp: &dp,
                        overlap,
                    };
                    let settings = StepSettings {
                        lr: 1e-3,
                        clip_grad_norm: 0.0,
                        skip: &|_, _| None,
                        stop: None,
                    };
                    let mut observer = AtBackwardEnd {
                        begun,
                        wait_for_first: overlap,
                        seen: None,
                    };
                    let batches = micro_batches(comm.rank(), 0).into_iter();
                    train_step(
                        model,
                        &mut optimizer,
                        batches,
                        &ctx,
                        &settings,
                        &mut observer,
                    )?;
                    Ok((
                        observer.seen.expect("the step passed its backward"),
                        dp.bucket_count(),
                    ))
                })
            })
            .collect();
        ranks
            .into_iter()
            .map(|r| r.join().unwrap().unwrap())
            .collect()
    })
}

#[test]
fn the_first_buckets_are_reduced_while_the_backward_runs() {
    for (begun, buckets) in begun_at_backward_end(true) {
        // At least the last layer's bucket; never the last bucket (the embedding's and the
        // shared block's gradients are final only once the backward is over).
        assert!(begun >= 1 && begun < buckets, "{begun} of {buckets}");
    }
    // Without overlap, nothing is reduced before the backward ends.
    for (begun, _) in begun_at_backward_end(false) {
        assert_eq!(begun, 0);
    }
}

const BIN: &str = env!("CARGO_BIN_EXE_zamba-train");

/// `zamba-train launch` of 2 processes (TCP) for 3 steps of 2 micro-batches per rank, with layer
/// recomputation and ZeRO-1; the steps' loss bits.
fn launched_losses(tmp: &Path, name: &str, overlap: bool) -> Vec<(u64, Option<u64>)> {
    let extra = format!("{}\n[train]\nsteps = 3\n", common::SCHEDULE);
    let config = common::write_config(tmp, name, &extra);
    let settings = [
        "batch.micro_batch=2".to_string(),
        "optimizer.zero=1".into(),
        "train.activation_checkpointing=layers".into(),
        "checkpoint.every=100".into(),
        "eval.every=100".into(),
        "dist.timeout_s=60".into(),
        format!("dist.overlap_grad_reduce={overlap}"),
    ];
    let mut cmd = Command::new(BIN);
    cmd.args(["launch", "--nproc-per-node", "2", "--", "--config"])
        .arg(&config);
    for s in &settings {
        cmd.args(["--set", s]);
    }
    let out = cmd.stdout(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::step_losses(&tmp.join(name))
}

#[test]
fn processes_over_tcp_train_the_same_bits_with_and_without_overlap() {
    let tmp = tempfile::tempdir().unwrap();
    let overlapped = launched_losses(tmp.path(), "overlapped", true);
    let after = launched_losses(tmp.path(), "after", false);
    assert_eq!(overlapped.len(), 3);
    assert_eq!(overlapped, after);
}

/// The value after `after` on the line of `stdout` that holds it, as a number.
fn figure(stdout: &str, after: &str) -> f64 {
    let rest = &stdout[stdout
        .find(after)
        .unwrap_or_else(|| panic!("{after:?} in {stdout}"))
        + after.len()..];
    let number: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    number
        .parse()
        .unwrap_or_else(|_| panic!("a number after {after:?} in {stdout}"))
}

#[test]
fn bench_model_matches_the_link_to_the_backward_and_reports_the_efficiency() {
    let bench = |link: &str| {
        Command::new(BIN)
            .args(["bench", "model", "--preset", "zamba-tiny", "--world", "2"])
            .args(["--batch", "2", "--seq-len", "32", "--steps", "1"])
            .args([
                "--activation-checkpointing",
                "layers",
                "--bucket-mb",
                "0.03",
            ])
            .arg(format!("--link-gbps={link}"))
            .output()
            .unwrap()
    };
    let run = bench("auto");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // The calibration chose a link, the measured step put time on it, and the efficiency is a
    // share of the step.
    assert!(figure(&stdout, "link: ") > 0.0, "{stdout}");
    let wire_ms = stdout
        .split(" ms on the wire per step")
        .next()
        .and_then(|before| before.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok());
    assert!(
        wire_ms.is_some_and(|ms| ms > 0.0),
        "time on the wire: {stdout}"
    );
    let efficiency = figure(&stdout, "data-parallel efficiency ");
    assert!(efficiency > 0.0 && efficiency <= 100.0, "{stdout}");

    for bad in ["fast", "0", "-1", "inf"] {
        let run = bench(bad);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "--link-gbps {bad} accepted");
        assert!(
            stderr.contains("--link-gbps")
                && stderr.contains("auto")
                && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}
