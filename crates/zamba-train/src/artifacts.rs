//! What a model directory given on the command line holds: the weights (a training checkpoint, a
//! run directory's newest checkpoint, or a transformers directory), the run config the weights
//! were trained with, and the tokenizer that goes with them.
//!
//! A run knows its tokenizer through its data: synthetic sources name it in `[synthetic]
//! tokenizer` (`byte` or a tokenizer.json); tokenized directories record it in their manifest
//! (kind and blake3 hash) and keep a copy beside the shards (`data tokenize` writes it). A
//! tokenizer given explicitly must have the hash the run's data was made with.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use zamba_data::loader::config::{TokenizerCheck, resolve_shards};
use zamba_data::tokenizer::{
    SpecialTokens, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TextTokenizer, TokenizerSpec, byte,
};
use zamba_data::{Manifest, TokenizerInfo};
use zamba_model::ZambaConfig;

use crate::checkpoint;
use crate::config::RunConfig;
use crate::config::synthetic_set;

/// The weights to load and what is known about how they were made.
pub struct ModelSource {
    /// A transformers directory (config.json + safetensors).
    pub model_dir: PathBuf,
    /// The resolved config of the run that wrote the checkpoint, when the source is one.
    pub run: Option<RunConfig>,
    /// For messages: what the given path turned out to be.
    pub description: String,
}

impl ModelSource {
    /// Resolves a training checkpoint (`…/checkpoints/step-N`), a run directory (its newest
    /// checkpoint) or a transformers directory.
    pub fn resolve(path: &Path) -> Result<Self> {
        if checkpoint::is_checkpoint(path) {
            return Self::checkpoint(path);
        }
        if checkpoint::checkpoints_dir(path).is_dir() {
            let Some((step, newest)) = checkpoint::list(path)?.pop() else {
                bail!(
                    "{} is a run directory without any complete checkpoint yet",
                    path.display()
                );
            };
            let mut source = Self::checkpoint(&newest)?;
            source.description = format!("{} (newest checkpoint, step {step})", newest.display());
            return Ok(source);
        }
        if path.join("config.json").is_file() {
            return Ok(Self {
                model_dir: path.to_path_buf(),
                run: None,
                description: format!("transformers model {}", path.display()),
            });
        }
        bail!(
            "{} is neither a zamba-train checkpoint (run.dir/checkpoints/step-N), a run directory, \
             nor a transformers model directory (with config.json)",
            path.display()
        )
    }

    fn checkpoint(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.toml");
        let run = match std::fs::read_to_string(&config_path) {
            Ok(text) => match RunConfig::from_toml_str(&text, dir, &[]) {
                Ok(run) => Some(run),
                Err(e) => {
                    eprintln!(
                        "warning: {} does not parse as a run config ({e}); its data and tokenizer are unknown",
                        config_path.display()
                    );
                    None
                }
            },
            Err(_) => None,
        };
        Ok(Self {
            model_dir: dir.join("model"),
            run,
            description: format!("checkpoint {}", dir.display()),
        })
    }
}

/// A tokenizer.json and its tokenizer_config.json, ready to write next to exported weights.
pub struct TokenizerFiles {
    pub tokenizer_json: Vec<u8>,
    pub tokenizer_config: serde_json::Value,
    /// Where they came from, for messages.
    pub origin: String,
}

impl TokenizerFiles {
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        tokenizers::Tokenizer::from_bytes(&self.tokenizer_json)
            .map_err(|e| anyhow::anyhow!("the tokenizer from {} does not load: {e}", self.origin))
    }

    /// Id of a special token named in tokenizer_config.json (`bos_token`, `eos_token`, …).
    pub fn special_id(&self, key: &str) -> Option<u32> {
        let value = &self.tokenizer_config[key];
        let name = value.as_str().or_else(|| value["content"].as_str())?;
        self.tokenizer().ok()?.token_to_id(name)
    }

    /// The byte tokenizer as tokenizer files; `chat_template` for runs on the synthetic
    /// instruct set.
    fn byte(doc_start: u32, chat_template: Option<&str>, max_len: usize) -> Self {
        let json = byte::tokenizer_json(doc_start).to_string().into_bytes();
        let [bos, eos, pad] = byte::SPECIAL;
        let mut config = generated_config(Some(bos), eos, Some(pad), max_len);
        if let Some(template) = chat_template {
            config["chat_template"] = template.into();
        }
        Self {
            tokenizer_json: json,
            tokenizer_config: config,
            origin: "the built-in byte tokenizer".into(),
        }
    }

    /// A tokenizer.json file, with the tokenizer_config.json beside it or one made from its
    /// special tokens.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let tokenizer_json =
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let config_path = path.with_file_name(TOKENIZER_CONFIG_FILE);
        let tokenizer_config = if config_path.is_file() {
            serde_json::from_slice(&std::fs::read(&config_path)?)
                .with_context(|| format!("{} is not valid JSON", config_path.display()))?
        } else {
            let loaded = TextTokenizer::load(
                &TokenizerSpec::File(path.to_path_buf()),
                &SpecialTokens::default(),
            )?;
            let hf = tokenizers::Tokenizer::from_bytes(&tokenizer_json)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let name = |id: Option<u32>| id.and_then(|i| hf.id_to_token(i));
            let eos = name(Some(loaded.info.eos_id)).expect("eos id is in the vocabulary");
            generated_config(
                name(loaded.info.bos_id).as_deref(),
                &eos,
                name(loaded.info.pad_id).as_deref(),
                max_len,
            )
        };
        Ok(Self {
            tokenizer_json,
            tokenizer_config,
            origin: path.display().to_string(),
        })
    }
}

