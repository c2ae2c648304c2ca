#!/usr/bin/env bash
# The GPU check: everything the first minutes on a GPU node should tell us, from prebuilt
# binaries (the bundle of scripts/gpu-bundle.sh), with no compiler and no network.
#
#   ./gpu-check.sh                     all sections on the first CUDA device (needs a GPU)
#   ./gpu-check.sh --smoke             every section at tiny sizes on the best device the binary
#                                      finds (the CPU where there is no GPU): proves the script
#   ./gpu-check.sh kernels model       only these sections (then the report)
#
# Options: --bin DIR (folder of zamba-train; default: this script's folder, else target/release),
#          --out DIR (default: gpu-check-out), --fixtures DIR (default: DIR/fixtures beside the
#          binary, else the source tree's tests/fixtures), --budget S (default 450: every section
#          gets its own time limit, and none runs past the budget, so the whole check, kernel JIT
#          included, ends within 8 minutes).
#
# Sections (each runs on its own: a failing or timed-out section is reported and the next one
# runs; each writes OUT/<section>.json and OUT/<section>.log):
#   env      GPU name, driver, memory (nvidia-smi); the CUDA libraries found and used
#   kernels  `zamba-train selftest --only kernels`: the scan kernels vs the CPU kernel, the attention
#            kernels vs Burn's attention on the CPU (f32, bf16)
#   model    `zamba-train selftest --only model`: whole model vs CPU, recomputation, bf16,
#            transformers' logits
#   peak     measured bf16 GEMM peak through our GEMM path, and through PyTorch when present
#   step     zamba-1b training steps (bf16, layer recomputation, seq 4096): tokens/s, MFU, peak
#            memory, and the step's time split by op class (spans with device synchronisation);
#            first the cost model's prediction of the same run on this card (predict*.json)
#   scan     the scan op's achieved bandwidth against a measured device-to-device copy
#   nvrtc    the step section's run with zamba-train-nvrtc (beside zamba-train; kernels compiled by
#            NVRTC instead of LLVM: scripts/gpu-bundle.sh --with-nvrtc), when that binary is there
#   dist     NCCL (world 1): collectives' values, a collective issued from a second thread while
#            compute is queued (it must not wait for that compute), all-reduce bandwidth
# then `zamba-train bench report`: one table, also OUT/summary.json.
#
# Library search order (printed): LD_LIBRARY_PATH, /usr/local/cuda/lib64 (and CUDA_HOME),
# Python site-packages nvidia/*/lib (pip's PyTorch layout). libcuda comes with the driver.
# CUDA_PATH (printed) is set for the kernel compilers: a toolkit with libdevice and the CUDA headers
# (CUDA_PATH, CUDA_HOME, /usr/local/cuda, /opt/cuda), else links to pip's copies or the bundle's.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN_DIR=""
OUT="gpu-check-out"
FIXTURES=""
SMOKE=0
BUDGET=450
SECTIONS=()
# Each section's own time limit in seconds (the budget may cut it shorter).
declare -A LIMIT=([env]=30 [kernels]=90 [model]=120 [peak]=60 [step]=180 [scan]=60 [nvrtc]=150 [dist]=60)

die() { printf 'gpu-check: error: %s\n' "$*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --bin) BIN_DIR="${2:?--bin needs a folder}"; shift ;;
        --out) OUT="${2:?--out needs a folder}"; shift ;;
        --fixtures) FIXTURES="${2:?--fixtures needs a folder}"; shift ;;
        --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
        -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}"; exit 0 ;;
        env|kernels|model|peak|step|scan|nvrtc|dist) SECTIONS+=("$1") ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
