#!/usr/bin/env bash
# One-command GPU check, from anywhere: bench/gpu_check.sh OUT [--quick] [--dry-run] [--budget S] [--wheels DIR]
# See bench/gpu_check.py (steps, outputs) and CONTRIBUTING.md ("Running the GPU check").
set -u
# relative paths in the arguments (OUT, --wheels DIR, --wheels=DIR) are the caller's: make them absolute first
args=()
prev=""
for a in "$@"; do
  case "$prev:$a" in
    --wheels:/*|--budget:*|--steps:*) args+=("$a") ;;
    --wheels:*) args+=("$PWD/$a") ;;
    *:--wheels=/*) args+=("$a") ;;
    *:--wheels=*) args+=("--wheels=$PWD/${a#--wheels=}") ;;
    *:-*|*:/*|*:) args+=("$a") ;;
    *) args+=("$PWD/$a") ;;
  esac
  prev="$a"
done
cd "$(dirname "$0")/.." || exit 1
unset TRITON_INTERPRET
exec "${PYTHON:-python3}" bench/gpu_check.py ${args[@]+"${args[@]}"}
