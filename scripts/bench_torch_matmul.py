#!/usr/bin/env python3
"""torch.matmul GFLOP/s at given shapes (best of several runs each), as one JSON object.

Used by `zamba-train bench peak` (which passes this file's text with `python -c`) so that MFU is
never reported against a peak a faster library on the same machine beats: f32 on the CPU, and bf16
on a GPU (the GPU check's measured peak). Also runnable alone:

    python3 scripts/bench_torch_matmul.py --threads 2 --shapes 2048x256x4096 2048x2048x2048
    python3 scripts/bench_torch_matmul.py --device cuda --dtype bf16 --shapes 8192x8192x8192
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    ap.add_argument("--shapes", nargs="+", default=["2048x2048x2048"], help="MxKxN, row-major A[M,K] @ B[K,N]")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (a CUDA device is synchronised around each product)")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    results = []
    for shape in args.shapes:
        m, k, n = (int(x) for x in shape.split("x"))
        a = torch.rand(m, k, dtype=dtype, device=args.device)
        b = torch.rand(k, n, dtype=dtype, device=args.device)
        flops = 2.0 * m * k * n
        reps = int(min(50, max(3, 2e10 / flops)))
        torch.matmul(a, b)
        sync()
        best = 0.0
        for _ in range(reps):
            t = time.perf_counter()
            torch.matmul(a, b)
            sync()
            best = max(best, flops / (time.perf_counter() - t) / 1e9)
        results.append(best)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "gflops": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
