use super::*;
use zamba_model::params::FlopsPerToken;

fn workload(
    config: &ZambaConfig,
    precision: Precision,
    checkpointing: ActivationCheckpointing,
) -> Workload<'_> {
    Workload {
        config,
        batch: 2,
        seq_len: 8,
        micro_batches: 1,
        precision,
        checkpointing,
    }
}

fn tiny() -> ZambaConfig {
    ZambaConfig::preset("zamba-tiny").unwrap()
}

fn cost(w: &Workload, kernels: Kernels, class: OpClass) -> OpCost {
    ops::count(w, kernels)
        .into_iter()
        .find(|o| o.class == class)
        .unwrap_or_else(|| panic!("no {class:?}"))
}

const BF16_LAYERS: (Precision, ActivationCheckpointing) =
    (Precision::Bf16, ActivationCheckpointing::Layers);

#[test]
fn the_classes_model_flops_sum_to_flops_per_token() {
    for preset in ["zamba-tiny", "zamba-1b", "zamba-7b"] {
        let c = ZambaConfig::preset(preset).unwrap();
        for (precision, checkpointing) in [
            BF16_LAYERS,
            (Precision::Fp32, ActivationCheckpointing::None),
        ] {
            for kernels in [Kernels::Planned, Kernels::Current] {
                let w = Workload {
                    seq_len: 4096,
                    ..workload(&c, precision, checkpointing)
                };
                let sum: f64 = ops::count(&w, kernels).iter().map(|o| o.model_flops).sum();
                let expected = FlopsPerToken::of(&c, 4096).train() * 2.0 * 4096.0;
                assert!(
                    (sum / expected - 1.0).abs() < 1e-12,
                    "{preset} {kernels}: {sum} vs {expected}"
                );
            }
        }
    }
}

/// zamba-tiny's LM head, by hand: `[16, 64] · [64, 512]` (tokens 2 × 8, hidden 64, vocabulary
/// 512), outside the recomputed blocks.
#[test]
fn a_gemms_flops_and_bytes_by_hand() {
    let c = tiny();
    let w = workload(&c, BF16_LAYERS.0, BF16_LAYERS.1);
    let head = cost(&w, Kernels::Planned, OpClass::GemmHead);
    let forward = 2.0 * 16.0 * 64.0 * 512.0;
    assert_eq!(head.model_flops, 3.0 * forward);
    assert_eq!(head.flops, 3.0 * forward);
    let (x, y, weight) = (16.0 * 64.0, 16.0 * 512.0, 64.0 * 512.0);
    // Forward: X, W (the bf16 copy), Y in bf16. Backward: dY, W, dX; X, dY in bf16, dW in f32.
    let bytes = 2.0 * (x + weight + y) + 2.0 * (y + weight + x) + 2.0 * (x + y) + 4.0 * weight;
    assert_eq!(head.bytes, bytes);
    assert_eq!(head.launches, 3.0);
    // fp32: every operand 4 bytes; no recomputation either way for the head.
    let w32 = workload(&c, Precision::Fp32, ActivationCheckpointing::None);
    let head32 = cost(&w32, Kernels::Planned, OpClass::GemmHead);
    assert_eq!(head32.bytes, 4.0 * (3.0 * x + 3.0 * y + 3.0 * weight));
    assert_eq!(head32.flops, head.flops);

    // in_proj, per layer [16, 64] · [64, 256] (d_inner 128, x and z), 6 layers, recomputed.
    let in_proj = cost(&w, Kernels::Planned, OpClass::GemmInProj);
    let forward = 6.0 * 2.0 * 16.0 * 64.0 * 256.0;
    assert_eq!(in_proj.model_flops, 3.0 * forward);
    assert_eq!(
        in_proj.flops,
        4.0 * forward,
        "two forwards and the backward"
    );
    assert_eq!(in_proj.launches, 6.0 * (2.0 * 2.0 + 2.0 * 2.0));
    // x_proj: two heads of [16, 64] · [64, 4 + 32] (dt rank 4, state 16).
    let x_proj = cost(&w, Kernels::Planned, OpClass::GemmXProj);
    assert_eq!(
        x_proj.model_flops,
        3.0 * 6.0 * 2.0 * 16.0 * 2.0 * 64.0 * 36.0
    );
}

