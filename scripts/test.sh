#!/usr/bin/env bash
# The test suite, two builds: the whole workspace on the default (Flex) backend, then, with
# `cube-cpu`, the test targets that run on every device of `zamba_kernels::kernel_devices` (the
# scan, attention, RMSNorm, GELU-gate, conv, cross-entropy and AdamW kernels, the model's execution) again, now also on
# Burn's CubeCL CPU runtime (the same `#[cube]` kernels the CUDA build runs, compiled by LLVM), the attention's memory
# against the sequence length there, and the trainer's bf16 run on that device. The other tests are device-independent and ran in the first build. The three crates are
# one cargo invocation so that Burn is built once with one feature set. The second build needs the offline LLVM of prepare-llvm.sh; the
# first, TensorBoard's event-file reader (prepare-test-python.sh), which checks the trainer's files.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/prepare-test-python.sh
cargo test --workspace
bash scripts/prepare-llvm.sh
cargo test -p zamba-kernels -p zamba-model -p zamba-train --features cube-cpu \
    --test selective_scan --test attention_devices --test elementwise_devices --test attention_memory \
    --test execution \
    --test cube_cpu_training
