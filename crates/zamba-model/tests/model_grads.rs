//! Gradients of the whole model: fused scan vs the plain-tensor-op reference, the shared block's
//! gradient summed over its uses (checked by finite differences), parameter accounting, and
//! PyTorch's `padding_idx` behaviour of the embedding.

use std::collections::HashMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Gradients, Int, Tensor};
use zamba_model::params::ParamCounts;
use zamba_model::{RandomInit, ZambaConfig, ZambaModel, next_token_loss, random_tokens};

fn tiny() -> ZambaConfig {
    ZambaConfig::preset("zamba-tiny").unwrap()
}

fn tokens(config: &ZambaConfig, device: &Device, batch: usize, len: usize) -> Tensor<2, Int> {
    random_tokens(3, config.vocab_size, [batch, len], device)
}

struct CollectGrads<'a> {
    grads: &'a Gradients,
    out: HashMap<ParamId, Vec<f32>>,
}

impl ModuleVisitor for CollectGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let grad = param
            .val()
            .grad(self.grads)
            .expect("every parameter receives a gradient");
        self.out
            .insert(param.id, grad.into_data().try_to_vec::<f32>().unwrap());
    }
}

fn all_grads(model: &ZambaModel, tokens: &Tensor<2, Int>) -> HashMap<ParamId, Vec<f32>> {
    let loss = next_token_loss(model.forward(tokens.clone()), tokens.clone());
    let grads = loss.backward();
    let mut collect = CollectGrads {
        grads: &grads,
        out: HashMap::new(),
    };
    model.visit(&mut collect);
    collect.out
}

#[test]
fn gradients_with_the_fused_scan_equal_the_reference_scan() {
    let config = tiny();
    let device = Device::flex().autodiff();
    let model = ZambaModel::from_source(&config, &mut RandomInit::new(11), &device).unwrap();
    let tokens = tokens(&config, &device, 2, 37);
    let fused = all_grads(&model, &tokens);
    let reference = all_grads(&model.clone().with_reference_scan(true), &tokens);
    assert_eq!(fused.len(), reference.len());
    for (id, g) in &fused {
        let r = &reference[id];
        let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "parameter {id} has an all-zero gradient");
        let err = g.iter().zip(r).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        assert!(
            err <= 1e-4,
            "parameter {id}: relative gradient difference {err}"
        );
    }
}

/// Loss after moving one parameter by `step · direction`.
fn loss_with(model: &ZambaModel, tokens: &Tensor<2, Int>, set: impl Fn(&mut ZambaModel)) -> f64 {
    let mut moved = model.clone();
    set(&mut moved);
    next_token_loss(moved.forward(tokens.clone()), tokens.clone()).into_scalar::<f32>() as f64
}

#[test]
fn shared_block_gradient_sums_all_of_its_uses() {
    // The h2 fixture: transformers weights with three hybrid layers, so the shared block is used
    // three times and carries a gradient well above f32 noise.
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/zamba-tiny-h2");
    let device = Device::flex().autodiff();
    let (config, model) = zamba_model::load_hf(&dir, &device).unwrap();
    assert!(
        config.hybrid_layers().len() >= 2,
        "the test needs two uses of the shared block"
    );
    let tokens_ad = tokens(&config, &device, 2, 24);
    let loss = next_token_loss(model.forward(tokens_ad.clone()), tokens_ad.clone());
    let grads = loss.backward();
    let g_q = model.shared.q_proj.weight.val().grad(&grads).unwrap();
    let g_up = model.shared.up_proj.weight.val().grad(&grads).unwrap();

    // Directional derivative along the gradient: dL = ε·|g|². If only one use of the shared block
    // contributed, the finite difference would disagree by the other uses' share.
    let plain = model.valid();
    let tokens = tokens_ad.inner();
    for (name, g) in [("q_proj", g_q), ("up_proj", g_up)] {
        let norm2 = g.clone().square().sum().into_scalar::<f32>() as f64;
        assert!(norm2 > 1e-4, "{name}: gradient too small to test ({norm2})");
        let eps = 1e-3 / norm2.sqrt();
        let shift = |sign: f64| {
            let g = g.clone();
            move |m: &mut ZambaModel| {
                let layer = if name == "q_proj" {
                    &mut m.shared.q_proj
                } else {
                    &mut m.shared.up_proj
                };
                layer.weight = Param::from_tensor(layer.weight.val() + g.clone() * (sign * eps));
            }
        };
        let fd = (loss_with(&plain, &tokens, shift(1.0)) - loss_with(&plain, &tokens, shift(-1.0)))
            / (2.0 * eps);
        let rel = (fd - norm2).abs() / norm2;
        assert!(
            rel < 1e-2,
            "{name}: finite difference {fd} vs autodiff {norm2} (relative error {rel})"
        );
    }
}

#[test]
fn module_tree_holds_the_shared_block_once() {
    for config in [tiny(), ZambaConfig::preset("zamba-bench").unwrap()] {
        let model =
            ZambaModel::from_source(&config, &mut RandomInit::new(0), &Device::flex()).unwrap();
        assert_eq!(model.num_params() as u64, ParamCounts::of(&config).total());
    }
}

#[test]
fn padding_row_gets_no_gradient_from_the_lookup() {
    let config = tiny();
    let device = Device::flex().autodiff();
    let model = ZambaModel::from_source(&config, &mut RandomInit::new(2), &device).unwrap();
    let pad = config.pad_token_id.unwrap() as i64;
    let tokens = Tensor::<2, Int>::from_data([[pad, 7, 9, pad, 11]], &device);
    // Hidden states only: the tied head would also (legitimately) reach the padding row.
    let grads = model.hidden_states(tokens).sum().backward();
    let g = model.embed_tokens.weight.val().grad(&grads).unwrap();
    let rows = |i: usize| g.clone().slice([i..i + 1]).abs().sum().into_scalar::<f32>();
    assert_eq!(rows(pad as usize), 0.0);
    assert!(rows(7) > 0.0 && rows(11) > 0.0);
}
