//! The one table of parameters. Every parameter of [`crate::ZambaModel`] is declared here once —
//! its Burn module path, its transformers state-dict name, its shape in transformers' layout, its
//! initialisation, the layout change between transformers and this model, and its weight-decay
//! group — and everything else is derived from these declarations:
//! - building the model from a checkpoint or a random init ([`crate::model`]'s `build` functions
//!   ask for parameters by module path),
//! - export under transformers' names ([`crate::hf::export_hf_tensors`]),
//! - the optimizer's decay groups ([`decay_group`]).

use crate::config::{LayerKind, ZambaConfig};
use crate::weights::{HostTensor, Init};

/// How a tensor's layout differs between transformers and this model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Stored as is.
    Same,
    /// PyTorch `Linear` `[out, in]` ↔ Burn `Linear` `[in, out]`.
    Transpose,
    /// `in_proj`: transformers' rows interleave x and z (`x_c` = row 2c, `z_c` = row 2c+1); ours
    /// are the columns `[x_0..x_{D-1} | z_0..z_{D-1}]` of a Burn `[d, 2D]` Linear weight.
    InProjSplitXz,
    /// The depthwise conv weight: transformers `[D, 1, K]` ↔ ours `[D, K]`.
    DropConvChannelAxis,
}

/// Weight-decay group of a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecayGroup {
    /// Matrices: decayed.
    Decay,
    /// Norm gains, biases, `A_log`, `D`: never decayed.
    NoDecay,
    /// The (tied) embedding: decayed only when the run asks for it.
    Embedding,
}

/// One parameter, relative to its component.
#[derive(Clone, Copy)]
pub struct Decl {
    /// Burn module path below the component, e.g. `in_proj.weight`.
    pub path: &'static str,
    /// transformers name below the component's prefix, e.g. `in_proj.weight`.
    pub hf_name: &'static str,
    /// Shape in transformers' layout.
    pub hf_shape: fn(&ZambaConfig) -> Vec<usize>,
    pub init: fn(&ZambaConfig) -> Init,
    pub layout: Layout,
    pub decay: DecayGroup,
}

fn normal(c: &ZambaConfig) -> Init {
    Init::Normal {
        std: c.initializer_range,
    }
}
fn ones(_: &ZambaConfig) -> Init {
    Init::Ones
}
fn zeros(_: &ZambaConfig) -> Init {
    Init::Zeros
}

const fn matrix(
    path: &'static str,
    hf_name: &'static str,
    hf_shape: fn(&ZambaConfig) -> Vec<usize>,
) -> Decl {
    Decl {
        path,
        hf_name,
        hf_shape,
        init: normal,
        layout: Layout::Transpose,
        decay: DecayGroup::Decay,
    }
}

const fn norm(
    path: &'static str,
    hf_name: &'static str,
    width: fn(&ZambaConfig) -> Vec<usize>,
) -> Decl {
    Decl {
        path,
        hf_name,
        hf_shape: width,
        init: ones,
        layout: Layout::Same,
        decay: DecayGroup::NoDecay,
    }
}

/// Parameters that exist once per model (module path prefix: none; transformers: `model.`).
pub const MODEL: &[Decl] = &[
    Decl {
        path: "embed_tokens.weight",
        hf_name: "embed_tokens.weight",
        hf_shape: |c| vec![c.vocab_size, c.hidden_size],
        init: |c| Init::Embedding {
            std: c.initializer_range,
            padding_idx: c.pad_token_id,
        },
        layout: Layout::Same,
        decay: DecayGroup::Embedding,
    },
    norm("final_layernorm.gamma", "final_layernorm.weight", |c| {
        vec![c.hidden_size]
    }),
];

/// The pre-Mamba norm of every layer (`layers.{i}.`; transformers `model.layers.{i}.` or, for
/// hybrid layers, `model.layers.{i}.mamba_decoder.`).
pub const LAYER: &[Decl] = &[norm(
    "input_layernorm.gamma",
    "input_layernorm.weight",
    |c| vec![c.hidden_size],
)];

