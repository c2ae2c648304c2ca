//! The whole model on a device: against Flex (fp32), against itself with per-layer recomputation,
//! in bf16 mixed precision against fp32, and against the logits transformers computed for a
//! fixture checkpoint. The model tests run these on every device of a build; `zamba-train
//! selftest` runs them on a new machine.
//!
//! Tolerances follow from the arithmetic of the device's products
//! ([`zamba_kernels::check::Arithmetic`]): f32 on the CPU backends, TF32 for f32 products on CUDA
//! tensor cores, bf16 for bf16 products everywhere.

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{DType, Device, Gradients, Int, Tensor, TensorData};
use zamba_kernels::check::{Arithmetic, Check, Comparisons};

use crate::{
    ActivationCheckpointing, Execution, Precision, RandomInit, ZambaConfig, ZambaModel, load_hf,
    next_token_loss, random_tokens,
};

/// The fixture the bf16 and transformers checks read (written by scripts/make_hf_fixture.py):
/// `config.json`, `model.safetensors`, `tokens.json`, `expected.json`.
pub const FIXTURE: &str = "zamba-tiny-h2";

/// Loss, logits and every parameter's gradient (by visiting order), gradients as f32 with the
/// dtype they came in.
pub struct ModelRun {
    pub loss: f64,
    pub logits: Vec<f32>,
    pub grads: Vec<(DType, Vec<f32>)>,
}

struct CollectGrads<'a> {
    grads: &'a Gradients,
    out: Vec<(DType, Vec<f32>)>,
}

impl ModuleVisitor for CollectGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let values = param.val().grad(self.grads).map(|grad| {
            let dtype = grad.dtype();
            let values = grad.cast(DType::F32).into_data().try_to_vec::<f32>();
            (dtype, values.expect("f32 values"))
        });
        // A parameter without a gradient shows as an empty vector, which no comparison passes.
        self.out.push(values.unwrap_or((DType::F32, Vec::new())));
    }
}

/// One forward and backward of `model` (on an autodiff device) with `execution`.
pub fn run(model: &ZambaModel, execution: Execution, tokens: &Tensor<2, Int>) -> ModelRun {
    let model = model.clone().with_execution(execution);
    let logits = model.forward(tokens.clone());
    let loss = next_token_loss(logits.clone(), tokens.clone());
    let grads = loss.backward();
    let mut collect = CollectGrads {
        grads: &grads,
        out: Vec::new(),
    };
    model.visit(&mut collect);
    ModelRun {
        loss: loss.into_scalar::<f32>() as f64,
        logits: logits
            .inner()
            .cast(DType::F32)
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32 logits"),
        grads: collect.out,
    }
}

pub const FP32: Execution = Execution {
    precision: Precision::Fp32,
    checkpointing: ActivationCheckpointing::None,
};

/// The `zamba-tiny` preset with random weights (seed 5) on the autodiff version of `device`.
pub fn tiny_on(device: &Device) -> ZambaModel {
    let config = ZambaConfig::preset("zamba-tiny").expect("the zamba-tiny preset");
    ZambaModel::from_source(&config, &mut RandomInit::new(5), &device.clone().autodiff())
        .expect("the preset builds")
}

/// Compares loss (absolute, in nats), logits and gradients (relative) of `got` with `want`.
fn compare_runs(
    c: &mut Comparisons,
    what: &str,
    got: &ModelRun,
    want: &ModelRun,
    [loss_tol, logits_tol, grads_tol]: [f64; 3],
) {
    c.require((got.loss - want.loss).abs() <= loss_tol, || {
        format!(
            "{what}: loss {} vs {} (tolerance {loss_tol:.0e} nats)",
            got.loss, want.loss
        )
    });
    c.close(
        format!("{what} logits"),
        &got.logits,
        &want.logits,
        logits_tol,
    );
    c.require(got.grads.len() == want.grads.len(), || {
        format!("{what}: parameter counts differ")
    });
    for (i, ((_, g), (_, w))) in got.grads.iter().zip(&want.grads).enumerate() {
        c.require(g.len() == w.len(), || {
            format!("{what}: parameter {i} has no gradient or another size")
        });
        if g.len() == w.len() {
            c.close(format!("{what} grad {i}"), g, w, grads_tol);
        }
    }
}

/// Every model check on `device`; `fixtures` is the folder holding [`FIXTURE`] (the bf16 and
/// transformers checks are reported as failed when it is missing).
pub fn model_checks(device: &Device, fixtures: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    if *device != Device::flex() {
        checks.push(Check::run("model fp32 vs Flex (zamba-tiny)", || {
            matches_flex(device)
        }));
    }
    checks.push(Check::run("model layer recomputation", || {
        recomputation(device)
    }));
    checks.push(Check::run("model vs transformers logits (fixture)", || {
        transformers_logits(device, &fixtures.join(FIXTURE))
    }));
    if device.supports_dtype(DType::BF16) {
        checks.push(Check::run("model bf16 vs fp32 (fixture)", || {
            bf16_close_to_fp32(device, &fixtures.join(FIXTURE))
        }));
    }
    checks
}

/// A whole forward and backward equals Flex's. Tolerances: with f32 products both sides differ
/// only in summation order (loss 1e-5 relative, logits and gradients 1e-4); with TF32 products
/// an eighth of what bf16 needs ([`Arithmetic::tolerance`]: the loss 0.02 nats, logits and
/// gradients 0.1, as [`bf16_close_to_fp32`]).
fn matches_flex(device: &Device) -> Result<String, String> {
    let flex = Device::flex().autodiff();
    let want = run(
        &tiny_on(&flex),
        FP32,
        &random_tokens(0, 512, [2, 21], &flex),
    );
    let ad = device.clone().autodiff();
    let got = run(&tiny_on(device), FP32, &random_tokens(0, 512, [2, 21], &ad));
    let arithmetic = Arithmetic::of(device, DType::F32);
    let tolerances = [
        arithmetic.tolerance(1e-5 * want.loss.abs(), 0.02),
        arithmetic.tolerance(1e-4, 0.1),
        arithmetic.tolerance(1e-4, 0.1),
    ];
    let mut c = Comparisons::new();
    compare_runs(&mut c, &format!("{arithmetic}"), &got, &want, tolerances);
    c.outcome()
}

