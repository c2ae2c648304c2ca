#!/usr/bin/env python3
"""Time forward+backward of Hugging Face transformers' ZambaForCausalLM on CPU (the baseline for our Rust/Burn port).

Run by hand (not in CI), with torch + transformers installed, e.g.:

    /root/.venvs/hf/bin/python scripts/bench_transformers.py                     # warmup 1, 3 measured steps
    /root/.venvs/hf/bin/python scripts/bench_transformers.py --warmup 0 --steps 1 --threads 2

Bench config (Zamba-7B ratios, scaled down): hidden_size 256, 12 layers of which 2 hybrid (period 6 / offset 4
-> hybrid layers [2, 7]), n_mamba_heads 2, mamba_expand 2, d_state 16, dt_rank auto (16), 8 attention heads over
attention_hidden_size 512 (head_dim 64), intermediate_size 1024, vocab 4096, seq 512, batch 4; float32, train
mode, random init (seeded), loss with labels = input_ids; grads are zeroed between steps, no optimizer step.
Uses the pure-PyTorch Mamba path (sequential selective scan) and SDPA attention unless --attn eager.

Prints one JSON object: {seconds_per_step, tokens_per_sec, torch_threads, versions, config, loadavg_start,
loadavg_end, step_seconds, loss, ...}. /proc/loadavg is read at start and end because other jobs may share the CPUs.

Side by side with the Rust trainer, in one run on the same machine and thread count (the "x transformers" ratio):

    cargo build -p zamba-train
    python scripts/bench_transformers.py --threads 2 --zamba-train target/debug/zamba-train

runs `zamba-train bench model --json --no-torch` first (RAYON_NUM_THREADS = --threads), then transformers, and adds
{"zamba_train": {...}, "speedup_vs_transformers": ...} to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return "n/a"


def run_zamba_train(args: argparse.Namespace) -> dict:
    """`zamba-train bench model --json` on the same shapes and thread count; its last line is the JSON."""
    import subprocess

    env = dict(os.environ)
    if args.threads:
        env["RAYON_NUM_THREADS"] = str(args.threads)
    cmd = [args.zamba_train, "bench", "model", "--json", "--no-torch", "--batch", str(args.batch),
           "--seq-len", str(args.seq), "--steps", str(args.zamba_steps)]
    print(f"[bench] {' '.join(cmd)} (loadavg {loadavg()})", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    print(out, file=sys.stderr, flush=True)
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zamba-train", metavar="BIN", help="also run BIN bench model (same shapes, threads) first")
    ap.add_argument("--zamba-steps", type=int, default=3, help="timed steps of the zamba-train run (default 3)")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    zamba = run_zamba_train(args) if args.zamba_train else None

    load_start = loadavg()
    import numpy as np
    import torch

    import transformers
    from transformers import ZambaConfig, ZambaForCausalLM

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg_kwargs = dict(
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=12,
        attn_layer_period=6,
        attn_layer_offset=4,
        n_mamba_heads=2,
        mamba_expand=2,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_dt_rank="auto",
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1024,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        tie_word_embeddings=True,
        use_cache=False,
    )
    cfg = ZambaConfig(**cfg_kwargs)
    model = ZambaForCausalLM._from_config(cfg, attn_implementation=args.attn).to(torch.float32)
    model.train()
    hybrid = [i for i, t in enumerate(cfg.layers_block_type) if t == "hybrid"]
    assert len(hybrid) == 2, cfg.layers_block_type
    n_params = sum(p.numel() for p in model.parameters())

    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        return float(out.loss.detach())

    def note(msg: str) -> None:
        print(f"[bench] {msg} (loadavg {loadavg()})", file=sys.stderr, flush=True)

    note(f"{n_params} params, hybrid layers {hybrid}, {args.warmup} warmup + {args.steps} timed steps")
    for i in range(args.warmup):
        t0 = time.perf_counter()
        step()
        note(f"warmup step {i + 1}/{args.warmup}: {time.perf_counter() - t0:.1f} s")
    times, losses = [], []
    for i in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        note(f"timed step {i + 1}/{args.steps}: {times[-1]:.1f} s, loss {losses[-1]:.4f}")

    sps = sum(times) / len(times)
    result = {
        "seconds_per_step": sps,
        "tokens_per_sec": args.batch * args.seq / sps,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "config": {
            **{k: v for k, v in cfg_kwargs.items() if k != "use_cache"},
            "mamba_dt_rank": cfg.mamba_dt_rank,
            "attention_hidden_size": cfg.attention_hidden_size,
            "attention_head_dim": cfg.attention_head_dim,
            "hybrid_layers": hybrid,
            "batch": args.batch,
            "seq": args.seq,
            "dtype": "float32",
            "device": "cpu",
            "attn_implementation": model.config._attn_implementation,
            "mamba_path": "pure PyTorch sequential scan",
            "n_params": n_params,
        },
        "warmup": args.warmup,
        "steps": args.steps,
        "step_seconds": times,
        "loss": losses,
        "cpu_count": os.cpu_count(),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
    }
    if zamba is not None:
        result["zamba_train"] = zamba
        result["speedup_vs_transformers"] = zamba["tokens_per_sec"] / result["tokens_per_sec"]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