/// Today's fused RMSNorm, GELU gate and conv on zamba-tiny (T = 16 tokens from 2 × 8, d = 64,
/// d_inner 128, I = 256, 4 taps, 6 layers, 2 uses of the shared block), bf16 with recomputation
/// (two forwards), by hand.
#[test]
fn the_fused_norm_gelu_gate_and_conv_by_hand() {
    let c = tiny();
    let w = workload(&c, BF16_LAYERS.0, BF16_LAYERS.1);
    let norm = cost(&w, Kernels::Current, OpClass::RmsNorm);
    // Per norm of width d in f32: x read and y written per forward (8 · T · d), x and dy read and
    // dx written backward (12 · T · d), and the dγ sums of 16 blocks of one row written and read
    // (8 · 16 · d). Widths: 6 layers of d, per use 2d and d, the final norm (one forward).
    let td = 16.0 * 64.0;
    let blocks = 8.0 * 16.0 * 64.0;
    let tensors = 12.0 * (28.0 * td + blocks) + 20.0 * td + blocks;
    // One f32 per row, written per forward and read backward: 10 norms recomputed, the final one.
    let stats = 10.0 * 3.0 * 4.0 * 16.0 + 2.0 * 4.0 * 16.0;
    // The two hybrid layers' norms read `t` in both forwards and the backward.
    let addend = 2.0 * 3.0 * 4.0 * td;
    assert_eq!(norm.bytes, tensors + stats + addend);
    assert_eq!(norm.launches, 10.0 * (2.0 + 2.0) + 3.0);
    // The planned kernel's launches (it also fuses the residual add).
    assert_eq!(
        norm.launches,
        cost(&w, Kernels::Planned, OpClass::RmsNorm).launches
    );
    // The GELU gate per use: gate, up read and the product written per forward; gate, up, dout
    // read and two gradients written backward, [16, 256] in bf16; the planned kernel already.
    let gate = cost(&w, Kernels::Current, OpClass::GeluGate);
    assert_eq!(gate.bytes, 2.0 * (2.0 * 3.0 + 5.0) * 16.0 * 256.0 * 2.0);
    assert_eq!(gate.launches, 2.0 * 3.0);
    assert_eq!(gate, cost(&w, Kernels::Planned, OpClass::GeluGate));
    // The conv per layer: x read and the output written per forward, x and dout read and dx
    // written backward ([2, 128, 8] in bf16), and the 5 f32 sums of each of 2 · 128 lanes' one
    // chunk written and read; a forward, the backward and the sum.
    let conv = cost(&w, Kernels::Current, OpClass::CausalConv);
    let volume = 2.0 * 128.0 * 8.0 * 2.0;
    assert_eq!(
        conv.bytes,
        6.0 * ((2.0 * 2.0 + 3.0) * volume + 2.0 * 4.0 * 5.0 * 256.0)
    );
    assert_eq!(conv.launches, 6.0 * (2.0 + 2.0));
    assert_eq!(
        conv.launches,
        cost(&w, Kernels::Planned, OpClass::CausalConv).launches
    );
}

