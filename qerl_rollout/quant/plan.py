"""QuantPlan: for every weight of a model, quantized or exempt, and why.

How it works. The plan is read off the module tree of a transformers model (a real one, or one
instantiated on the meta device from a config), never off substring matches of tensor names:

1. The decoder layers are the `nn.ModuleList` of `config.num_hidden_layers` modules.
2. A direct child of a layer that holds routed experts (a module owning 3-D parameters whose
   first dim is the number of experts, or a `ModuleList` of that many experts) is a MoE block.
   Inside it, the router is the one module whose 2-D `weight` has shape (num_experts, hidden);
   everything it owns (weight, bias, DeepSeek's `e_score_correction_bias`) stays BF16. A MoE
   block whose router cannot be identified raises `RouterNotFoundError` naming the candidates.
   Another child with linear layers is the shared expert (quantized); a linear with
   out_features == 1 next to a shared expert is the shared-expert gate (exempt).
3. Other children of a layer: a module whose class name contains "Attention" is attention,
   anything else holding linears is the dense MLP. Their 2-D linear weights are quantized.
4. Input/output embeddings come from `get_input_embeddings()` / `get_output_embeddings()`.
   1-D tensors are norms or biases and are exempt; any other 2-D tensor the rules above did not
   place is `other` and exempt, so nothing unknown is ever quantized silently.

Names. The trainer (transformers 5.x) keeps experts fused: `mlp.experts.gate_up_proj` (E, 2I, H)
and `mlp.experts.down_proj` (E, H, I); checkpoints and vLLM use per-expert 2-D tensors. The
mapping between the two is taken from transformers' own checkpoint conversion mapping for the
model type (`WeightRenaming` + `WeightConverter` with MergeModulelist(dim=0) [+ Concatenate(dim=1)]),
so Mixtral's `block_sparse_moe.experts.{i}.w1/w3/w2` and the `gate_proj`-first order of
`gate_up_proj` come out exactly as `save_pretrained` writes them. `QuantPlan.checkpoint_tensors`
splits a trainer tensor into those pieces.

Fused groups are the checkpoint tensors that vLLM fuses into one layer and that therefore share
one NVFP4 global scale: q/k/v, gate/up (dense MLP, shared expert, every routed expert; Mixtral's
w1/w3), and MLA's q_a_proj/kv_a_proj_with_mqa when both exist (vLLM's `fused_qkv_a_proj`).

Precision (`Precision`, the run's `rollout.quant_targets` and `rollout.bf16_layers`): of the
quantizable tensors above, only the categories of the chosen targets are quantized (`experts`:
routed and shared experts; `experts_attention`: and attention; `all_linear`, the default: and the
dense MLPs too, every decoder-layer linear) and the first and last `bf16_layers` decoder layers
stay BF16 whole (NeMo RL's recipe). The rest gets the plan's one scheme. What is kept BF16 this
way says why in its reason, and is in the export's ignore list like any exempt module; a
precision that leaves nothing quantized is refused (use the bf16 scheme). `overrides`
(`rollout.quant_overrides`) give a module kind (`experts`, `attention`, `dense_mlp`) its own
scheme instead of the plan's (for example experts nvfp4 + attention fp8_block); each quantized
decision carries its scheme (`TensorDecision.scheme`). An override is by kind, never by
tensor, so the tensors vLLM fuses into one layer (q/k/v, gate/up) always share a scheme.
Routers, shared-expert gates, lm_head, embeddings and norms are not a kind an override can
name: they stay BF16 whatever the config says, and naming one is refused.

Left out: conversion operations other than merge/concatenate (e.g. transposes, qwen3_vl_moe),
vision towers and MTP heads (they fall into `other`, exempt), and per-scheme shape limits
(the quantizer raises on a shape it cannot handle).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qerl_rollout.quant import SCHEMES

CATEGORIES = (
    "attention",
    "expert",
    "dense_mlp",
    "shared_expert",
    "router",
    "shared_expert_gate",
    "lm_head",
    "embedding",
    "norm",
    "bias",
    "other",
)
QUANTIZABLE_CATEGORIES = frozenset({"attention", "expert", "dense_mlp", "shared_expert"})
_EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")
# Sibling projections that vLLM loads into one fused layer (its packed_modules_mapping).
FUSED_SIBLINGS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
)


class RouterNotFoundError(ValueError):
    """A MoE block whose router module cannot be identified structurally."""


class UnsupportedConversionError(NotImplementedError):
    """transformers maps this model's checkpoint with an operation the plan does not invert."""


