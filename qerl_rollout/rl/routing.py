"""The trainer's routers, hooked: expert load, agreement with the rollout, routing replay (R3).

How it works. `RouterHooks.attach(model)` finds the MoE router modules (the quant plan's
`router` category: the one module per MoE block whose weight is (experts, hidden)) and puts one
forward hook on each. transformers' routers return `(router_logits, routing_weights,
expert_indices)` over the flattened (B * T) tokens of the batch, and the MoE block hands the
last two to its experts. The hook does up to three things with them:

- **Count** (inside `counting(mask, routes)`): each real token's top-k (`mask` (B, T) != 0, so
  padding never counts) is added to the (layers, experts) `counts` of the trainer's own
  routing. Given the rollout's `routes` for the same tokens, it also counts the rollout's
  experts (`rollout_counts`) and compares the two top-k sets token by token: `overlap` (the
  sum of |trainer & rollout|), `flips` (tokens whose sets differ) and `compared` (tokens
  that have a rollout route). Only the training forward counts: the no-grad scoring passes
  (logp_old, the KL reference) run outside `counting`, and a gradient-checkpointed backward
  recomputes each layer inside `loss.backward()`, outside it too, so nothing counts twice.
  The trainer's own routing is counted before any replay, so under R3 it still says where
  the BF16 router would have sent each token.
- **Replay** (inside `replaying(routes)`, R3, arXiv 2510.11370): the indices are replaced by
  the given routes wherever a token has one, and the routing weights are recomputed from the
  trainer's own router logits over the replayed experts with that router's rule
  (`REPLAY_RULES`), so top-k follows the rollout while the weights stay differentiable. For a
  token routed as the trainer would route it, the rule gives bit-identical weights (it
  gathers the same probabilities top-k returned), so replaying the trainer's own routing
  changes nothing. `replaying` must enclose the backward too: a checkpointed layer is
  recomputed there and must route as its forward did.

Routes are (B, T, moe_layers, k) integer tensors aligned with the batch's columns, the MoE
layers in model order, -1 where a token has no route (padding, or a token the rollout did not
route). Sharded, each rank hooks its own rows, and `all_reduce` sums the statistics, so every
rank reports the whole batch.

`load_metrics(counts, names, prefix)` turns counts into what a run logs, per layer and
overall: `load_cv` (std / mean of the per-expert token counts, population std: 0 when every
expert gets the same), `max_over_mean` (the busiest expert against the mean: 1 when balanced,
E when one expert takes everything), `dead` (experts that got no token). Overall: the mean over
layers of the first two, the sum of the third. `agreement_metrics` gives `router/topk_agreement`
(the mean fraction of the k experts both chose) and `router/flip_rate` (the fraction of tokens
whose k experts differ), overall (token-weighted over layers) and per layer.
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


@contextmanager
def recorded_routes(model: nn.Module):
    """Inside: a dict that each forward fills with every router's top-k indices (tokens, k),
    by plain router name in layer order (the last forward's). Outside, the hooks are gone."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out[-1]))
             for name, m in router_modules(model).items()]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


# --- routing weights of given experts, per router family (what each router's forward does) ---

def _softmax_then_gather(router: nn.Module, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Qwen3-MoE, Qwen2-MoE, OLMoE: fp32 softmax over all experts, the chosen ones' probabilities,
    renormalized over the k when `norm_topk_prob`, in the logits' dtype."""
    weights = torch.softmax(logits, dtype=torch.float, dim=-1).gather(-1, experts)
    if router.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype)


