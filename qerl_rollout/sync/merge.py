"""The trainer's weights as a stream of (name, tensor), LoRA merged per module in fp32.

How it works. `merged_named_tensors(model)` walks the model's modules in registration order
(which is layer order for transformers decoders) and yields every parameter and persistent
buffer under its plain transformers name (peft's `base_model.model.` prefix and
`.base_layer` segments removed, adapter tensors skipped). For a module carrying active LoRA
adapters the base weight is replaced by `W + sum_a scaling_a * (B_a @ A_a)`, computed in fp32
and rounded once to the weight dtype; the trainer's own tensors are never written. Two peft
layer types are understood:

- `lora.Linear` (target_modules): delta = B @ A, shape (out, in).
- `lora.ParamWrapper` (target_parameters, e.g. fused MoE experts (E, N, K)): A is stored as
  (E*r, in) and B as (out, r*E); delta[e] = B[:, :, e] @ A[e], laid out (E, in, out) or
  (E, out, in) as peft lays it (its `_did_swap_in_out_features`), the same einsum as
  `ParamWrapper.get_delta_weight` but on fp32 factors.

`fingerprint(model)` gives, per plain name, the identities, storage pointers and in-place
version counters of the tensors a merged value depends on (base weight and adapter factors),
and for small tensors (<= 65536 elements: norms, biases, LoRA factors) a hash of their bytes.
An optimizer step, `copy_`, `load_state_dict` or any in-place op on the parameter bumps its
counter, and `param.data = new` changes the storage pointer, so changed large tensors are
found without reading them. A large tensor written through the `.data` alias
(`p.data.add_(x)`: only the alias's counter moves) or a numpy view is NOT seen;
`push(full=True)` re-sends everything after such writes. Left out: DoRA, `fan_in_fan_out`, `modules_to_save` copies and other
adapter types; they raise instead of being merged wrongly.

Under FSDP2 (`rl.fsdp`) every parameter is a DTensor sharded on dim 0: `merged_shards` yields
each rank's rows merged (the LoRA factors gathered whole, only the local rows of the delta
computed), and fingerprints and finiteness checks read the local shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from qerl_rollout.dist import full_tensor, local_tensor, row_range

_PEFT_PREFIX = "base_model.model."
_ADAPTER_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                       "lora_magnitude_vector", "lora_dropout")


def plain_name(name: str) -> str:
    """`base_model.model.x.base_layer.weight` -> `x.weight` (peft wrapping removed)."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name.replace(".base_layer.", ".").replace(".base_layer", "")


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "scaling") and hasattr(module, "base_layer")


def _active_adapters(layer: nn.Module) -> list[str]:
    if getattr(layer, "merged", False):
        raise ValueError(f"{type(layer).__name__} has merged adapters; unmerge before syncing")
    if getattr(layer, "disable_adapters", False):
        return []
    active = layer.active_adapters
    active = [active] if isinstance(active, str) else list(active)
    if any(a in getattr(layer, "lora_embedding_A", {}) for a in active):
        raise NotImplementedError(f"LoRA on embeddings ({type(layer).__name__}) is not supported by "
                                  "the weight sync; target attention/MLP projections or experts")
    adapters = [a for a in active if a in layer.lora_A]
    for a in adapters:
        if getattr(layer, "use_dora", {}).get(a, False):
            raise NotImplementedError("DoRA adapters are not supported by the weight sync")
        if getattr(layer, "fan_in_fan_out", False):
            raise NotImplementedError("fan_in_fan_out LoRA layers are not supported by the weight sync")
    return adapters


def _target(layer: nn.Module) -> tuple[nn.Module, str]:
    """(module that owns the adapted tensor, its leaf name) of a LoRA layer."""
    if type(layer).__name__ == "ParamWrapper":
        owner = layer.base_layer
        while type(owner).__name__ == "ParamWrapper":   # peft nests one wrapper per parameter
            owner = owner.base_layer
        return owner, layer.parameter_name
    return layer.base_layer, "weight"


def _delta_fp32(layer: nn.Module, adapter: str, rows: slice | None = None) -> torch.Tensor:
    """scaling * B @ A in fp32, shaped like the adapted tensor (or its dim-0 `rows` only).

    Under FSDP2 the factors are sharded DTensors; they are gathered whole first (a collective,
    small next to the weight), then only the rows this rank holds are computed.
    """
    a = full_tensor(layer.lora_A[adapter].weight).detach().float()
    b = full_tensor(layer.lora_B[adapter].weight).detach().float()
    rows = rows or slice(None)
    scaling = layer.scaling[adapter]
    num_experts = getattr(layer, "num_experts", 1)
    if type(layer).__name__ == "ParamWrapper" and num_experts > 1:
        a = a.reshape(num_experts, -1, a.shape[-1])[rows]          # (E, r, in)
        b = b.reshape(b.shape[0], -1, num_experts)[:, :, rows]     # (out, r, E)
        layout = "e o i" if layer._did_swap_in_out_features else "e i o"
        return torch.einsum(f"o r e, e r i -> {layout}", b, a) * scaling
    return (b[rows] @ a) * scaling


