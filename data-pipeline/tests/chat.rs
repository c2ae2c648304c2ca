//! Chat-format data: rendering against transformers' `apply_chat_template` (fixture made by
//! scripts/make_chat_fixture.py), assistant masks against transformers' `assistant_masks`, and
//! the masks through tokenization and the loader.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, ListArray, RecordBatch, StringArray, StructArray};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use zamba_data::chat::{ChatTemplate, Message, parse_conversation};
use zamba_data::manifest::LossOn;
use zamba_data::shard::{read_document_masks, read_documents};
use zamba_data::tokenize::ChatOptions;
use zamba_data::tokenizer::byte;
use zamba_data::{
    DataConfig, MixtureLoader, SourceConfig, TokenizeOptions, TokenizerSpec, tokenize,
};

fn fixture() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn special(f: &serde_json::Value) -> BTreeMap<String, String> {
    serde_json::from_value(f["meta"]["special_tokens"].clone()).unwrap()
}

fn conversation(f: &serde_json::Value, name: &str) -> Vec<Message> {
    parse_conversation(&f["conversations"][name]).unwrap()
}

#[test]
fn rendering_equals_transformers_apply_chat_template() {
    let f = fixture();
    let renderings = f["renderings"].as_array().unwrap();
    assert!(renderings.len() >= 15);
    for r in renderings {
        let name = r["template"].as_str().unwrap();
        let template =
            ChatTemplate::new(f["templates"][name].as_str().unwrap(), special(&f)).unwrap();
        let conv = conversation(&f, r["conversation"].as_str().unwrap());
        let got = template
            .render(&conv, r["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(
            got,
            r["text"].as_str().unwrap(),
            "{name} / {}",
            r["conversation"]
        );
    }
    for e in f["errors"].as_array().unwrap() {
        let name = e["template"].as_str().unwrap();
        let template =
            ChatTemplate::new(f["templates"][name].as_str().unwrap(), special(&f)).unwrap();
        let err = template
            .render(&parse_conversation(&e["messages"]).unwrap(), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(e["message"].as_str().unwrap()),
            "{name}: {err}"
        );
    }
    assert_eq!(
        f["templates"]["synthetic"].as_str().unwrap(),
        zamba_data::synth::instruct::CHAT_TEMPLATE,
        "the fixture's synthetic template is the one the synthetic data uses"
    );
}

/// A tokenizer.json (the byte tokenizer) with a tokenizer_config.json holding `template`.
fn tokenizer_dir(dir: &Path, template: &str, special: &BTreeMap<String, String>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let json = dir.join("tokenizer.json");
    std::fs::write(&json, byte::tokenizer_json(byte::EOS).to_string()).unwrap();
    let mut config = serde_json::json!({"chat_template": template});
    for (k, v) in special {
        config[k] = v.clone().into();
    }
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    json
}

fn chat_tokenize(
    inputs: Vec<PathBuf>,
    out: &Path,
    tokenizer: &Path,
    column: &str,
) -> anyhow::Result<()> {
    let mut opts = TokenizeOptions::new(
        inputs
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
        out,
        TokenizerSpec::File(tokenizer.to_path_buf()),
    );
    opts.chat = Some(ChatOptions {
        messages_column: column.into(),
        template_file: None,
        loss_on: LossOn::Assistant,
    });
    tokenize(&opts).map(|_| ())
}

fn write_jsonl(path: &Path, field: &str, conversations: &[serde_json::Value]) {
    let lines: Vec<String> = conversations
        .iter()
        .map(|c| serde_json::json!({ field: c }).to_string())
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn assistant_masks_equal_transformers_and_survive_tokenization() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let masks = f["masks"].as_array().unwrap();
    assert!(masks.len() >= 5);
    for (i, m) in masks.iter().enumerate() {
        let name = m["template"].as_str().unwrap();
        let conv_name = m["conversation"].as_str().unwrap();
        let dir = tmp.path().join(format!("case-{i}"));
        let tokenizer = tokenizer_dir(
            &dir.join("tok"),
            f["templates"][name].as_str().unwrap(),
            &special(&f),
        );
        let input = dir.join("chat.jsonl");
        write_jsonl(&input, "messages", &[f["conversations"][conv_name].clone()]);
        chat_tokenize(vec![input], &dir.join("out"), &tokenizer, "messages").unwrap();
        let shard = dir.join("out/shard-00000.parquet");
        let docs = read_documents(&shard).unwrap();
        let doc_masks = read_document_masks(&shard).unwrap().expect("a mask column");
        let mut want_ids: Vec<u32> = serde_json::from_value(m["input_ids"].clone()).unwrap();
        let mut want_mask: Vec<bool> = m["assistant_masks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64() == Some(1))
            .collect();
        // The pipeline ends every document with EOS, a target after a final assistant message.
        want_ids.push(byte::EOS);
        want_mask.push(true);
        assert_eq!(docs[0].0, want_ids, "{name}/{conv_name}");
        assert_eq!(doc_masks[0], want_mask, "{name}/{conv_name}");
    }
}

/// `conversations` as a parquet list<struct<from, value>> column (ShareGPT).
fn write_sharegpt_parquet(path: &Path, conversations: &[Vec<(&str, &str)>]) {
    let fields = Fields::from(vec![
        Field::new("from", DataType::Utf8, false),
        Field::new("value", DataType::Utf8, false),
    ]);
    let flat: Vec<(&str, &str)> = conversations.iter().flatten().copied().collect();
    let structs = StructArray::new(
        fields.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(flat.iter().map(|m| m.0))) as ArrayRef,
            Arc::new(StringArray::from_iter_values(flat.iter().map(|m| m.1))),
        ],
        None,
    );
    let item = Arc::new(Field::new("item", DataType::Struct(fields), false));
    let list = ListArray::new(
        item.clone(),
        OffsetBuffer::from_lengths(conversations.iter().map(Vec::len)),
        Arc::new(structs),
        None,
    );
    let schema = Arc::new(Schema::new(vec![Field::new(
        "conversations",
        DataType::List(item),
        false,
    )]));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(list)]).unwrap();
    let mut w = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn sharegpt_parquet_gives_the_same_documents_as_role_content_jsonl() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer_dir(
        &tmp.path().join("tok"),
        f["templates"]["chatml"].as_str().unwrap(),
        &special(&f),
    );
    let conv = vec![
        ("system", "Be brief."),
        ("human", "Hi there"),
        ("gpt", "Hello!"),
    ];
    let parquet = tmp.path().join("sharegpt.parquet");
    write_sharegpt_parquet(&parquet, &[conv.clone(), conv[1..].to_vec()]);
    chat_tokenize(
        vec![parquet],
        &tmp.path().join("a"),
        &tokenizer,
        "conversations",
    )
    .unwrap();
    let jsonl = tmp.path().join("openai.jsonl");
    let as_messages = |c: &[(&str, &str)]| {
        serde_json::Value::Array(
            c.iter()
                .map(|(r, t)| {
                    let role = match *r {
                        "human" => "user",
                        "gpt" => "assistant",
                        other => other,
                    };
                    serde_json::json!({"role": role, "content": t})
                })
                .collect(),
        )
    };
    write_jsonl(
        &jsonl,
        "messages",
        &[as_messages(&conv), as_messages(&conv[1..])],
    );
    chat_tokenize(vec![jsonl], &tmp.path().join("b"), &tokenizer, "messages").unwrap();
    let read = |dir: &str| {
        let shard = tmp.path().join(dir).join("shard-00000.parquet");
        let tokens: Vec<Vec<u32>> = read_documents(&shard)
            .unwrap()
            .into_iter()
            .map(|d| d.0)
            .collect();
        (tokens, read_document_masks(&shard).unwrap())
    };
    let (a, b) = (read("a"), read("b"));
    assert_eq!(a, b);
    let text = String::from_utf8(
        a.0[0][..a.0[0].len() - 1]
            .iter()
            .map(|&t| t as u8)
            .collect(),
    )
    .unwrap();
    assert!(
        text.contains("<|im_start|>user\nHi there<|im_end|>"),
        "{text}"
    );
    assert!(
        !text.contains("You are a helpful assistant"),
        "the given system message is kept"
    );
}