/// The scan's bytes are the kernels' accounting: zamba-tiny has `B·D·L` = 2 · 128 · 8 = 2048
/// activation elements per input, `B·G·L·N` = 2 · 2 · 8 · 16 = 512 per B and C, and 128 · 16 + 2
/// · 128 = 2304 f32 parameters; one 2048-step chunk holds all 8 steps (no checkpoints).
#[test]
fn the_scans_bytes_by_hand() {
    let c = tiny();
    let w = workload(&c, BF16_LAYERS.0, BF16_LAYERS.1);
    let (rows, bc, params) = (2048.0, 512.0, 2304.0);
    let forward = 2.0 * (4.0 * rows + 2.0 * bc) + 4.0 * params;
    let backward = 2.0 * (7.0 * rows + 4.0 * bc) + 4.0 * 2.0 * params;
    let f = cost(&w, Kernels::Planned, OpClass::ScanForward);
    let b = cost(&w, Kernels::Planned, OpClass::ScanBackward);
    assert_eq!(f.bytes, 6.0 * 2.0 * forward, "6 layers, two forwards each");
    assert_eq!(b.bytes, 6.0 * backward);
    assert_eq!(b.model_flops, 2.0 * f.model_flops);
    // The Cube kernel's 64-step chunks leave no checkpoint at 8 steps either; its forward runs
    // a cube per lane. Its backward runs a cube per 16 channels of a group (64 per group: 4
    // cubes), each writing an f32 partial of dB and dC that its sums read back.
    // Its forward composes each unit's steps into maps before walking them: 6 FLOPs more per
    // (lane, step, state) element, B·D·L·N = 2048 · 16; its backward composes those maps and the
    // adjoint's: 12 more.
    let current = cost(&w, Kernels::Current, OpClass::ScanForward);
    assert_eq!(current.bytes, f.bytes);
    assert_eq!(current.flops - f.flops, 6.0 * 2.0 * 6.0 * 2048.0 * 16.0);
    assert_eq!(current.blocks, Some(256.0));
    let current = cost(&w, Kernels::Current, OpClass::ScanBackward);
    let partials = 2.0 * 2.0 * 4.0 * 8.0 * 16.0; // B·G·cubes per group·L·N
    assert_eq!(current.bytes, 6.0 * (backward + 2.0 * 2.0 * 4.0 * partials));
    assert_eq!(current.flops - b.flops, 6.0 * 12.0 * 2048.0 * 16.0);
    assert_eq!(current.blocks, Some(16.0), "B·G·4 cubes");
}

#[test]
fn recomputation_adds_one_forward_of_the_blocks_and_nothing_to_the_model_flops() {
    let c = tiny();
    let with = workload(&c, Precision::Bf16, ActivationCheckpointing::Layers);
    let without = workload(&c, Precision::Bf16, ActivationCheckpointing::None);
    for class in [OpClass::GemmOutProj, OpClass::GemmDown] {
        let (a, b) = (
            cost(&with, Kernels::Planned, class),
            cost(&without, Kernels::Planned, class),
        );
        assert_eq!(a.model_flops, b.model_flops);
        assert_eq!(a.flops - b.flops, a.model_flops / 3.0, "{class:?}");
        assert!(a.bytes > b.bytes);
    }
    let (a, b) = (
        cost(&with, Kernels::Planned, OpClass::GemmHead),
        cost(&without, Kernels::Planned, OpClass::GemmHead),
    );
    assert_eq!(
        (a.flops, a.bytes),
        (b.flops, b.bytes),
        "the head is not recomputed"
    );
}

#[test]
fn the_roofline_takes_the_slower_ceiling_plus_the_launches() {
    let c = tiny();
    let w = workload(&c, Precision::Bf16, ActivationCheckpointing::None);
    let card = Card {
        id: "test",
        smi_part: "test",
        bf16_tflops: 1e-3, // 1 GFLOP/s
        f32_tflops: 1e-3,
        hbm_tbs: 1e-3, // 1 GB/s
        sms: 64,
    };
    let f = Fractions::of(Kernels::Planned);
    let p = predict(&w, card, Kernels::Planned, f);
    let head = p
        .ops
        .iter()
        .find(|o| o.cost.class == OpClass::GemmHead)
        .unwrap();
    let compute = head.cost.flops / (1e9 * f.gemm);
    let memory = head.cost.bytes / (1e9 * f.memory);
    let expected = compute.max(memory) + 3.0 * f.launch_us * 1e-6;
    assert!((head.seconds / expected - 1.0).abs() < 1e-12);
    assert_eq!(head.bound, Bound::Compute, "{compute} vs {memory}");
    let step: f64 = p.ops.iter().map(|o| o.seconds).sum();
    assert_eq!(p.step_seconds(), step);
    assert!((p.tokens_per_second() - 16.0 / step).abs() < 1e-9);
    assert!((p.mfu() - w.model_flops() / step / 1e9).abs() < 1e-12);
    // The current scan backward's 16 cubes (B·G = 4, 4 per group) use a quarter of the 64 SMs.
    let current = predict(&w, card, Kernels::Current, Fractions::of(Kernels::Current));
    let scan = current
        .ops
        .iter()
        .find(|o| o.cost.class == OpClass::ScanBackward)
        .unwrap();
    let fc = current.fractions;
    let expected = (scan.cost.flops / (1e9 * fc.vector * 0.25))
        .max(scan.cost.bytes / (1e9 * fc.scan_memory * 0.25))
        + scan.cost.launches * fc.launch_us * 1e-6;
    assert!((scan.seconds / expected - 1.0).abs() < 1e-12);
}

