#!/usr/bin/env python3
"""f32 torch.matmul GFLOP/s at given shapes (best of several runs each), as one JSON object.

Used by `zamba-train bench peak` (which passes this file's text with `python -c`) so that MFU is
never reported against a peak a faster library on the same machine beats; also runnable alone:

    python3 scripts/bench_torch_matmul.py --threads 2 --shapes 2048x256x4096 2048x2048x2048
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
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for shape in args.shapes:
        m, k, n = (int(x) for x in shape.split("x"))
        a = torch.rand(m, k, dtype=torch.float32)
        b = torch.rand(k, n, dtype=torch.float32)
        flops = 2.0 * m * k * n
        reps = int(min(50, max(3, 2e10 / flops)))
        torch.matmul(a, b)
        best = 0.0
        for _ in range(reps):
            t = time.perf_counter()
            torch.matmul(a, b)
            best = max(best, flops / (time.perf_counter() - t) / 1e9)
        results.append(best)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "gflops": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