#[test]
fn bad_conversations_are_errors_naming_file_and_row() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer_dir(
        &tmp.path().join("tok"),
        f["templates"]["chatml"].as_str().unwrap(),
        &special(&f),
    );
    let good = serde_json::json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]);
    let cases = [
        (
            serde_json::json!([{"role": "narrator", "content": "x"}]),
            "unknown role \"narrator\"",
        ),
        (
            serde_json::json!([{"role": "user", "content": {"text": "x"}}]),
            "content is an object",
        ),
        (serde_json::json!([]), "empty list"),
    ];
    for (i, (bad, want)) in cases.into_iter().enumerate() {
        let input = tmp.path().join(format!("bad-{i}.jsonl"));
        write_jsonl(&input, "messages", &[good.clone(), good.clone(), bad]);
        let out = tmp.path().join(format!("out-{i}"));
        let err = format!(
            "{:#}",
            chat_tokenize(vec![input], &out, &tokenizer, "messages").unwrap_err()
        );
        assert!(
            err.contains(&format!("bad-{i}.jsonl row 2")) && err.contains(want),
            "{err}"
        );
        assert!(!out.join("manifest.json").exists());
    }
    let input = tmp.path().join("no-column.jsonl");
    write_jsonl(&input, "dialogue", &[good]);
    let err = format!(
        "{:#}",
        chat_tokenize(vec![input], &tmp.path().join("x"), &tokenizer, "messages").unwrap_err()
    );
    assert!(
        err.contains("no messages field \"messages\"") && err.contains("dialogue"),
        "{err}"
    );
}

