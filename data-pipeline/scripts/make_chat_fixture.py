#!/usr/bin/env python3
"""Write data-pipeline/tests/fixtures/chat_templates.json: chat templates in the styles tokenizers
ship (ChatML, Zephyr, Llama-2, a `tojson` one, and the synthetic instruct set's), conversations,
and what transformers' `apply_chat_template` makes of them:

- `renderings`: `tokenize=False` output, with and without `add_generation_prompt`;
- `masks`: for templates given a twin with `{% generation %}` tags around what each assistant
  message adds, the `input_ids` and `assistant_masks` transformers returns with
  `return_assistant_tokens_mask=True` (over the byte tokenizer, so one token per byte);
- `errors`: conversations a template refuses, with the message it raises.

The tokenizer is zamba-data's byte tokenizer (`tokenizer_json`, id b = byte b, `<s>` 256, `</s>`
257, `<pad>` 258), rebuilt here from the same definition. Run (not in CI):

    python3 -m venv /work/venv-hf && /work/venv-hf/bin/pip install transformers==5.24.0 jinja2
    /work/venv-hf/bin/python data-pipeline/scripts/make_chat_fixture.py
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "chat_templates.json"

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TAGGED = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Multi-line with block tags on their own lines: exercises trim_blocks and lstrip_blocks.
ZEPHYR = """{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>\\n' }}
    {% endif %}
{% endfor %}"""
ZEPHYR_TAGGED = """{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
    {% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] + eos_token + '\\n' }}{% endgeneration %}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>\\n' }}
    {% endif %}
{% endfor %}"""

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

TOJSON = (
    "{{ messages | tojson }}\n{{ messages[0] | tojson(indent=2) }}\n"
    "{% for m in messages %}{{ m.role | upper }}: {{ m.content | trim }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Must equal zamba_data::synth::instruct::CHAT_TEMPLATE (a Rust test checks).
SYNTHETIC = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] }}"
    "{% else %}{{ raise_exception('only user and assistant messages are supported') }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SYNTHETIC_TAGGED = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{% else %}{{ raise_exception('only user and assistant messages are supported') }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

TEMPLATES = {
    "chatml": (CHATML, CHATML_TAGGED),
    "zephyr": (ZEPHYR, ZEPHYR_TAGGED),
    "llama2": (LLAMA2, None),
    "tojson": (TOJSON, None),
    "synthetic": (SYNTHETIC, SYNTHETIC_TAGGED),
}

CONVERSATIONS = {
    "multi_turn": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Italy?  "},
        {"role": "assistant", "content": "Rome"},
    ],
    "unicode_two_lines": [
        {"role": "user", "content": "Order a drink\nin French, \"quoted\"."},
        {"role": "assistant", "content": "Un café au lait, s'il vous plaît!"},
    ],
    "open_question": [
        {"role": "user", "content": "What is 12 + 30?"},
    ],
}

# (template, conversation) pairs a template refuses.
ERRORS = {
    "llama2": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    "synthetic": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
}


def byte_symbol(b: int) -> str:
    printable = lambda c: (ord("!") <= c <= ord("~")) or (0xA1 <= c <= 0xAC) or (0xAE <= c <= 0xFF)
    if printable(b):
        return chr(b)
    return chr(256 + sum(1 for c in range(b) if not printable(c)))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<s>", "</s>", "<pad>"]
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [
            {"id": 256 + i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, c in enumerate(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {byte_symbol(b): b for b in range(256)}, "merges": []},
    }
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def main() -> None:
    tok = byte_tokenizer()
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    renderings, masks, errors = [], [], []
    for tname, (template, tagged) in TEMPLATES.items():
        for cname, conv in CONVERSATIONS.items():
            if tname == "synthetic" and conv[0]["role"] == "system":
                continue
            prompts = [False, True] if conv[-1]["role"] == "user" else [False]
            for gen in prompts:
                text = tok.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=gen)
                renderings.append({"template": tname, "conversation": cname, "add_generation_prompt": gen, "text": text})
            if tagged is not None and conv[-1]["role"] == "assistant":
                out = tok.apply_chat_template(
                    conv, chat_template=tagged, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
                )
                untagged = tok.apply_chat_template(conv, chat_template=template, tokenize=False)
                assert tok.decode(out["input_ids"]) == untagged, (tname, cname)
                masks.append({
                    "template": tname, "conversation": cname,
                    "input_ids": list(out["input_ids"]), "assistant_masks": list(out["assistant_masks"]),
                })
    for tname, conv in ERRORS.items():
        try:
            tok.apply_chat_template(conv, chat_template=TEMPLATES[tname][0], tokenize=False)
            raise SystemExit(f"{tname} accepted {conv}")
        except Exception as e:  # jinja2's TemplateError raised by raise_exception
            errors.append({"template": tname, "messages": conv, "message": str(e)})
    fixture = {
        "meta": {
            "transformers": transformers.__version__,
            "made_by": "data-pipeline/scripts/make_chat_fixture.py",
            "special_tokens": special,
        },
        "templates": {name: t for name, (t, _) in TEMPLATES.items()},
        "conversations": CONVERSATIONS,
        "renderings": renderings,
        "masks": masks,
        "errors": errors,
    }
    OUT.write_text(json.dumps(fixture, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {OUT}: {len(renderings)} renderings, {len(masks)} masks, {len(errors)} errors")


if __name__ == "__main__":
    main()
