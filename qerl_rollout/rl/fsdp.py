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

`qerl_rollout.dist.row_range(n, rank, world)` is that chunk arithmetic, for code that must
know which rows a rank holds (the sharded weight sync). Left out: HSDP (replicate x shard meshes), activation
checkpointing policies beyond transformers' own, and CPU offload of the optimizer state.
"""

from __future__ import annotations

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
