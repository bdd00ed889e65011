"""Delta pushes in the quantized domain (`wire.delta`, `WeightSync(delta=True)`): blocks, patches,
the engine's copies, and a delta push byte for byte equal to a full push."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from qerl_rollout.rollout.engine import read_manifest
from qerl_rollout.sync.weight_sync import TransportError, WeightSync
from qerl_rollout.wire.delta import (
    BLOCK_BYTES,
    DeltaError,
    HeldTensors,
    block_fingerprints,
    encode,
    is_patch,
)

sys.path.insert(0, str(Path(__file__).parent))
from recording import RecordingReceiver  # noqa: E402

DTYPES = [torch.int8, torch.float8_e4m3fn, torch.uint8, torch.bfloat16, torch.float32]


def _random(shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*shape[:-1], shape[-1] * dtype.itemsize), generator=g,
                         dtype=torch.uint8).view(dtype)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bfloat16])
def test_every_single_byte_change_marks_its_block_and_only_it(dtype):
    t = _random((3, 300), dtype)            # 900 or 1800 bytes: the last block is padded
    before = block_fingerprints(t)
    assert before.numel() == -(-t.numel() * t.element_size() // BLOCK_BYTES)
    assert torch.equal(before, block_fingerprints(t.clone()))
    flat_bytes = t.numel() * t.element_size()
    for i in range(0, flat_bytes, 37):
        changed = t.clone()
        changed.reshape(-1).view(torch.uint8)[i] ^= 1 << (i % 8)
        assert (block_fingerprints(changed) != before).nonzero().flatten().tolist() == [i // BLOCK_BYTES], i


def _push(held: HeldTensors, payload) -> dict:
    held.begin()
    out = dict(held.apply(payload))
    held.commit()
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_patch_rebuilds_the_new_tensor_byte_for_byte(dtype):
    old, held = _random((63, 97), dtype), HeldTensors()      # not a whole number of blocks
    _push(held, [("w", old)])
    new = old.clone()
    new.view(torch.uint8)[5, :3] ^= 0xFF          # one block
    new.view(torch.uint8)[62, -1] ^= 0x01         # the last, padded block
    patch = encode("w", new, block_fingerprints(new), block_fingerprints(old))
    assert [n for n, _ in patch] == ["w#blocks", "w#bytes", "w#check"] and patch[0][1].numel() == 2
    got = _push(held, patch)["w"]
    assert got.dtype == dtype and got.shape == new.shape
    assert torch.equal(got.view(torch.uint8), new.view(torch.uint8))
    # an empty patch (nothing moved) gives the held tensor back
    same = encode("w", new, block_fingerprints(new), block_fingerprints(new))
    assert same[0][1].numel() == 0
    assert torch.equal(_push(held, same)["w"].view(torch.uint8), new.view(torch.uint8))


def test_a_patch_that_would_not_be_smaller_sends_the_tensor_whole():
    old = _random((16, 64), torch.int8)
    new = old ^ 1                                        # every block changed
    assert encode("w", new, block_fingerprints(new), block_fingerprints(old)) == [("w", new)]


def test_a_corrupted_block_a_missing_copy_and_a_split_patch_are_refused():
    old, held = _random((32, 64), torch.int8), HeldTensors()
    new = old.clone()
    new[3, 0] += 1
    patch = encode("w", new, block_fingerprints(new), block_fingerprints(old))
    with pytest.raises(DeltaError, match="holds no copy of it"):
        HeldTensors().apply(patch)
    _push(held, [("w", old)])
    bad = [(n, t.clone()) for n, t in patch]
    bad[1][1][0, 7] ^= 0x10                              # one bit of the sent block
    held.begin()
    with pytest.raises(DeltaError, match="'w' after its delta is not the tensor the trainer sent"):
        held.apply(bad)
    with pytest.raises(DeltaError, match="incomplete delta"):
        held.apply(patch[:2])
    # a refused patch leaves the copy it was meant for: the good patch still applies
    assert torch.equal(_push(held, patch)["w"], new)


def test_an_aborted_update_drops_every_copy_until_a_full_push():
    """Copies are replaced as tensors arrive, so an abort leaves a mix of two pushes: the engine
    drops them all, refuses the next patch, and takes a full push (the sender's next push is
    full after any failure anyway)."""
    old, held = _random((32, 64), torch.int8), HeldTensors()
    other = _random((8, 64), torch.int8, seed=1)
    _push(held, [("w", old), ("v", other)])
    held.begin()
    held.apply([("w", old + 1)])                         # half an update, then aborted
    held.abort()
    unchanged = encode("v", other, block_fingerprints(other), block_fingerprints(other))
    with pytest.raises(DeltaError, match="holds no copy"):
        held.apply(unchanged)
    assert torch.equal(_push(held, [("w", old), ("v", other)])["w"], old)
    assert torch.equal(_push(held, unchanged)["v"], other) and held.nbytes == old.numel() + other.numel()


# -- the sync ----------------------------------------------------------------------------------


class _DeltaReceiver(RecordingReceiver):
    """Resolves patches as an engine does (`HeldTensors`) and records each push's whole tensors
    and its wire tensors anew."""

    def __init__(self, scheme, manifest):
        super().__init__(scheme, manifest)
        self.held, self.wire, self.delta_updates = HeldTensors(), {}, []

    def begin_update(self, version, digest=False, delta=False):
        self.tensors, self.wire = {}, {}
        self.delta_updates.append(delta)
        self.held.begin() if delta else self.held.clear()

    def load(self, named_tensors):
        self.wire.update((n, t.clone()) for n, t in named_tensors)
        super().load(self.held.apply(named_tensors))

    def commit(self, version):
        self.held.commit()
        super().commit(version)

    def abort(self, reason):
        self.held.abort()


def _lora_policy(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                            target_parameters=["mlp.experts.gate_up_proj"]))


def _move_rows(policy, rows: slice, seed: int) -> None:
    """New values in a few rows of every LoRA B: only those rows of the merged weights move."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p[..., rows, :] = torch.randn(p[..., rows, :].shape, generator=g) * 0.05


