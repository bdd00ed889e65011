"""Expert load of the trainer's own forward: how many tokens each router sends to each expert.

How it works. `ExpertLoad.attach(model)` finds the MoE router modules (the quant plan's
`router` category: the one module per MoE block whose weight is (experts, hidden)) and hooks
them. While `counting(mask)` is active, each router's top-k indices (the last element of the
tuple transformers' routers return) are counted per expert over the tokens `mask` marks, so
padding never counts. Only the training forward is counted: the no-grad scoring passes
(logp_old, the KL reference) run outside `counting`, and a gradient-checkpointed backward
recomputes each layer inside `loss.backward()`, outside it too, so nothing counts twice.
Sharded, each rank counts its rows and `all_reduce` sums the (layers, experts) counts, so every
rank reports the whole batch's load.

`load_metrics(counts, prefix)` turns counts into what a run logs, per layer and overall:
`load_cv` (std / mean of the per-expert token counts, population std: 0 when every expert
gets the same), `max_over_mean` (the busiest expert against the mean: 1 when balanced, E
when one expert takes everything), `dead` (experts that got no token). Overall: the mean
over layers of the first two, the sum of the third.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def router_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Plain module path (peft prefix removed) -> router module, in layer order; {} if dense."""
    from qerl_rollout.quant import DEFAULT_SCHEME
    from qerl_rollout.quant.plan import build_plan

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    plan = build_plan(base.config, DEFAULT_SCHEME)
    weights = {n for n, d in plan.decisions.items() if d.category == "router"}
    modules = {}
    for name, module in model.named_modules():
        plain = name.removeprefix("base_model.model.")
        if f"{plain}.weight" in weights:
            modules[plain] = module
    return modules


class ExpertLoad:
    """Per-router token counts of the forwards run inside `counting` (module docstring)."""

    def __init__(self, routers: dict[str, nn.Module], num_experts: int):
        self.names = list(routers)
        self.counts = torch.zeros(len(routers), num_experts, dtype=torch.int64)
        self._mask: torch.Tensor | None = None
        self._hooks = [module.register_forward_hook(self._record(i)) for i, module in enumerate(routers.values())]

    @classmethod
    def attach(cls, model: nn.Module) -> ExpertLoad | None:
        """Hooks on `model`'s routers, or None for a dense model."""
        routers = router_modules(model)
        if not routers:
            return None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        text = base.config.get_text_config()
        experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) \
            or text.n_routed_experts
        return cls(routers, experts)

    def _record(self, layer: int):
        def hook(_module, _inputs, out):
            if self._mask is None:
                return
            indices = out[-1] if isinstance(out, tuple) else out
            if indices.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"router {self.names[layer]} returned no expert indices")
            chosen = indices.reshape(-1, indices.shape[-1])[self._mask.to(indices.device)]
            if self.counts.device != chosen.device:    # counted where the model runs: no sync per layer
                self.counts = self.counts.to(chosen.device)
            self.counts[layer] += torch.bincount(chosen.flatten(), minlength=self.counts.shape[1])
        return hook

    def reset(self) -> None:
        self.counts.zero_()

    @contextmanager
    def counting(self, attention_mask: torch.Tensor):
        """Count the routes of the real tokens (`attention_mask` (B, T) != 0) of the forwards inside."""
        self._mask = attention_mask.reshape(-1).bool()
        try:
            yield
        finally:
            self._mask = None

    def all_reduce(self) -> None:
        """Sum the counts over the ranks of the default process group (a collective)."""
        import torch.distributed as dist

        if dist.get_backend() == "nccl" and self.counts.device.type != "cuda":
            self.counts = self.counts.cuda()     # a rank with no counted row still joins on its GPU
        dist.all_reduce(self.counts)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def load_metrics(counts: torch.Tensor, names: list[str], prefix: str) -> dict[str, float]:
    """`prefix/load_cv`, `prefix/max_over_mean`, `prefix/dead`, overall and per layer (`.../<name>`),
    of (layers, experts) token counts (module docstring)."""
    counts = counts.cpu()
    c = counts.double()
    mean = c.mean(dim=1)
    cv = torch.where(mean > 0, c.std(dim=1, correction=0) / mean, torch.zeros_like(mean))
    peak = torch.where(mean > 0, c.max(dim=1).values / mean, torch.zeros_like(mean))
    dead = (counts == 0).sum(dim=1)
    out = {f"{prefix}/load_cv": cv.mean().item(), f"{prefix}/max_over_mean": peak.mean().item(),
           f"{prefix}/dead": float(dead.sum())}
    for i, name in enumerate(names):
        layer = _layer_label(name)
        out[f"{prefix}/load_cv/{layer}"] = cv[i].item()
        out[f"{prefix}/max_over_mean/{layer}"] = peak[i].item()
        out[f"{prefix}/dead/{layer}"] = float(dead[i])
    return out


def _layer_label(router: str) -> str:
    """`model.layers.3.mlp.gate` -> `layer3` (the name a metric carries)."""
    parts = router.split(".")
    return f"layer{parts[parts.index('layers') + 1]}" if "layers" in parts else router