def _adapters_by_tensor(model: nn.Module) -> dict[tuple[int, str], list[tuple[nn.Module, str]]]:
    """(id(owner module), leaf) -> [(LoRA layer, adapter name)] for every active adapter."""
    found: dict[tuple[int, str], list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        if _is_lora_layer(module):
            owner, leaf = _target(module)
            for adapter in _active_adapters(module):
                found.setdefault((id(owner), leaf), []).append((module, adapter))
    return found


def merge(w: torch.Tensor, adapters: list[tuple[nn.Module, str]], rows: slice | None = None) -> torch.Tensor:
    """w + sum of the adapters' deltas, accumulated in fp32 and rounded once to w's dtype.

    `rows`: `w` holds only these dim-0 rows of the adapted tensor (a rank's shard).
    """
    if not adapters:
        return w.detach()
    acc = w.detach().to(torch.float32, copy=True)   # a copy even when w is already fp32
    for layer, adapter in adapters:
        acc += _delta_fp32(layer, adapter, rows)
    return acc.to(w.dtype)


def _owned_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(plain name, owner, leaf, tensor) for every parameter and persistent buffer, in order."""
    skip: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(s) for s in skip):
            continue
        if path.rpartition(".")[2] in _ADAPTER_CONTAINERS:
            skip.append(path + ".")
            continue
        prefix = path + "." if path else ""
        for leaf, t in module.named_parameters(recurse=False):
            yield plain_name(prefix + leaf), module, leaf, t
        for leaf, t in module.named_buffers(recurse=False):
            if leaf not in module._non_persistent_buffers_set:
                yield plain_name(prefix + leaf), module, leaf, t


def merged_named_tensors(
    model: nn.Module, names: set[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every trainer tensor (or those in `names`) under its plain name, LoRA merged.

    The model's tensors are never modified; untouched tensors are yielded as detached views.
    """
    adapters = _adapters_by_tensor(model)
    for name, owner, leaf, t in _owned_tensors(model):
        if names is None or name in names:
            yield name, merge(t, adapters.get((id(owner), leaf), []))


@dataclass
class Shard:
    """A rank's part of a merged trainer tensor: rows [start, start + len(tensor)) of `rows`.

    `replicated`: the tensor is not sharded (every rank holds all of it, e.g. a buffer).
    """

    name: str
    tensor: torch.Tensor
    start: int
    rows: int
    replicated: bool


def merged_shards(model: nn.Module, names: set[str] | None = None) -> Iterator[Shard]:
    """`merged_named_tensors` for an FSDP2-sharded model: this rank's rows of each tensor,
    LoRA merged. A collective (the LoRA factors are gathered): every rank must walk the same
    `names` in the same order."""
    adapters = _adapters_by_tensor(model)
    for name, owner, leaf, t in _owned_tensors(model):
        if names is not None and name not in names:
            continue
        local = local_tensor(t)
        if local is t or t.dim() == 0:
            yield Shard(name, merge(t, adapters.get((id(owner), leaf), [])), 0, max(t.shape[:1], default=1),
                        replicated=True)
            continue
        mesh = t.device_mesh
        start, stop = row_range(t.shape[0], mesh.get_local_rank(), mesh.size())
        if local.shape[0] != stop - start:
            raise RuntimeError(f"{name}: rank holds {local.shape[0]} rows, expected {stop - start}")
        rows = slice(start, stop)
        yield Shard(name, merge(local, adapters.get((id(owner), leaf), []), rows), start, t.shape[0],
                    replicated=False)


def raw_tensors(model: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(plain name, own name, tensor) of every tensor a merged value reads, adapters included
    (under FSDP2: this rank's shards)."""
    adapters = _adapters_by_tensor(model)
    for name, owner, leaf, t in _owned_tensors(model):
        yield name, name, local_tensor(t)
        for layer, a in adapters.get((id(owner), leaf), []):
            yield name, f"{name} (LoRA {a} A)", local_tensor(layer.lora_A[a].weight)
            yield name, f"{name} (LoRA {a} B)", local_tensor(layer.lora_B[a].weight)


SMALL_TENSOR_NUMEL = 1 << 16


def _tensor_key(t: torch.Tensor) -> tuple:
    """Identity, storage and version counter; plus a content hash for small tensors.

    `param.data = new` keeps the Parameter's id but swaps its storage (data_ptr sees it).
    Writes through the `.data` alias (`p.data.mul_(2)`) bump only the alias's counter, so for
    small tensors (norms, biases, routing biases, LoRA factors) the bytes are hashed too.
    """
    key_id, t = id(t), local_tensor(t)   # FSDP2: the local shard's storage and version counter
    key = (key_id, t.data_ptr(), t._version)
    if t.numel() <= SMALL_TENSOR_NUMEL:
        data = t.detach().cpu().contiguous().view(-1).view(torch.uint8)
        key += (hashlib.blake2b(data.numpy().tobytes(), digest_size=16).digest(),)
    return key


def fingerprint(model: nn.Module) -> dict[str, tuple]:
    """Plain name -> identities and version counters of everything its merged value reads."""
    adapters = _adapters_by_tensor(model)
    out: dict[str, tuple] = {}
    for name, owner, leaf, t in _owned_tensors(model):
        deps: list = [_tensor_key(t)]
        for layer, a in adapters.get((id(owner), leaf), []):
            deps += [a, layer.scaling[a], _tensor_key(layer.lora_A[a].weight),
                     _tensor_key(layer.lora_B[a].weight)]
        out[name] = tuple(deps)
    return out
