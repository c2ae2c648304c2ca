#!/usr/bin/env bash
# Prepare the LLVM 23.1 prefix that Burn 0.22.1's `cuda` (and `cpu`) backend build needs, without the
# network access to GitHub releases that tracel-llvm-bundler would otherwise use.
#
# Why: burn-cuda -> cubecl-cuda -> cubecl-llvm -> build-dependency tracel-llvm-bundler 23.1.0-4, whose
# build script skips its download when
#     ${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-23.1.0-4/.tracel-llvm-installed
# exists. This script fills that prefix from two pinned, hash-checked PyPI wheels
# (mlc-llvm-static{,-extra-targets}==23.1.1.post0: LLVM 23.1 static libs built against libstdc++,
# with the NVPTX target in the extra wheel). See shared/notes/offline-llvm.md.
#
# Usage:   scripts/prepare-llvm.sh            # idempotent: exits 0 at once if already installed
#          FORCE=1 scripts/prepare-llvm.sh    # reinstall (this retriggers a cubecl-llvm rebuild)
# Needs:   python3 (with pip) on PATH, also at cargo build time (bin/llvm-config is a Python script);
#          PyPI reachable on first run (~92 MB download, ~400 MB on disk).
# Env:     XDG_DATA_HOME (as the bundler reads it), PYTHON (default python3),
#          LLVM_WHEEL_DIR (a folder already holding the two wheels: used instead of downloading).
set -euo pipefail

BUNDLE="tracel-llvm-23.1.0-4"
DATA_HOME="${XDG_DATA_HOME:-${HOME:?HOME is not set}/.local/share}"
PREFIX="${DATA_HOME}/tracel/${BUNDLE}"
SENTINEL="${PREFIX}/.tracel-llvm-installed"
PYTHON="${PYTHON:-python3}"

VERSION="23.1.1.post0"
SHA_MAIN="dcfec888abfaa418be77d41af585805f31463584cf9c90582992c00f392c1ac5"
SHA_EXTRA="c36e834d9a4e9cf9759f27fece65711ece7a2fc2b5a96dbb15d66f5e9e787929"

log() { printf 'prepare-llvm: %s\n' "$*" >&2; }
die() { printf 'prepare-llvm: error: %s\n' "$*" >&2; exit 1; }

check_prefix() {
    # Succeeds when $1 holds a usable prefix with NVPTX built.
    local p="$1" targets
    [[ -x "${p}/bin/llvm-config" ]] || { log "missing or non-executable ${p}/bin/llvm-config"; return 1; }
    [[ -d "${p}/include/llvm-c" ]] || { log "missing ${p}/include/llvm-c"; return 1; }
    compgen -G "${p}/lib/libLLVMCore.a" >/dev/null || { log "missing ${p}/lib/libLLVMCore.a"; return 1; }
    targets="$("${p}/bin/llvm-config" --targets-built)" || { log "${p}/bin/llvm-config --targets-built failed"; return 1; }
    [[ " ${targets} " == *" NVPTX "* ]] || { log "NVPTX not in targets-built: ${targets}"; return 1; }
    local ver
    ver="$("${p}/bin/llvm-config" --version)" || return 1
    [[ "${ver}" == 23.1* ]] || { log "unexpected LLVM version ${ver} (want 23.1.x)"; return 1; }
    return 0
}

command -v "${PYTHON}" >/dev/null 2>&1 || die "${PYTHON} not found on PATH (needed to download the wheels and by llvm-config at build time)"

if [[ -e "${SENTINEL}" && -z "${FORCE:-}" ]]; then
    if check_prefix "${PREFIX}"; then
        log "already installed: ${PREFIX} (LLVM $("${PREFIX}/bin/llvm-config" --version), NVPTX built)"
        exit 0
    fi
    die "sentinel ${SENTINEL} exists but the prefix is broken (see above); remove ${PREFIX} and rerun, or rerun with FORCE=1"
fi

"${PYTHON}" -m pip --version >/dev/null 2>&1 || [[ -n "${LLVM_WHEEL_DIR:-}" ]] \
    || die "${PYTHON} -m pip is not available (needed to download the wheels; or set LLVM_WHEEL_DIR)"

