#!/usr/bin/env python3
"""Check a `zamba-train export-hf` directory with Hugging Face transformers.

    python scripts/check_hf_export.py EXPORT_DIR --zamba-train target/release/zamba-train \
        [--text "some text"] [--tolerance 1e-4]

1. `AutoTokenizer.from_pretrained(EXPORT_DIR)` and `ZambaForCausalLM.from_pretrained(EXPORT_DIR)`
   load (pure-PyTorch Mamba path: the script refuses to run with mamba-ssm / causal-conv1d).
2. The text is tokenized by transformers; `zamba-train logits --hf EXPORT_DIR` computes logits on
   the same ids; the max |Δlogit| against transformers (float32, eager attention) must be within
   the tolerance.
3. transformers' greedy `generate` and `zamba-train generate --temperature 0` continue a prompt
   with the same text.

Prints one JSON line with the results; exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, ZambaForCausalLM


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--zamba-train", required=True, help="path to the zamba-train binary")
    ap.add_argument("--text", default="<|user|>\nWhat is 12 + 30?\n<|assistant|>\n42")
    ap.add_argument("--prompt", default="<|user|>\nRepeat exactly: hello\n<|assistant|>\n")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()

    for mod in ("mamba_ssm", "causal_conv1d"):
        try:
            __import__(mod)
            raise SystemExit(f"{mod} is importable: uninstall it so the pure-PyTorch Mamba path is used")
        except ImportError:
            pass
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.export_dir)
    model = ZambaForCausalLM.from_pretrained(args.export_dir, dtype=torch.float32, attn_implementation="eager").eval()

    ids = tok(args.text)["input_ids"]
    with torch.no_grad():
        hf_logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]

    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens.json"
        out = Path(tmp) / "logits.json"
        tokens.write_text(json.dumps(ids))
        subprocess.run(
            [args.zamba_train, "logits", "--hf", str(args.export_dir), "--tokens", str(tokens), "--out", str(out)],
            check=True,
        )
        ours = torch.tensor(json.loads(out.read_text())["logits"])
    diff = float((ours - hf_logits).abs().max())

    prompt_ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = model.generate(
            prompt_ids, max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=True
        )[0, prompt_ids.shape[1]:]
    hf_text = tok.decode(generated, skip_special_tokens=True)
    ours_text = subprocess.run(
        [args.zamba_train, "generate", "--checkpoint", str(args.export_dir), "--prompt", args.prompt,
         "--max-new-tokens", str(args.max_new_tokens), "--temperature", "0"],
        check=True, capture_output=True, text=True,
    ).stdout
    ours_text = ours_text[:-1] if ours_text.endswith("\n") else ours_text

    result = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokens": len(ids),
        "max_abs_logit_diff": diff,
        "tolerance": args.tolerance,
        "greedy_transformers": hf_text,
        "greedy_zamba_train": ours_text,
    }
    print(json.dumps(result, ensure_ascii=False))
    ok = diff <= args.tolerance and hf_text == ours_text
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
