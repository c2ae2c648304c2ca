//! Text → token ids: a Hugging Face `tokenizer.json` or the built-in byte tokenizer.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The tokenizer file a tokenized directory keeps beside its manifest (a copy of the one used).
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Its companion with special tokens and the chat template, copied when present.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// Which tokenizer to use: the literal `byte`, or a path to a `tokenizer.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerSpec {
    Byte,
    File(PathBuf),
}

impl FromStr for TokenizerSpec {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "byte" {
            Self::Byte
        } else {
            Self::File(PathBuf::from(s))
        })
    }
}

/// Identity of a tokenizer as recorded in every manifest; two shard sets can be mixed only if these match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// `byte` or `huggingface`.
    pub kind: String,
    /// File name of the tokenizer.json (informational), or `byte`.
    pub name: String,
    /// blake3 of the tokenizer.json bytes, or `byte-v1` for the built-in tokenizer.
    pub hash: String,
    /// One past the largest token id the tokenizer can produce (added tokens included).
    pub vocab_size: u32,
    pub eos_id: u32,
    pub bos_id: Option<u32>,
    pub pad_id: Option<u32>,
}

impl TokenizerInfo {
    pub fn describe(&self) -> String {
        format!(
            "{} (hash {}, vocab {}, eos {})",
            self.name,
            &self.hash[..self.hash.len().min(12)],
            self.vocab_size,
            self.eos_id
        )
    }
}

/// The built-in tokenizer: ids 0..=255 are bytes, then BOS, EOS, PAD.
pub mod byte {
    pub const BOS: u32 = 256;
    pub const EOS: u32 = 257;
    pub const PAD: u32 = 258;
    pub const VOCAB: u32 = 259;
    /// Names of BOS, EOS, PAD in [`tokenizer_json`].
    pub const SPECIAL: [&str; 3] = ["<s>", "</s>", "<pad>"];

    /// The byte tokenizer as a Hugging Face `tokenizer.json` (what `transformers` and the
    /// `tokenizers` crate load): byte-level pre-tokenization without splitting, a BPE without
    /// merges over the 256 byte symbols (byte b has id b), BOS/EOS/PAD as special tokens. The
    /// post-processor puts `doc_start` (a special id) before every text, as the token that
    /// preceded each document in training.
    pub fn tokenizer_json(doc_start: u32) -> serde_json::Value {
        let vocab: serde_json::Map<String, serde_json::Value> = (0..=255u8)
            .map(|b| (byte_symbol(b).to_string(), u32::from(b).into()))
            .collect();
        let added: Vec<serde_json::Value> = SPECIAL
            .iter()
            .zip(BOS..)
            .map(|(content, id)| {
                serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let start = SPECIAL[(doc_start - BOS) as usize];
        let mut start_token = serde_json::Map::new();
        start_token.insert(
            start.into(),
            serde_json::json!({"id": start, "ids": [doc_start], "tokens": [start]}),
        );
        serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": start, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": start, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": start_token
            },
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []}
        })
    }

    /// GPT-2's printable stand-in for byte `b` (byte-level BPE's alphabet).
    fn byte_symbol(b: u8) -> char {
        let printable = |c: u8| matches!(c, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        if printable(b) {
            return char::from(b);
        }
        let rank = (0..b).filter(|&c| !printable(c)).count() as u32;
        char::from_u32(256 + rank).expect("valid code point")
    }
}

/// Names under which tokenizer.json files commonly store their end/begin-of-document tokens, in order of preference.
const EOS_CANDIDATES: &[&str] = &[
    "</s>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<eos>",
    "<|eos|>",
    "[EOS]",
];
const BOS_CANDIDATES: &[&str] = &[
    "<s>",
    "<|begin_of_text|>",
    "<bos>",
    "<|bos|>",
    "<|startoftext|>",
    "[BOS]",
];
const PAD_CANDIDATES: &[&str] = &["<pad>", "<|pad|>", "[PAD]"];

/// Optional overrides for special tokens that cannot be discovered by name: a token string or an id.
#[derive(Clone, Debug, Default)]
pub struct SpecialTokens {
    pub eos: Option<String>,
    pub bos: Option<String>,
    pub eos_id: Option<u32>,
    pub bos_id: Option<u32>,
}

pub struct TextTokenizer {
    hf: Option<Box<tokenizers::Tokenizer>>,
    pub info: TokenizerInfo,
}

impl TextTokenizer {
    pub fn load(spec: &TokenizerSpec, special: &SpecialTokens) -> Result<Self> {
        match spec {
            TokenizerSpec::Byte => {
                if special.eos.is_some()
                    || special.bos.is_some()
                    || special.eos_id.is_some()
                    || special.bos_id.is_some()
                {
                    bail!(
                        "--eos-*/--bos-* apply to a tokenizer.json; the byte tokenizer's ids are fixed (bos {}, eos {})",
                        byte::BOS,
                        byte::EOS
                    );
                }
                Ok(Self {
                    hf: None,
                    info: TokenizerInfo {
                        kind: "byte".into(),
                        name: "byte".into(),
                        hash: "byte-v1".into(),
                        vocab_size: byte::VOCAB,
                        eos_id: byte::EOS,
                        bos_id: Some(byte::BOS),
                        pad_id: Some(byte::PAD),
                    },
                })
            }
            TokenizerSpec::File(path) => Self::load_file(path, special),
        }
    }

