#!/usr/bin/env bash
# Builds the GPU bundle on an ordinary CPU machine (no GPU, no CUDA toolkit needed): a release
# `zamba-train` with `--features cuda`, stripped, packed with the GPU check and the transformers
# fixture its model checks read, into target/zamba-gpu-bundle.tar.xz (at most 60 MiB).
#
#   scripts/gpu-bundle.sh [--with-nvrtc]
#
# --with-nvrtc also builds `zamba-train-nvrtc` (`--features cuda-nvrtc`: the CubeCL kernels
# compiled as CUDA C++ by NVRTC instead of through LLVM) in target/nvrtc, for the check's nvrtc
# section to time against the default binary; a second release build (about as long again).
#
# On a GPU node (NVIDIA driver; NCCL and the other CUDA libraries the binary loads at run time
# may live only in a Python environment's nvidia/*/lib folders), with no compiler and no network:
#
#   tar xf zamba-gpu-bundle.tar.xz && cd zamba-gpu-bundle && ./gpu-check.sh
#
# Needs what a `--features cuda` build needs (scripts/prepare-llvm.sh: python3 with pip, PyPI
# reachable once; also for CUDA's libdevice, from NVIDIA's nvcc wheel), ~12 minutes of a 2-core machine from a cold target dir, and `strip`, `tar`,
# `xz`. Env: CARGO_FLAGS (extra cargo flags).
set -euo pipefail
cd "$(dirname "$0")/.."

LIMIT_MIB=60
NVRTC=0
case "${1:-}" in
    --with-nvrtc) NVRTC=1 ;;
    "") ;;
    *) echo "gpu-bundle: error: unknown argument '$1' (expected nothing or --with-nvrtc)" >&2; exit 2 ;;
esac
NAME="zamba-gpu-bundle"
STAGE="target/${NAME}"
ARCHIVE="target/${NAME}.tar.xz"

# CUDA's libdevice (the math functions — exp, log, tanh — that LLVM's NVPTX backend links into
# every kernel using them), from NVIDIA's pinned, hash-checked nvcc wheel, into $1: the GPU node
# may have a driver and pip's CUDA libraries but no toolkit, and no network.
LIBDEVICE_WHEEL="nvidia-cuda-nvcc-cu12==12.9.86"
LIBDEVICE_WHEEL_SHA="5d6a0d32fdc7ea39917c20065614ae93add6f577d840233237ff08e9a38f58f0"
bundle_libdevice() {
    local wheels="target/libdevice-wheel"
    mkdir -p "${wheels}" "$1"
    if ! compgen -G "${wheels}/nvidia_cuda_nvcc_cu12-*.whl" >/dev/null; then
        "${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: \
            --platform manylinux2010_x86_64 --dest "${wheels}" "${LIBDEVICE_WHEEL}"
    fi
    local wheel
    wheel=$(compgen -G "${wheels}/nvidia_cuda_nvcc_cu12-*.whl" | head -n 1)
    echo "${LIBDEVICE_WHEEL_SHA}  ${wheel}" | sha256sum --check --quiet \
        || { echo "gpu-bundle: error: ${wheel} does not have the pinned hash" >&2; exit 1; }
    "${PYTHON:-python3}" - "${wheel}" "$1" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    data = wheel.read("nvidia/cuda_nvcc/nvvm/libdevice/libdevice.10.bc")
with open(f"{sys.argv[2]}/libdevice.10.bc", "wb") as out:
    out.write(data)
PY
}

bash scripts/prepare-llvm.sh
# shellcheck disable=SC2086
cargo build --release -p zamba-train --features cuda ${CARGO_FLAGS:-}
if (( NVRTC )); then
    # shellcheck disable=SC2086
    CARGO_TARGET_DIR=target/nvrtc cargo build --release -p zamba-train --features cuda-nvrtc ${CARGO_FLAGS:-}
fi

rm -rf "${STAGE}" "${ARCHIVE}"
mkdir -p "${STAGE}/fixtures"
cp target/release/zamba-train "${STAGE}/"
strip "${STAGE}/zamba-train"
if (( NVRTC )); then
    cp target/nvrtc/release/zamba-train "${STAGE}/zamba-train-nvrtc"
    strip "${STAGE}/zamba-train-nvrtc"
fi
cp scripts/gpu-check.sh "${STAGE}/"
bundle_libdevice "${STAGE}/cuda/nvvm/libdevice"
cp -r tests/fixtures/zamba-tiny-h2 "${STAGE}/fixtures/"
cat >"${STAGE}/README.txt" <<EOF
zamba-train GPU bundle ($(git describe --always --dirty 2>/dev/null || echo unknown), built $(date -u +%Y-%m-%d))

  ./gpu-check.sh            all sections on the first CUDA device (about 8 minutes on an H100)
  ./gpu-check.sh --smoke    every section at tiny sizes (proves the script; no GPU needed)
  ./gpu-check.sh --help     sections and options

Results: gpu-check-out/ (one log and one JSON per section, summary.json, the table at the end).
The binary also runs alone: ./zamba-train selftest --device cuda, ./zamba-train --help.
It loads libcuda (the driver) and, for the dist section, libnccl at run time; gpu-check.sh finds
them on LD_LIBRARY_PATH, /usr/local/cuda/lib64 or a Python environment's nvidia/*/lib folders.
Its kernels link CUDA's libdevice when they are compiled: gpu-check.sh sets CUDA_PATH to a CUDA
toolkit if there is one, else to cuda/ here (libdevice from NVIDIA's nvcc wheel). To run the
binary alone without a toolkit: CUDA_PATH=$PWD/cuda ./zamba-train ...
EOF
tar -C target -cJf "${ARCHIVE}" "${NAME}"

size=$(stat -c %s "${ARCHIVE}")
mib=$(( (size + (1 << 20) - 1) >> 20 ))
echo "gpu-bundle: ${ARCHIVE} (${mib} MiB; binary $(( $(stat -c %s "${STAGE}/zamba-train") >> 20 )) MiB unpacked)"
if (( size > LIMIT_MIB << 20 )); then
    echo "gpu-bundle: error: the archive is over ${LIMIT_MIB} MiB" >&2
    exit 1
fi
