//! The distributed optimizer on CPU ranks (threads): bf16 working parameters with f32 master
//! weights and moments sharded over the ranks update like plain f32 AdamW on one rank; the f32
//! and bf16 gradient transports give what each promises; a bf16 run's master weights carry over
//! to an f32 run; and the trainer in bf16 on 1, 2 and 4 thread ranks, resumed across world sizes.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::Linear;
use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, Tensor, TensorData};
use zamba_dist::{Communicator, DistOptions, SingleRank};
use zamba_model::Precision;
use zamba_train::checkpoint::{self, TrainerState};
use zamba_train::data_parallel::{DataParallel, ReduceDtype, Sharding};
use zamba_train::optim::{AdamW, AdamWParams};
use zamba_train::train::{TrainOptions, train};

use common::{SCHEDULE, options, step_losses, weights, write_config};

#[derive(Module, Debug)]
struct Toy {
    linear: Linear,
    gamma: Param<Tensor<1>>,
}

const PARAMS: AdamWParams = AdamWParams {
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weight_decay: 0.1,
    decay_embeddings: false,
};

/// Values with many significant bits (not bf16-representable), the same on every call.
fn wavy(n: usize, phase: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (i as f32 * 0.7318 + phase).sin() * 1.234_567)
        .collect()
}

/// Weight [8, 6] (48 elements) and gamma [10]: with 40-element buckets, two buckets, each cut
/// into one chunk per rank.
fn toy(device: &Device) -> Toy {
    let weight = TensorData::new(wavy(48, 0.3), vec![8, 6]);
    let gamma = TensorData::new(wavy(10, 1.1), vec![10]);
    Toy {
        linear: Linear {
            weight: Param::from_tensor(Tensor::from_data(weight, device)),
            bias: None,
        },
        gamma: Param::from_tensor(Tensor::from_data(gamma, device)),
    }
}

const BUCKET_BYTES: usize = 40 * 4;

/// Rank `rank`'s gradients (f32, on the compute device).
fn grads(model: &Toy, rank: usize) -> GradientsParams {
    let device = Device::flex();
    let phase = 2.0 + rank as f32;
    let mut grads = GradientsParams::new();
    let weight = TensorData::new(wavy(48, phase), vec![8, 6]);
    grads.register::<2>(model.linear.weight.id, Tensor::from_data(weight, &device));
    let gamma = TensorData::new(wavy(10, phase + 0.5), vec![10]);
    grads.register::<1>(model.gamma.id, Tensor::from_data(gamma, &device));
    grads
}

/// The mean of both ranks' gradients, as one rank's.
fn mean_grads(model: &Toy) -> GradientsParams {
    let mut mean = GradientsParams::new();
    let (mut a, mut b) = (grads(model, 0), grads(model, 1));
    let w = model.linear.weight.id;
    let w_mean = (a.remove::<2>(w).unwrap() + b.remove::<2>(w).unwrap()) / 2.0;
    mean.register::<2>(w, w_mean);
    let g = model.gamma.id;
    mean.register::<1>(
        g,
        (a.remove::<1>(g).unwrap() + b.remove::<1>(g).unwrap()) / 2.0,
    );
    mean
}

/// Every parameter's values (as f32) and type, by path.
fn params(model: &impl Module) -> BTreeMap<String, (Vec<f32>, DType)> {
    struct Collect(Vec<String>, BTreeMap<String, (Vec<f32>, DType)>);
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.0.push(name.into());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            let dtype = value.dtype();
            let values = value
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap();
            self.1.insert(self.0.join("."), (values, dtype));
        }
    }
    let mut collect = Collect(Vec::new(), BTreeMap::new());
    model.visit(&mut collect);
    collect.1
}

fn bf16_rounded(values: &[f32]) -> Vec<f32> {
    let t = Tensor::<1>::from_floats(values, &Device::flex());
    t.cast(DType::BF16)
        .cast(DType::F32)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
}

/// One f32 AdamW step of the toy on one rank with the mean of both ranks' gradients.
fn reference_step() -> BTreeMap<String, (Vec<f32>, DType)> {
    let compute = Device::flex();
    let model = toy(&compute.clone().autodiff());
    let dp = DataParallel::new(&model, BUCKET_BYTES, Sharding::Replicated, 0, 1);
    let mut opt = AdamW::new(PARAMS);
    let model = dp.prepare(model, &mut opt, &SingleRank, &compute).unwrap();
    let (g, _) = dp
        .reduce_gradients(mean_grads(&model), &SingleRank, &compute)
        .unwrap();
    let model = dp
        .update(model, &mut opt, g, 1e-2, 1.0, &SingleRank, &compute)
        .unwrap();
    params(&model)
}