@pytest.mark.parametrize("scheme", ["int8", "fp8_block", "nvfp4"])
def test_a_delta_push_sends_less_and_delivers_what_a_full_push_delivers(tiny_qwen3_moe, scheme):
    manifest = read_manifest(tiny_qwen3_moe)
    policy = _lora_policy(tiny_qwen3_moe)
    rec, ref = _DeltaReceiver(scheme, manifest), RecordingReceiver(scheme, manifest)
    sync, full_sync = WeightSync(rec, delta=True), WeightSync(ref)
    first = sync.push(policy)
    assert first.full and not any(is_patch(n) for n in rec.wire) and first.bytes_sent == first.bytes_whole
    for step in range(1, 3):
        _move_rows(policy, slice(2 * step, 2 * step + 2), seed=step)
        report = sync.push(policy)
        ref.tensors = {}
        whole = full_sync.push(policy, full=True)
        assert not report.full and rec.delta_updates == [True] * (step + 1)
        assert any(n.endswith("#blocks") for n in rec.wire)
        assert report.bytes_sent < 0.5 * report.bytes_whole, (report.bytes_sent, report.bytes_whole)
        for name, t in rec.tensors.items():             # what the engine loads: the full push's bytes
            assert torch.equal(t.view(torch.uint8), ref.tensors[name].view(torch.uint8)), name
        assert whole.bytes_sent >= report.bytes_whole


def test_after_a_failed_delta_push_the_next_push_is_full(tiny_qwen3_moe):
    policy = _lora_policy(tiny_qwen3_moe)
    rec = _DeltaReceiver("int8", read_manifest(tiny_qwen3_moe))
    sync = WeightSync(rec, delta=True, retry_full_on_transport_error=False)
    sync.push(policy)
    _move_rows(policy, slice(0, 2), seed=1)
    real_load = rec.load
    rec.load = lambda bucket: (_ for _ in ()).throw(RuntimeError("link down"))
    with pytest.raises(TransportError, match="link down"):
        sync.push(policy)
    rec.load = real_load
    report = sync.push(policy)
    assert report.full and not any(is_patch(n) for n in rec.wire)
    _move_rows(policy, slice(4, 6), seed=2)
    assert not sync.push(policy).full and any(is_patch(n) for n in rec.wire)


def test_an_engine_without_its_copies_gets_a_full_retry(tiny_qwen3_moe):
    """A restarted engine holds nothing: its refusal of the first patch is a transport error, and
    the sync's retry pushes in full."""
    policy = _lora_policy(tiny_qwen3_moe)
    rec = _DeltaReceiver("int8", read_manifest(tiny_qwen3_moe))
    sync = WeightSync(rec, delta=True)
    sync.push(policy)
    rec.held.clear()                                     # the engine restarted
    _move_rows(policy, slice(0, 2), seed=1)
    report = sync.push(policy)
    assert report.retried and report.full and not any(is_patch(n) for n in rec.wire)
