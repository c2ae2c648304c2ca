#!/usr/bin/env bash
# The test suite, two builds: the whole workspace on the default (Flex) backend, then the scan
# kernels and the model again with `cube-cpu`, where every kernel and model test also runs on Burn's
# CubeCL CPU runtime (the same `#[cube]` kernels the CUDA build runs, compiled by LLVM; see
# `zamba_kernels::kernel_devices`). The second build needs the offline LLVM of prepare-llvm.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace
bash scripts/prepare-llvm.sh
cargo test -p zamba-kernels -p zamba-model --features cube-cpu