#[test]
fn current_kernels_cast_weights_in_bf16_only_and_move_more_bytes() {
    let c = ZambaConfig::preset("zamba-1b").unwrap();
    let bf16 = Workload {
        batch: 1,
        seq_len: 4096,
        ..workload(&c, BF16_LAYERS.0, BF16_LAYERS.1)
    };
    let fp32 = Workload {
        precision: Precision::Fp32,
        ..bf16
    };
    let has_casts = |w: &Workload, k| {
        let ops = ops::count(w, k);
        ops.iter().any(|o| o.class == OpClass::WeightCasts)
    };
    assert!(has_casts(&bf16, Kernels::Current));
    assert!(!has_casts(&fp32, Kernels::Current));
    assert!(!has_casts(&bf16, Kernels::Planned));
    // The weights are bf16 already; each weight gradient is cast to f32 once: 6 bytes per
    // element (read bf16, write f32) for every weight of the products.
    let casts = cost(&bf16, Kernels::Current, OpClass::WeightCasts);
    let params = zamba_model::params::ParamCounts::of(&c);
    assert!(casts.bytes >= 6.0 * (params.embedding + params.shared_block) as f64);
    assert!(casts.bytes <= 6.0 * params.total() as f64);
    let card = "h100-sxm".parse::<Card>().unwrap();
    let planned = predict(
        &bf16,
        card,
        Kernels::Planned,
        Fractions::of(Kernels::Planned),
    );
    let current = predict(
        &bf16,
        card,
        Kernels::Current,
        Fractions::of(Kernels::Current),
    );
    assert!(
        current.group_seconds(Group::Attention) > 2.0 * planned.group_seconds(Group::Attention)
    );
    // The loss and AdamW are fused kernels already, the loss with a launch more than planned,
    // AdamW one launch per tensor rather than per bucket: slower than planned.
    for group in [Group::Loss, Group::Optimizer] {
        assert!(
            current.group_seconds(group) > planned.group_seconds(group),
            "{group:?}"
        );
    }
    assert!(planned.mfu() > current.mfu() && planned.mfu() < 1.0);
    // The Cube kernels keep no scores (traffic within 2× of the planned flash kernel's, not one
    // bf16 [1, 16, 4096, 4096] volume per use and pass), and their products, more of them than
    // flash attention's for the second recomputation in the backward, run on the tensor cores
    // in bf16 (head dimension 256, a multiple of 16: the tile kernels).
    let attention = cost(&bf16, Kernels::Current, OpClass::Attention);
    let flash = cost(&bf16, Kernels::Planned, OpClass::Attention);
    assert!(attention.bytes < 2.0 * flash.bytes);
    assert!(attention.flops > flash.flops);
    // The fused RMSNorm on f32 moves less than the planned one, which also reads and writes the
    // residual stream for the add it fuses, and more than half as much (its blocks' dγ sums are
    // a few percent at 4,096 rows).
    let norm = cost(&bf16, Kernels::Current, OpClass::RmsNorm);
    let planned_norm = cost(&bf16, Kernels::Planned, OpClass::RmsNorm);
    assert!(norm.bytes < planned_norm.bytes && norm.bytes > 0.5 * planned_norm.bytes);
    assert_eq!(
        (attention.rate, flash.rate),
        (Rate::Attention, Rate::Attention)
    );
    // In f32 the row kernels run: scalar products on the CUDA cores.
    let f32_attention = cost(&fp32, Kernels::Current, OpClass::Attention);
    assert_eq!(f32_attention.rate, Rate::Vector);
}