/// Recomputing each layer in the backward gives the same loss and logits bit for bit (the same
/// ops on the same values) and the same gradients up to the order in which the backward sums the
/// shared block's contributions (1e-5 relative in f32).
fn recomputation(device: &Device) -> Result<String, String> {
    let ad = device.clone().autodiff();
    let model = tiny_on(device);
    let tokens = random_tokens(0, 512, [2, 19], &ad);
    let kept = run(&model, FP32, &tokens);
    let layers = Execution {
        checkpointing: ActivationCheckpointing::Layers,
        ..FP32
    };
    let recomputed = run(&model, layers, &tokens);
    let mut c = Comparisons::new();
    c.require(recomputed.loss == kept.loss, || {
        format!("loss {} vs {}", recomputed.loss, kept.loss)
    });
    c.require(recomputed.logits == kept.logits, || "logits differ".into());
    compare_runs(&mut c, "recomputed", &recomputed, &kept, [0.0, 0.0, 1e-5]);
    c.outcome()
}

/// The fixture's tokens and a model loaded from it on the autodiff version of `device`.
fn fixture_on(dir: &Path, device: &Device) -> Result<(Vec<i64>, ZambaModel), String> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map_err(|e| format!("reading {}: {e}", dir.join(name).display()))
    };
    let ids: Vec<i64> = serde_json::from_str(&read("tokens.json")?)
        .map_err(|e| format!("{}/tokens.json: {e}", dir.display()))?;
    let (_, model) = load_hf(dir, &device.clone().autodiff()).map_err(|e| e.to_string())?;
    Ok((ids, model))
}

/// Logits and loss of the fixture equal those transformers computed (`expected.json`): within
/// 1e-4 absolute on the logits and 1e-5 on the loss with f32 products (as the CPU parity tests),
/// an eighth of bf16's 0.1 / 0.02 with TF32 ([`Arithmetic::tolerance`]).
fn transformers_logits(device: &Device, dir: &Path) -> Result<String, String> {
    let (ids, model) = fixture_on(dir, device)?;
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("expected.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let want: Vec<Vec<f32>> =
        serde_json::from_value(expected["logits"].clone()).map_err(|e| e.to_string())?;
    let want_loss = expected["loss"]
        .as_f64()
        .ok_or("expected.json has no loss")?;
    let n = ids.len();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device.clone());
    let model = model.valid();
    let logits = model.forward(input.clone());
    let loss = next_token_loss(logits.clone(), input).into_scalar::<f32>() as f64;
    let got = logits
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| format!("{e:?}"))?;
    let want: Vec<f32> = want.into_iter().flatten().collect();
    let arithmetic = Arithmetic::of(device, DType::F32);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let mut c = Comparisons::new();
    // Absolute 1e-4 on the logits, expressed relative to their largest value.
    c.close(
        "logits",
        &got,
        &want,
        arithmetic.tolerance(1e-4 / scale.max(1e-30), 0.1),
    );
    let loss_tol = arithmetic.tolerance(1e-5, 0.02);
    c.require((loss - want_loss).abs() <= loss_tol, || {
        format!("loss {loss} vs transformers {want_loss} (tolerance {loss_tol:.0e})")
    });
    c.outcome()
}

/// bf16 mixed precision on the fixture (three uses of the shared block): the loss within 0.02
/// nats of fp32's, the gradients in f32 (the master weights' type) and within 0.1 (relative to
/// the largest) of fp32's — bf16 keeps 8 significant bits, and the error of ~10 chained products
/// and their backward reaches a few percent — with and without recomputation, which agree bit for
/// bit. The fp32 side runs on the same device.
fn bf16_close_to_fp32(device: &Device, dir: &Path) -> Result<String, String> {
    let (ids, model) = fixture_on(dir, device)?;
    let n = ids.len();
    let ad = device.clone().autodiff();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &ad);
    let fp32 = run(&model, FP32, &input);
    let mut c = Comparisons::new();
    let mut losses = Vec::new();
    for checkpointing in [
        ActivationCheckpointing::None,
        ActivationCheckpointing::Layers,
    ] {
        let execution = Execution {
            precision: Precision::Bf16,
            checkpointing,
        };
        let bf16 = run(&model, execution, &input);
        let what = format!("bf16 {checkpointing}");
        c.require(bf16.loss != fp32.loss, || {
            format!("{what}: loss equals fp32's exactly; bf16 must actually round")
        });
        c.require(bf16.grads.iter().all(|(d, _)| *d == DType::F32), || {
            format!("{what}: gradients must reach the f32 master weights in f32")
        });
        let logits_tol = f64::INFINITY; // the loss bounds them; bf16 logits are not compared alone
        compare_runs(&mut c, &what, &bf16, &fp32, [0.02, logits_tol, 0.1]);
        losses.push(bf16.loss);
    }
    c.require(losses[0] == losses[1], || {
        format!(
            "bf16 loss with recomputation {} differs from without {}",
            losses[1], losses[0]
        )
    });
    c.outcome()
        .map(|detail| format!("loss {:.5} vs fp32 {:.5}; {detail}", losses[0], fp32.loss))
}