#[test]
fn the_loader_yields_masks_that_line_up_with_assistant_tokens() {
    // Synthetic chat: user text lowercase, assistant text uppercase, so a target must count
    // exactly when it is an uppercase letter or the EOS closing an assistant turn.
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer_dir(
        &tmp.path().join("tok"),
        zamba_data::synth::instruct::CHAT_TEMPLATE,
        &BTreeMap::new(),
    );
    let conversations: Vec<serde_json::Value> = (0..300)
        .map(|i| {
            let question = format!("question number {i} {}", "abc ".repeat(i % 5));
            let answer = format!("ANSWER{}", "XYZ".repeat(1 + i % 4));
            if i % 7 == 0 {
                serde_json::json!([{"role": "user", "content": question}])
            } else {
                serde_json::json!([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
            }
        })
        .collect();
    let input = tmp.path().join("chat.jsonl");
    write_jsonl(&input, "messages", &conversations);
    let mut opts = TokenizeOptions::new(
        vec![input.to_string_lossy().into_owned()],
        tmp.path().join("tok-out"),
        TokenizerSpec::File(tokenizer),
    );
    opts.row_group_tokens = 512;
    opts.chat = Some(ChatOptions {
        messages_column: "messages".into(),
        template_file: None,
        loss_on: LossOn::Assistant,
    });
    let manifest = tokenize(&opts).unwrap();
    assert!(manifest.settings.has_loss_mask());
    let dir = tmp.path().join("tok-out").to_string_lossy().into_owned();
    let config = DataConfig {
        sources: BTreeMap::from([(
            "chat".to_string(),
            SourceConfig {
                paths: vec![dir.clone()],
                weight: 1.0,
                validation: vec![dir],
            },
        )]),
        seq_len: 48,
        seed: 5,
        shuffle_blocks: 2,
        prefetch: 2,
        model_vocab_size: None,
    };
    let mut loader = MixtureLoader::new(&config, 0, 1, 8, None, false).unwrap();
    let expected = |target: u32, prev: u32| {
        target.is_ascii_uppercase_byte() || (target == byte::EOS && prev.is_ascii_uppercase_byte())
    };
    let mut counted = 0;
    let mut batches: Vec<zamba_data::Batch> =
        (0..20).map(|_| loader.next_batch().unwrap()).collect();
    batches.extend(loader.validation("chat", 8).unwrap().map(Result::unwrap));
    for batch in &batches {
        let mask = batch.loss_mask.as_ref().expect("masked data yields a mask");
        for (j, (&target, &keep)) in batch.targets.iter().zip(mask).enumerate() {
            let prev = batch.inputs[j];
            assert_eq!(keep, expected(target, prev), "target {target} after {prev}");
            counted += usize::from(keep);
        }
    }
    assert!(counted > 0 && counted < batches.len() * 8 * 48 / 2);
}

trait AsciiUpper {
    fn is_ascii_uppercase_byte(self) -> bool;
}

impl AsciiUpper for u32 {
    fn is_ascii_uppercase_byte(self) -> bool {
        (b'A' as u32..=b'Z' as u32).contains(&self)
    }
}
