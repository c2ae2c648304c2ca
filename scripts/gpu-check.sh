#!/usr/bin/env bash
# The GPU check: one command for a ~10-minute window on one H100/H200.
#
#   scripts/gpu-check.sh                 # all sections
#   scripts/gpu-check.sh build kernels   # some sections, in the given order
#
# Sections (functions below, run in this order by default):
#   build     prepare the offline LLVM, build zamba-train and the kernel/model tests with `cuda`
#   kernels   the scan kernel tests on the CUDA device (vs the CPU kernel, bf16, determinism)
#   model     the model tests on the CUDA device (whole model vs Flex, recomputation, bf16)
#   train     ~30 steps of the ~1B preset (zamba-1b) in bf16 with per-layer recomputation on
#             synthetic data: tokens/s, MFU, peak GPU memory
#   bench     one training step of the same model alone: the scan's share of the step
#   dist      NCCL collectives (one rank per GPU) and all-reduce bandwidth (needs libnccl.so.2)
#
# MFU is against the card's dense bf16 peak: 989 TFLOP/s for an H100 SXM and an H200 (both
# 989.4 TFLOP/s dense bf16 per NVIDIA's datasheets); set PEAK_TFLOPS for another card (H100 PCIe:
# 756). Results go to docs/performance.md (GPU section) by hand.
#
# Env: PEAK_TFLOPS (989), STEPS (30), SEQ_LEN (4096), MICRO_BATCH (4), SEQUENCES (8 per step),
#      OUT (target/gpu-check), CARGO_FLAGS (extra cargo flags).
set -euo pipefail
cd "$(dirname "$0")/.."

PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
STEPS="${STEPS:-30}"
SEQ_LEN="${SEQ_LEN:-4096}"
MICRO_BATCH="${MICRO_BATCH:-4}"
SEQUENCES="${SEQUENCES:-8}"
OUT="${OUT:-target/gpu-check}"
CARGO_FLAGS="${CARGO_FLAGS:-}"
BIN="target/release/zamba-train"

section() { printf '\n==== %s ====\n' "$*"; }
die() { printf 'gpu-check: error: %s\n' "$*" >&2; exit 1; }

# Runs "$@" while sampling the GPU's used memory every second; prints the peak in MiB.
with_memory_peak() {
    local samples="${OUT}/memory-samples.txt"
    : >"${samples}"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 500 >>"${samples}" &
    local sampler=$!
    local status=0
    "$@" || status=$?
    kill "${sampler}" 2>/dev/null || true
    wait "${sampler}" 2>/dev/null || true
    printf 'peak GPU memory used (nvidia-smi, whole device): %s MiB\n' \
        "$(sort -n "${samples}" | tail -n 1)"
    return "${status}"
}

check_gpu() {
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this check needs an NVIDIA GPU"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    mkdir -p "${OUT}"
}

build() {
    section "build (release, --features cuda)"
    bash scripts/prepare-llvm.sh
    # shellcheck disable=SC2086
    cargo build --release -p zamba-train --features cuda ${CARGO_FLAGS}
    # shellcheck disable=SC2086
    cargo test --release --features cuda -p zamba-kernels -p zamba-model --no-run ${CARGO_FLAGS}
}

kernels() {
    section "scan kernel tests on the CUDA device"
    # shellcheck disable=SC2086
    cargo test --release --features cuda -p zamba-kernels --test selective_scan ${CARGO_FLAGS}
}

model() {
    section "model tests on the CUDA device"
    # shellcheck disable=SC2086
    cargo test --release --features cuda -p zamba-model --test execution ${CARGO_FLAGS}
}

train_config() {
    cat <<EOF
# Written by scripts/gpu-check.sh.
[run]
name = "gpu-check"
dir = "${OUT}/run"

[model]
preset = "zamba-1b"

[data]
seq_len = ${SEQ_LEN}

[data.sources.web]
paths = ["synthetic:web"]
weight = 1.0

[batch]
sequences = ${SEQUENCES}
micro_batch = ${MICRO_BATCH}

[schedule]
kind = "cosine"
peak_lr = 3e-4
min_lr = 3e-5
warmup_steps = 5

[train]
steps = ${STEPS}
activation_checkpointing = "layers"

[checkpoint]
every = 0

[logging]
progress = false

[runtime]
device = "cuda:0"
precision = "bf16"
peak_gflops = ${PEAK_TFLOPS}000
EOF
}

train() {
    section "train: zamba-1b, bf16, layer recomputation, ${STEPS} steps of ${SEQUENCES} × ${SEQ_LEN} tokens"
    rm -rf "${OUT}/run"
    train_config >"${OUT}/gpu-check.toml"
    "${BIN}" --config "${OUT}/gpu-check.toml" --dry-run | sed -n '/^== Run/,$p' | head -n 12
    with_memory_peak "${BIN}" --config "${OUT}/gpu-check.toml"
    # Throughput and MFU: the median over the steps after the first five (JIT and allocator warm-up).
    python3 - "${OUT}/run/metrics.jsonl" "${PEAK_TFLOPS}" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [r for r in rows if not r.get("eval") and r["step"] >= 5] or rows
tok = statistics.median(r["tokens_per_sec"] for r in steps)
mfu = statistics.median(r["mfu"] for r in steps if r.get("mfu") is not None)
print(f"tokens/s (median of steps 5..): {tok:.0f}")
print(f"MFU vs {sys.argv[2]} TFLOP/s dense bf16: {100 * mfu:.1f}% (model FLOPs: 3x forward, attention without causal discount)")
print(f"final loss: {rows[-1]['loss']}")
PY
}

bench() {
    section "bench: one training step of zamba-1b alone (scan share)"
    with_memory_peak "${BIN}" bench model --device cuda --preset zamba-1b --precision bf16 \
        --activation-checkpointing layers --batch "${MICRO_BATCH}" --seq-len "${SEQ_LEN}" \
        --steps 3 --peak-gflops "${PEAK_TFLOPS}000"
}

dist() {
    local gpus
    gpus=$(nvidia-smi -L | wc -l)
    section "zamba-dist: NCCL collectives (world 1 on GPU 0; one rank per GPU on all ${gpus})"
    # shellcheck disable=SC2086
    ZAMBA_GPU_COUNT=${gpus} cargo test --release -p zamba-dist --features cuda --test nccl ${CARGO_FLAGS} \
        -- --ignored --test-threads=1 every_collective_on_one_rank_per_gpu
    if [[ ${gpus} -ge 2 ]]; then
        section "zamba-dist: a rank that skips a collective is named (world ${gpus})"
        # shellcheck disable=SC2086
        ZAMBA_GPU_COUNT=${gpus} cargo test --release -p zamba-dist --features cuda --test nccl ${CARGO_FLAGS} \
            -- --ignored --test-threads=1 a_rank_that_skips_a_collective_is_named
    fi
    section "zamba-dist: NCCL all-reduce bandwidth"
    for world in 1 "${gpus}"; do
        "${BIN}" bench allreduce --backend nccl --world "${world}" --sizes 1M,16M,64M,256M --iters 20
        "${BIN}" bench allreduce --backend nccl --world "${world}" --dtype bf16 --sizes 64M,256M --iters 20
    done
}

main() {
    local sections=("$@")
    if [[ ${#sections[@]} -eq 0 ]]; then
        sections=(build kernels model train bench dist)
    fi
    check_gpu
    local start=${SECONDS}
    for s in "${sections[@]}"; do
        declare -F "${s}" >/dev/null || die "unknown section ${s}"
        "${s}"
    done
    section "done in $((SECONDS - start)) s"
}

main "$@"
