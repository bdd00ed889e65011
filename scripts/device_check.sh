#!/usr/bin/env bash
# The GPU check, for the day a GPU machine is lent: one CUDA GPU with torch, triton and
# transformers (no vLLM, no peft, no network). Run from the repository root, nothing installed:
#     bash scripts/device_check.sh [OUT_DIR]          (default: $OUT, else bench/results)
# 1. the Triton kernels against the torch twin, bit for bit, and their GB/s
#    (python -m qerl_rollout.bench gpu_requant);
# 2. a 1-rank FSDP2 checkpoint save and load, and the colocated offload round trip, with their
#    peak device memory (python -m qerl_rollout.bench device_memory).
# Each step has its own time limit (7 minutes in all); the tables print and JSON lands in
# OUT_DIR. Paste the tables into the README's device section. Exit status 1 if a step failed.
set -u -o pipefail
out="${1:-${OUT:-bench/results}}"
python="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
"$python" -c 'import torch, triton, transformers; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")' \
    | tee "$out/device.txt" || status=1
timeout 300 "$python" -m qerl_rollout.bench gpu_requant --iters 20 --out "$out/gpu_requant.json" \
    | tee "$out/gpu_requant.txt" || status=1
timeout 120 "$python" -m qerl_rollout.bench device_memory --out "$out/device_memory.json" \
    | tee "$out/device_memory.txt" || status=1
exit $status