/// The per-invocation projection of a hybrid layer (`layers.{i}.`; transformers `model.layers.{i}.`).
pub const HYBRID: &[Decl] = &[matrix("hybrid_linear.weight", "linear.weight", |c| {
    vec![c.hidden_size, c.hidden_size]
})];

/// One Mamba mixer (`layers.{i}.mamba.`; transformers `model.layers.{i}.mamba.` or
/// `model.layers.{i}.mamba_decoder.mamba.`).
pub const MAMBA: &[Decl] = &[
    Decl {
        path: "in_proj.weight",
        hf_name: "in_proj.weight",
        hf_shape: |c| vec![2 * c.d_inner(), c.hidden_size],
        init: normal,
        layout: Layout::InProjSplitXz,
        decay: DecayGroup::Decay,
    },
    Decl {
        path: "conv_weight",
        hf_name: "conv1d.weight",
        hf_shape: |c| vec![c.d_inner(), 1, c.mamba_d_conv],
        init: normal,
        layout: Layout::DropConvChannelAxis,
        decay: DecayGroup::Decay,
    },
    Decl {
        path: "conv_bias",
        hf_name: "conv1d.bias",
        hf_shape: |c| vec![c.d_inner()],
        init: zeros,
        layout: Layout::Same,
        decay: DecayGroup::NoDecay,
    },
    Decl {
        path: "x_proj_weight",
        hf_name: "x_proj_weight",
        hf_shape: |c| {
            vec![
                c.n_mamba_heads,
                c.dt_rank() + 2 * c.mamba_d_state,
                c.mamba_head_dim(),
            ]
        },
        init: normal,
        layout: Layout::Same,
        decay: DecayGroup::Decay,
    },
    Decl {
        path: "dt_proj_weight",
        hf_name: "dt_proj_weight",
        hf_shape: |c| vec![c.n_mamba_heads, c.mamba_head_dim(), c.dt_rank()],
        init: |c| Init::Uniform {
            bound: (c.dt_rank() as f64).powf(-0.5),
        },
        layout: Layout::Same,
        decay: DecayGroup::Decay,
    },
    Decl {
        path: "dt_proj_bias",
        hf_name: "dt_proj_bias",
        hf_shape: |c| vec![c.n_mamba_heads, c.mamba_head_dim()],
        init: |c| Init::DtBias {
            min: c.time_step_min,
            max: c.time_step_max,
            floor: c.time_step_floor,
        },
        layout: Layout::Same,
        decay: DecayGroup::NoDecay,
    },
    Decl {
        path: "a_log",
        hf_name: "A_log",
        hf_shape: |c| vec![c.n_mamba_heads, c.mamba_head_dim(), c.mamba_d_state],
        init: |c| Init::ALog {
            d_state: c.mamba_d_state,
        },
        layout: Layout::Same,
        decay: DecayGroup::NoDecay,
    },
    Decl {
        path: "d_skip",
        hf_name: "D",
        hf_shape: |c| vec![c.n_mamba_heads, c.mamba_head_dim()],
        init: ones,
        layout: Layout::Same,
        decay: DecayGroup::NoDecay,
    },
    matrix("out_proj.weight", "out_proj.weight", |c| {
        vec![c.hidden_size, c.d_inner()]
    }),
];

fn kv_width(c: &ZambaConfig) -> usize {
    c.num_key_value_heads * c.attention_head_dim()
}