QUANT_TARGETS = {
    "experts": ("expert", "shared_expert"),
    "experts_attention": ("expert", "shared_expert", "attention"),
    "all_linear": ("expert", "shared_expert", "attention", "dense_mlp"),
}


# The module kinds `Precision.overrides` may give their own scheme, and their categories.
OVERRIDE_KINDS = {
    "experts": ("expert", "shared_expert"),
    "attention": ("attention",),
    "dense_mlp": ("dense_mlp",),
}
# Names a user may reach for that are never quantized (refused by `Precision`, with why).
NEVER_QUANTIZED = ("router", "gate", "shared_expert_gate", "lm_head", "embedding", "embed_tokens",
                   "norm", "bias")


@dataclass(frozen=True)
class Precision:
    """Which quantizable tensors a plan quantizes, and in which scheme: the categories of
    `targets` (`QUANT_TARGETS`), outside the first and last `bf16_layers` decoder layers, in
    the plan's scheme unless `overrides` ((kind, scheme) pairs, `OVERRIDE_KINDS`) name
    another for their kind (module docstring)."""

    targets: str = "all_linear"
    bf16_layers: int = 0
    overrides: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.targets not in QUANT_TARGETS:
            raise ValueError(f"unknown quant targets {self.targets!r}; choose from {sorted(QUANT_TARGETS)}")
        if self.bf16_layers < 0:
            raise ValueError(f"bf16_layers must be >= 0, got {self.bf16_layers}")
        object.__setattr__(self, "overrides", tuple(sorted((str(k), str(v)) for k, v in dict(self.overrides).items())))
        for kind, scheme in self.overrides:
            _check_override(kind, scheme, self.targets)

    @property
    def override_schemes(self) -> tuple[str, ...]:
        return tuple(sorted({scheme for _, scheme in self.overrides}))

    def scheme_for(self, category: str, default: str) -> str:
        """The scheme a quantized tensor of `category` gets: its kind's override, or `default`."""
        for kind, scheme in self.overrides:
            if category in OVERRIDE_KINDS[kind]:
                return scheme
        return default

    def kept_bf16(self, category: str, layer: int | None, num_layers: int) -> str | None:
        """Why a quantizable tensor of `category` in decoder layer `layer` stays BF16, or None."""
        if category not in QUANT_TARGETS[self.targets]:
            return f"{category} kept BF16 (quant_targets={self.targets})"
        if layer is not None and (layer < self.bf16_layers or layer >= num_layers - self.bf16_layers):
            return f"layer {layer} kept BF16 (bf16_layers={self.bf16_layers})"
        return None


def _check_override(kind: str, scheme: str, targets: str) -> None:
    """One line for each way an override can be wrong (unknown kind, a never-quantized module,
    an unknown or bf16 scheme, a kind its targets leave BF16)."""
    where = f"quant_overrides {kind}={scheme}"
    if kind in NEVER_QUANTIZED:
        raise ValueError(f"{where}: {kind} is never quantized (routers, shared-expert gates, lm_head, "
                         f"embeddings and norms stay BF16); override one of {sorted(OVERRIDE_KINDS)}")
    if kind not in OVERRIDE_KINDS:
        raise ValueError(f"{where}: unknown module kind {kind!r}; choose from {sorted(OVERRIDE_KINDS)}")
    if scheme not in SCHEMES:
        raise ValueError(f"{where}: unknown scheme {scheme!r}; choose from {sorted(SCHEMES)} "
                         "(to keep a kind BF16, leave it out of quant_targets)")
    if not set(OVERRIDE_KINDS[kind]) & set(QUANT_TARGETS[targets]):
        raise ValueError(f"{where}: quant_targets={targets} keeps {kind} BF16; add it to the targets "
                         "or drop the override")


