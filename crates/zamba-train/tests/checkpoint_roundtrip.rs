//! Checkpoints: a saved checkpoint loads back exactly (weights, moments, counters, loader state),
//! incomplete ones are refused and not listed, pruning keeps the last k and every N-th.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor};
use zamba_data::{LoaderState, SourceCursor};
use zamba_model::{RandomInit, ZambaConfig, ZambaModel, next_token_loss};
use zamba_train::checkpoint::{self, TrainerState};
use zamba_train::optim::{AdamW, AdamWParams};

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

fn moments(opt: &AdamW) -> BTreeMap<String, (Vec<f32>, Vec<f32>)> {
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
    device.seed(2);
    let tokens = Tensor::<2, Int>::random(
        [2, 9],
        Distribution::Uniform(0.0, config.vocab_size as f64),
        &device,
    );
    let grads = GradientsParams::from_grads(
        next_token_loss(model.forward(tokens.clone()), tokens).backward(),
        &model,
    );
    let mut opt = AdamW::new(PARAMS);
    let model = opt.step(model, &grads, 1e-3, 1.0);

    let run = tempfile::tempdir().unwrap();
    let dir = checkpoint::save(run.path(), &model, &config, &opt, &state(5), "# config\n").unwrap();
    assert!(checkpoint::is_checkpoint(&dir));
    let loaded = checkpoint::load(&dir, PARAMS, &device).unwrap();
    assert_eq!(values(&loaded.model), values(&model));
    assert_eq!(moments(&loaded.optimizer), moments(&opt));
    assert_eq!(
        loaded.optimizer.step, 4,
        "the optimizer step comes from the trainer state"
    );
    assert_eq!(loaded.state, state(5));
    assert_eq!(loaded.resolved_config, "# config\n");
    // The saved config.json spells the layer schedule out, as transformers writes it.
    assert_eq!(loaded.model_config.layer_kinds(), config.layer_kinds());
    assert_eq!(
        ZambaConfig {
            layers_block_type: None,
            ..loaded.model_config
        },
        config
    );
}

#[test]
fn incomplete_checkpoints_are_refused_and_pruning_keeps_last_and_every_nth() {
    let config = ZambaConfig::preset("zamba-tiny").unwrap();
    let device = Device::flex();
    let model = ZambaModel::from_source(&config, &mut RandomInit::new(1), &device).unwrap();
    let opt = AdamW::new(PARAMS);
    let run = tempfile::tempdir().unwrap();
    for step in 1..=6 {
        checkpoint::save(run.path(), &model, &config, &opt, &state(step), "").unwrap();
    }
    // An interrupted write: a directory without the completion marker.
    let broken = checkpoint::save(run.path(), &model, &config, &opt, &state(7), "").unwrap();
    std::fs::remove_file(broken.join("COMPLETE")).unwrap();
    let err = checkpoint::load(&broken, PARAMS, &device)
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
