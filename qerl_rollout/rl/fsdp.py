"""FSDP2 for the LoRA policy: shard base weights, adapters, gradients and optimizer state.

How it works. `shard_policy(model)` applies `torch.distributed.fsdp.fully_shard` bottom-up
on the default process group (NCCL on GPUs, gloo on CPUs), so every parameter becomes a
DTensor sharded on dim 0 (`Shard(0)`, torch.chunk sizes: rank r holds rows
[r*ceil(N/W), min((r+1)*ceil(N/W), N))):

- each LoRA factor (`lora_A.<adapter>`, `lora_B.<adapter>`: fp32, trainable) is a group of
  its own. FSDP2 all-gathers one flat buffer per group and needs one dtype per group, so the
  fp32 adapters cannot share a group with the BF16 base weights without casting them (a
  `MixedPrecisionPolicy(param_dtype=bf16)` would run the adapters in BF16 and change the
  numerics against the single-process trainer);
- each decoder layer (`model.layers.<i>`) is a group: its BF16 weights are gathered for its
  forward and backward only, then freed;
- the root group holds the rest (embeddings, final norm, lm_head base weight).

No parameter is cast: BF16 weights stay BF16, the adapters stay fp32, gradients are reduced
in the adapters' fp32. The loss the policy differentiates is normalised by whole-batch
counts summed over ranks (`Policy` all-reduces them), so each rank's gradient is its share of
the global gradient and the reduce-scatter must *sum*: the divide factor is set to 1 on every
group (FSDP2's default averages over ranks, right only for a mean of per-rank means), and the
collectives use plain SUM (a factor of 1 would otherwise become NCCL's PREMUL_SUM, which gloo
lacks).

Loading (`load_sharded`): only rank 0 reads the checkpoint, into host memory; every other
rank builds the same LoRA model on the meta device (shapes, no storage). All shard it, then
`set_model_state_dict(broadcast_from_rank0=True)` sends rank 0's tensors one at a time and
each rank keeps its own slice, so a node's host memory holds one copy of the model (rank 0's)
instead of one per rank. The buffers that are not in a state dict (rotary `inv_freq`) are
broadcast the same way. A model with tied embeddings is loaded whole on every rank instead:
assigning the two names separately would untie them.

`qerl_rollout.dist.row_range(n, rank, world)` is that chunk arithmetic, for code that must
know which rows a rank holds (the sharded weight sync). Left out: HSDP (replicate x shard meshes), activation
checkpointing policies beyond transformers' own, and CPU offload of the optimizer state.
"""

from __future__ import annotations

import warnings

from torch import nn

_ADAPTER_CONTAINERS = ("lora_A", "lora_B")


def _adapter_modules(model: nn.Module) -> list[nn.Module]:
    found = []
    for name, module in model.named_modules():
        parent, _, _ = name.rpartition(".")
        if parent.rpartition(".")[2] in _ADAPTER_CONTAINERS and any(True for _ in module.parameters()):
            found.append(module)
    return found


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = []
    for name, module in model.named_modules():
        head, _, index = name.rpartition(".")
        if head.endswith("layers") and index.isdigit():
            layers.append(module)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers (`*.layers.<i>`) to shard")
    return layers


def load_sharded(build, device) -> nn.Module:
    """`build(device)` -> the LoRA model (rank 0: on the CPU, read; others: on "meta"), sharded
    over all ranks with its weights from rank 0 (module docstring). Returns the model."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank0 = dist.get_rank() == 0
    model = build(torch.device("cpu") if rank0 else torch.device("meta"))
    if getattr(model.config, "tie_word_embeddings", False):   # every rank reads it (module docstring)
        if not rank0:
            model = build(torch.device("cpu"))
        return shard_policy(model, device.type)
    full = model.state_dict() if rank0 else {}
    shard_policy(model, device.type)
    with warnings.catch_warnings():   # torch 2.13 asks its own deprecated default-device helper
        warnings.filterwarnings("ignore", "`_get_pg_default_device` will be deprecated", UserWarning)
        warnings.filterwarnings("ignore", "Multiple backends are registered", UserWarning)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    _broadcast_buffers(model, device)
    return model


def _broadcast_buffers(model: nn.Module, device) -> None:
    """Rank 0's buffers onto every rank, in `named_buffers` order (the same on every rank)."""
    import torch
    import torch.distributed as dist

    for name, buffer in model.named_buffers():
        value = buffer.to(device) if dist.get_rank() == 0 else torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
        dist.broadcast(value, src=0)
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = value


def shard_policy(model: nn.Module, device_type: str = "cpu") -> nn.Module:
    """Shard `model` (a peft LoRA model, on the CPU) in place with FSDP2 over all ranks.

    Groups are sharded bottom-up, so FSDP2 moves one group's full weights to `device_type` at
    a time and keeps only the shard: the device never holds the whole model. Returns `model`.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("shard_policy needs torch.distributed initialised (init_process_group)")
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for module in _adapter_modules(model):
        fully_shard(module, mesh=mesh)
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)   # plain SUM: gloo has no PREMUL_SUM
    return model
