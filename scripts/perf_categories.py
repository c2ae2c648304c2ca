#!/usr/bin/env python3
"""Sums `perf report --sort symbol --stdio` self-time percentages into the categories of
docs/performance.md's step profile; reads the report on stdin, prints a Markdown table."""

from __future__ import annotations

import re
import sys

# First matching pattern wins; patterns are matched against the symbol name.
CATEGORIES = [
    ("GEMM (gemm crate kernels and packing)", r"gemm|nano_gemm|pack_|microkernel"),
    ("causal conv + SiLU", r"zamba_kernels::conv|causal_conv"),
    ("selective scan", r"zamba_kernels::scan|selective_scan|step_terms"),
    ("RMSNorm", r"zamba_kernels::rms_norm|rms_norm"),
    ("cross-entropy", r"zamba_kernels::cross_entropy|log_sum_exp|softmax_times|log_softmax"),
    ("AdamW", r"zamba_kernels::adamw|adamw"),
    ("attention softmax (its GEMMs count as GEMM)", r"attention|flash|softmax"),
    ("GELU gate", r"zamba_kernels::gelu"),
    ("memory: alloc, zeroing, page faults", r"malloc|free|memset|calloc|clear_page|page|mmap|munmap|alloc|anonymous|zap_|rmqueue|_raw_spin|handle_mm|lru|folio|memcg|pte|tlb|list_del|charge|mm_|vma|__mod_|kmem|cgroup|irq|do_user_addr|exc_|asm_|rcu|release_pages|uncharge|mem_cgroup"),
    ("copies (contiguous, cat, transpose)", r"memcpy|memmove|copy_|contiguous|cat|strided|transpose|permute|__memcpy"),
    ("element-wise / reductions (Burn ops)", r"burn_flex|macerator|binary|unary|scalar_op|reduce|sum|mean|activation|gelu|silu|sigmoid|exp|float|erf|Iterator|call_once|libm|powf|sqrt"),
    ("autodiff graph and dispatch", r"burn_autodiff|burn_dispatch|burn_tensor|burn_backend|graph|Gradients|NodeRef"),
    ("thread pool (rayon)", r"rayon|crossbeam|sched_yield|futex|__sched|syscall"),
]


def main() -> int:
    totals: dict[str, float] = {}
    other: list[tuple[float, str]] = []
    for line in sys.stdin:
        m = re.match(r"\s*([\d.]+)%\s+\[[.kHgu]\]\s+(.*)$", line)
        if not m:
            continue
        pct, sym = float(m.group(1)), m.group(2).strip()
        for name, pattern in CATEGORIES:
            if re.search(pattern, sym, re.IGNORECASE):
                totals[name] = totals.get(name, 0.0) + pct
                break
        else:
            totals["other"] = totals.get("other", 0.0) + pct
            other.append((pct, sym))
    print("| category | share of samples |")
    print("| --- | --- |")
    for name, _ in CATEGORIES + [("other", "")]:
        if name in totals:
            print(f"| {name} | {totals[name]:.1f}% |")
    other.sort(reverse=True)
    if other:
        print("\nlargest uncategorized symbols:", file=sys.stderr)
        for pct, sym in other[:15]:
            print(f"  {pct:5.1f}%  {sym[:120]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
