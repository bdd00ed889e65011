"""The push check: does the engine serve what the trainer pushed? Two halves, one exact.

How it works (`PushCheck`, run by the training loop on the first push and every
`sync.verify_every`-th; 0 turns it off):
- Hash (exact). The push is made with `digest=True`: the sync records a digest of every tensor
  it sends (`wire.bucket.digests`) and every engine records the same of every tensor it loads,
  in its own process, before decoding. The two must be equal, name for name: a tensor
  dropped, misrouted or corrupted on the way fails here. It cannot see a kernel that goes on
  computing with old values after a correct load (vLLM's CPU layers keep no raw copy of a
  linear weight after prepacking it), which is what the second half is for.
- Logits (within a tolerance). Every engine scores a fixed probe (prompts and responses from
  the run's first rollout) and the trainer scores it with the numbers the engine should hold:
  a quantize-dequantize copy of its merged policy (`qdq_copy`, in fp32), at
  temperature 1. Two figures over the probe's tokens must each stay under their tolerance
  (`Tolerance`, measured below): the mean |dlogp|, which a wrong layer raises however few
  tokens it moves most, and the max, bounded loosely, because a router near a tie can flip one
  token's experts under a kernel's rounding and move that token alone by 0.1 or more.
- Over the tolerance, or a hash mismatch: the loop pushes once in full and checks again; if
  that fails too, `StalePushError` stops the run with one line naming the scheme, mode,
  platform and figure. Nothing is written after the failed check, so the last checkpoint
  stays the newest good one.

Left out (say so where it matters): the logits half needs the whole policy in the trainer
process and a second copy of it (a single, unsharded trainer; small models), and pushes with
adaptive quantization noise on the norms (the noise is drawn inside the push) are checked by
hash only. For INT8 kernel-mode engines the reference quantizes the weights but not the
activations (vLLM's W8A8 does, per token): adding per-token int8 fake quantization at every
quantized linear's and expert's input moved the reference further from the engine, not closer
(Qwen3-MoE max |dlogp| 0.011 -> 0.076, AMD EPYC Zen 4 with zentorch), so the gap is the
kernels' own rounding, measured below. GPU kernel modes (FP8 W8A8) are not measured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from qerl_rollout.quant import DEFAULT_SCHEME

# Engine vs trainer QDQ reference, mean (max) |dlogp| over the probe's tokens, tiny MoE families,
# a pushed LoRA policy, AMD EPYC Zen 4 + zentorch (tests/rollout/test_engine_sync.py, the
# default tiny run, and the INT8 kernel engine of tests/rollout/test_kernel_mode.py's families):
#
# | engine | in sync | one layer wrong (weight x2) | stale (a kernel cache not cleared) |
# |---|---|---|---|
# | emulate, default run | 0.0009 (0.0024) | 0.038-0.063 (0.083-0.236) | - |
# | emulate, 4 families | (0.002-0.03) | - | - |
# | int8 kernel, Qwen3/Qwen2-MoE | 0.003-0.004 (0.008-0.011) | - | 0.17-0.20 (0.37-0.44) |
# | int8 kernel, Mixtral | 0.013 (0.134: one token's router flipped) | - | 0.30 (0.63) |
#
# mean 0.02: 1.5x above the noisiest engine in sync, 1.9x below the mildest wrong layer;
# max 0.25: 1.9x above a flipped token, 1.5x below the mildest stale engine.
VERIFY_TOL = 0.02
VERIFY_MAX_TOL = 0.25


@dataclass(frozen=True)
class Tolerance:
    """The push check's bounds on the probe's |dlogp| (see the table above)."""

    mean: float = VERIFY_TOL
    max: float = VERIFY_MAX_TOL

    def __post_init__(self):
        if self.mean <= 0 or self.max <= 0:
            raise ValueError(f"sync.verify_tol and sync.verify_max_tol must be > 0, got {self.mean}, {self.max}")
log = logging.getLogger(__name__)


class StalePushError(RuntimeError):
    """The engine does not serve what was pushed, even after a full re-push."""


def digest_problems(sent: dict[str, str], received: list[dict[str, str] | None]) -> list[str]:
    """Differences between what was sent and what each engine loaded ([] when all agree)."""
    problems = []
    for i, got in enumerate(received):
        if got is None:
            problems.append(f"engine {i} recorded no digests (push was not begun with digest=True)")
            continue
        missing = sorted(set(sent) - set(got))
        extra = sorted(set(got) - set(sent))
        differ = sorted(n for n in set(sent) & set(got) if sent[n] != got[n])
        for what, names in (("did not load", missing), ("loaded unsent", extra), ("loaded other bytes for", differ)):
            if names:
                problems.append(f"engine {i} {what} {len(names)} tensor(s), e.g. {names[0]}")
    return problems


def dlogp_stats(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    """(max, mean) of |a - b| over all tokens; the two must score the same responses."""
    if [len(x) for x in a] != [len(y) for y in b]:
        raise ValueError("the two sides scored responses of different lengths")
    gaps = [abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)]
    return max(gaps, default=0.0), sum(gaps) / len(gaps) if gaps else 0.0


@dataclass(frozen=True)
class Probe:
    """Fixed prompts and responses every check scores (token ids)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]

    @classmethod
    def from_samples(cls, samples, n: int = 2) -> Probe:
        """The first sample of each of the first `n` prompts that produced a response."""
        picked, seen = [], set()
        for s in samples:
            if s.prompt_index not in seen and s.token_ids:
                seen.add(s.prompt_index)
                picked.append(s)
            if len(picked) == n:
                break
        if not picked:
            raise ValueError("no sample with a response to build the push-check probe from")
        return cls([list(s.prompt_token_ids) for s in picked], [list(s.token_ids) for s in picked])