@dataclass(frozen=True)
class TensorDecision:
    """What happens to one trainer tensor (a parameter or persistent buffer); `scheme` is the
    one it is quantized with (None when it is not)."""

    name: str
    category: str
    quantized: bool
    reason: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    checkpoint_names: tuple[str, ...]
    scheme: str | None = None

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize


@dataclass(frozen=True)
class ExpertSplit:
    """A fused 3-D expert tensor = per-expert checkpoint tensors concatenated along dim 1.

    `templates` hold `{expert}`; their order is the concatenation order (gate before up).
    """

    templates: tuple[str, ...]
    num_experts: int

    def names(self) -> tuple[str, ...]:
        return tuple(t.format(expert=e) for e in range(self.num_experts) for t in self.templates)


@dataclass
class QuantPlan:
    """Per-tensor decisions keyed by trainer name, plus the checkpoint-name view of them."""

    scheme: str
    model_type: str
    decisions: dict[str, TensorDecision]
    splits: dict[str, ExpertSplit] = field(default_factory=dict)
    fused_groups: tuple[tuple[str, ...], ...] = ()
    precision: Precision = Precision()
    _by_checkpoint: dict[str, str] = field(default_factory=dict, repr=False)
    _group_of: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for d in self.decisions.values():
            for ck in d.checkpoint_names:
                self._by_checkpoint[ck] = d.name
        for group in self.fused_groups:
            for ck in group:
                self._group_of[ck] = group

    # -- lookups -------------------------------------------------------------------------
    def __getitem__(self, name: str) -> TensorDecision:
        return self.decisions[name]

    def for_checkpoint(self, checkpoint_name: str) -> TensorDecision:
        """The decision of the trainer tensor a checkpoint tensor comes from."""
        try:
            return self.decisions[self._by_checkpoint[checkpoint_name]]
        except KeyError:
            raise KeyError(
                f"{checkpoint_name!r} is not a tensor of this {self.model_type} plan"
            ) from None

    def decision_of(self, checkpoint_name: str) -> TensorDecision | None:
        """Like `for_checkpoint`, but None for a name that is not a checkpoint tensor of the plan
        (e.g. a compressed-tensors `x.weight_scale`)."""
        trainer_name = self._by_checkpoint.get(checkpoint_name)
        return None if trainer_name is None else self.decisions[trainer_name]

    def checkpoint_names(self) -> list[str]:
        return list(self._by_checkpoint)

    def group_of(self, checkpoint_name: str) -> tuple[str, ...]:
        """The fused group (shared NVFP4 global scale) of a checkpoint tensor, or itself."""
        return self._group_of.get(checkpoint_name, (checkpoint_name,))

    def group_amax(self, amax_by_name: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint name -> the amax its NVFP4 global scale is computed from: the largest
        amax over the members of its fused group present in `amax_by_name` (q/k/v, gate/up of
        one expert), which gives the group the smallest of its scales, as vLLM's fused layer
        needs. The one place both the export and the weight sync take it from."""
        out = {}
        for name in amax_by_name:
            members = [amax_by_name[m] for m in self.group_of(name) if m in amax_by_name]
            out[name] = torch.stack(members).amax()
        return out

    def schemes(self) -> list[str]:
        """The schemes this plan quantizes with, the plan's own first (one unless overridden)."""
        used = {d.scheme for d in self.decisions.values() if d.quantized}
        return sorted(used, key=lambda s: (s != self.scheme, s))

    def quantized(self) -> list[TensorDecision]:
        return [d for d in self.decisions.values() if d.quantized]

    def exempt(self) -> list[TensorDecision]:
        return [d for d in self.decisions.values() if not d.quantized]

    # -- trainer tensor -> checkpoint tensors -----------------------------------------------
    def checkpoint_tensors(
        self, name: str, tensor: torch.Tensor
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (checkpoint_name, tensor) pieces of one trainer tensor (views, no copies).

        A fused 3-D expert tensor gives one 2-D piece per expert and projection, in the order
        save_pretrained writes them; any other tensor gives itself under its checkpoint name.
        """
        if name not in self.splits:
            for ck in self.decisions[name].checkpoint_names:
                yield ck, tensor
            return
        for names, stack in self.checkpoint_stacks(name, tensor):
            yield from zip(names, stack.unbind(0))

    def checkpoint_stacks(
        self, name: str, tensor: torch.Tensor, first_expert: int = 0
    ) -> Iterator[tuple[tuple[str, ...], torch.Tensor]]:
        """Like `checkpoint_tensors` but keeps experts stacked: (per-expert names, (E, rows, K)).

        `tensor` may hold experts `first_expert .. first_expert + len(tensor) - 1` only (a
        trainer rank's shard of the fused tensor); the names follow.
        """
        split = self.splits.get(name)
        if split is None:
            yield self.decisions[name].checkpoint_names, tensor
            return
        n_parts = len(split.templates)
        experts = range(first_expert, first_expert + tensor.shape[0])
        if experts.stop > split.num_experts:
            raise ValueError(f"{name}: experts {experts.start}..{experts.stop - 1} of {split.num_experts}")
        for part, chunk in enumerate(tensor.chunk(n_parts, dim=1)):
            yield tuple(split.templates[part].format(expert=e) for e in experts), chunk

    # -- vLLM / compressed-tensors view -----------------------------------------------------
    def ignore_patterns(self) -> list[str]:
        """Anchored `re:` patterns for every exempt 2-D module, as vLLM names modules.

        Layer (and expert) indices are folded into `\\d+` only when the folded pattern matches
        no quantized module; otherwise the pattern stays per layer.
        """
        return _patterns([d for d in self.exempt() if len(d.shape) >= 2], self.quantized())

    def module_patterns(self, scheme: str) -> list[str]:
        """Anchored `re:` patterns for the modules quantized with `scheme` (a `quant_overrides`
        group's targets), folded as in `ignore_patterns` where no other module matches."""
        mine = [d for d in self.quantized() if d.scheme == scheme]
        return _patterns(mine, [d for d in self.decisions.values() if d.scheme != scheme])

    def summary(self, file=None) -> str:
        """A table of tensor counts and BF16 bytes per category, quantized vs exempt."""
        rows = _summary_rows(self.decisions.values())
        lines = [
            f"QuantPlan {self.model_type} scheme={self.scheme}"
            + "".join(f" {kind}={scheme}" for kind, scheme in self.precision.overrides),
            f"{'category':<20}{'quantized':>10}{'q_bytes':>14}{'exempt':>10}{'e_bytes':>14}",
        ]
        for cat, (nq, bq, ne, be) in rows.items():
            lines.append(f"{cat:<20}{nq:>10}{bq:>14,}{ne:>10}{be:>14,}")
        text = "\n".join(lines)
        if file is not None:
            print(text, file=file)
        return text

    def summary_counts(self) -> dict[str, tuple[int, int, int, int]]:
        """{category: (n_quantized, bytes_quantized, n_exempt, bytes_exempt)}."""
        return _summary_rows(self.decisions.values())


# ================================ building the plan ========================================


def build_plan(model_or_config, scheme: str, precision: Precision | None = None) -> QuantPlan:
    """Decide every tensor of a transformers model (or a config, instantiated on meta)."""
    _check_scheme(scheme)
    precision = precision or Precision()
    model = _as_model(model_or_config)
    config = model.config
    text_config = config.get_text_config()
    naming = CheckpointNaming.for_model(model)
    roles = _module_roles(model, text_config)
    tied = _tied_output_name(model, text_config)
    layers_name, _ = _decoder_layers(model, text_config)
    decisions: dict[str, TensorDecision] = {}
    splits: dict[str, ExpertSplit] = {}
    for name, tensor in _state_tensors(model):
        category, quantized, reason = _decide(name, tensor, roles)
        kept = quantized and precision.kept_bf16(category, _layer_index(name, layers_name),
                                                   text_config.num_hidden_layers)
        if kept:
            quantized, reason = False, kept
        split = naming.expert_split(name, tensor)
        if split is not None:
            splits[name] = split
            ck_names = split.names()
        elif name == tied:
            ck_names, reason = (), reason + "; tied to the input embedding, not stored"
        else:
            ck_names = (naming.to_checkpoint(name),)
        decisions[name] = TensorDecision(
            name, category, quantized, reason, tuple(tensor.shape), tensor.dtype, ck_names,
            precision.scheme_for(category, scheme) if quantized else None,
        )
    if precision != Precision() and not any(d.quantized for d in decisions.values()):
        raise ValueError(f"quant_targets={precision.targets} with bf16_layers={precision.bf16_layers} "
                         f"leaves nothing of this {text_config.num_hidden_layers}-layer {config.model_type} "
                         "quantized; use the bf16 scheme")
    groups = _fused_groups(
        [ck for d in decisions.values() if d.quantized for ck in d.checkpoint_names]
    )
    return QuantPlan(scheme, config.model_type, decisions, splits, groups, precision)


def build_plan_from_checkpoint(model_dir: str | Path, scheme: str, precision: Precision | None = None) -> QuantPlan:
    """The plan of a checkpoint directory: its config instantiated on the meta device."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    return build_plan(config, scheme, precision)


def _layer_index(name: str, layers_name: str) -> int | None:
    """`model.layers.3.mlp...` -> 3 (the decoder layer a tensor is in), None outside them."""
    if not name.startswith(layers_name + "."):
        return None
    return int(name[len(layers_name) + 1:].split(".", 1)[0])


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {sorted(SCHEMES)}")


def _as_model(model_or_config) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    from transformers import AutoModelForCausalLM

    dtype = getattr(model_or_config, "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_or_config, dtype=dtype)


def _state_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers, in state-dict order (tied names included)."""
    yield from model.state_dict(keep_vars=True).items()


def _tied_output_name(model: nn.Module, text_config) -> str | None:
    if not getattr(text_config, "tie_word_embeddings", False):
        return None
    out = model.get_output_embeddings()
    return _name_of(model, out) + ".weight" if out is not None else None


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules(remove_duplicate=False) if m is module)


# ------------------------------ structural roles ------------------------------------------


@dataclass(frozen=True)
class _Role:
    category: str
    reason: str


def _module_roles(model: nn.Module, text_config) -> dict[str, _Role]:
    """Module path -> role; a tensor takes the role of its longest owning module path."""
    roles: dict[str, _Role] = {}
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None:
        roles[_name_of(model, emb)] = _Role("embedding", "input embedding")
    if out is not None:
        roles[_name_of(model, out)] = _Role("lm_head", "output projection (lm_head)")
    layers_name, layers = _decoder_layers(model, text_config)
    n_experts = _num_experts(text_config)
    hidden = text_config.hidden_size
    for i, layer in enumerate(layers):
        for child_name, child in layer.named_children():
            path = f"{layers_name}.{i}.{child_name}"
            experts = _find_experts(child, n_experts)
            if experts is not None:
                roles.update(_moe_roles(path, child, experts, hidden))
            elif "Attention" in type(child).__name__:
                roles[path] = _Role("attention", "attention projection")
            elif _has_linear(child):
                roles[path] = _Role("dense_mlp", "dense MLP projection")
    return roles


def _decoder_layers(model: nn.Module, text_config) -> tuple[str, nn.ModuleList]:
    n = text_config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"no ModuleList of {n} decoder layers in {type(model).__name__}")


def _num_experts(text_config) -> int | None:
    for f in _EXPERT_COUNT_FIELDS:
        value = getattr(text_config, f, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _find_experts(block: nn.Module, n_experts: int | None) -> tuple[str, nn.Module] | None:
    """(relative path, module) of the routed experts inside `block`, or None for a dense block."""
    for name, module in block.named_modules():
        own = list(module.parameters(recurse=False))
        if (
            own
            and all(p.dim() == 3 for p in own)
            and (n_experts is None or own[0].shape[0] == n_experts)
        ):
            return name, module
        if (
            isinstance(module, nn.ModuleList)
            and n_experts
            and len(module) == n_experts
            and _has_linear(module)
        ):
            return name, module
    return None


def _moe_roles(
    path: str, block: nn.Module, experts: tuple[str, nn.Module], hidden: int
) -> dict[str, _Role]:
    experts_name, experts_module = experts
    n_experts = _expert_count(experts_module)
    roles = {f"{path}.{experts_name}": _Role("expert", "routed expert")}
    candidates = _weight_owners(block, skip=experts_name)
    routers = [n for n, w in candidates if tuple(w.shape) == (n_experts, hidden)]
    if len(routers) != 1:
        listed = ", ".join(f"{path}.{n} {tuple(w.shape)}" for n, w in candidates) or "none"
        raise RouterNotFoundError(
            f"MoE block {path} ({type(block).__name__}, {n_experts} experts): expected exactly one "
            f"router with weight ({n_experts}, {hidden}), found {len(routers)}; candidates: {listed}"
        )
    router = routers[0]
    roles[f"{path}.{router}"] = _Role("router", f"MoE router ({n_experts} experts), kept BF16")
    rest = [(n, w) for n, w in candidates if n != router]
    shared = _shared_expert_children(block, {experts_name, router})
    for name in shared:
        roles[f"{path}.{name}"] = _Role("shared_expert", "shared expert projection")
    for n, w in rest:
        top = n.split(".")[0]
        if top in shared:
            continue
        if shared and w.shape[0] == 1:
            roles[f"{path}.{n}"] = _Role(
                "shared_expert_gate", "shared-expert gate (out_features 1), kept BF16"
            )
        else:
            roles[f"{path}.{n}"] = _Role("other", "unrecognised module in a MoE block, kept BF16")
    return roles


def _expert_count(experts_module: nn.Module) -> int:
    if isinstance(experts_module, nn.ModuleList):
        return len(experts_module)
    return next(experts_module.parameters(recurse=False)).shape[0]


def _weight_owners(block: nn.Module, skip: str) -> list[tuple[str, torch.Tensor]]:
    """(relative name, weight) of every module in `block` outside `skip` owning a 2-D weight."""
    found = []
    for name, module in block.named_modules():
        if not name or name == skip or name.startswith(skip + "."):
            continue
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            found.append((name, w))
    return found


def _shared_expert_children(block: nn.Module, taken: set[str]) -> set[str]:
    """Direct children of a MoE block, other than experts and router, holding two+ linears."""
    return {
        n
        for n, c in block.named_children()
        if n not in taken and sum(isinstance(m, nn.Linear) for m in c.modules()) >= 2
    }


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


# ------------------------------ per-tensor decision ---------------------------------------

_EXEMPT_ROLES = {"router", "shared_expert_gate", "embedding", "lm_head", "other"}


def _decide(name: str, tensor: torch.Tensor, roles: dict[str, _Role]) -> tuple[str, bool, str]:
    """(category, quantized, reason) of one tensor from the role of its owning module."""
    module, _, leaf = name.rpartition(".")
    role = _owning_role(module, roles)
    if role is not None and role.category in _EXEMPT_ROLES:
        return role.category, False, role.reason
    if tensor.dim() == 1:
        if leaf == "bias" or leaf.endswith("_bias"):
            return "bias", False, "bias, kept in its dtype"
        return "norm", False, "1-D scale (norm), kept in its dtype"
    if role is None:
        return "other", False, "outside every recognised layer role, kept BF16"
    if tensor.dim() == 3 and role.category != "expert":
        return "other", False, "3-D tensor outside routed experts, kept BF16"
    return role.category, True, role.reason


def _owning_role(module: str, roles: dict[str, _Role]) -> _Role | None:
    path = module
    while True:
        if path in roles:
            return roles[path]
        if not path:
            return None
        path = path.rpartition(".")[0]


# ------------------------------ checkpoint naming -----------------------------------------

_LITERAL = re.compile(r"^[\w.*]+$")


@dataclass(frozen=True)
class _ExpertConverter:
    target: str  # trainer suffix, e.g. "mlp.experts.gate_up_proj"
    sources: tuple[str, ...]  # checkpoint suffixes with "*", e.g. "mlp.experts.*.gate_proj.weight"


@dataclass(frozen=True)
class CheckpointNaming:
    """Trainer name <-> checkpoint name, inverted from transformers' conversion mapping."""

    renames: tuple[tuple[str, str], ...] = ()  # (trainer substring, checkpoint substring)
    converters: tuple[_ExpertConverter, ...] = ()

    @classmethod
    def for_model(cls, model: nn.Module) -> CheckpointNaming:
        from transformers.conversion_mapping import extract_weight_conversions_for_model

        renames, converters = [], []
        for transform in extract_weight_conversions_for_model(model) or []:
            kind = type(transform).__name__
            sources, targets = list(transform.source_patterns), list(transform.target_patterns)
            if not all(_LITERAL.match(p) for p in sources + targets) or len(targets) != 1:
                raise UnsupportedConversionError(
                    f"{kind} {sources} -> {targets} uses regex patterns"
                )
            if kind == "WeightRenaming" and len(sources) == 1:
                renames.append((targets[0], sources[0]))
            elif kind == "WeightConverter" and _is_expert_merge(transform):
                converters.append(_ExpertConverter(targets[0], tuple(sources)))
            else:
                raise UnsupportedConversionError(
                    f"{kind} {sources} -> {targets} with {transform.operations!r} is not invertible here"
                )
        return cls(tuple(renames), tuple(converters))

    def to_checkpoint(self, name: str) -> str:
        for trainer_part, ckpt_part in self.renames:
            name = name.replace(trainer_part, ckpt_part)
        return name

    def expert_split(self, name: str, tensor: torch.Tensor) -> ExpertSplit | None:
        for conv in self.converters:
            if name.endswith(conv.target) and tensor.dim() == 3:
                prefix = name[: -len(conv.target)]
                templates = tuple(
                    self.to_checkpoint(prefix + s).replace("*", "{expert}") for s in conv.sources
                )
                return ExpertSplit(templates, tensor.shape[0])
        return None


def _is_expert_merge(transform) -> bool:
    """MergeModulelist(dim=0), then Concatenate(dim=1) when there are several sources."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in transform.operations]
    expected = [("MergeModulelist", 0)] + (
        [("Concatenate", 1)] if len(transform.source_patterns) > 1 else []
    )
    return ops == expected and all("*" in s for s in transform.source_patterns)


# ------------------------------ groups and patterns ---------------------------------------


def _module_of(checkpoint_name: str) -> str:
    return checkpoint_name.rpartition(".")[0]


def _fused_groups(quantized_checkpoint_names: list[str]) -> tuple[tuple[str, ...], ...]:
    """Sibling projections of one parent module that vLLM fuses (all members quantized)."""
    present = set(quantized_checkpoint_names)
    groups = []
    for ck in quantized_checkpoint_names:
        parent, _, rest = _module_of(ck).rpartition(".")
        leaf = ck.rpartition(".")[2]
        for siblings in FUSED_SIBLINGS:
            if rest != siblings[0]:
                continue
            members = tuple(f"{parent}.{s}.{leaf}" for s in siblings)
            if all(m in present for m in members):
                groups.append(members)
    return tuple(groups)


_LAYER_INDEX = re.compile(r"(?<=\\\.)\d+(?=\\\.)")


def _patterns(decisions: list[TensorDecision], others: list[TensorDecision]) -> list[str]:
    """Anchored `re:` patterns matching the modules of `decisions` and none of `others`'."""
    other_modules = [_module_of(ck) for d in others for ck in d.checkpoint_names]
    patterns: dict[str, None] = {}          # ordered set
    folds: dict[str, bool] = {}             # folded pattern -> matches none of the others
    for d in decisions:
        for ck in d.checkpoint_names:
            exact = "^" + re.escape(_module_of(ck)) + "$"
            folded = _LAYER_INDEX.sub(r"\\d+", exact)
            if folded != exact and folded not in folds:
                folds[folded] = not any(re.match(folded, q) for q in other_modules)
            patterns["re:" + (folded if folds.get(folded) else exact)] = None
    return list(patterns)


def _summary_rows(decisions) -> dict[str, tuple[int, int, int, int]]:
    rows = {c: [0, 0, 0, 0] for c in CATEGORIES}
    for d in decisions:
        base = 0 if d.quantized else 2
        rows[d.category][base] += 1
        rows[d.category][base + 1] += d.nbytes
    return {c: tuple(v) for c, v in rows.items() if v[0] or v[2]}