mkdir -p "${DATA_HOME}/tracel"
WORK="$(mktemp -d "${DATA_HOME}/tracel/.prepare-llvm.XXXXXX")"
cleanup() { rm -rf "${WORK}"; }
trap cleanup EXIT

WHEELS="${WORK}/wheels"
mkdir -p "${WHEELS}"
if [[ -n "${LLVM_WHEEL_DIR:-}" ]]; then
    log "using wheels from ${LLVM_WHEEL_DIR}"
    cp "${LLVM_WHEEL_DIR}"/mlc_llvm_static-"${VERSION}"-*.whl \
       "${LLVM_WHEEL_DIR}"/mlc_llvm_static_extra_targets-"${VERSION}"-*.whl "${WHEELS}/" \
        || die "LLVM_WHEEL_DIR=${LLVM_WHEEL_DIR} does not hold both mlc-llvm-static wheels ${VERSION}"
    # Verify the hashes ourselves, as --require-hashes would.
    for pair in "mlc_llvm_static-${VERSION}-:${SHA_MAIN}" "mlc_llvm_static_extra_targets-${VERSION}-:${SHA_EXTRA}"; do
        f="$(compgen -G "${WHEELS}/${pair%%:*}*.whl" | head -n1)"
        got="$(sha256sum "${f}" | cut -d' ' -f1)"
        [[ "${got}" == "${pair##*:}" ]] || die "sha256 mismatch for ${f}: got ${got}, want ${pair##*:}"
    done
else
    cat >"${WORK}/req.txt" <<EOF
mlc-llvm-static==${VERSION} --hash=sha256:${SHA_MAIN}
mlc-llvm-static-extra-targets==${VERSION} --hash=sha256:${SHA_EXTRA}
EOF
    log "downloading mlc-llvm-static{,-extra-targets}==${VERSION} (hash-pinned, ~92 MB)"
    "${PYTHON}" -m pip download --no-deps --only-binary=:all: --require-hashes \
        --disable-pip-version-check -q -d "${WHEELS}" -r "${WORK}/req.txt" \
        || die "pip download failed: PyPI must be reachable on first run (or set LLVM_WHEEL_DIR to a folder with the two wheels)"
fi

PARTIAL="${PREFIX}.partial"
rm -rf "${PARTIAL}"
mkdir -p "${PARTIAL}"
n=0
# Base wheel first, then the extra-targets wheel (whose files, e.g. bin/llvm-config, must win).
for stem in "mlc_llvm_static-${VERSION}-" "mlc_llvm_static_extra_targets-${VERSION}-"; do
    whl="$(compgen -G "${WHEELS}/${stem}*.whl" | head -n1)" || die "wheel ${stem}*.whl missing after download"
    log "unpacking $(basename "${whl}")"
    # Extract only mlc_llvm_static/static/** and strip that leading path.
    "${PYTHON}" - "${whl}" "${PARTIAL}" <<'PY'
import os, shutil, sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
root = "mlc_llvm_static/static/"
count = 0
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        name = info.filename
        if not name.startswith(root) or name.endswith("/"):
            continue
        rel = name[len(root):]
        if rel.startswith("/") or ".." in rel.split("/"):
            sys.exit(f"refusing unsafe member {name}")
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        mode = (info.external_attr >> 16) & 0o777
        if mode:
            os.chmod(out, mode)
        count += 1
if count == 0:
    sys.exit(f"{whl}: no {root} members")
print(f"prepare-llvm:   {count} files", file=sys.stderr)
PY
    n=$((n + 1))
done
[[ ${n} -eq 2 ]] || die "expected 2 wheels, found ${n}"
chmod +x "${PARTIAL}"/bin/llvm-config*

check_prefix "${PARTIAL}" || die "unpacked prefix failed verification (see above); left in ${PARTIAL}"

# Move into place; the sentinel comes last, so an interrupted run never looks installed.
rm -rf "${PREFIX}.old"
if [[ -e "${PREFIX}" ]]; then mv "${PREFIX}" "${PREFIX}.old"; fi
mv "${PARTIAL}" "${PREFIX}"
rm -rf "${PREFIX}.old"
touch "${SENTINEL}"
log "installed LLVM $("${PREFIX}/bin/llvm-config" --version) into ${PREFIX} (targets: $("${PREFIX}/bin/llvm-config" --targets-built))"
