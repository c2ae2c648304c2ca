//! Checkpoints: a saved checkpoint loads back exactly (weights, moments, counters, loader state),
//! incomplete ones are refused and not listed, pruning keeps the last k and every N-th, and
//! optimizer moments written by any number of ZeRO-1 ranks load on any other number.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use zamba_data::{LoaderState, SourceCursor};
use zamba_dist::SingleRank;
use zamba_model::{RandomInit, SaveDtype, ZambaConfig, ZambaModel, next_token_loss, random_tokens};
use zamba_train::checkpoint::{self, Snapshot, TrainerState, moments};
use zamba_train::data_parallel::{DataParallel, Sharding, param_slots};
use zamba_train::optim::{AdamW, AdamWParams, Master, Moments};
use zamba_train::rank::RankContext;

const PARAMS: AdamWParams = AdamWParams {
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weight_decay: 0.1,
    decay_embeddings: false,
};

struct Values(Vec<Vec<f32>>);

impl ModuleVisitor for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0
            .push(param.val().into_data().try_to_vec::<f32>().unwrap());
    }
}

fn values(model: &ZambaModel) -> Vec<Vec<f32>> {
    let mut v = Values(Vec::new());
    model.visit(&mut v);
    v.0
}

fn single_rank(device: &Device) -> RankContext {
    RankContext {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        device: device.clone(),
        comm: Box::new(SingleRank),
    }
}

fn moments_of(opt: &AdamW) -> BTreeMap<String, (Vec<f32>, Vec<f32>)> {
    let read = |t: &Tensor<1>| t.clone().into_data().try_to_vec::<f32>().unwrap();
    opt.moments
        .iter()
        .map(|(k, m)| (k.clone(), (read(&m.m), read(&m.v))))
        .collect()
}

fn state(step: u64) -> TrainerState {
    TrainerState {
        step,
        tokens: 4096 * step,
        consecutive_skips: 1,
        total_skips: 2,
        loss_window: vec![3.5, 3.25],
        optimizer_step: step - 1,
        world_size: 1,
        loader: LoaderState {
            version: 1,
            fingerprint: "abc".into(),
            step,
            sources: BTreeMap::from([(
                "web".into(),
                SourceCursor {
                    windows: 17,
                    mix_rows: 16,
                },
            )]),
        },
    }
}

#[test]
fn save_then_load_gives_back_everything() {
    let config = ZambaConfig::preset("zamba-tiny").unwrap();
    let device = Device::flex().autodiff();
    let model = ZambaModel::from_source(&config, &mut RandomInit::new(1), &device).unwrap();
    let tokens = random_tokens(2, config.vocab_size, [2, 9], &device);
    let grads = GradientsParams::from_grads(
        next_token_loss(model.forward(tokens.clone()), tokens).backward(),
        &model,
    );
    let mut opt = AdamW::new(PARAMS);
    let dp = DataParallel::new(&model, 1 << 16, Sharding::Replicated, 0, 1);
    let compute = Device::flex();
    let (grads, _) = dp.reduce_gradients(grads, &SingleRank, &compute).unwrap();
    let model = dp
        .update(model, &mut opt, grads, 1e-3, 1.0, &SingleRank, &compute)
        .unwrap();

    let run = tempfile::tempdir().unwrap();
    let ctx = single_rank(&device);
    let saved = state(5);
    let snapshot = Snapshot {
        model: &model,
        model_config: &config,
        optimizer: &opt,
        sharding: Sharding::Replicated,
        state: &saved,
        resolved_config: "# config\n",
    };
    let dir = checkpoint::save(&ctx, run.path(), &snapshot).unwrap();
    assert!(checkpoint::is_checkpoint(&dir));
    let loaded = checkpoint::load(&dir, &device).unwrap();
    assert_eq!(values(&loaded.model), values(&model));
    let restored =
        checkpoint::load_optimizer(&dir, PARAMS, loaded.state.optimizer_step, &dp, &compute)
            .unwrap();
    assert_eq!(moments_of(&restored), moments_of(&opt));
    assert_eq!(
        restored.step, 4,
        "the optimizer step comes from the trainer state"
    );
    assert_eq!(loaded.state, state(5));
    assert_eq!(loaded.resolved_config, "# config\n");
    // The saved config.json spells derived values out, as transformers writes them: the same
    // config once resolved.
    assert_eq!(loaded.model_config.layer_kinds(), config.layer_kinds());
    let resolved = |c: &ZambaConfig| zamba_model::hf_export::hf_config_json(c, SaveDtype::F32);
    assert_eq!(resolved(&loaded.model_config), resolved(&config));
}