/// What a rank of a two-rank ZeRO-1 bf16 step ends with: its parameters, its master weights
/// (path → (range, values)) and its reduced gradient segments.
struct RankResult {
    params: BTreeMap<String, (Vec<f32>, DType)>,
    prepared_dtypes: Vec<DType>,
    master: Vec<(String, std::ops::Range<usize>, Vec<f32>)>,
    reduced: Vec<(String, std::ops::Range<usize>, Vec<f32>)>,
}

fn bf16_zero1_step(transport: ReduceDtype) -> Vec<RankResult> {
    let comms = zamba_dist::thread_group(2, &DistOptions::default());
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| s.spawn(move || rank_step(comm.as_ref(), transport)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn rank_step(comm: &dyn Communicator, transport: ReduceDtype) -> RankResult {
    let compute = Device::flex();
    let model = toy(&compute.clone().autodiff());
    let dp = DataParallel::new(&model, BUCKET_BYTES, Sharding::Zero1, comm.rank(), 2)
        .with_precision(Precision::Bf16)
        .with_transport(transport);
    let mut opt = AdamW::new(PARAMS);
    let model = dp.prepare(model, &mut opt, comm, &compute).unwrap();
    let prepared_dtypes = params(&model).values().map(|(_, d)| *d).collect();
    let g = grads(&model, comm.rank());
    let (g, _) = dp.reduce_gradients(g, comm, &compute).unwrap();
    let reduced = dp
        .segments()
        .iter()
        .zip(&g)
        .map(|(s, t)| {
            let values = t.clone().into_data().try_to_vec::<f32>().unwrap();
            (dp.path(s).to_string(), s.range.clone(), values)
        })
        .collect();
    let model = dp
        .update(model, &mut opt, g, 1e-2, 1.0, comm, &compute)
        .unwrap();
    let master = opt
        .master
        .iter()
        .map(|(path, m)| {
            let values = m.value.clone().into_data().try_to_vec::<f32>().unwrap();
            (path.clone(), m.range.clone(), values)
        })
        .collect();
    RankResult {
        params: params(&model),
        prepared_dtypes,
        master,
        reduced,
    }
}

/// The ranks' pieces of each parameter, put together.
fn assemble(
    pieces: impl Iterator<Item = (String, std::ops::Range<usize>, Vec<f32>)>,
) -> BTreeMap<String, Vec<f32>> {
    let mut out: BTreeMap<String, Vec<Option<f32>>> = BTreeMap::new();
    for (path, range, values) in pieces {
        let n = if path.ends_with("weight") { 48 } else { 10 };
        let full = out.entry(path).or_insert_with(|| vec![None; n]);
        for (i, v) in range.zip(values) {
            assert!(full[i].is_none(), "element {i} held twice");
            full[i] = Some(v);
        }
    }
    out.into_iter()
        .map(|(path, v)| {
            (
                path,
                v.into_iter()
                    .map(|x| x.expect("every element held"))
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn bf16_working_parameters_with_sharded_f32_master_weights_update_like_plain_f32_adamw() {
    let reference = reference_step();
    let ranks = bf16_zero1_step(ReduceDtype::F32);
    for rank in &ranks {
        assert!(rank.prepared_dtypes.iter().all(|d| *d == DType::BF16));
    }
    // The master weights, divided over the ranks, are the f32 update bit for bit: the same
    // averaged gradients, the same AdamW arithmetic.
    let master = assemble(ranks.iter().flat_map(|r| r.master.clone()));
    assert_eq!(master.len(), 2);
    for (path, values) in &master {
        assert_eq!(values, &reference[path].0, "{path}");
    }
    // Every rank's working parameters are bf16, the rounding of the f32 update: within bf16's
    // relative precision (2^-8) of it.
    for rank in &ranks {
        for (path, (values, dtype)) in &rank.params {
            let want = &reference[path].0;
            assert_eq!(*dtype, DType::BF16, "{path}");
            assert_eq!(values, &bf16_rounded(want), "{path}");
            for (v, w) in values.iter().zip(want) {
                assert!((v - w).abs() <= w.abs() / 256.0, "{path}: {v} vs {w}");
            }
        }
    }
}

#[test]
fn gradients_travel_in_the_configured_type_and_arrive_in_f32() {
    let model = toy(&Device::flex().autodiff());
    let mut mean = mean_grads(&model);
    let exact: BTreeMap<String, Vec<f32>> = [
        (
            "linear.weight",
            mean.remove::<2>(model.linear.weight.id)
                .unwrap()
                .reshape([48]),
        ),
        ("gamma", mean.remove::<1>(model.gamma.id).unwrap()),
    ]
    .into_iter()
    .map(|(p, t)| (p.to_string(), t.into_data().try_to_vec::<f32>().unwrap()))
    .collect();

    let f32_wire = assemble(
        bf16_zero1_step(ReduceDtype::F32)
            .into_iter()
            .flat_map(|r| r.reduced),
    );
    assert_eq!(f32_wire, exact, "f32 transport: the exact mean");

    // bf16 transport: each rank's gradients rounded to bf16, added in f32 in rank order, the
    // mean rounded to bf16 once (the CPU communicators' reduction).
    let bf16_wire = assemble(
        bf16_zero1_step(ReduceDtype::Bf16)
            .into_iter()
            .flat_map(|r| r.reduced),
    );
    for (path, got) in &bf16_wire {
        let n = got.len();
        let of_rank = |r: f32| {
            let phase = 2.0 + r + if path == "gamma" { 0.5 } else { 0.0 };
            wavy(n, phase)
        };
        let (a, b) = (of_rank(0.0), of_rank(1.0));
        let (a16, b16) = (bf16_rounded(&a), bf16_rounded(&b));
        let mean: Vec<f32> = a16.iter().zip(&b16).map(|(x, y)| (x + y) / 2.0).collect();
        assert_eq!(got, &bf16_rounded(&mean), "{path}");
        let want = &exact[path];
        assert_ne!(got, want, "{path}: the bf16 transport changed nothing");
        // Three roundings to bf16 (2^-9 relative each), of the contributions and of the mean.
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let scale = (a[i].abs() + b[i].abs()) / 2.0;
            assert!((g - w).abs() <= scale / 128.0, "{path}: {g} vs {w}");
        }
    }
}

#[test]
fn an_f32_run_continues_from_a_bf16_runs_master_weights_not_its_bf16_weights() {
    let compute = Device::flex();
    let autodiff = compute.clone().autodiff();
    let model = toy(&autodiff);
    let bf16 = DataParallel::new(&model, BUCKET_BYTES, Sharding::Replicated, 0, 1)
        .with_precision(Precision::Bf16);
    let mut opt = AdamW::new(PARAMS);
    let model = bf16
        .prepare(model, &mut opt, &SingleRank, &compute)
        .unwrap();
    let (g, _) = bf16
        .reduce_gradients(mean_grads(&model), &SingleRank, &compute)
        .unwrap();
    let model = bf16
        .update(model, &mut opt, g, 1e-2, 1.0, &SingleRank, &compute)
        .unwrap();
    let master: BTreeMap<String, Vec<f32>> = opt
        .master
        .iter()
        .map(|(p, m)| (p.clone(), m.value.clone().into_data().try_to_vec().unwrap()))
        .collect();
    // An f32 run given the bf16 run's model (as a checkpoint's weights) and optimizer state.
    let f32_layout = DataParallel::new(&model, BUCKET_BYTES, Sharding::Replicated, 0, 1);
    let continued = f32_layout
        .prepare(model, &mut opt, &SingleRank, &compute)
        .unwrap();
    assert!(
        opt.master.is_empty(),
        "the master weights became the parameters"
    );
    for (path, (values, dtype)) in params(&continued) {
        assert_eq!(dtype, DType::F32, "{path}");
        assert_eq!(values, master[&path], "{path}");
        assert_ne!(
            values,
            bf16_rounded(&values),
            "{path}: f32 values, not bf16 ones"
        );
    }
}

/// A bf16 run of 6 steps, checkpointed after step 3: 8 sequences per step in micro-batches of
/// 2, so 1, 2 and 4 ranks accumulate 4, 2 and 1 micro-batches of the same rows.
fn bf16_run(tmp: &Path, name: &str, world: usize, zero: u8, transport: &str) -> TrainOptions {
    let config = write_config(tmp, name, &format!("{SCHEDULE}\n[train]\nsteps = 6\n"));
    let mut opts = options(config);
    opts.overrides = vec![
        "batch.micro_batch=2".into(),
        "runtime.precision=bf16".into(),
        format!("runtime.world_size={world}"),
        format!("optimizer.zero={zero}"),
        format!("dist.grad_reduce_dtype={transport}"),
        "dist.timeout_s=60".into(),
        "runtime.peak_gflops=1".into(),
    ];
    opts
}

fn losses(run_dir: &Path) -> Vec<f64> {
    step_losses(run_dir)
        .into_iter()
        .map(|(_, bits)| f64::from_bits(bits.unwrap()))
        .collect()
}

fn newest(run_dir: &Path) -> std::path::PathBuf {
    checkpoint::list(run_dir).unwrap().pop().unwrap().1
}

fn trainer_state(run_dir: &Path) -> TrainerState {
    checkpoint::read_state(&newest(run_dir)).unwrap()
}

/// Largest relative difference of two loss curves.
fn loss_gap(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / x.abs())
        .fold(0.0, f64::max)
}

/// bf16 runs on different world sizes differ by where a bf16 rounding of the master weights
/// falls once the f32 sums are grouped otherwise: far less than bf16's own precision.
const BF16_LOSS_TOL: f64 = 1e-4;

#[test]
fn a_bf16_zero1_run_trains_like_one_rank_and_resumes_on_one_two_and_four_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    train(&bf16_run(tmp.path(), "w4", 4, 1, "f32")).unwrap();
    let full = tmp.path().join("w4");
    let reference = losses(&full);
    train(&bf16_run(tmp.path(), "w1", 1, 0, "f32")).unwrap();
    let gap = loss_gap(&reference, &losses(&tmp.path().join("w1")));
    eprintln!("bf16 world 4 (ZeRO-1) vs world 1: losses within {gap:e}");
    assert!(gap < BF16_LOSS_TOL, "world 4 vs world 1: {gap:e}");

    // The working weights are bf16 (stored as f32 with zero low bits); the optimizer parts hold
    // each rank's f32 master weights.
    let final_weights = weights(&newest(&full));
    assert!(final_weights.iter().all(|w| w.to_bits() & 0xffff == 0));
    let step3 = full.join("checkpoints/step-00000003");
    let part = std::fs::read(step3.join("optimizer/part-00003-of-00004.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&part).unwrap();
    let contents = &meta.metadata().as_ref().unwrap()["contents"];
    assert_eq!(contents, r#"["master","m","v"]"#);

    for (world, zero) in [(4, 1), (1, 0), (2, 1)] {
        let name = format!("resumed-w{world}");
        let mut opts = bf16_run(tmp.path(), &name, world, zero, "f32");
        opts.resume = Some(step3.clone());
        train(&opts).unwrap();
        let dir = tmp.path().join(&name);
        let got = losses(&dir);
        assert_eq!(got.len(), 3, "steps 3, 4, 5");
        assert_eq!(trainer_state(&dir).loader, trainer_state(&full).loader);
        if world == 4 {
            // The same ranks from the same master weights and moments: bit for bit.
            assert_eq!(got, reference[3..], "resumed on the writing world size");
            assert_eq!(weights(&newest(&dir)), final_weights);
        } else {
            let gap = loss_gap(&reference[3..], &got);
            eprintln!("{name}: losses within {gap:e} of the uninterrupted run's");
            assert!(gap < BF16_LOSS_TOL, "{name}: {gap:e}");
        }
    }
}

#[test]
fn bf16_gradient_transport_trains_within_bf16_tolerance_of_f32_transport() {
    let tmp = tempfile::tempdir().unwrap();
    train(&bf16_run(tmp.path(), "f32-wire", 2, 1, "f32")).unwrap();
    train(&bf16_run(tmp.path(), "bf16-wire", 2, 1, "bf16")).unwrap();
    let (f32_dir, bf16_dir) = (tmp.path().join("f32-wire"), tmp.path().join("bf16-wire"));
    let gap = loss_gap(&losses(&f32_dir), &losses(&bf16_dir));
    eprintln!("bf16 transport vs f32 transport: losses within {gap:e}");
    assert!(gap < BF16_LOSS_TOL, "{gap:e}");
    assert_ne!(
        weights(&newest(&f32_dir)),
        weights(&newest(&bf16_dir)),
        "dist.grad_reduce_dtype = \"bf16\" changed nothing"
    );
}

#[test]
fn an_unknown_gradient_transport_is_refused_naming_the_choices() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("run.toml");
    std::fs::write(&path, common::MINIMAL_RUN).unwrap();
    let set = vec!["dist.grad_reduce_dtype=f16".to_string()];
    let e = zamba_train::config::RunConfig::load(&path, &set).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("dist.grad_reduce_dtype"), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("f16") && text.contains("bf16") && text.contains("f32"),
        "{text}"
    );
}