def _plain_config(model: nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def qdq_copy(model: nn.Module, scheme: str, plan=None) -> nn.Module:
    """A plain transformers model holding exactly the numbers an engine serves after a push of
    `model`: LoRA merged, every quantized tensor replaced by its quantize-dequantize values,
    routers and the other exempt tensors untouched."""
    from transformers import AutoModelForCausalLM

    from qerl_rollout.quant.plan import build_plan
    from qerl_rollout.sync.merge import merged_named_tensors
    from qerl_rollout.wire.stream import qdq_named_tensors

    config = _plain_config(model)
    plan = plan or build_plan(config, scheme)
    copy = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = dict(qdq_named_tensors(plan, scheme, merged_named_tensors(model)))
    missing, unexpected = copy.load_state_dict(state, strict=False)
    tied = {n for n, d in plan.decisions.items() if not d.checkpoint_names}
    if set(missing) - tied or unexpected:
        raise ValueError(f"QDQ copy mismatch: missing {missing}, unexpected {unexpected}")
    return copy.eval()


@torch.no_grad()
def reference_logprobs(model: nn.Module, scheme: str, probe: Probe, precision=None) -> list[list[float]]:
    """The probe's response logprobs (temperature 1) under the QDQ copy of `model` in fp32
    (the layers `precision` quantizes, `quant.plan.Precision`)."""
    from qerl_rollout.quant.plan import build_plan

    plan = build_plan(_plain_config(model), scheme if scheme != "bf16" else DEFAULT_SCHEME, precision)
    device = next(model.parameters()).device
    copy = qdq_copy(model, scheme, plan).float().to(device)
    out = []
    for prompt, response in zip(probe.prompt_ids, probe.response_ids):
        ids = torch.tensor([prompt + response], device=device)
        logp = torch.log_softmax(copy(ids).logits[0].float(), dim=-1)
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1, device=device)
        out.append(logp[positions, ids[0, len(prompt):]].tolist())
    del copy
    return out


