"""Smoke test: vLLM's CPU engine loads a tiny Qwen3-MoE built here and samples with logprobs."""

from __future__ import annotations

import math

import pytest


@pytest.fixture(scope="module")
def llm(tiny_qwen3_moe):
    from vllm import LLM

    from qerl_rollout.rollout.engine import enable_cpu_amx

    enable_cpu_amx()   # on AMX CPUs vLLM's kernels need the tile state (see its docstring)
    engine = LLM(
        model=str(tiny_qwen3_moe),
        dtype="bfloat16",
        max_model_len=256,
        enforce_eager=True,
        seed=0,
    )
    yield engine
    del engine


def test_generates_n_samples_per_prompt_with_logprobs(llm):
    from vllm import SamplingParams

    prompts = [[5, 6, 7, 8], [100, 200]]
    params = SamplingParams(n=3, max_tokens=6, temperature=1.0, logprobs=0, seed=1, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [list(o.prompt_token_ids) for o in outputs] == prompts
    for out in outputs:
        assert len(out.outputs) == 3
        for sample in out.outputs:
            assert len(sample.token_ids) == 6
            assert len(sample.logprobs) == 6
            for tok, lp in zip(sample.token_ids, sample.logprobs):
                value = lp[tok].logprob  # logprobs=0 still returns the sampled token's logprob
                assert math.isfinite(value) and value <= 0.0
                # A random model over a 1024-token vocabulary is close to uniform: log(1/1024).
                assert -12.0 < value < -3.0
