"""The pure learning modules import neither ray nor vllm (nor transformers / peft)."""

import subprocess
import sys


def test_pure_rl_modules_do_not_import_processes_or_models():
    code = (
        "import sys, qerl_rollout.rl, qerl_rollout.rl.grpo, qerl_rollout.rl.mismatch, "
        "qerl_rollout.rl.aqn, qerl_rollout.rewards, qerl_rollout.data\n"
        "bad = [m for m in ('ray', 'vllm', 'transformers', 'peft') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
