#!/usr/bin/env python3
"""Make small golden fixtures from Hugging Face transformers' ZambaForCausalLM.

Run by hand (not in CI); needs torch + transformers + safetensors + numpy, e.g. in a venv outside the repo:

    python3 -m venv /root/.venvs/hf
    /root/.venvs/hf/bin/pip install torch transformers safetensors numpy
    /root/.venvs/hf/bin/python scripts/make_hf_fixture.py            # writes tests/fixtures/zamba-tiny-*/
    /root/.venvs/hf/bin/python scripts/make_hf_fixture.py --only zamba-tiny-h1 --out-dir /tmp/fx

Deterministic for a given --seed (default 1234), transformers/torch version and CPU.

For each fixture it builds a random-weight ZambaForCausalLM from ZambaConfig, makes the weights non-trivial
(RMSNorm gains ~ 1 +- 0.1, non-zero conv bias, random D, broad random dt_proj_bias, perturbed A_log, random
embedding row 0 even though pad_token_id = 0), runs it in float32 eval mode on a fixed token sequence with
eager attention and the pure-PyTorch (slow) Mamba path, and writes under <out-dir>/<name>/:

  config.json, model.safetensors   via save_pretrained(safe_serialization=True), the layout transformers writes
  tokens.json                      JSON array of token ids (one sequence, batch 1)
  expected.json                    {"logits": [[f32; vocab]; T],
                                    "loss": mean next-token CE as transformers computes it with labels=tokens,
                                    "hidden_states_last": [[f32; d]; T]  final_layernorm output (lm_head input),
                                    "layer_outputs": [[[f32; d]; T]; L]  residual stream after each layer,
                                    "grad_norms": {param name: L2 norm of d loss / d param},
                                    "meta": {...}}

It also checks, and fails loudly otherwise, that (a) reloading the written directory with from_pretrained
reproduces the logits bit for bit, (b) SDPA attention agrees with eager, and (c) an independent float64
re-implementation written from shared/notes/zamba-model.md (in this file, `reference_logits`) agrees with
transformers to 1e-4, reading the weights back from model.safetensors by their names.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import transformers
from safetensors import safe_open
from transformers import ZambaConfig, ZambaForCausalLM

REPO = Path(__file__).resolve().parent.parent

COMMON = dict(
    hidden_size=32,
    mamba_expand=2,
    mamba_d_conv=4,
    mamba_conv_bias=True,
    mamba_proj_bias=False,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=64,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    hidden_act="gelu",
    hidden_mamba_act="silu",
    # Larger than the default 0.02 so that logits are far from uniform (a sharper test).
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    use_cache=False,
)

FIXTURES = {
    # 7 layers, period 2 / offset 1 -> hybrid layers [2, 4, 6] (the last layer is hybrid too).
    "zamba-tiny-h2": dict(
        COMMON,
        vocab_size=112,
        n_mamba_heads=2,
        mamba_d_state=16,
        mamba_dt_rank="auto",  # ceil(32 / 16) = 2
        num_hidden_layers=7,
        attn_layer_period=2,
        attn_layer_offset=1,
    ),
    # 6 layers, period 3 / offset 0 -> hybrid layers [2, 3] (two consecutive hybrids, then two Mamba layers).
    "zamba-tiny-h1": dict(
        COMMON,
        vocab_size=96,
        n_mamba_heads=1,
        mamba_d_state=8,
        mamba_dt_rank=4,  # explicit, != auto (2)
        num_hidden_layers=6,
        attn_layer_period=3,
        attn_layer_offset=0,
    ),
}

SEQ_LEN = 20


def f32_list(t: torch.Tensor):
    """Nested lists of the shortest decimal strings that round-trip to the same float32."""
    a = t.detach().to(torch.float32).cpu().numpy()

    def conv(x):
        if x.ndim == 0:
            return float(np.format_float_positional(x, unique=True, trim="-")) if np.isfinite(x) else float(x)
        return [conv(y) for y in x]

    return conv(a)


def make_tokens(vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed + 17)
    toks = torch.randint(3, vocab, (SEQ_LEN,), generator=g).tolist()
    toks[0] = 1  # bos
    toks[SEQ_LEN // 2] = 0  # pad id inside the sequence (plain token for a causal LM without attention_mask)
    toks[SEQ_LEN // 2 + 3] = toks[3]  # a repeated token
    return toks


@torch.no_grad()
def perturb(model: ZambaForCausalLM, seed: int) -> None:
    """Make every parameter kind non-trivial, deterministically."""
    g = torch.Generator().manual_seed(seed + 101)

    def randn_like(p, std):
        return torch.randn(p.shape, generator=g, dtype=torch.float32) * std

    for name, p in model.named_parameters():  # tied/shared parameters appear once
        if name.endswith("layernorm.weight"):
            p.copy_(1.0 + randn_like(p, 0.1))
        elif name.endswith("conv1d.bias"):
            p.copy_(randn_like(p, 0.1))
        elif name.endswith("mamba.D"):
            p.copy_(1.0 + randn_like(p, 0.5))
        elif name.endswith("dt_proj_bias"):
            lo, hi = math.log(1e-2), math.log(0.5)
            dt = torch.exp(torch.rand(p.shape, generator=g) * (hi - lo) + lo)
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt), dt in [0.01, 0.5]
        elif name.endswith("A_log"):
            p.add_(randn_like(p, 0.2))
        elif name == "model.embed_tokens.weight":
            # HF zeroes the padding_idx row at init; make it a normal row so token 0 is non-trivial.
            p[0].copy_(randn_like(p[0], model.config.initializer_range))


# ----------------------------------------------------------------------------------------------------------
# Independent float64 reference written from shared/notes/zamba-model.md, reading tensors by saved name.
# ----------------------------------------------------------------------------------------------------------


def reference_logits(cfg: dict, sd: dict[str, torch.Tensor], tokens: list[int]) -> torch.Tensor:
    W = {k: v.to(torch.float64) for k, v in sd.items()}
    d = cfg["hidden_size"]
    D = cfg["mamba_expand"] * d
    H = cfg["n_mamba_heads"]
    P = D // H
    N = cfg["mamba_d_state"]
    R = cfg["mamba_dt_rank"]
    K = cfg["mamba_d_conv"]
    nh = cfg["num_attention_heads"]
    hd = cfg["attention_head_dim"]
    eps = cfg["rms_norm_eps"]
    types = cfg["layers_block_type"]
    hybrid = [i for i, t in enumerate(types) if t == "hybrid"]
    shared = f"model.layers.{hybrid[0]}.shared_transf" if hybrid else None
    T = len(tokens)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def mamba(pre, h):
        p = h @ W[f"{pre}.in_proj.weight"].T  # [T, 2D]
        x, z = p[:, 0::2], p[:, 1::2]  # interleaved
        w = W[f"{pre}.conv1d.weight"][:, 0, :]  # [D, K]
        xp = torch.cat([torch.zeros(K - 1, D, dtype=x.dtype), x], 0)
        xc = torch.stack([(xp[t : t + K] * w.T).sum(0) for t in range(T)]) + W[f"{pre}.conv1d.bias"]
        xc = F.silu(xc)
        ys = []
        for hh in range(H):
            xh = xc[:, hh * P : (hh + 1) * P]  # [T, P]
            zh = z[:, hh * P : (hh + 1) * P]
            proj = xh @ W[f"{pre}.x_proj_weight"][hh].T  # [T, R+2N]
            dt_raw, Bm, Cm = proj[:, :R], proj[:, R : R + N], proj[:, R + N :]
            delta = F.softplus(dt_raw @ W[f"{pre}.dt_proj_weight"][hh].T + W[f"{pre}.dt_proj_bias"][hh])  # [T, P]
            A = -torch.exp(W[f"{pre}.A_log"][hh])  # [P, N]
            s = torch.zeros(P, N, dtype=x.dtype)
            y = []
            for t in range(T):
                s = torch.exp(delta[t][:, None] * A) * s + delta[t][:, None] * Bm[t][None, :] * xh[t][:, None]
                y.append(s @ Cm[t] + W[f"{pre}.D"][hh] * xh[t])
            ys.append(torch.stack(y) * F.silu(zh))
        return torch.cat(ys, 1) @ W[f"{pre}.out_proj.weight"].T

    def attn_mlp(u):
        q = (u @ W[f"{shared}.self_attn.q_proj.weight"].T).view(T, nh, hd).transpose(0, 1)
        k = (u @ W[f"{shared}.self_attn.k_proj.weight"].T).view(T, nh, hd).transpose(0, 1)
        v = (u @ W[f"{shared}.self_attn.v_proj.weight"].T).view(T, nh, hd).transpose(0, 1)
        s = q @ k.transpose(1, 2) / math.sqrt(hd / 2)
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        a = (torch.softmax(s, -1) @ v).transpose(0, 1).reshape(T, nh * hd)
        a = a @ W[f"{shared}.self_attn.o_proj.weight"].T
        m = rms(a, W[f"{shared}.pre_ff_layernorm.weight"])
        g = F.gelu(m @ W[f"{shared}.feed_forward.gate_proj.weight"].T)  # erf GELU
        up = m @ W[f"{shared}.feed_forward.up_proj.weight"].T
        return (g * up) @ W[f"{shared}.feed_forward.down_proj.weight"].T

    E = W["model.embed_tokens.weight"]
    x0 = E[torch.tensor(tokens)]
    x = x0
    for i, t in enumerate(types):
        if t == "hybrid":
            u = rms(torch.cat([x, x0], -1), W[f"{shared}.input_layernorm.weight"])
            tt = attn_mlp(u) @ W[f"model.layers.{i}.linear.weight"].T
            pre = f"model.layers.{i}.mamba_decoder"
            x = x + mamba(f"{pre}.mamba", rms(x + tt, W[f"{pre}.input_layernorm.weight"]))
        else:
            pre = f"model.layers.{i}"
            x = x + mamba(f"{pre}.mamba", rms(x, W[f"{pre}.input_layernorm.weight"]))
    hN = rms(x, W["model.final_layernorm.weight"])
    lm = W.get("lm_head.weight", E)
    return hN @ lm.T


# ----------------------------------------------------------------------------------------------------------


def run_model(model, ids, labels=None):
    return model(input_ids=ids, labels=labels, use_cache=False)


def build_one(name: str, kwargs: dict, seed: int, out_root: Path) -> dict:
    torch.manual_seed(seed)
    cfg = ZambaConfig(**kwargs)
    model = ZambaForCausalLM._from_config(cfg, attn_implementation="eager") if hasattr(
        ZambaForCausalLM, "_from_config"
    ) else ZambaForCausalLM(cfg)
    model = model.to(torch.float32).eval()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    perturb(model, seed)

    # Sanity on the code path: no mamba-ssm / causal-conv1d / kernels, so the PyTorch fallbacks run.
    from transformers.models.zamba import modeling_zamba as mz

    for mod in ("mamba_ssm", "causal_conv1d", "kernels"):
        try:
            __import__(mod)
            raise SystemExit(f"{mod} is importable: uninstall it so the pure-PyTorch Mamba path is used")
        except ImportError:
            pass

    L = model.model.layers
    hy = [i for i, t in enumerate(cfg.layers_block_type) if t == "hybrid"]
    for i in hy[1:]:  # shared block really is one set of tensors
        assert L[i].shared_transf.self_attn.q_proj.weight is L[hy[0]].shared_transf.self_attn.q_proj.weight
    assert model.lm_head.weight is model.model.embed_tokens.weight

    tokens = make_tokens(cfg.vocab_size, seed)
    ids = torch.tensor([tokens])

    layer_outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: layer_outs.append(o.detach()[0].clone())) for layer in L]
    model.zero_grad(set_to_none=True)
    out = run_model(model, ids, labels=ids)
    for h in hooks:
        h.remove()
    out.loss.backward()
    grad_norms = {
        n: float(p.grad.detach().double().norm()) if p.grad is not None else None for n, p in model.named_parameters()
    }
    logits = out.logits.detach()[0]
    loss = float(out.loss.detach())
    with torch.no_grad():
        last = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
        loss_f64 = float(F.cross_entropy(logits[:-1].double(), ids[0, 1:]))

    # SDPA agrees with eager?
    sdpa = ZambaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    sdpa.load_state_dict(model.state_dict())
    with torch.no_grad():
        d_sdpa = float((run_model(sdpa, ids).logits[0] - logits).abs().max())
    assert d_sdpa < 1e-5, d_sdpa

    out_dir = out_root / name
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    gen = out_dir / "generation_config.json"
    if gen.exists():
        gen.unlink()  # not needed by the Rust side
    (out_dir / "tokens.json").write_text(json.dumps(tokens) + "\n")

    # Round trip through the written files.
    re = ZambaForCausalLM.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        d_reload = float((run_model(re, ids).logits[0] - logits).abs().max())
    assert d_reload == 0.0, d_reload

    with safe_open(out_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        sd = {k: f.get_tensor(k) for k in keys}
        shapes = {k: list(sd[k].shape) for k in keys}
        dtypes = sorted({str(sd[k].dtype) for k in keys})
    cfg_json = json.loads((out_dir / "config.json").read_text())
    ref = reference_logits(cfg_json, sd, tokens)
    d_ref = float((ref - logits.double()).abs().max())
    assert d_ref < 1e-4, d_ref

    expected = {
        "logits": f32_list(logits),
        "loss": loss,
        "hidden_states_last": f32_list(last),
        "layer_outputs": [f32_list(o) for o in layer_outs],
        "grad_norms": grad_norms,
        "meta": {
            "seed": seed,
            "seq_len": len(tokens),
            "loss_f64_from_f32_logits": loss_f64,
            "layers_block_type": list(cfg.layers_block_type),
            "hybrid_layers": hy,
            "attn_implementation": "eager",
            "mamba_path": "pure PyTorch (sequential selective scan; no mamba-ssm / causal-conv1d / kernels)",
            "max_abs_diff_sdpa_vs_eager": d_sdpa,
            "max_abs_diff_reload": d_reload,
            "max_abs_diff_f64_reference": d_ref,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "notes": "hidden_states_last = final_layernorm output; layer_outputs[i] = residual stream after "
            "layer i (before final_layernorm); grad_norms from loss.backward() in eval mode, f32; HF's "
            "nn.Embedding(padding_idx=0) drops the lookup-side gradient of embedding row 0.",
        },
    }
    (out_dir / "expected.json").write_text(json.dumps(expected, separators=(",", ":")) + "\n")

    info = {
        "name": name,
        "layers_block_type": list(cfg.layers_block_type),
        "hybrid_layers": hy,
        "attention_head_dim": cfg.attention_head_dim,
        "mamba_dt_rank": cfg.mamba_dt_rank,
        "tokens": tokens,
        "loss": loss,
        "loss_f64": loss_f64,
        "d_sdpa": d_sdpa,
        "d_reload": d_reload,
        "d_ref": d_ref,
        "n_params": sum(p.numel() for p in model.parameters()),
        "dtypes": dtypes,
        "keys": [(k, shapes[k]) for k in keys],
        "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())},
    }
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out-dir", type=Path, default=REPO / "tests" / "fixtures")
    ap.add_argument("--only", choices=sorted(FIXTURES), action="append")
    args = ap.parse_args()

    torch.set_num_threads(1)  # bitwise-stable reductions
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    for name in args.only or list(FIXTURES):
        info = build_one(name, FIXTURES[name], args.seed, args.out_dir)
        print(f"\n== {name} ({info['n_params']} params, dtypes {info['dtypes']})")
        print(f"layers_block_type: {info['layers_block_type']} -> hybrid {info['hybrid_layers']}")
        print(f"attention_head_dim {info['attention_head_dim']}, mamba_dt_rank {info['mamba_dt_rank']}")
        print(f"tokens: {info['tokens']}")
        print(f"loss {info['loss']!r} (f64 from f32 logits {info['loss_f64']!r})")
        print(
            f"max|diff| sdpa-vs-eager {info['d_sdpa']:.3g}, reload {info['d_reload']:.3g}, "
            f"f64 reference-from-notes {info['d_ref']:.3g}"
        )
        print("keys in model.safetensors:")
        for k, s in info["keys"]:
            print(f"  {k} {s}")
        print("files:", ", ".join(f"{k} {v} B" for k, v in info["files"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
