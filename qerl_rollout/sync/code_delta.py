"""Which quantized codes a push changed: `sync/changed_code_fraction`, and a frozen-policy warning.

Why. A LoRA step can be smaller than one quantization step (QuRL, arXiv 2602.13953): the
requantized weights then hold the same codes, and the rollout policy stays where it was while
the trainer moves. This measures it on every push.

How it works. For every code tensor a push sends (`x.weight` in INT8/FP8, `x.weight_packed`
in NVFP4) the sync keeps one 64-bit fingerprint per output row (`row_fingerprints`: the row's
bytes as int64 words times fixed odd random weights, summed mod 2^64). A row whose fingerprint
differs from the one of the last committed push has changed codes. One changed word always
changes the sum (an odd weight is invertible mod 2^64); several cancel with probability about
2^-64. `CodeDelta` compares one push's code tensors with the fingerprints of the last and
counts changed rows over compared rows, overall and per module kind; its fingerprints replace
the kept ones only once the engine committed the push. Rows first seen (the first push) are not
compared. Scales are not fingerprinted: a row whose scale alone moved counts as unchanged.
Memory: 8 bytes per code row on the trainer's rank 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from qerl_rollout.quant.plan import QuantPlan
from qerl_rollout.wire.stream import is_code_tensor

log = logging.getLogger(__name__)
FROZEN_AFTER = 3          # delta pushes in a row that changed no code before the warning
_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def _word_weights(n_words: int, device: torch.device) -> torch.Tensor:
    key = (n_words, str(device))
    if key not in _WEIGHTS:
        g = torch.Generator().manual_seed(n_words)
        w = torch.randint(-(2**62), 2**62, (n_words,), generator=g, dtype=torch.int64) * 2 + 1
        _WEIGHTS[key] = w.to(device)
    return _WEIGHTS[key]


def row_fingerprints(codes: torch.Tensor) -> torch.Tensor:
    """One int64 per row of a 2-D code tensor (module docstring)."""
    rows = codes.reshape(codes.shape[0], -1).contiguous().view(torch.uint8)
    pad = -rows.shape[1] % 8
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    words = rows.view(torch.int64)
    return (words * _word_weights(words.shape[1], words.device)).sum(dim=1)


class CodeDelta:
    """One push's comparison with the fingerprints `kept` from the last committed push."""

    def __init__(self, kept: dict[str, torch.Tensor], plan: QuantPlan):
        self.kept, self.plan = kept, plan
        self.fingerprints: dict[str, torch.Tensor] = {}
        self.rows: dict[str, list[int]] = {}       # kind -> [changed, compared]

    def observe(self, bucket: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, t in bucket:
            if not is_code_tensor(name, t):
                continue
            fp = row_fingerprints(t)
            self.fingerprints[name] = fp
            old = self.kept.get(name)
            if old is None or old.shape != fp.shape:
                continue
            decision = self.plan.decision_of(name.rpartition(".")[0] + ".weight")
            counts = self.rows.setdefault(decision.category if decision else "other", [0, 0])
            counts[0] += int((old != fp).sum())
            counts[1] += fp.numel()

    def fractions(self) -> dict[str, float]:
        """{"all": changed / compared rows, <kind>: ...}; empty when nothing was compared."""
        if not self.rows:
            return {}
        changed, compared = (sum(c[i] for c in self.rows.values()) for i in (0, 1))
        return {"all": changed / compared, **{k: c / n for k, (c, n) in sorted(self.rows.items())}}


class CodeTracker:
    """The fingerprints of the last committed push, and the run of pushes that changed none."""

    def __init__(self):
        self.kept: dict[str, torch.Tensor] = {}
        self.unchanged_pushes = 0

    def start(self, plan: QuantPlan) -> CodeDelta:
        return CodeDelta(self.kept, plan)

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
