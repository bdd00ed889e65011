"""Run under `python -m torch.distributed.run --nproc-per-node 2` by test_sharded_sync.py.

Every rank builds the same FSDP2-sharded LoRA policy, sets the LoRA tensors to the values in
LORA_FILE, and pushes them once per scheme with a sharded `WeightSync`; rank 0 holds a
recording receiver and saves what it received to OUT_DIR/<scheme>.pt. Then rank 1 puts a NaN
in its own shard of one LoRA factor and every rank records the push error it raised.
Arguments: MODEL_DIR LORA_FILE OUT_DIR scheme=MANIFEST_DIR ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from qerl_rollout.dist import local_tensor
from qerl_rollout.rl.policy import Policy
from qerl_rollout.rollout.engine import read_manifest
from qerl_rollout.sync.weight_sync import PushError, WeightSync

sys.path.insert(0, str(Path(__file__).parent))
from recording import RecordingReceiver, policy_config  # noqa: E402


def main(model_dir: str, lora_file: str, out_dir: str, *manifests: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    policy = Policy(policy_config(model_dir), distributed=True)
    policy.load_lora(torch.load(lora_file))
    for arg in manifests:
        scheme, manifest_dir = arg.split("=", 1)
        receiver = RecordingReceiver(scheme, read_manifest(manifest_dir)) if rank == 0 else None
        sync = WeightSync(receiver, sharded=True, scheme=scheme, bucket_bytes=1 << 20)
        report = sync.push(policy.model)
        if rank == 0:
            torch.save({"tensors": receiver.tensors, "bytes_bf16": report.bytes_bf16},
                       Path(out_dir) / f"{scheme}.pt")
        else:
            assert report is None
    name, param = next((n, p) for n, p in policy.model.named_parameters() if "lora_B" in n)
    if rank == 1:
        with torch.no_grad():
            local_tensor(param).view(-1)[0] = float("nan")
    try:
        sync.push(policy.model)
        error = "no error"
    except PushError as e:
        error = str(e)
    (Path(out_dir) / f"error{rank}.txt").write_text(f"{name}\n{error}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
