"""The sharded weight sync (2 gloo ranks, FSDP2) sends exactly what the single-process sync sends.

`sharded_push.py` runs under torchrun with 2 ranks: each holds half of every tensor's rows
(half of the experts), merges LoRA into its rows, quantizes them (nvfp4 with an all-reduced
amax; fp8_block locally where the 128-row blocks align, else rank 0 quantizes the gathered
rows), and rank 0 assembles the complete tensors. Here the same LoRA values are pushed by one
unsharded process; every tensor of every scheme must have the same name, dtype, shape and
bytes. The tiny Qwen3-MoE exercises both fp8_block paths: q_proj (256 rows, chunk 128) is
quantized on each rank, k_proj (128 rows, chunk 64) is gathered first. A NaN that only rank 1
holds must stop the push on both ranks, with the tensor named.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recording import RecordingReceiver, policy_config

from qerl_rollout.quant.export import export_checkpoint
from qerl_rollout.rl.policy import Policy
from qerl_rollout.rollout.engine import read_manifest
from qerl_rollout.sync.weight_sync import WeightSync

SCHEMES = ["fp8_block", "fp8_channel", "int8", "nvfp4", "bf16"]
HERE = Path(__file__).parent


def _lora_values(model_dir, path: Path) -> dict:
    """Seeded random values for every LoRA tensor (B is zero at init: nothing would merge)."""
    names = {n: p.shape for n, p in Policy(policy_config(model_dir)).model.named_parameters()
             if p.requires_grad}
    g = torch.Generator().manual_seed(7)
    lora = {n: torch.randn(shape, generator=g) * 0.05 for n, shape in sorted(names.items())}
    torch.save(lora, path)
    return lora


def _manifest_dirs(model_dir, tmp_path: Path) -> dict[str, Path]:
    dirs = {"bf16": Path(model_dir)}
    for scheme in SCHEMES[:-1]:
        export_checkpoint(model_dir, tmp_path / scheme, scheme, progress=False)
        dirs[scheme] = tmp_path / scheme
    return dirs


@pytest.fixture(scope="module")
def sharded_run(tiny_model, tmp_path_factory, launch_env):
    tmp = tmp_path_factory.mktemp("sharded")
    model_dir = tiny_model("qwen3_moe")
    lora = _lora_values(model_dir, tmp / "lora.pt")
    dirs = _manifest_dirs(model_dir, tmp)
    out = tmp / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29561", str(HERE / "sharded_push.py"), str(model_dir), str(tmp / "lora.pt"),
           str(out), *(f"{s}={d}" for s, d in dirs.items())]
    env = launch_env(OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")   # an abort prints its Python stacks
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return model_dir, lora, dirs, out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sharded_push_sends_the_single_process_bytes(sharded_run, scheme):
    model_dir, lora, dirs, out = sharded_run
    sharded = torch.load(out / f"{scheme}.pt")
    policy = Policy(policy_config(model_dir))
    policy.load_lora(lora)
    receiver = RecordingReceiver(scheme, read_manifest(dirs[scheme]))
    report = WeightSync(receiver).push(policy.model)
    single = receiver.tensors
    assert sorted(sharded["tensors"]) == sorted(single)
    differ = [n for n, t in single.items() if not _same(sharded["tensors"][n], t)]
    assert not differ, f"{len(differ)} of {len(single)} tensors differ, e.g. {differ[:3]}"
    assert sharded["bytes_bf16"] == report.bytes_bf16


def test_the_merged_lora_reaches_the_engine(sharded_run):
    """Guards the test itself: with LoRA merged, pushed attention weights differ from the base."""
    model_dir, _, dirs, out = sharded_run
    sharded = torch.load(out / "bf16.pt")["tensors"]
    base = Policy(policy_config(model_dir))
    receiver = RecordingReceiver("bf16", read_manifest(dirs["bf16"]))
    WeightSync(receiver).push(base.model)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not _same(sharded[name], receiver.tensors[name])
    expert = "model.layers.1.mlp.experts.7.down_proj.weight"   # rank 1's expert
    assert not _same(sharded[expert], receiver.tensors[expert])


def test_a_nan_on_one_rank_stops_every_rank(sharded_run):
    *_, out = sharded_run
    rank0 = (out / "error0.txt").read_text().splitlines()
    rank1 = (out / "error1.txt").read_text().splitlines()
    name = rank0[0].removeprefix("base_model.model.").replace(".default.weight", "").replace(".lora_B", "")
    assert "NaN/Inf" in rank1[1] and "LoRA default B" in rank1[1]
    assert rank0[1].startswith("on trainer rank 1: refusing to push") and name in rank0[1]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
