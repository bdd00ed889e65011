"""Router agreement: does the quantized rollout send tokens to the experts the BF16 policy would?

How it works. `qdq_copy(model, scheme)` builds a plain transformers model holding exactly the
numbers the rollout engine serves after a push (LoRA merged, every quantized tensor replaced by
its quantize-dequantize values, routers and other exempt tensors untouched).
`router_topk_agreement(policy, rollout, input_ids)` runs both on the same tokens, records the
experts each router selects (the top-k indices transformers' router modules return, found
through the quant plan's `router` category), and reports per layer and overall the mean
fraction of the k selected experts the two agree on, and the fraction of tokens whose k
experts agree exactly. Routers stay BF16 in the rollout, so any disagreement comes from the
quantized layers below them changing the router's input.

Left out: this is an evaluation tool, it holds a second copy of the model; padding is not
masked (pass unpadded batches, or a single sequence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qerl_rollout.quant.plan import QuantPlan, build_plan
from qerl_rollout.sync.merge import merged_named_tensors
from qerl_rollout.wire.stream import qdq_named_tensors


@dataclass
class RouterAgreement:
    mean: float                 # mean over layers and tokens of |top-k(a) & top-k(b)| / k
    exact: float                # fraction of (layer, token) whose top-k sets are equal
    per_layer: dict[str, float]


def _plain_config(model: nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def qdq_copy(model: nn.Module, scheme: str, plan: QuantPlan | None = None) -> nn.Module:
    """A plain transformers model with the engine's numbers for `model` (see module docstring)."""
    from transformers import AutoModelForCausalLM

    config = _plain_config(model)
    plan = plan or build_plan(config, scheme)
    copy = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = dict(qdq_named_tensors(plan, scheme, merged_named_tensors(model)))
    missing, unexpected = copy.load_state_dict(state, strict=False)
    tied = {n for n, d in plan.decisions.items() if not d.checkpoint_names}
    if set(missing) - tied or unexpected:
        raise ValueError(f"QDQ copy mismatch: missing {missing}, unexpected {unexpected}")
    return copy.eval()


def _router_modules(model: nn.Module) -> dict[str, nn.Module]:
    from qerl_rollout.rl.routing import router_modules

    modules = router_modules(model)
    if not modules:
        raise ValueError("the plan names no router modules: is this a MoE model?")
    return modules


@torch.no_grad()
def selected_experts(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Router module name -> (tokens, k) expert indices chosen on `input_ids`."""
    chosen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in _router_modules(model).items():
        def record(_m, _inp, out, name=name):
            indices = out[-1] if isinstance(out, tuple) else out
            if indices.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"router {name} returned no expert indices")
            chosen[name] = indices.reshape(-1, indices.shape[-1])
        hooks.append(module.register_forward_hook(record))
    try:
        model(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
    return chosen


def topk_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: (|a & b| / k, sets equal) for (tokens, k) index tensors."""
    k = a.shape[-1]
    overlap = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1)
    return overlap.float() / k, overlap == k


def router_topk_agreement(policy: nn.Module, rollout: nn.Module, input_ids: torch.Tensor) -> RouterAgreement:
    a = selected_experts(policy, input_ids)
    b = selected_experts(rollout, input_ids)
    per_layer, fractions, exact = {}, [], []
    for name in a:
        frac, same = topk_agreement(a[name], b[name])
        per_layer[name] = frac.mean().item()
        fractions.append(frac)
        exact.append(same.float())
    return RouterAgreement(torch.cat(fractions).mean().item(), torch.cat(exact).mean().item(), per_layer)
