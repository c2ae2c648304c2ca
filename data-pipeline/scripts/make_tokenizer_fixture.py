"""Builds the fixture for the "token counts equal Python `tokenizers`" test.

Trains a small byte-level BPE (GPT-2 style pre-tokenizer) on the GPL-3 and Apache-2.0 licence
texts shipped with Debian, then records, for a few real-text documents, the token count that
Python `tokenizers` gives with add_special_tokens=False. The Rust test tokenizes the same
documents through `zamba_data::tokenize` and compares (adding 1 for the appended EOS).

Run from data-pipeline/:  /root/.venvs/tok/bin/python scripts/make_tokenizer_fixture.py
"""
import json
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

FIX = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
LICENSES = Path("/usr/share/common-licenses")


def main() -> None:
    corpus = [(LICENSES / name).read_text() for name in ("GPL-3", "Apache-2.0")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(str(FIX / "bpe-1000.json"))

    # Real text the tokenizer was not trained on, plus non-ASCII and odd whitespace.
    docs = {
        "lgpl-3-head.txt": (LICENSES / "LGPL-3").read_text()[:3000],
        "mpl-2.0-head.txt": (LICENSES / "MPL-2.0").read_text()[:3000],
        "multilingual.txt": (
            "Zamba est un modèle hybride : des blocs Mamba et un bloc d'attention partagé.\n"
            "Größere Modelle brauchen mehr Daten — 東京で学習した。 Ελληνικά κείμενα, emoji 🚀🙂.\n"
            "  indented line\twith tabs\r\nand CRLF   trailing spaces   \n\n\nnumbers 3.14159 2,718 1e-9\n"
        ),
    }
    counts = {}
    for name, text in docs.items():
        (FIX / name).write_text(text)
        counts[name] = len(tok.encode(text, add_special_tokens=False).ids)
    expected = {
        "tokenizer": "bpe-1000.json",
        "python_tokenizers_version": tokenizers.__version__,
        "add_special_tokens": False,
        "token_counts": counts,
    }
    (FIX / "expected_token_counts.json").write_text(json.dumps(expected, indent=2) + "\n")
    print(json.dumps(expected, indent=2))


if __name__ == "__main__":
    main()