DEFAULT_SECTIONS=1
[[ ${#SECTIONS[@]} -gt 0 ]] && DEFAULT_SECTIONS=0
[[ ${DEFAULT_SECTIONS} -eq 0 ]] || SECTIONS=(env kernels model peak step scan dist)

# The binary: --bin, else beside this script (the bundle), else the source tree's release build.
find_binary() {
    local dir
    for dir in ${BIN_DIR:+"${BIN_DIR}"} "${HERE}" "${HERE}/../target/release"; do
        if [[ -x "${dir}/zamba-train" ]]; then
            BIN="$(cd "${dir}" && pwd)/zamba-train"
            BIN_NVRTC="${BIN}-nvrtc"
            # With its NVRTC twin beside it, the default run times that one too (before dist).
            if [[ ${DEFAULT_SECTIONS} -eq 1 && -x "${BIN_NVRTC}" ]]; then
                SECTIONS=(env kernels model peak step scan nvrtc dist)
            fi
            return 0
        fi
    done
    die "no zamba-train binary in ${BIN_DIR:-${HERE} or ${HERE}/../target/release}; pass --bin DIR"
}

# Python's site-packages folders (where pip puts PyTorch's nvidia/* and triton wheels).
python_roots() {
    local python
    for python in python3 python; do
        command -v "${python}" >/dev/null 2>&1 || continue
        "${python}" - <<'PY' 2>/dev/null
import site, sys
roots = list(getattr(site, "getsitepackages", lambda: [])()) + [site.getusersitepackages()] + sys.path
for root in dict.fromkeys(roots):
    print(root)
PY
        break
    done
}

# Folders that may hold the CUDA user-space libraries, in search order.
library_dirs() {
    local d root
    IFS=: read -ra d <<<"${LD_LIBRARY_PATH:-}"
    printf '%s\n' "${d[@]}"
    [[ -n "${CUDA_HOME:-}" ]] && printf '%s\n' "${CUDA_HOME}/lib64"
    printf '%s\n' /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64
    while read -r root; do
        compgen -G "${root}/nvidia/*/lib" || true
    done < <(python_roots)
}

# CUDA toolkit roots to look in, in order; last, the bundle's own cuda/ (libdevice only, from
# scripts/gpu-bundle.sh).
toolkit_roots() {
    printf '%s\n' "${CUDA_PATH:-}" "${CUDA_HOME:-}" /usr/local/cuda /opt/cuda "${HERE}/cuda"
}

# The first existing file among $@ (paths relative to each toolkit root, then to each Python
# site-packages folder); prints its path.
find_toolkit_file() {
    local root relative
    while read -r root; do
        [[ -n "${root}" ]] || continue
        for relative in "$@"; do
            [[ -f "${root}/${relative}" ]] && { printf '%s\n' "${root}/${relative}"; return 0; }
        done
    done < <(toolkit_roots; python_roots)
    return 1
}

# Sets CUDA_PATH for the kernels' compilers: LLVM's NVPTX backend links CUDA's libdevice
# (nvvm/libdevice/libdevice.10.bc: exp, log, tanh, … — every kernel with a softmax, SiLU or the
# scan needs it), NVRTC includes the CUDA headers (include/cuda_bf16.h). A toolkit with both is used
# as it is; otherwise (a driver plus pip's CUDA wheels: nvidia/cuda_nvcc, nvidia/cuda_runtime, or
# triton's copy of libdevice) a folder of links to what was found stands in for one. Appends to
# OUT/libraries.txt.
locate_toolkit() {
    local libdevice include
    libdevice=$(find_toolkit_file nvvm/libdevice/libdevice.10.bc \
        nvidia/cuda_nvcc/nvvm/libdevice/libdevice.10.bc triton/backends/nvidia/lib/libdevice.10.bc) \
        || libdevice=""
    include=$(find_toolkit_file include/cuda_bf16.h nvidia/cuda_runtime/include/cuda_bf16.h) \
        || include=""
    local root="${libdevice%/nvvm/libdevice/libdevice.10.bc}"
    if [[ -n "${libdevice}" && -n "${include}" && "${include}" == "${root}/include/cuda_bf16.h" ]]; then
        export CUDA_PATH="${root}"
    elif [[ -n "${libdevice}${include}" ]]; then
        export CUDA_PATH="${OUT}/cuda-toolkit"
        mkdir -p "${CUDA_PATH}/nvvm/libdevice"
        [[ -n "${libdevice}" ]] && ln -sf "${libdevice}" "${CUDA_PATH}/nvvm/libdevice/libdevice.10.bc"
        [[ -n "${include}" ]] && ln -sfn "$(dirname "${include}")" "${CUDA_PATH}/include"
    fi
    printf '%-9s %s\n' libdevice "${libdevice:-not found (set CUDA_PATH to a CUDA toolkit, or pip install nvidia-cuda-nvcc-cu12)}" \
        | tee -a "${OUT}/libraries.txt"
    printf '%-9s %s\n' headers "${include:-not found (NVRTC-compiled kernels need include/cuda_bf16.h)}" \
        | tee -a "${OUT}/libraries.txt"
    [[ -n "${CUDA_PATH:-}" ]] && echo "CUDA_PATH=${CUDA_PATH}"
    return 0
}

# Finds library $1 (a soname pattern); prints its path.
find_library() {
    local dir hit
    while read -r dir; do
        [[ -n "${dir}" && -d "${dir}" ]] || continue
        hit=$(compgen -G "${dir}/$1" | head -n 1)
        [[ -n "${hit}" ]] && { printf '%s\n' "${hit}"; return 0; }
    done < <(library_dirs)
    return 1
}

# Puts the folders of the libraries found on LD_LIBRARY_PATH; writes OUT/libraries.txt.
locate_libraries() {
    local name pattern path dirs=()
    : >"${OUT}/libraries.txt"
    for entry in "cuda:libcuda.so.1" "nccl:libnccl.so*" "cublasLt:libcublasLt.so*" "nvrtc:libnvrtc.so*"; do
        name="${entry%%:*}"; pattern="${entry#*:}"
        if path=$(find_library "${pattern}"); then
            printf '%-9s %s\n' "${name}" "${path}" | tee -a "${OUT}/libraries.txt"
            dirs+=("$(dirname "${path}")")
        else
            printf '%-9s not found\n' "${name}" | tee -a "${OUT}/libraries.txt"
        fi
    done
    local joined
    joined=$(printf '%s\n' "${dirs[@]}" | awk '!seen[$0]++' | paste -sd: -)
    export LD_LIBRARY_PATH="${joined}${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"
}

json_string() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr -d '\n')"; }

# ---- sections ----------------------------------------------------------------------------------

section_env() {
    local name="none" driver="none" memory=0
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        IFS=, read -r name driver memory < <(nvidia-smi -i 0 \
            --query-gpu=name,driver_version,memory.total --format=csv,noheader,nounits)
        name="$(echo "${name}" | xargs)"; driver="$(echo "${driver}" | xargs)"
        memory="$(echo "${memory}" | xargs)"
    fi
    echo "GPU: ${name}, driver ${driver}, ${memory} MiB"
    echo "device: ${DEVICE}"
    {
        printf '{"gpu": %s, "driver": %s, "memory_mib": %s, "device": %s, "smoke": %s, "libraries": [' \
            "$(json_string "${name}")" "$(json_string "${driver}")" "${memory:-0}" \
            "$(json_string "${DEVICE}")" "$([[ ${SMOKE} -eq 1 ]] && echo true || echo false)"
        local first=1 line
        while read -r line; do
            [[ ${first} -eq 1 ]] || printf ', '
            first=0
            json_string "${line}"
        done <"${OUT}/libraries.txt"
        printf ']}\n'
    } >"${OUT}/env.json"
}

section_kernels() {
    "${BIN}" selftest --device "${DEVICE}" --only kernels ${FIXTURES:+--fixtures "${FIXTURES}"} \
        --json "${OUT}/kernels.json"
}

section_model() {
    "${BIN}" selftest --device "${DEVICE}" --only model ${FIXTURES:+--fixtures "${FIXTURES}"} \
        --json "${OUT}/model.json"
}

section_peak() {
    local size=8192
    [[ ${SMOKE} -eq 1 ]] && size=256
    "${BIN}" bench peak --device "${DEVICE}" --precision bf16 --size "${size}" \
        --json "${OUT}/peak.json"
}

# The step's model, batch and arithmetic (tiny with --smoke): the step and nvrtc sections' run.
step_args() {
    if [[ ${SMOKE} -eq 1 ]]; then
        echo --preset zamba-tiny --batch 1 --seq-len 64
    else
        echo --preset zamba-1b --batch 1 --seq-len 4096
    fi
    echo --precision bf16 --activation-checkpointing layers
}

section_step() {
    # shellcheck disable=SC2046
    set -- $(step_args)
    predict_step "$@"
    local steps=3
    [[ ${SMOKE} -eq 1 ]] && steps=2
    with_memory_peak "${BIN}" bench model --device "${DEVICE}" "$@" --steps "${steps}" \
        --no-torch --trace "${OUT}/step-trace.json" --json-file "${OUT}/step.json"
}

# The step section's run (untraced) with the binary whose kernels NVRTC compiles.
section_nvrtc() {
    [[ -x "${BIN_NVRTC}" ]] || { echo "no ${BIN_NVRTC} (scripts/gpu-bundle.sh --with-nvrtc)"; return 1; }
    # shellcheck disable=SC2046
    "${BIN_NVRTC}" bench model --device "${DEVICE}" $(step_args) --steps 2 --no-torch \
        --json-file "${OUT}/step-nvrtc.json"
}

# The cost model's prediction of the step section's run on this card (the datasheet's H100 SXM
# where no GPU is seen): OUT/predict.json for the kernels this binary runs, OUT/predict-planned.json
# for the planned ones. A card the model does not know is reported, not fatal.
predict_step() {
    local card="h100-sxm" name
    if command -v nvidia-smi >/dev/null 2>&1 \
        && name=$(nvidia-smi -i 0 --query-gpu=name --format=csv,noheader 2>/dev/null); then
        card="$(echo "${name}" | xargs)"
    fi
    local kernels file
    for kernels in current planned; do
        file="${OUT}/predict.json"
        [[ ${kernels} == planned ]] && file="${OUT}/predict-planned.json"
        "${BIN}" bench model --device cuda --predict --card "${card}" --kernels "${kernels}" "$@" \
            --json-file "${file}" \
            || echo "gpu-check: no ${kernels}-kernel prediction for card '${card}' (see above)"
    done
}

section_scan() {
    if [[ ${SMOKE} -eq 1 ]]; then
        set -- --batch 1 --channels 32 --seq-len 64 --repeats 2
    else
        set -- --batch 1 --channels 4096 --seq-len 4096 --repeats 5
    fi
    "${BIN}" bench scan --device "${DEVICE}" --precision bf16 "$@" --json "${OUT}/scan.json"
}

section_dist() {
    local backend=nccl sizes="1M,16M,64M,256M"
    [[ ${DEVICE} == cuda* ]] || backend=tcp
    [[ ${SMOKE} -eq 1 ]] && sizes="64K,1M"
    "${BIN}" bench allreduce --backend "${backend}" --world 1 --check --overlap-probe \
        --sizes "${sizes}" --iters 10 --json "${OUT}/dist.json"
}

# Runs "$@" while sampling the GPU's used memory; the peak goes to OUT/memory-peak.txt.
with_memory_peak() {
    if ! command -v nvidia-smi >/dev/null 2>&1 || [[ ${DEVICE} != cuda* ]]; then
        "$@"
        return
    fi
    local samples="${OUT}/memory-samples.txt"
    : >"${samples}"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 >>"${samples}" &
    local sampler=$! status=0
    "$@" || status=$?
    kill "${sampler}" 2>/dev/null
    wait "${sampler}" 2>/dev/null
    sort -n "${samples}" | tail -n 1 >"${OUT}/memory-peak.txt"
    return "${status}"
}

# Runs section $1 under `timeout` (its whole process group is stopped at the limit: its own, or
# what is left of the budget); its output goes to the terminal and OUT/$1.log, its outcome to
# OUT/sections.txt. A failure never stops the script.
run_section() {
    local s=$1 start=${SECONDS} status outcome=ok
    local left=$(( BUDGET - (SECONDS - CHECK_START) ))
    local limit=$(( ${LIMIT[$s]} < left ? ${LIMIT[$s]} : left ))
    printf '\n==== %s (limit %ss) ====\n' "${s}" "${limit}"
    if (( limit < 5 )); then
        printf '%s\t0\tskipped (budget of %ss spent)\n' "${s}" "${BUDGET}" >>"${OUT}/sections.txt"
        return
    fi
    timeout -k 5 "${limit}" bash -c "section_${s}" 2>&1 | tee "${OUT}/${s}.log"
    status=${PIPESTATUS[0]}
    if [[ ${status} -eq 124 || ${status} -eq 137 ]]; then
        outcome="timeout after ${limit}s"
    elif [[ ${status} -ne 0 ]]; then
        outcome="failed (exit ${status})"
    fi
    printf '%s\t%s\t%s\n' "${s}" "$(( SECONDS - start ))" "${outcome}" >>"${OUT}/sections.txt"
    printf -- '---- %s: %s in %ss\n' "${s}" "${outcome}" "$(( SECONDS - start ))"
}

main() {
    find_binary
    local devices
    devices=$("${BIN}" selftest --list-devices) || die "${BIN} selftest --list-devices failed"
    DEVICE=$(head -n 1 <<<"${devices}")
    if [[ ${SMOKE} -eq 0 && ${DEVICE} != cuda* ]]; then
        die "no CUDA device found (this binary's devices: $(paste -sd' ' <<<"${devices}")); \
this check needs an NVIDIA GPU with its driver (nvidia-smi), and a binary built with \
--features cuda (scripts/gpu-bundle.sh). Use --smoke to exercise the script on this machine."
    fi
    mkdir -p "${OUT}" || die "cannot create ${OUT}"
    : >"${OUT}/sections.txt"
    echo "binary: ${BIN}"
    locate_libraries
    locate_toolkit
    export BIN BIN_NVRTC OUT DEVICE SMOKE FIXTURES
    export -f json_string with_memory_peak predict_step step_args "${SECTIONS[@]/#/section_}"
    CHECK_START=${SECONDS}
    for s in "${SECTIONS[@]}"; do
        run_section "${s}"
    done
    printf '\n==== report (%ss) ====\n' "$(( SECONDS - CHECK_START ))"
    "${BIN}" bench report --dir "${OUT}"
}

main
