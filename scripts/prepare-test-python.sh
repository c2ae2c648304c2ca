#!/usr/bin/env bash
# The Python packages the test suite reads run outputs with: TensorBoard's own event-file reader
# (tests/tensorboard_events.rs checks the trainer's event files with it, resumption included).
# Only the reader's imports are installed (no TensorBoard server, gRPC or web assets): the
# `tensorboard` wheel without its dependencies, plus the three modules the reader imports.
#
# Usage:   scripts/prepare-test-python.sh     # idempotent: exits 0 at once if already importable
# Env:     PYTHON (default python3), as the tests read it (ZAMBA_TEST_PYTHON overrides it there).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
CHECK='from tensorboard.backend.event_processing import event_multiplexer'

if "$PYTHON" -c "$CHECK" 2>/dev/null; then
    exit 0
fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    tensorboard==2.21.0 absl-py==2.5.1 numpy==2.4.6 protobuf==7.36.2
"$PYTHON" -c "$CHECK"
