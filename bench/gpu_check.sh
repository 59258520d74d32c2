#!/usr/bin/env bash
# One-command GPU check, from anywhere: bench/gpu_check.sh OUT [--quick] [--dry-run] [--budget S] [--wheels DIR]
# See bench/gpu_check.py (steps, outputs) and CONTRIBUTING.md ("Running the GPU check").
set -u
cd "$(dirname "$0")/.." || exit 1
unset TRITON_INTERPRET
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
