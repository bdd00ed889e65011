"""Which quantized codes a push changed (`sync/changed_code_fraction`, a frozen-policy warning),
and the sender's half of delta pushes (`wire.delta`).

Why. A LoRA step can be smaller than one quantization step (QuRL, arXiv 2602.13953): the
requantized weights then hold the same codes, and the rollout policy stays where it was while
the trainer moves. This measures it on every push; with `delta` it also sends only what moved.

How it works. For every code tensor a push sends (`x.weight` in INT8/FP8, `x.weight_packed`
in NVFP4), and with `delta` for every tensor, the sync keeps the block fingerprints of what it
sent (`wire.delta.block_fingerprints`: one int64 per BLOCK_BYTES of the tensor's bytes). A block
whose fingerprint differs from the last committed push's has changed. `CodeDelta` compares one
push with the kept fingerprints, counts changed code blocks over compared ones, overall and per
module kind, and with `delta` replaces each tensor the engine holds by its patch; its
fingerprints replace the kept ones only once the engine committed the push. Tensors first seen
(the first push, a full one) are sent whole and not compared. Scales are counted apart from
codes: a block of codes that did not move counts as unchanged even where its scale moved.
Memory: 8 bytes per block (1/8 of the code bytes; with `delta`, of every pushed byte) kept in
the host memory of the trainer's rank 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from qerl_rollout.quant.plan import QuantPlan
from qerl_rollout.wire import delta as wire_delta
from qerl_rollout.wire.stream import is_code_tensor

log = logging.getLogger(__name__)
FROZEN_AFTER = 3          # delta pushes in a row that changed no code before the warning
Payload = list[tuple[str, torch.Tensor]]


class CodeDelta:
    """One push's comparison with the fingerprints `kept` from the last committed push."""

    def __init__(self, kept: dict[str, torch.Tensor], plan: QuantPlan, patches: bool = False):
        """`patches`: send each tensor kept from the last committed push as its delta."""
        self.kept, self.plan, self.patches = kept, plan, patches
        self.fingerprints: dict[str, torch.Tensor] = {}
        self.blocks: dict[str, list[int]] = {}       # kind -> [changed, compared] code blocks

    def observe(self, payload: Iterable[tuple[str, torch.Tensor]]) -> Payload:
        """The payload to send (with `patches`: deltas in place of kept tensors); counts codes."""
        out: Payload = []
        for name, t in payload:
            code = is_code_tensor(name, t)
            if not (code or self.patches):
                out.append((name, t))
                continue
            fp = wire_delta.block_fingerprints(t).cpu()      # host memory (module docstring)
            self.fingerprints[name] = fp
            old = self.kept.get(name)
            known = old is not None and old.shape == fp.shape
            if code and known:
                self._count(name, int((old != fp).sum()), fp.numel())
            out += wire_delta.encode(name, t, fp, old) if self.patches and known else [(name, t)]
        return out

    def _count(self, name: str, changed: int, compared: int) -> None:
        decision = self.plan.decision_of(name.rpartition(".")[0] + ".weight")
        counts = self.blocks.setdefault(decision.category if decision else "other", [0, 0])
        counts[0] += changed
        counts[1] += compared

    def fractions(self) -> dict[str, float]:
        """{"all": changed / compared code blocks, <kind>: ...}; empty when none were compared."""
        if not self.blocks:
            return {}
        changed, compared = (sum(c[i] for c in self.blocks.values()) for i in (0, 1))
        return {"all": changed / compared, **{k: c / n for k, (c, n) in sorted(self.blocks.items())}}


class CodeTracker:
    """The fingerprints of the last committed push, and the run of pushes that changed none."""

    def __init__(self):
        self.kept: dict[str, torch.Tensor] = {}
        self.unchanged_pushes = 0

    def start(self, plan: QuantPlan, patches: bool = False) -> CodeDelta:
        """A push's comparison; `patches` only where the engine holds the kept tensors."""
        return CodeDelta(self.kept, plan, patches)

    def forget(self) -> None:
        """After a failed push: nothing is known of what the engine holds."""
        self.kept.clear()

    def commit(self, delta: CodeDelta) -> dict[str, float]:
        """Keep `delta`'s fingerprints (the engine now holds them); warn once per streak of
        FROZEN_AFTER pushes that compared codes and changed none. Returns its fractions."""
        self.kept.update(delta.fingerprints)
        fractions = delta.fractions()
        if fractions:
            self.unchanged_pushes = self.unchanged_pushes + 1 if fractions["all"] == 0 else 0
            if self.unchanged_pushes == FROZEN_AFTER:
                log.warning("the last %d pushes changed no quantized code: the trainer's updates are "
                            "smaller than one quantization step and the rollout policy is frozen "
                            "(sync/changed_code_fraction = 0)", FROZEN_AFTER)
        return fractions
