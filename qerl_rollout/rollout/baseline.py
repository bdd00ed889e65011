"""BF16Baseline: inside a run, how much faster the quantized rollout is, and what it costs.

How it works. The run keeps a second rollout engine serving the policy in BF16 (any placement
with `generate`, `score` and a `receiver`), and a `push()` that makes it serve the trainer's
current weights (a `WeightSync` of its own, wherever the trainer lives). Every
`rollout.baseline_every` steps the controller calls `measure` right after the quantized
rollout of the step, before the optimizer step, so both engines hold the same policy: the
controller has pushed the baseline the weights of that rollout (`push()`, a delta push since
its last one; in the push phase before the step, while the trainer is on its device, since a
colocated trainer is on the host during the rollout). `measure` never pushes: the baseline
generates the same prompts with the same sampling arguments and seed, and the quantized engine generates
them again: `rounds` times each, alternating (BF16, quantized, BF16, ...), and each rate is
total tokens over total seconds. The ratio uses these re-runs, not the step's own rollout: that
one follows the optimizer step, whose memory traffic leaves the engine cold (measured: 0.78x on
the 0.43B model where back-to-back runs gave ~1.1x), and a single short batch on a shared
machine swung from 0.4x to 2.3x between steps. Finally the BF16 engine scores the tokens the
quantized engine sampled in the step. It returns:

    rollout/speedup_vs_bf16     quantized tokens/s / BF16 tokens/s on the same batch
    rollout/bf16_tokens_per_s   the baseline's own rate
    quant/kl_vs_bf16            KL(pi_quant || pi_bf16) per token, k3 estimator (>= 0, low
                                variance); quant/kl_k1_vs_bf16 with k1 (unbiased, noisy)
    quant/logp_gap_mean, _max   per-token |logp_quant - logp_bf16|
    baseline/seconds            the whole measurement (generates, score): kept out of the
                                step's rollout/train/sync timings

The KL needs the quantized logprobs at temperature 1 (`score` is at temperature 1), so at any
other sampling temperature only the speedup is reported. The two engines share the machine but
never run at once, so the ratio is the one a user would see switching schemes.
Left out: a baseline on other hardware than the quantized engine (placement decides).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from qerl_rollout.rl.mismatch import quantization_cost


class BF16Baseline:
    def __init__(self, rollout, push: Callable[[], object], *, rounds: int = 2):
        if rollout.receiver.scheme != "bf16":
            raise ValueError(f"the baseline engine must serve bf16, not {rollout.receiver.scheme}")
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.rollout = rollout
        self.push = push
        self.rounds = rounds

    def measure(self, rollout, prompt_token_ids, samples, **sampling) -> dict:
        """Metrics for one step whose quantized `rollout` sampled `samples` from these prompts
        (the baseline already pushed the same weights)."""
        t0 = time.perf_counter()
        totals = {"bf16": [0, 0.0], "quant": [0, 0.0]}    # tokens, seconds
        for _ in range(self.rounds):
            for key, engine in (("bf16", self.rollout), ("quant", rollout)):
                t = time.perf_counter()
                generated = engine.generate(prompt_token_ids, **sampling)
                totals[key][0] += sum(len(s.token_ids) for s in generated)
                totals[key][1] += time.perf_counter() - t
        bf16_rate, quant_rate = (tokens / max(seconds, 1e-9) for tokens, seconds in totals.values())
        out = {"rollout/speedup_vs_bf16": quant_rate / bf16_rate,
               "rollout/bf16_tokens_per_s": bf16_rate}
        if sampling.get("temperature", 1.0) == 1.0 and any(s.token_ids for s in samples):
            kept = [s for s in samples if s.token_ids]
            ref = self.rollout.score([s.prompt_token_ids for s in kept], [s.token_ids for s in kept])
            cost = quantization_cost([s.logprobs for s in kept], ref)
            out.update({"quant/kl_vs_bf16": cost["kl_k3"], "quant/kl_k1_vs_bf16": cost["kl_k1"],
                        "quant/logp_gap_mean": cost["logp_gap_mean"],
                        "quant/logp_gap_max": cost["logp_gap_max"]})
        out["baseline/seconds"] = time.perf_counter() - t0
        return out

    def close(self) -> None:
        self.rollout.close()
