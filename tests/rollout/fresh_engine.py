"""`python tests/rollout/fresh_engine.py MODEL_DIR SCHEME OUT.json`: a freshly loaded engine's numbers.

Run in a process of its own, so that nothing another engine left behind (vLLM globals, kernel
weight caches) can reach it: the reference a pushed engine must equal exactly. It writes the
prompt logprobs of fixed responses (`score`) and a greedy continuation with its logprobs.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [300, 301, 302]]
RESPONSES = [[13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [400, 17, 9, 250, 12]]


def engine_numbers(engine, greedy: bool = True) -> dict:
    """What two engines holding the same weights must agree on exactly."""
    out = {"score": engine.score(PROMPTS, RESPONSES), "mode": engine.mode}
    if greedy:
        (sample,) = engine.generate([PROMPTS[0]], n=1, max_tokens=8, temperature=0.0, ignore_eos=True)
        out["greedy_tokens"], out["greedy_logprobs"] = sample.token_ids, sample.logprobs
    return out


TP_ENV = "QERL_TEST_TENSOR_PARALLEL"   # vLLM tensor parallelism of the engines these tests build
TARGETS_ENV = "QERL_TEST_QUANT_TARGETS"   # and their precision: "targets[,kind=scheme...]"


def engine_quant(scheme: str):
    """The QuantConfig of the engines these tests build (`TARGETS_ENV`, default all_linear:
    the quant targets, then any `quant_overrides` as kind=scheme)."""
    from qerl_rollout import QuantConfig
    from qerl_rollout.quant.plan import Precision

    targets, *overrides = os.environ.get(TARGETS_ENV, "all_linear").split(",")
    return QuantConfig(scheme, precision=Precision(targets, overrides=tuple(o.split("=") for o in overrides)))


def engine_options() -> dict:
    tp = int(os.environ.get(TP_ENV, "1"))
    return {"tensor_parallel_size": tp} if tp > 1 else {}


def main(model_dir: str, scheme: str, out_path: str, greedy: str = "1") -> None:
    from qerl_rollout import RolloutEngine
    from qerl_rollout.rollout.engine import prepare_export

    quant = engine_quant(scheme)
    engine = RolloutEngine(model_dir, quant, max_model_len=256, export_dir=prepare_export(model_dir, quant),
                           **engine_options())
    with open(out_path, "w") as f:
        json.dump(engine_numbers(engine, greedy == "1"), f)
    engine.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