@dataclass
class CheckResult:
    hash_problems: list[str]
    max_dlogp: float | None = None    # the worst engine's; None: the logits half did not run
    mean_dlogp: float | None = None

    def over(self, tol: Tolerance) -> list[str]:
        """The figures over their tolerance, in words."""
        if self.mean_dlogp is None:
            return []
        return ([f"mean |dlogp| {self.mean_dlogp:.4f} > sync.verify_tol {tol.mean}"] * (self.mean_dlogp > tol.mean)
                + [f"max |dlogp| {self.max_dlogp:.4f} > sync.verify_max_tol {tol.max}"] * (self.max_dlogp > tol.max))

    def ok(self, tol: Tolerance) -> bool:
        return not self.hash_problems and not self.over(tol)

    def describe(self, tol: Tolerance) -> str:
        return "; ".join(self.hash_problems + self.over(tol)) or "ok"


def check(report, received: list[dict[str, str] | None], engine_scores: list[list[list[float]]] | None,
          reference: list[list[float]] | None) -> CheckResult:
    """One check of a push made with `digest=True` (`engine_scores`: one list per engine)."""
    problems = digest_problems(report.digests or {}, received)
    if engine_scores is None or reference is None:
        return CheckResult(problems)
    stats = [dlogp_stats(scores, reference) for scores in engine_scores]
    return CheckResult(problems, max(m for m, _ in stats), max(mean for _, mean in stats))


class PushCheck:
    """Runs the check on the pushes it is due for (see the module docstring).

    `due(step)`: the first push this process makes and every `every`-th step's. `run` takes
    the trainer and rollout interfaces of any placement: `trainer.push(..., full=True,
    digest=True)`, `trainer.reference_logprobs(probe, scheme)` (None where the trainer cannot
    build the reference), `rollout.receiver.received_digests()`, `rollout.score_each(...)`.
    """

    def __init__(self, every: int, tol: Tolerance = Tolerance(), logits: bool = True, *,
                 scheme: str, mode: str, platform: str):
        if every < 0:
            raise ValueError(f"sync.verify_every must be >= 0, got {every}")
        self.every, self.tol, self.logits = every, tol, logits
        self.scheme, self.mode, self.platform = scheme, mode, platform
        self.probe: Probe | None = None
        self._checked = False

    def due(self, step: int) -> bool:
        return bool(self.every) and (not self._checked or step % self.every == 0)

    def run(self, trainer, rollout, report, samples, push_again, noisy: bool,
            serve=lambda: None) -> dict:
        """Check the push `report` (made with digest=True); `push_again()` re-pushes in full
        with digest=True. `noisy`: the push carried AQN noise (hash only). `serve()` is called
        after the trainer's reference and before the engines score (colocated: the trainer
        leaves the GPU, the KV cache wakes). Returns metrics."""
        self._checked = True
        if self.probe is None:
            self.probe = Probe.from_samples(samples)
        result = self._check(trainer, rollout, report, noisy, serve)
        repushed = 0
        if not result.ok(self.tol):
            log.warning("push check failed for version %d (%s); re-pushing in full", report.version,
                        result.describe(self.tol))
            report, repushed = push_again(), 1
            result = self._check(trainer, rollout, report, noisy, serve)
            if not result.ok(self.tol):
                raise StalePushError(
                    f"the {self.scheme}/{self.mode} engine does not serve the pushed weights "
                    f"(version {report.version}, after a full re-push) on {self.platform}: "
                    f"{result.describe(self.tol)}")
        metrics = {"sync/verify_hash_ok": float(not result.hash_problems), "sync/verify_repushed": repushed}
        if result.mean_dlogp is not None:
            metrics["sync/verify_max_dlogp"] = result.max_dlogp
            metrics["sync/verify_mean_dlogp"] = result.mean_dlogp
        return metrics

    def _check(self, trainer, rollout, report, noisy: bool, serve) -> CheckResult:
        received = rollout.receiver.received_digests()
        received = received if isinstance(received, list) else [received]
        scores = reference = None
        if self.logits and not noisy:
            reference = trainer.reference_logprobs(self.probe, self.scheme)
            if reference is not None:
                serve()
                scores = rollout.score_each(self.probe.prompt_ids, self.probe.response_ids)
        return check(report, received, scores, reference)
