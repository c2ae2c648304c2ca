//! AdamW, the no-decay group, global-norm clipping and gradient accumulation against hand
//! computations.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use zamba_dist::SingleRank;
use zamba_model::{RandomInit, ZambaConfig, ZambaModel, cross_entropy, random_tokens};
use zamba_train::data_parallel::{DataParallel, Sharding};
use zamba_train::optim::{AdamW, AdamWParams, clip_factor, is_decayed};

#[derive(Module, Debug)]
struct Toy {
    linear: Linear,
    gamma: Param<Tensor<1>>,
}

fn toy(device: &Device) -> Toy {
    Toy {
        linear: Linear {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![1.0f32, -2.0, 0.5, 3.0], vec![2, 2]),
                device,
            )),
            bias: None,
        },
        gamma: Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![2.0f32, -1.0], vec![2]),
            device,
        )),
    }
}

/// loss = Σ (x·W) ⊙ gamma for x = [1, 1]: dL/dW[i][j] = gamma[j], dL/dgamma[j] = Σ_i W[i][j].
fn grads_of(model: &Toy, device: &Device) -> GradientsParams {
    let x = Tensor::<2>::ones([1, 2], device);
    let loss = (model.linear.forward(x) * model.gamma.val().unsqueeze::<2>()).sum();
    GradientsParams::from_grads(loss.backward(), model)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// The trainer's path on one rank: gradients per optimizer segment and the global norm.
fn reduced<M: Module>(model: &M, grads: GradientsParams) -> (DataParallel, Vec<Tensor<1>>, f64) {
    let dp = DataParallel::new(model, 1 << 20, Sharding::Replicated, 0, 1);
    let (grads, sum_squares) = dp
        .reduce_gradients(grads, &SingleRank, &Device::flex())
        .unwrap();
    let norm = (sum_squares.into_scalar::<f32>() as f64).sqrt();
    (dp, grads, norm)
}

/// One AdamW step of `model` through the data-parallel layer, as the trainer takes it.
fn adamw_step<M: Module>(
    model: M,
    grads: GradientsParams,
    opt: &mut AdamW,
    lr: f64,
    scale: f64,
) -> M {
    let (dp, grads, _) = reduced(&model, grads);
    dp.update(model, opt, grads, lr, scale, &SingleRank, &Device::flex())
        .unwrap()
}

#[test]
fn decay_groups_exclude_norms_biases_a_log_d_and_optionally_embeddings() {
    for path in [
        "layers.0.input_layernorm.gamma",
        "layers.3.mamba.conv_bias",
        "layers.3.mamba.dt_proj_bias",
        "layers.3.mamba.a_log",
        "layers.3.mamba.d_skip",
        "shared.q_proj.bias",
    ] {
        assert!(!is_decayed(path, true), "{path}");
    }
    for path in [
        "layers.3.mamba.in_proj.weight",
        "layers.3.mamba.x_proj_weight",
        "shared.q_proj.weight",
        "layers.2.hybrid_linear.weight",
    ] {
        assert!(is_decayed(path, false), "{path}");
    }
    assert!(is_decayed("embed_tokens.weight", true));
    assert!(!is_decayed("embed_tokens.weight", false));
}

#[test]
fn adamw_step_matches_the_formula_with_and_without_decay() {
    let device = Device::flex().autodiff();
    let model = toy(&device);
    let grads = grads_of(&model, &device);
    let p = AdamWParams {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        decay_embeddings: false,
    };
    let mut opt = AdamW::new(p);
    let (lr, scale) = (0.01, 0.5);
    let model = adamw_step(model, grads, &mut opt, lr, scale);
    // Step 1: m̂ = g, v̂ = g², so the update is lr·sign(g) (up to eps), plus decay on weights only.
    let expect = |theta: f64, g: f64, decay: f64| {
        let g = g * scale;
        let (m, v) = ((1.0 - p.beta1) * g, (1.0 - p.beta2) * g * g);
        let (mh, vh) = (m / (1.0 - p.beta1), v / (1.0 - p.beta2));
        theta * (1.0 - lr * decay) - lr * mh / (vh.sqrt() + p.eps)
    };
    let w = values(model.linear.weight.val());
    let w0 = [1.0, -2.0, 0.5, 3.0];
    let gamma = [2.0, -1.0];
    for (i, got) in w.iter().enumerate() {
        let want = expect(w0[i], gamma[i % 2], 0.1);
        assert!(
            (*got as f64 - want).abs() < 1e-6,
            "weight {i}: {got} vs {want}"
        );
    }
    let g = values(model.gamma.val());
    let g_grad = [1.0 + 0.5, -2.0 + 3.0];
    for (j, got) in g.iter().enumerate() {
        let want = expect(gamma[j], g_grad[j], 0.0); // "gamma": no decay
        assert!(
            (*got as f64 - want).abs() < 1e-6,
            "gamma {j}: {got} vs {want}"
        );
    }
    assert_eq!(opt.step, 1);
    assert_eq!(opt.moments.len(), 2);
}

#[test]
fn global_norm_and_clip_factor_match_a_hand_computation() {
    let device = Device::flex().autodiff();
    let model = toy(&device);
    let grads = grads_of(&model, &device);
    // dW = [[2, -1], [2, -1]], dgamma = [1.5, 1.0]
    let want = (4.0f64 + 1.0 + 4.0 + 1.0 + 2.25 + 1.0).sqrt();
    let (_, _, norm) = reduced(&model, grads);
    assert!((norm - want).abs() < 1e-6, "{norm} vs {want}");
    assert!((clip_factor(norm, 1.0) - 1.0 / (want + 1e-6)).abs() < 1e-12);
    assert_eq!(clip_factor(norm, 100.0), 1.0);
    assert_eq!(clip_factor(norm, 0.0), 1.0, "0 turns clipping off");
}

#[test]
fn two_micro_batches_of_b_equal_one_batch_of_2b() {
    let config = ZambaConfig::preset("zamba-tiny").unwrap();
    let device = Device::flex().autodiff();
    let model = ZambaModel::from_source(&config, &mut RandomInit::new(4), &device).unwrap();
    let tokens = random_tokens(9, config.vocab_size, [4, 17], &device);
    let rows = |a: usize, b: usize| tokens.clone().slice([a..b, 0..17]);
    let loss_of = |t: Tensor<2, Int>| {
        let [b, l] = t.dims();
        cross_entropy(
            model.forward(t.clone().slice([0..b, 0..l - 1])),
            t.slice([0..b, 1..l]),
        )
    };
    let whole = GradientsParams::from_grads(loss_of(rows(0, 4)).backward(), &model);
    let mut acc = GradientsAccumulator::new();
    for (a, b) in [(0, 2), (2, 4)] {
        acc.accumulate(
            &model,
            GradientsParams::from_grads((loss_of(rows(a, b)) / 2.0).backward(), &model),
        );
    }
    let split = acc.grads();
    let diff_sq: f64 = {
        let w = values(whole.get::<2>(model.shared.q_proj.weight.id).unwrap());
        let s = values(split.get::<2>(model.shared.q_proj.weight.id).unwrap());
        w.iter()
            .zip(&s)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum()
    };
    let (_, _, a) = reduced(&model, whole);
    let (_, _, b) = reduced(&model, split);
    assert!((b - a).abs() / a < 1e-5);
    assert!(
        diff_sq.sqrt() < 1e-6 * a.max(1.0),
        "q_proj gradients differ: {}",
        diff_sq.sqrt()
    );
}