/// Today's fused cross-entropy and AdamW on zamba-tiny in bf16, by hand.
#[test]
fn the_fused_loss_and_adamw_by_hand() {
    let c = tiny();
    let w = workload(&c, BF16_LAYERS.0, BF16_LAYERS.1);
    let (t, v) = (16.0, c.vocab_size as f64);
    // The bf16 logits read forward, read and their gradient written backward; per row the
    // target (three reads), lse (written, read) and the row loss (written, read); three launches.
    let loss = cost(&w, Kernels::Current, OpClass::CrossEntropy);
    assert_eq!(loss.bytes, 3.0 * 2.0 * t * v + 28.0 * t);
    assert_eq!(loss.launches, 3.0);
    // Per parameter: θ, g, m, v read and θ, m, v written in f32 (28 bytes) and the bf16 copy
    // written (2) in one launch per tensor.
    let adamw = cost(&w, Kernels::Current, OpClass::Optimizer);
    let params = zamba_model::params::ParamCounts::of(&c).total() as f64;
    let tensors = zamba_model::param_table::param_table(&c).len() as f64;
    assert_eq!(adamw.bytes, 30.0 * params);
    assert_eq!(adamw.launches, tensors);
    let fp32 = cost(
        &Workload {
            precision: Precision::Fp32,
            ..w
        },
        Kernels::Current,
        OpClass::Optimizer,
    );
    assert_eq!((fp32.bytes, fp32.launches), (28.0 * params, tensors));
}

#[test]
fn fractions_take_overrides_and_refuse_bad_ones() {
    let f = Fractions::of(Kernels::Planned)
        .with_overrides("gemm=0.6, launch_us=0")
        .unwrap();
    assert_eq!((f.gemm, f.launch_us), (0.6, 0.0));
    assert_eq!(f.memory, Fractions::of(Kernels::Planned).memory);
    let err = |spec| {
        Fractions::of(Kernels::Planned)
            .with_overrides(spec)
            .unwrap_err()
    };
    assert!(err("gemm").contains("not name=value"));
    assert!(err("gemm=fast").contains("not a number"));
    assert!(err("gemm=1.5").contains("out of range"));
    assert!(err("memory=0").contains("out of range"));
    assert!(err("flops=0.5").contains("unknown name \"flops\""));
    assert!(
        "fused"
            .parse::<Kernels>()
            .unwrap_err()
            .contains("\"planned\"")
    );
}

#[test]
fn every_trace_category_has_a_group_and_every_class_a_traced_group() {
    use zamba_trace::Category;
    assert_eq!(Group::of_category(Category::Gemm), Group::Gemm);
    assert_eq!(Group::of_category(Category::Scan), Group::Scan);
    assert_eq!(Group::of_category(Category::Loss), Group::Loss);
    assert_eq!(Group::of_category(Category::Recompute), Group::Other);
    assert_eq!(Group::of_category(Category::Layer), Group::Other);
    let c = tiny();
    let w = workload(&c, BF16_LAYERS.0, BF16_LAYERS.1);
    let p = predict(
        &w,
        "h100-sxm".parse().unwrap(),
        Kernels::Current,
        Fractions::of(Kernels::Current),
    );
    let by_group: f64 = Group::ALL.iter().map(|g| p.group_seconds(*g)).sum();
    assert!((by_group / p.step_seconds() - 1.0).abs() < 1e-12);
}

#[test]
fn micro_batches_repeat_the_passes_and_share_one_update() {
    let c = tiny();
    let one = workload(&c, BF16_LAYERS.0, BF16_LAYERS.1);
    let four = Workload {
        micro_batches: 4,
        ..one
    };
    for class in [OpClass::GemmInProj, OpClass::ScanBackward, OpClass::RmsNorm] {
        let (a, b) = (
            cost(&one, Kernels::Planned, class),
            cost(&four, Kernels::Planned, class),
        );
        assert_eq!(
            (
                4.0 * a.model_flops,
                4.0 * a.flops,
                4.0 * a.bytes,
                4.0 * a.launches
            ),
            (b.model_flops, b.flops, b.bytes, b.launches),
            "{class:?}"
        );
    }
    let optimizer = |w: &Workload| cost(w, Kernels::Planned, OpClass::Optimizer);
    assert_eq!(optimizer(&one), optimizer(&four));
    let params = zamba_model::params::ParamCounts::of(&c).total() as f64;
    let sums = cost(&four, Kernels::Planned, OpClass::GradientAccumulation);
    assert_eq!(
        sums.bytes,
        3.0 * 4.0 * params,
        "three more f32 reads of every gradient"
    );
    assert!(
        ops::count(&one, Kernels::Planned)
            .iter()
            .all(|o| o.class != OpClass::GradientAccumulation)
    );
    assert_eq!(four.model_flops(), 4.0 * one.model_flops());
}
