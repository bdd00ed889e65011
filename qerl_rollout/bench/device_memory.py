"""Device memory of a checkpoint and of the colocated offload, measured on one GPU.

    python -m qerl_rollout.bench device_memory [--layers 16] [--hidden 2048] [--out PATH]
    python -m qerl_rollout.bench device_memory --cpu-smoke   # no GPU: a tiny model, gloo

Needs torch and transformers only (the device machine has no peft and no vLLM), so the policy
is a transformers Qwen3 model with its q_proj weights trainable standing in for the LoRA
factors; everything else is this project's own code on it:

1. one rank joins a process group (NCCL on CUDA, gloo with --cpu-smoke) and shards the model
   with `rl.fsdp.shard_policy`, as a trainer rank does; one AdamW step makes optimizer state;
2. save: `rl.policy.Policy.save_state` (the run checkpoint's trainer part: the rank writes its
   shards of the trainable tensors and AdamW state with torch.distributed.checkpoint, nothing
   gathered): the peak device memory above the resident state, against the largest trainable
   tensor (the plan's "save" row) and the whole model;
3. load: the trainable tensors and moments are zeroed, `Policy.load_state` reads them back:
   its peak above resident, and whether every value came back bit for bit;
4. offload: `rl.policy.Policy.to_device` to the host and back (the colocated train/rollout
   moves): device memory allocated and reserved before, on the host (the allocator cache must
   be empty: the engine beside it is another process) and after the return, and whether every
   trainable value came back bit for bit.

Each part records its error instead of stopping the others. Prints a table and writes JSON
(default bench/results/device_memory.json). Exit status 1 if a part failed or a value came
back changed, 2 without CUDA (unless --cpu-smoke).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

MIB = 1 << 20


def build_model(layers: int, hidden: int, device_type: str):
    """A BF16 Qwen3 model on the CPU, sharded for one rank; q_proj weights trainable."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from qerl_rollout.rl.fsdp import shard_policy

    config = Qwen3Config(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512),
                         head_dim=128, vocab_size=32000, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("q_proj.weight"))
    return shard_policy(model, device_type)


def _mem(device) -> dict:
    if device.type != "cuda":
        return {"allocated_mib": None, "reserved_mib": None}
    return {"allocated_mib": torch.cuda.memory_allocated() / MIB, "reserved_mib": torch.cuda.memory_reserved() / MIB}


def _peak_above(device, fn):
    """fn()'s result and its peak device memory above what was allocated before (MiB)."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - before) / MIB


def measure(layers: int, hidden: int, device: torch.device, ckpt_dir: Path) -> dict:
    from qerl_rollout.rl.policy import Policy, PolicyConfig, build_optimizer

    model = build_model(layers, hidden, device.type)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(trainable, PolicyConfig(lr=1e-4))
    ids = torch.randint(0, 32000, (2, 64), device=device)
    model(input_ids=ids).logits.float().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    policy = SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler, step=1, distributed=True)
    policy._dcp_state = lambda: Policy._dcp_state(policy)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "layers": layers, "hidden": hidden,
           "model_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / MIB,
           "largest_trainable_mib": max(p.numel() * p.element_size() for p in trainable) / MIB,
           "resident": _mem(device)}
    parts = {}
    try:
        saved = _trainable_state(model, optimizer)
        _, peak = _peak_above(device, lambda: Policy.save_state(policy, ckpt_dir))
        parts["save"] = {"peak_above_resident_mib": peak,
                         "files": sorted(p.name for p in ckpt_dir.iterdir())}
        with torch.no_grad():
            for t in _tensors(model, optimizer):
                t.zero_()
        _, peak = _peak_above(device, lambda: Policy.load_state(policy, ckpt_dir))
        loaded = _trainable_state(model, optimizer)
        parts["load"] = {"peak_above_resident_mib": peak, "values_equal": all(
            torch.equal(saved[k], loaded[k]) for k in saved)}
    except Exception as e:  # noqa: BLE001 - recorded, the next part still runs
        parts.setdefault("save", {})["error"] = f"{type(e).__name__}: {e}"
    try:
        before = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        offload = {"before": _mem(device)}
        Policy.to_device(policy, "cpu")
        offload["on_host"] = _mem(device)
        Policy.to_device(policy, device)
        offload["returned"] = _mem(device)
        after = {n: p.detach().to("cpu") for n, p in model.named_parameters() if p.requires_grad}
        offload["values_equal"] = all(torch.equal(_local(before[n]), _local(after[n])) for n in before)
        parts["offload"] = offload
    except Exception as e:  # noqa: BLE001
        parts["offload"] = {"error": f"{type(e).__name__}: {e}"}
    out["parts"] = parts
    return out


def _tensors(model, optimizer) -> list[torch.Tensor]:
    """This rank's local shards of the trainable tensors and their AdamW moments."""
    out = [_local(p.data) for p in model.parameters() if p.requires_grad]
    return out + [_local(s[k]) for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]


def _trainable_state(model, optimizer) -> dict[int, torch.Tensor]:
    return {i: t.to("cpu", copy=True) for i, t in enumerate(_tensors(model, optimizer))}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def table(result: dict) -> str:
    p = result["parts"]

    def mib(v):
        return "-" if v is None else f"{v:,.1f}"

    rows = [f"device {result['device']}: model {mib(result['model_mib'])} MiB, largest trainable tensor "
            f"{mib(result['largest_trainable_mib'])} MiB, resident {mib(result['resident']['allocated_mib'])} MiB"]
    for name in ("save", "load"):
        part = p.get(name, {})
        rows.append(f"{name:<8} peak above resident {mib(part.get('peak_above_resident_mib'))} MiB"
                    + (f"; values equal after the load: {part['values_equal']}" if "values_equal" in part else "")
                    + (f"  ERROR {part['error']}" if "error" in part else ""))
    off = p.get("offload", {})
    if "error" in off:
        rows.append(f"offload  ERROR {off['error']}")
    else:
        rows.append("offload  allocated / reserved MiB: " + ", ".join(
            f"{k} {mib(off[k]['allocated_mib'])} / {mib(off[k]['reserved_mib'])}" for k in ("before", "on_host", "returned"))
            + f"; values equal after the round trip: {off['values_equal']}")
    return "\n".join(rows)


def failed(result: dict) -> bool:
    p = result["parts"]
    return (any("error" in part for part in p.values()) or not p.get("offload", {}).get("values_equal", False)
            or not p.get("load", {}).get("values_equal", False))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qerl_rollout.bench device_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=Path("bench/results/device_memory.json"))
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU: a 2-layer model over gloo")
    args = ap.parse_args(argv)
    if not (torch.cuda.is_available() or args.cpu_smoke):
        print("device_memory needs CUDA (or --cpu-smoke)", file=sys.stderr)
        return 2
    import torch.distributed as dist

    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    layers, hidden = (2, 256) if args.cpu_smoke else (args.layers, args.hidden)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo" if args.cpu_smoke else "nccl", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(layers, hidden, device, Path(tmp) / "trainer")
    finally:
        dist.destroy_process_group()
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 1 if failed(result) else 0


if __name__ == "__main__":
    sys.exit(main())