/// The one shared attention + MLP block (`shared.`; transformers
/// `model.layers.{first hybrid layer}.shared_transf.`).
pub const SHARED: &[Decl] = &[
    norm("input_layernorm.gamma", "input_layernorm.weight", |c| {
        vec![c.attention_hidden_size()]
    }),
    matrix("q_proj.weight", "self_attn.q_proj.weight", |c| {
        vec![c.attention_hidden_size(), c.attention_hidden_size()]
    }),
    matrix("k_proj.weight", "self_attn.k_proj.weight", |c| {
        vec![kv_width(c), c.attention_hidden_size()]
    }),
    matrix("v_proj.weight", "self_attn.v_proj.weight", |c| {
        vec![kv_width(c), c.attention_hidden_size()]
    }),
    matrix("o_proj.weight", "self_attn.o_proj.weight", |c| {
        vec![c.hidden_size, c.attention_hidden_size()]
    }),
    norm("pre_ff_layernorm.gamma", "pre_ff_layernorm.weight", |c| {
        vec![c.hidden_size]
    }),
    matrix("gate_proj.weight", "feed_forward.gate_proj.weight", |c| {
        vec![c.intermediate_size, c.hidden_size]
    }),
    matrix("up_proj.weight", "feed_forward.up_proj.weight", |c| {
        vec![c.intermediate_size, c.hidden_size]
    }),
    matrix("down_proj.weight", "feed_forward.down_proj.weight", |c| {
        vec![c.hidden_size, c.intermediate_size]
    }),
];

/// Where each component sits in the module tree; `#` stands for a layer index.
const MODULE_SCOPES: &[(&str, &[Decl])] = &[
    ("", MODEL),
    ("layers.#.", LAYER),
    ("layers.#.", HYBRID),
    ("layers.#.mamba.", MAMBA),
    ("shared.", SHARED),
];

/// One parameter of a concrete model.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// Burn module path, e.g. `layers.3.mamba.in_proj.weight`.
    pub path: String,
    /// Canonical (current transformers) state-dict name.
    pub hf_name: String,
    pub hf_shape: Vec<usize>,
    pub init: Init,
    pub layout: Layout,
    pub decay: DecayGroup,
}

impl ParamSpec {
    /// Shape in this model's layout.
    pub fn shape(&self) -> Vec<usize> {
        self.layout.our_shape(&self.hf_shape)
    }
}

/// Every parameter of the model `config` describes, in module order.
pub fn param_table(config: &ZambaConfig) -> Vec<ParamSpec> {
    let mut table = Vec::new();
    let mut push = |module: &str, hf: &str, decls: &[Decl]| {
        for d in decls {
            table.push(ParamSpec {
                path: format!("{module}{}", d.path),
                hf_name: format!("{hf}{}", d.hf_name),
                hf_shape: (d.hf_shape)(config),
                init: (d.init)(config),
                layout: d.layout,
                decay: d.decay,
            });
        }
    };
    push("", "model.", MODEL);
    for (i, kind) in config.layer_kinds().iter().enumerate() {
        let module = format!("layers.{i}.");
        let mamba_hf = match kind {
            LayerKind::Mamba => format!("model.layers.{i}."),
            LayerKind::Hybrid => format!("model.layers.{i}.mamba_decoder."),
        };
        push(&module, &mamba_hf, LAYER);
        push(
            &format!("{module}mamba."),
            &format!("{mamba_hf}mamba."),
            MAMBA,
        );
        if *kind == LayerKind::Hybrid {
            push(&module, &format!("model.layers.{i}."), HYBRID);
        }
    }
    let first_hybrid = config.hybrid_layers().first().copied().unwrap_or(0);
    push(
        "shared.",
        &format!("model.layers.{first_hybrid}.shared_transf."),
        SHARED,
    );
    table
}

/// The decay group of a parameter of [`crate::ZambaModel`] by its module path
/// (e.g. `layers.12.mamba.a_log`), or None if the model has no such parameter.
pub fn decay_group(path: &str) -> Option<DecayGroup> {
    MODULE_SCOPES.iter().find_map(|(scope, decls)| {
        let rest = strip_scope(path, scope)?;
        decls.iter().find(|d| d.path == rest).map(|d| d.decay)
    })
}

/// `path` without the scope pattern's prefix (`#` matches one layer index).
fn strip_scope<'a>(path: &'a str, scope: &str) -> Option<&'a str> {
    match scope.split_once('#') {
        None => path.strip_prefix(scope),
        Some((before, after)) => {
            let rest = path.strip_prefix(before)?;
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return None;
            }
            rest[digits..].strip_prefix(after)
        }
    }
}