#[test]
fn incomplete_checkpoints_are_refused_and_pruning_keeps_last_and_every_nth() {
    let config = ZambaConfig::preset("zamba-tiny").unwrap();
    let device = Device::flex();
    let model = ZambaModel::from_source(&config, &mut RandomInit::new(1), &device).unwrap();
    let opt = AdamW::new(PARAMS);
    let run = tempfile::tempdir().unwrap();
    let ctx = single_rank(&device);
    let save = |step| {
        let state = state(step);
        let snapshot = Snapshot {
            model: &model,
            model_config: &config,
            optimizer: &opt,
            sharding: Sharding::Replicated,
            state: &state,
            resolved_config: "",
        };
        checkpoint::save(&ctx, run.path(), &snapshot).unwrap()
    };
    for step in 1..=6 {
        save(step);
    }
    // An interrupted write: a directory without the completion marker.
    let broken = save(7);
    std::fs::remove_file(broken.join("COMPLETE")).unwrap();
    let err = checkpoint::load(&broken, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a complete checkpoint"), "{err}");
    let steps = |run: &std::path::Path| -> Vec<u64> {
        checkpoint::list(run)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    };
    assert_eq!(steps(run.path()), vec![1, 2, 3, 4, 5, 6]);

    checkpoint::prune(run.path(), 2, 3).unwrap();
    assert_eq!(steps(run.path()), vec![3, 5, 6]);
}

/// Made-up moments for every parameter: element `i` of `path` has m = i + k, v = 2i + k.
fn full_moments(model: &ZambaModel) -> HashMap<String, (Vec<f32>, Vec<f32>)> {
    param_slots(model)
        .into_iter()
        .enumerate()
        .map(|(k, s)| {
            let m = (0..s.numel).map(|i| (i + k) as f32).collect();
            let v = (0..s.numel).map(|i| (2 * i + k) as f32).collect();
            (s.path, (m, v))
        })
        .collect()
}

/// The moments rank `rank` of `world` holds under `sharding`, cut from `full`.
fn owned(
    model: &ZambaModel,
    full: &HashMap<String, (Vec<f32>, Vec<f32>)>,
    sharding: Sharding,
    rank: usize,
    world: usize,
) -> (DataParallel, BTreeMap<String, Moments>) {
    // Small buckets, so that parameters are cut between ranks.
    let dp = DataParallel::new(model, 4096, sharding, rank, world);
    let device = Device::flex();
    let cut = |v: &[f32], r: &Range<usize>| {
        Tensor::<1>::from_data(
            TensorData::new(v[r.clone()].to_vec(), vec![r.len()]),
            &device,
        )
    };
    let moments = dp
        .segments()
        .iter()
        .map(|s| {
            let (m, v) = &full[dp.path(s)];
            let moments = Moments {
                range: s.range.clone(),
                m: cut(m, &s.range),
                v: cut(v, &s.range),
            };
            (dp.path(s).to_string(), moments)
        })
        .collect();
    (dp, moments)
}

fn wanted(dp: &DataParallel) -> Vec<(String, Range<usize>)> {
    dp.segments()
        .iter()
        .map(|s| (dp.path(s).to_string(), s.range.clone()))
        .collect()
}

#[test]
fn zero_moments_written_by_two_ranks_load_on_one_and_on_three() {
    let config = ZambaConfig::preset("zamba-tiny").unwrap();
    let model = ZambaModel::from_source(&config, &mut RandomInit::new(1), &Device::flex()).unwrap();
    let full = full_moments(&model);
    let numel: HashMap<String, usize> = param_slots(&model)
        .into_iter()
        .map(|s| (s.path, s.numel))
        .collect();
    let numel_ref: HashMap<&str, usize> = numel.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let ckpt = tempfile::tempdir().unwrap();
    for rank in 0..2 {
        let (dp, moments) = owned(&model, &full, Sharding::Zero1, rank, 2);
        assert!(
            dp.segments().len() < param_slots(&model).len() + 2,
            "rank {rank} holds a share"
        );
        moments::write(
            &moments::part_path(ckpt.path(), rank, 2),
            &moments,
            &BTreeMap::new(),
            &numel_ref,
        )
        .unwrap();
    }
    for (sharding, world) in [(Sharding::Replicated, 1), (Sharding::Zero1, 3)] {
        for rank in 0..world {
            let (dp, expected) = owned(&model, &full, sharding, rank, world);
            let got = moments::read(ckpt.path(), &numel_ref, &wanted(&dp), true, &Device::flex())
                .unwrap();
            assert!(got.master.is_empty(), "no master weights were written");
            let got = got.moments;
            assert_eq!(got.len(), expected.len());
            for (path, e) in &expected {
                let g = &got[path];
                assert_eq!(g.range, e.range, "{path}");
                let read = |t: &Tensor<1>| t.clone().into_data().try_to_vec::<f32>().unwrap();
                assert_eq!(read(&g.m), read(&e.m), "{path} m on rank {rank} of {world}");
                assert_eq!(read(&g.v), read(&e.v), "{path} v on rank {rank} of {world}");
            }
        }
    }

    // A missing part leaves parameters short; the error says so.
    let (dp, _) = owned(&model, &full, Sharding::Replicated, 0, 1);
    std::fs::remove_file(moments::part_path(ckpt.path(), 1, 2)).unwrap();
    let err = format!(
        "{:#}",
        moments::read(ckpt.path(), &numel_ref, &wanted(&dp), true, &Device::flex()).unwrap_err()
    );
    assert!(
        err.contains("part file is missing") || err.contains("no AdamW moments"),
        "{err}"
    );

    // Moments of a parameter the model does not have, and a parameter without moments.
    let (_, mut all) = owned(&model, &full, Sharding::Replicated, 0, 1);
    let one = all.remove("final_layernorm.gamma").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut numel_extra = numel_ref.clone();
    numel_extra.insert("layers.99.gamma", one.range.len());
    let mut with_stranger = all.clone();
    with_stranger.insert("layers.99.gamma".into(), one);
    moments::write(
        &moments::part_path(dir.path(), 0, 1),
        &with_stranger,
        &BTreeMap::new(),
        &numel_extra,
    )
    .unwrap();
    let err = format!(
        "{:#}",
        moments::read(dir.path(), &numel_ref, &wanted(&dp), true, &Device::flex()).unwrap_err()
    );
    assert!(
        err.contains("layers.99.gamma") && err.contains("does not have"),
        "{err}"
    );
    let no_master = BTreeMap::new();
    moments::write(
        &moments::part_path(dir.path(), 0, 1),
        &all,
        &no_master,
        &numel_ref,
    )
    .unwrap();
    let err = format!(
        "{:#}",
        moments::read(dir.path(), &numel_ref, &wanted(&dp), true, &Device::flex()).unwrap_err()
    );
    assert!(
        err.contains("final_layernorm.gamma") && err.contains("no AdamW moments"),
        "{err}"
    );
    assert!(
        moments::read(dir.path(), &numel_ref, &wanted(&dp), false, &Device::flex()).is_ok(),
        "before the first step none are required"
    );
}

#[test]
fn master_weights_written_by_two_ranks_load_on_one_and_on_three() {
    let config = ZambaConfig::preset("zamba-tiny").unwrap();
    let model = ZambaModel::from_source(&config, &mut RandomInit::new(1), &Device::flex()).unwrap();
    let full = full_moments(&model);
    let numel: HashMap<String, usize> = param_slots(&model)
        .into_iter()
        .map(|s| (s.path, s.numel))
        .collect();
    let numel_ref: HashMap<&str, usize> = numel.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    // Master weights stand in as the first moments' values, for every range a rank owns.
    let as_master = |moments: &BTreeMap<String, Moments>| -> BTreeMap<String, Master> {
        let master = |m: &Moments| Master {
            range: m.range.clone(),
            value: m.m.clone(),
        };
        moments
            .iter()
            .map(|(p, m)| (p.clone(), master(m)))
            .collect()
    };
    let read = |t: &Tensor<1>| t.clone().into_data().try_to_vec::<f32>().unwrap();
    // A bf16 run checkpointed before its first update: master weights, no moments yet.
    let ckpt = tempfile::tempdir().unwrap();
    let none = BTreeMap::new();
    for rank in 0..2 {
        let (_, moments) = owned(&model, &full, Sharding::Zero1, rank, 2);
        let part = moments::part_path(ckpt.path(), rank, 2);
        moments::write(&part, &none, &as_master(&moments), &numel_ref).unwrap();
    }
    for (sharding, world) in [(Sharding::Replicated, 1), (Sharding::Zero1, 3)] {
        for rank in 0..world {
            let (dp, expected) = owned(&model, &full, sharding, rank, world);
            let got = moments::read(
                ckpt.path(),
                &numel_ref,
                &wanted(&dp),
                false,
                &Device::flex(),
            )
            .unwrap();
            assert!(got.moments.is_empty());
            assert_eq!(got.master.len(), expected.len());
            for (path, e) in &expected {
                let g = &got.master[path];
                assert_eq!(g.range, e.range, "{path}");
                assert_eq!(
                    read(&g.value),
                    read(&e.m),
                    "{path} on rank {rank} of {world}"
                );
            }
        }
    }
    let (dp, _) = owned(&model, &full, Sharding::Replicated, 0, 1);
    let err = moments::read(ckpt.path(), &numel_ref, &wanted(&dp), true, &Device::flex());
    let err = format!("{:#}", err.unwrap_err());
    assert!(err.contains("no AdamW moments"), "after a step: {err}");

    // A part with master weights next to one without is not one checkpoint's.
    let (_, rank1) = owned(&model, &full, Sharding::Zero1, 1, 2);
    let part = moments::part_path(ckpt.path(), 1, 2);
    moments::write(&part, &rank1, &BTreeMap::new(), &numel_ref).unwrap();
    let err = moments::read(
        ckpt.path(),
        &numel_ref,
        &wanted(&dp),
        false,
        &Device::flex(),
    );
    let err = format!("{:#}", err.unwrap_err());
    assert!(
        err.contains("part-00001-of-00002") && err.contains("not of one checkpoint"),
        "{err}"
    );
}
