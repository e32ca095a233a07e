#!/usr/bin/env bash
# The compiled backend on a GPU, in one command (under 5 minutes on an H100/H200):
# parity of compiled vs eager on CUDA for every config, throughput vs torch AdamW fused on
# CUDA, and the device-to-device copy bandwidth measured in the same run.
# Without a GPU it runs the CPU-side parts (arguments, parity on CPU tensors, small sizes).
#
#   benchmarks/gpu_check.sh [--device cuda|cpu] [--steps 50] [--json PATH] [--skip-throughput]
#
# Writes gpu_check.json into $OUT (or the current directory) unless --json is given.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-.}"
args=("$@")
if [[ " ${args[*]-} " != *" --json "* ]]; then
    args+=(--json "$out_dir/gpu_check.json")
fi
exec python -m adamkit.bench.gpu_check "${args[@]}"