impl Layout {
    /// Shape in this model's layout of a tensor of transformers shape `hf`.
    pub fn our_shape(self, hf: &[usize]) -> Vec<usize> {
        match (self, hf) {
            (Layout::Same, _) => hf.to_vec(),
            (Layout::Transpose | Layout::InProjSplitXz, [rows, cols]) => vec![*cols, *rows],
            (Layout::DropConvChannelAxis, [d, 1, k]) => vec![*d, *k],
            _ => panic!("layout {self:?} does not apply to shape {hf:?}"),
        }
    }

    /// transformers layout → ours.
    pub fn to_ours(self, hf: HostTensor) -> HostTensor {
        let shape = self.our_shape(&hf.shape);
        match self {
            Layout::Same => hf,
            Layout::Transpose => hf.transposed(),
            Layout::DropConvChannelAxis => HostTensor::new(shape, hf.data),
            Layout::InProjSplitXz => {
                let cols = hf.shape[1];
                let mut split = vec![0.0; hf.data.len()];
                for (row, src) in in_proj_rows(hf.shape[0] / 2) {
                    split[row * cols..(row + 1) * cols]
                        .copy_from_slice(&hf.data[src * cols..(src + 1) * cols]);
                }
                HostTensor::new(hf.shape.clone(), split).transposed()
            }
        }
    }

    /// Our layout → transformers'.
    pub fn to_hf(self, ours: HostTensor) -> HostTensor {
        match self {
            Layout::Same => ours,
            Layout::Transpose => ours.transposed(),
            Layout::DropConvChannelAxis => {
                let [d, k] = ours.shape[..] else {
                    panic!("conv weight must be 2-D, got {:?}", ours.shape)
                };
                HostTensor::new(vec![d, 1, k], ours.data)
            }
            Layout::InProjSplitXz => {
                let split = ours.transposed();
                let cols = split.shape[1];
                let mut interleaved = vec![0.0; split.data.len()];
                for (row, src) in in_proj_rows(split.shape[0] / 2) {
                    interleaved[src * cols..(src + 1) * cols]
                        .copy_from_slice(&split.data[row * cols..(row + 1) * cols]);
                }
                HostTensor::new(split.shape.clone(), interleaved)
            }
        }
    }
}

