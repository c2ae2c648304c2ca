#!/usr/bin/env bash
# Checks that need NVIDIA GPUs. Run on a GPU machine from the repository root:
#   bash scripts/gpu-check.sh
# Needs the LLVM prefix of scripts/prepare-llvm.sh (it is run here if missing), the CUDA driver,
# and NCCL (libnccl.so.2 on the library path) for the distributed checks. Each section is a
# function; the script runs them all and stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS=$(nvidia-smi -L | wc -l)
echo "== $GPUS GPU(s)"
nvidia-smi -L
bash scripts/prepare-llvm.sh

# ---- distributed (zamba-dist): NCCL communicators ------------------------------------------
dist_checks() {
    echo "== zamba-dist: NCCL collectives (world 1 on GPU 0; one rank per GPU on all $GPUS)"
    ZAMBA_GPU_COUNT=$GPUS cargo test --release -p zamba-dist --features cuda --test nccl \
        -- --ignored --test-threads=1 every_collective_on_one_rank_per_gpu
    if [ "$GPUS" -ge 2 ]; then
        echo "== zamba-dist: a rank that skips a collective is named (world $GPUS)"
        ZAMBA_GPU_COUNT=$GPUS cargo test --release -p zamba-dist --features cuda --test nccl \
            -- --ignored --test-threads=1 a_rank_that_skips_a_collective_is_named
    fi
    echo "== zamba-dist: NCCL all-reduce bandwidth"
    cargo build --release -p zamba-train --features cuda
    for world in 1 "$GPUS"; do
        ./target/release/zamba-train bench allreduce --backend nccl --world "$world" \
            --sizes 1M,16M,64M,256M --iters 20
        ./target/release/zamba-train bench allreduce --backend nccl --world "$world" \
            --dtype bf16 --sizes 64M,256M --iters 20
    done
}
# ---- end distributed ------------------------------------------------------------------------

dist_checks
echo "== GPU checks passed"