def _mixtral(router: nn.Module, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Mixtral: fp32 softmax, the chosen ones' probabilities always renormalized, kept in fp32."""
    weights = torch.softmax(logits.float(), dim=-1).gather(-1, experts)
    return weights / weights.sum(dim=-1, keepdim=True)


def _deepseek_v3(router: nn.Module, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3: sigmoid scores (the bias only chooses, it is not a weight), renormalized when
    `norm_topk_prob`, times `routed_scaling_factor`."""
    weights = logits.sigmoid().gather(1, experts)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor


REPLAY_RULES = {
    "Qwen3MoeTopKRouter": _softmax_then_gather,
    "Qwen2MoeTopKRouter": _softmax_then_gather,
    "OlmoeTopKRouter": _softmax_then_gather,
    "MixtralTopKRouter": _mixtral,
    "DeepseekV3TopkRouter": _deepseek_v3,
}


COUNTS_KEY = "experts/counts"     # the one non-scalar entry of `RouterHooks.metrics`


def _num_experts(model: nn.Module) -> tuple[int, int]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = base.config.get_text_config()
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) \
        or text.n_routed_experts
    return experts, text.num_experts_per_tok


class RouterHooks:
    """Forward hooks on every router of a model: count, compare, replay (module docstring)."""

    def __init__(self, routers: dict[str, nn.Module], num_experts: int, top_k: int):
        self.names = list(routers)
        self.routers = list(routers.values())
        self.num_experts, self.top_k = num_experts, top_k
        # One tensor, so that one all-reduce sums everything: per layer, the trainer's and the
        # rollout's expert counts, then overlap, flips and compared tokens.
        self.stats = torch.zeros(len(routers), 2 * num_experts + 3, dtype=torch.int64)
        self._mask: torch.Tensor | None = None
        self._compare: torch.Tensor | None = None
        self._replay: torch.Tensor | None = None
        self._hooks = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.routers)]

    @classmethod
    def attach(cls, model: nn.Module) -> RouterHooks | None:
        """Hooks on `model`'s routers, or None for a dense model."""
        routers = router_modules(model)
        return cls(routers, *_num_experts(model)) if routers else None

    # --- views of `stats` ---
    @property
    def counts(self) -> torch.Tensor:
        """(layers, experts) tokens the trainer's own routers sent to each expert."""
        return self.stats[:, : self.num_experts]

    @property
    def rollout_counts(self) -> torch.Tensor:
        """(layers, experts) the same tokens' experts in the rollout's routes."""
        return self.stats[:, self.num_experts: 2 * self.num_experts]

    @property
    def overlap(self) -> torch.Tensor:
        return self.stats[:, -3]

    @property
    def flips(self) -> torch.Tensor:
        return self.stats[:, -2]

    @property
    def compared(self) -> torch.Tensor:
        return self.stats[:, -1]

    def check_replayable(self) -> None:
        """Raise unless every router has a rule for recomputing its weights (`REPLAY_RULES`)."""
        unknown = sorted({type(r).__name__ for r in self.routers} - REPLAY_RULES.keys())
        if unknown:
            raise ValueError(f"routing replay (r3) has no weight rule for router {unknown[0]}; "
                             f"it knows {sorted(REPLAY_RULES)}")

    def _hook(self, layer: int):
        def hook(module, _inputs, out):
            indices = out[-1] if isinstance(out, tuple) else out
            if indices.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"router {self.names[layer]} returned no expert indices")
            own = indices.reshape(-1, indices.shape[-1])
            if self._mask is not None:
                self._count(layer, own)
            if self._replay is not None:
                return self._replayed(layer, module, out, own)
            return None
        return hook

    def _layer_routes(self, routes: torch.Tensor, layer: int, tokens: int, device) -> torch.Tensor:
        """Layer `layer`'s (tokens, k) routes of a (B, T, layers, k) tensor, as int64 on `device`."""
        flat = routes.reshape(-1, *routes.shape[2:])
        if flat.shape[0] != tokens or flat.shape[1] != len(self.routers) or flat.shape[2] != self.top_k:
            raise ValueError(f"routes of shape {tuple(routes.shape)} do not fit {tokens} tokens x "
                             f"{len(self.routers)} MoE layers x top-{self.top_k}")
        return flat[:, layer].to(device=device, dtype=torch.int64)

    def _count(self, layer: int, own: torch.Tensor) -> None:
        if self.stats.device != own.device:    # counted where the model runs: no sync per layer
            self.stats = self.stats.to(own.device)
        real = self._mask.to(own.device)
        experts = self.num_experts
        self.stats[layer, :experts] += torch.bincount(own[real].flatten(), minlength=experts)
        if self._compare is None:
            return
        theirs = self._layer_routes(self._compare, layer, own.shape[0], own.device)
        known = real & (theirs[:, 0] >= 0)
        a, b = own[known], theirs[known]
        shared = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1)
        self.stats[layer, experts: 2 * experts] += torch.bincount(b.flatten(), minlength=experts)
        self.stats[layer, -3] += shared.sum()
        self.stats[layer, -2] += (shared < self.top_k).sum()
        self.stats[layer, -1] += known.sum()

    def _replayed(self, layer: int, router: nn.Module, out: tuple, own: torch.Tensor) -> tuple:
        logits = out[0]
        given = self._layer_routes(self._replay, layer, own.shape[0], own.device)
        experts = torch.where(given[:, :1] >= 0, given, own.to(torch.int64))
        weights = REPLAY_RULES[type(router).__name__](router, logits.reshape(own.shape[0], -1), experts)
        return (logits, weights.reshape(out[1].shape), experts.to(own.dtype).reshape(out[-1].shape))

    def reset(self) -> None:
        self.stats.zero_()

    @contextmanager
    def counting(self, attention_mask: torch.Tensor, routes: torch.Tensor | None = None):
        """Count the routes of the real tokens (`attention_mask` (B, T) != 0) of the forwards
        inside; with the rollout's `routes` (B, T, layers, k), compare with them too."""
        self._mask, self._compare = attention_mask.reshape(-1).bool(), routes
        try:
            yield
        finally:
            self._mask = self._compare = None

    @contextmanager
    def replaying(self, routes: torch.Tensor):
        """Route the forwards (and checkpointed recomputes) inside by `routes` (B, T, layers, k),
        -1 = the router's own choice (module docstring)."""
        self.check_replayable()
        self._replay = routes
        try:
            yield
        finally:
            self._replay = None

    def all_reduce(self) -> None:
        """Sum the statistics over the ranks of the default process group (a collective)."""
        import torch.distributed as dist

        if dist.get_backend() == "nccl" and self.stats.device.type != "cuda":
            self.stats = self.stats.cuda()     # a rank with no counted row still joins on its GPU
        dist.all_reduce(self.stats)

    def metrics(self) -> dict:
        """`experts/trainer/*`, and where routes were compared `experts/rollout/*` and
        `router/*`, of what was counted since `reset`; plus `experts/counts`, the counts
        themselves ({"names", "trainer", "rollout"}: nested lists, the report's heatmaps)."""
        compared = int(self.compared.sum()) > 0
        out: dict = load_metrics(self.counts, self.names, "experts/trainer")
        if compared:
            out.update(load_metrics(self.rollout_counts, self.names, "experts/rollout"))
            out.update(agreement_metrics(self.overlap, self.flips, self.compared, self.top_k, self.names))
        out[COUNTS_KEY] = {"names": list(self.names), "trainer": self.counts.cpu().tolist(),
                           "rollout": self.rollout_counts.cpu().tolist() if compared else None}
        return out

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


def agreement_metrics(overlap: torch.Tensor, flips: torch.Tensor, compared: torch.Tensor, k: int,
                      names: list[str]) -> dict[str, float]:
    """`router/topk_agreement` and `router/flip_rate`, overall and per layer, from per-layer
    sums of |trainer & rollout| (`overlap`), tokens whose sets differ (`flips`) and tokens
    compared (module docstring)."""
    overlap, flips, compared = (t.cpu().double() for t in (overlap, flips, compared))
    total = compared.sum().clamp(min=1)
    seen = compared.clamp(min=1)
    out = {"router/topk_agreement": (overlap.sum() / (k * total)).item(),
           "router/flip_rate": (flips.sum() / total).item()}
    for i, name in enumerate(names):
        layer = _layer_label(name)
        out[f"router/topk_agreement/{layer}"] = (overlap[i] / (k * seen[i])).item()
        out[f"router/flip_rate/{layer}"] = (flips[i] / seen[i]).item()
    return out


def _layer_label(router: str) -> str:
    """`model.layers.3.mlp.gate` -> `layer3` (the name a metric carries)."""
    parts = router.split(".")
    return f"layer{parts[parts.index('layers') + 1]}" if "layers" in parts else router