/// (row in `[x | z]` order, the same row in transformers' interleaved order) for `d_inner`
/// channels: x_c is row c ↔ 2c, z_c is row D + c ↔ 2c + 1.
fn in_proj_rows(d_inner: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..2 * d_inner).map(move |row| (row, 2 * (row % d_inner) + row / d_inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_proj_split_puts_x_then_z_and_round_trips() {
        // D = 2, d = 3: transformers rows x0 z0 x1 z1.
        let rows = [[1., 2., 3.], [10., 20., 30.], [4., 5., 6.], [40., 50., 60.]];
        let hf = HostTensor::new(vec![4, 3], rows.concat());
        let ours = Layout::InProjSplitXz.to_ours(hf.clone());
        assert_eq!(ours.shape, vec![3, 4]);
        // Column j of ours is output channel j in [x0 x1 z0 z1] order.
        let col = |j: usize| (0..3).map(|i| ours.data[i * 4 + j]).collect::<Vec<f32>>();
        assert_eq!(col(0), vec![1., 2., 3.]);
        assert_eq!(col(1), vec![4., 5., 6.]);
        assert_eq!(col(2), vec![10., 20., 30.]);
        assert_eq!(col(3), vec![40., 50., 60.]);
        assert_eq!(Layout::InProjSplitXz.to_hf(ours), hf);
    }

    #[test]
    fn every_layout_round_trips() {
        let t = |shape: Vec<usize>| {
            let n = shape.iter().product();
            HostTensor::new(shape, (0..n).map(|v| v as f32).collect())
        };
        for (layout, shape) in [
            (Layout::Same, vec![2, 3, 4]),
            (Layout::Transpose, vec![3, 5]),
            (Layout::DropConvChannelAxis, vec![6, 1, 4]),
            (Layout::InProjSplitXz, vec![8, 3]),
        ] {
            let hf = t(shape);
            let ours = layout.to_ours(hf.clone());
            assert_eq!(ours.shape, layout.our_shape(&hf.shape), "{layout:?}");
            assert_eq!(layout.to_hf(ours), hf, "{layout:?}");
        }
    }

    #[test]
    fn table_names_are_unique_and_the_shared_block_sits_under_the_first_hybrid_layer() {
        let c = ZambaConfig::preset("zamba-tiny").unwrap();
        let table = param_table(&c);
        let mut paths: Vec<_> = table.iter().map(|p| &p.path).collect();
        let mut names: Vec<_> = table.iter().map(|p| &p.hf_name).collect();
        paths.sort();
        paths.dedup();
        names.sort();
        names.dedup();
        assert_eq!(paths.len(), table.len());
        assert_eq!(names.len(), table.len());
        let hybrid = c.hybrid_layers();
        let q = table
            .iter()
            .find(|p| p.path == "shared.q_proj.weight")
            .unwrap();
        assert_eq!(
            q.hf_name,
            format!(
                "model.layers.{}.shared_transf.self_attn.q_proj.weight",
                hybrid[0]
            )
        );
        let h = hybrid[1];
        assert!(
            table
                .iter()
                .any(|p| p.path == format!("layers.{h}.hybrid_linear.weight")
                    && p.hf_name == format!("model.layers.{h}.linear.weight"))
        );
        assert!(
            table
                .iter()
                .any(|p| p.path == format!("layers.{h}.mamba.a_log")
                    && p.hf_name == format!("model.layers.{h}.mamba_decoder.mamba.A_log"))
        );
        assert!(
            table
                .iter()
                .any(|p| p.path == "layers.0.input_layernorm.gamma"
                    && p.hf_name == "model.layers.0.input_layernorm.weight")
        );
    }

    #[test]
    fn the_built_model_has_exactly_the_declared_parameters() {
        let c = ZambaConfig {
            num_key_value_heads: 2,
            ..ZambaConfig::preset("zamba-tiny").unwrap()
        };
        let model = crate::ZambaModel::from_source(
            &c,
            &mut crate::RandomInit::new(0),
            &burn::tensor::Device::flex(),
        )
        .unwrap();
        let mut built: Vec<(String, Vec<usize>)> = crate::hf::parameters_by_path(&model)
            .into_iter()
            .map(|(path, t)| (path, t.shape))
            .collect();
        let mut declared: Vec<(String, Vec<usize>)> = param_table(&c)
            .iter()
            .map(|p| (p.path.clone(), p.shape()))
            .collect();
        built.sort();
        declared.sort();
        assert_eq!(built, declared);
    }

    #[test]
    fn decay_groups_follow_the_declarations() {
        let c = ZambaConfig::preset("zamba-tiny").unwrap();
        for spec in param_table(&c) {
            assert_eq!(decay_group(&spec.path), Some(spec.decay), "{}", spec.path);
        }
        let no_decay: Vec<String> = param_table(&c)
            .into_iter()
            .filter(|p| p.decay == DecayGroup::NoDecay)
            .map(|p| p.path.rsplit('.').next().unwrap().to_string())
            .collect();
        for leaf in &no_decay {
            assert!(
                ["gamma", "conv_bias", "dt_proj_bias", "a_log", "d_skip"].contains(&leaf.as_str()),
                "{leaf}"
            );
        }
        assert_eq!(
            decay_group("layers.17.mamba.a_log"),
            Some(DecayGroup::NoDecay)
        );
        assert_eq!(
            decay_group("layers.17.mamba.in_proj.weight"),
            Some(DecayGroup::Decay)
        );
        assert_eq!(
            decay_group("embed_tokens.weight"),
            Some(DecayGroup::Embedding)
        );
        assert_eq!(decay_group("layers.x.mamba.a_log"), None);
        assert_eq!(decay_group("shared.q_proj.bias"), None);
    }
}