    fn load_file(path: &Path, special: &SpecialTokens) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading tokenizer file {}", path.display()))?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "tokenizer file {} does not parse as a Hugging Face tokenizer.json: {e}; \
                 pass a tokenizer.json saved by `tokenizers` (or `byte` for the built-in byte tokenizer)",
                path.display()
            )
        })?;
        let vocab = tokenizer.get_vocab(true);
        let max_id = vocab.values().copied().max().unwrap_or(0);
        let vocab_size = (tokenizer.get_vocab_size(true) as u32).max(max_id + 1);
        let find = |explicit: &Option<String>,
                    explicit_id: Option<u32>,
                    candidates: &[&str],
                    what: &str|
         -> Result<Option<u32>> {
            if let Some(id) = explicit_id {
                if id >= vocab_size {
                    bail!(
                        "{what} id {id} is outside the vocabulary of {} ({vocab_size} ids)",
                        path.display()
                    );
                }
                return Ok(Some(id));
            }
            match explicit {
                Some(token) => match tokenizer.token_to_id(token) {
                    Some(id) => Ok(Some(id)),
                    None => bail!(
                        "{what} token {token:?} is not in the vocabulary of {}",
                        path.display()
                    ),
                },
                None => Ok(candidates.iter().find_map(|c| tokenizer.token_to_id(c))),
            }
        };
        let eos_id = find(&special.eos, special.eos_id, EOS_CANDIDATES, "end-of-document")?.with_context(|| {
            format!(
                "tokenizer {} has none of the usual end-of-document tokens ({}); name it with --eos-token or --eos-id",
                path.display(),
                EOS_CANDIDATES.join(", ")
            )
        })?;
        let bos_id = find(
            &special.bos,
            special.bos_id,
            BOS_CANDIDATES,
            "begin-of-document",
        )?;
        let pad_id = PAD_CANDIDATES.iter().find_map(|c| tokenizer.token_to_id(c));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self {
            hf: Some(Box::new(tokenizer)),
            info: TokenizerInfo {
                kind: "huggingface".into(),
                name,
                hash: blake3::hash(&bytes).to_hex().to_string(),
                vocab_size,
                eos_id,
                bos_id,
                pad_id,
            },
        })
    }

    /// Token ids of `text` without any special tokens (the caller adds BOS/EOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.hf {
            None => Ok(text.bytes().map(u32::from).collect()),
            Some(tokenizer) => {
                // encode_fast skips offset tracking, which we never use.
                let encoding = tokenizer
                    .encode_fast(text, false)
                    .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?;
                Ok(encoding.get_ids().to_vec())
            }
        }
    }

    /// Token ids of `text` (no special tokens added) and the byte offset in `text` where each
    /// token starts.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<usize>)> {
        match &self.hf {
            None => Ok((
                text.bytes().map(u32::from).collect(),
                (0..text.len()).collect(),
            )),
            Some(tokenizer) => {
                let encoding = tokenizer
                    .encode(text, false)
                    .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?;
                let starts = encoding
                    .get_offsets()
                    .iter()
                    .map(|&(start, _)| start)
                    .collect();
                Ok((encoding.get_ids().to_vec(), starts))
            }
        }
    }

    /// Token ids of one document as stored in a shard: optional BOS, the text, EOS.
    pub fn encode_document(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let body = self.encode(text)?;
        let mut ids = Vec::with_capacity(body.len() + 2);
        if add_bos {
            ids.push(self.info.bos_id.context("no BOS token known")?);
        }
        ids.extend_from_slice(&body);
        ids.push(self.info.eos_id);
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokenizer_json_encodes_like_the_byte_tokenizer() {
        let json = byte::tokenizer_json(byte::EOS).to_string();
        let hf = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap();
        let ours = TextTokenizer::load(&TokenizerSpec::Byte, &SpecialTokens::default()).unwrap();
        let all_bytes: String = String::from_utf8_lossy(&(1..=255u8).collect::<Vec<_>>()).into();
        for text in [
            "héllo wörld\n  tabs\tand 🦀",
            "<|user|>\nWhat is 2 + 2?\n",
            &all_bytes,
        ] {
            let want = ours.encode(text).unwrap();
            let got = hf.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(got, want, "{text:?}");
            let with_start = hf.encode(text, true).unwrap().get_ids().to_vec();
            assert_eq!(with_start[0], byte::EOS);
            assert_eq!(&with_start[1..], &want[..]);
            assert_eq!(hf.decode(&with_start, true).unwrap(), text);
        }
        assert_eq!(hf.token_to_id("<s>"), Some(byte::BOS));
        assert_eq!(hf.token_to_id("<pad>"), Some(byte::PAD));
    }

    #[test]
    fn byte_tokenizer_round_trips_utf8() {
        let tok = TextTokenizer::load(&TokenizerSpec::Byte, &SpecialTokens::default()).unwrap();
        let ids = tok.encode_document("héllo", true).unwrap();
        assert_eq!(ids.first(), Some(&byte::BOS));
        assert_eq!(ids.last(), Some(&byte::EOS));
        let bytes: Vec<u8> = ids[1..ids.len() - 1].iter().map(|&i| i as u8).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), "héllo");
    }
}