/// tokenizer_config.json for a `PreTrainedTokenizerFast` over tokenizer.json.
fn generated_config(
    bos: Option<&str>,
    eos: &str,
    pad: Option<&str>,
    max_len: usize,
) -> serde_json::Value {
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": false,
    })
}

/// The tokenizer of `source`: `explicit` if given (checked against the run's data), else the
/// one found with the weights or through the run's data.
pub fn tokenizer_for(
    source: &ModelSource,
    model: &ZambaConfig,
    explicit: Option<&Path>,
) -> Result<TokenizerFiles> {
    let max_len = model.max_position_embeddings;
    let expected = match &source.run {
        Some(run) => Some(run_tokenizer(run)?),
        None => None,
    };
    if let Some(path) = explicit {
        let hash = blake3::hash(
            &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )
        .to_hex()
        .to_string();
        let expected_hash = match &expected {
            Some(RunTokenizer::Recorded { info, .. }) => {
                Some(info.describe()).zip(Some(info.hash.clone()))
            }
            Some(RunTokenizer::File(file)) => Some((
                file.display().to_string(),
                blake3::hash(&std::fs::read(file)?).to_hex().to_string(),
            )),
            Some(RunTokenizer::Byte { .. }) => {
                Some(("the built-in byte tokenizer".into(), String::new()))
            }
            None => None,
        };
        if let Some((what, want)) = expected_hash
            && hash != want
        {
            bail!(
                "--tokenizer {} is not the tokenizer the run's data was made with ({what}); \
                 the model would see different token ids",
                path.display()
            );
        }
        return TokenizerFiles::from_file(path, max_len);
    }
    match expected {
        Some(RunTokenizer::Byte {
            doc_start,
            chat_template,
        }) => return Ok(TokenizerFiles::byte(doc_start, chat_template, max_len)),
        Some(RunTokenizer::File(path)) => return TokenizerFiles::from_file(&path, max_len),
        Some(RunTokenizer::Recorded { info, dir }) => bail!(
            "the run's data ({}) was tokenized with {}, and no copy of it is kept there; \
             pass that tokenizer.json with --tokenizer",
            dir.display(),
            info.describe()
        ),
        None => {}
    }
    let beside = source.model_dir.join(TOKENIZER_FILE);
    if beside.is_file() {
        return TokenizerFiles::from_file(&beside, max_len);
    }
    bail!(
        "no tokenizer found for {}: pass the tokenizer.json the model was trained with, with --tokenizer",
        source.description
    )
}

/// How a run's tokenizer can be had.
enum RunTokenizer {
    Byte {
        doc_start: u32,
        chat_template: Option<&'static str>,
    },
    File(PathBuf),
    /// Known only by the manifest's record.
    Recorded {
        info: TokenizerInfo,
        dir: PathBuf,
    },
}

fn run_tokenizer(run: &RunConfig) -> Result<RunTokenizer> {
    let sets: Vec<&str> = run
        .data
        .sources
        .values()
        .flat_map(|s| s.paths.iter().chain(&s.validation))
        .filter_map(|p| synthetic_set(p))
        .collect();
    if let (Some(section), false) = (&run.synthetic, sets.is_empty()) {
        return Ok(match section.options().tokenizer {
            // The synthetic sets are tokenized without BOS: every document follows an EOS.
            TokenizerSpec::Byte => RunTokenizer::Byte {
                doc_start: byte::EOS,
                chat_template: sets
                    .contains(&"instruct")
                    .then_some(zamba_data::synth::instruct::CHAT_TEMPLATE),
            },
            TokenizerSpec::File(path) => RunTokenizer::File(path),
        });
    }
    let (name, source) = run
        .data
        .sources
        .iter()
        .next()
        .context("the run config has no data sources")?;
    let shards = resolve_shards(name, &source.paths, &mut TokenizerCheck::default())
        .with_context(|| format!("finding the tokenizer of the run's data (source {name:?})"))?;
    let dir = shards[0]
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let manifest = Manifest::load(&dir)?;
    let info = manifest.settings.tokenizer;
    if info.kind == "byte" {
        let doc_start = if manifest.settings.add_bos {
            byte::BOS
        } else {
            byte::EOS
        };
        return Ok(RunTokenizer::Byte {
            doc_start,
            chat_template: None,
        });
    }
    let copy = dir.join(TOKENIZER_FILE);
    if copy.is_file() && blake3::hash(&std::fs::read(&copy)?).to_hex().as_str() == info.hash {
        return Ok(RunTokenizer::File(copy));
    }
    Ok(RunTokenizer::Recorded { info, dir })
}
