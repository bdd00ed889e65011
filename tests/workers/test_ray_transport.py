"""Weight pushes into a `RolloutWorker` actor through Ray's object store and over a gloo
group (`workers.collective`), with a real local Ray.

One actor engine and one in-process engine (tiny Qwen3-MoE, fp8_block, emulate on CPU) are
shared by the module. Both receive the same push of a peft-LoRA policy; the actor's scores
and seeded samples must equal the in-process engine's exactly, since the same bytes reach
the same vLLM code; so must the experts each token was routed to, byte for byte. Per-dtype packing round trips go through a separate Ray worker process
and are compared byte for byte. The collective push must load, byte for byte, what the
in-process push loads; an engine killed between two of its buckets must fail the push at once,
named, without leaving the live engine waiting.
"""

from __future__ import annotations

import time

import pytest
import ray
import torch

from qerl_rollout.config import QuantConfig
from qerl_rollout.rollout.types import EngineStateError
from qerl_rollout.sync.weight_sync import TransportError, WeightSync
from qerl_rollout.wire.bucket import ALIGN, flatten, unflatten
from qerl_rollout.workers import (
    RayWeightReceiver,
    pack_bucket,
    start_rollout_worker,
    unpack_bucket,
)
from qerl_rollout.workers.collective import CollectiveWeightReceiver

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]]
RESPONSES = [[21, 22, 23, 24], [31, 32, 33]]
BUCKET_BYTES = 512 << 10          # several buckets for the 5 MB tiny model: exercises pipelining


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def worker(ray_cluster, tiny_qwen3_moe):
    """The actor handle; returns at once, so the actor's engine starts beside the local one.

    It runs as many OpenMP threads as this process, without the libgomp preload a vLLM engine
    in this process may have left in os.environ: the same bytes give the same numbers only on
    the same threads (Ray would give a num_cpus=1 actor one thread; this file alone then
    measured 1e-3 apart in logprob, AMD EPYC Zen 4 + zentorch)."""
    same_threads = {"OMP_NUM_THREADS": str(torch.get_num_threads()), "LD_PRELOAD": ""}
    return start_rollout_worker(tiny_qwen3_moe, QuantConfig("fp8_block"), num_cpus=1, env_vars=same_threads)


@pytest.fixture(scope="module")
def policy(tiny_qwen3_moe):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe, dtype=torch.bfloat16)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:   # peft starts B at zero; make the adapters change the weights
                p.normal_(std=0.05)
    return model


@pytest.fixture(scope="module")
def pushed(worker, policy, tiny_qwen3_moe):
    """Push the same policy into the actor (over Ray) and into an in-process engine."""
    from qerl_rollout.rollout.engine import RolloutEngine

    local = RolloutEngine(tiny_qwen3_moe, QuantConfig("fp8_block"))
    receiver = RayWeightReceiver(worker)                 # waits for the actor's engine
    before = ray.get(worker.score.remote(PROMPTS, RESPONSES))
    remote_report = WeightSync(receiver, bucket_bytes=BUCKET_BYTES).push(policy)
    local_report = WeightSync(local, bucket_bytes=BUCKET_BYTES).push(policy)
    return local, receiver, before, remote_report, local_report


@pytest.mark.parametrize("case", ["bfloat16", "float8_e4m3fn", "uint8", "float32",
                                  "bfloat16_transposed", "float32_scalar"])
def test_packed_bucket_round_trip_is_bit_exact(ray_cluster, case):
    tensor = _special_values(case)
    ref = ray.put(pack_bucket([("x.weight", tensor), ("y.bias", torch.arange(3.0))]))
    name, dtype, shape, raw = ray.get(_unpack_in_other_process.remote(ref))
    assert (name, dtype, shape) == ("x.weight", tensor.dtype, tuple(tensor.shape))
    assert raw == tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_push_over_ray_equals_in_process_push(pushed, worker):
    local, receiver, before, remote_report, local_report = pushed
    assert remote_report.buckets > 1 and remote_report.buckets == local_report.buckets
    assert remote_report.version == local_report.version == 1
    assert receiver.version == local.version == 1
    after = ray.get(worker.score.remote(PROMPTS, RESPONSES))
    assert after != before                               # the LoRA push changed the weights
    assert after == local.score(PROMPTS, RESPONSES)      # exact: same bytes, same vLLM code
    sampling = {"n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 7, "routes": True}
    remote_samples = ray.get(worker.generate.remote(PROMPTS, **sampling))
    local_samples = local.generate(PROMPTS, **sampling)
    assert [(s.token_ids, s.logprobs, s.version) for s in remote_samples] == \
           [(s.token_ids, s.logprobs, s.version) for s in local_samples]
    # The routes travel byte for byte (numpy int16 through Ray's serialization).
    assert [(r.routes.dtype, r.routes.shape, r.routes.tobytes()) for r in remote_samples] == \
           [(s.routes.dtype, s.routes.shape, s.routes.tobytes()) for s in local_samples]


class _CorruptSecondBucket:
    """Passes everything to a RayWeightReceiver but gives the 2nd bucket a misshapen tensor."""

    def __init__(self, inner):
        self.inner, self.loads = inner, 0
        self.mode, self.scheme, self.manifest = inner.mode, inner.scheme, inner.manifest

    @property
    def version(self):
        return self.inner.version

    def __getattr__(self, name):                         # begin_update, commit, abort
        return getattr(self.inner, name)

    def load(self, bucket):
        self.loads += 1
        if self.loads == 2:
            name, t = bucket[0]
            bucket = [(name, torch.zeros(3, dtype=t.dtype))] + list(bucket[1:])
        self.inner.load(bucket)


def test_failed_load_in_actor_surfaces_and_blocks_serving(pushed, worker, policy):
    local, receiver, *_ = pushed
    corrupt = _CorruptSecondBucket(receiver)
    sync = WeightSync(corrupt, bucket_bytes=BUCKET_BYTES, retry_full_on_transport_error=False)
    with pytest.raises(TransportError) as failure:    # an engine-side failure, not the trainer's
        sync.push(policy)
    chain = [failure.value, failure.value.__cause__]
    assert any(isinstance(e, ray.exceptions.RayTaskError) for e in chain), chain
    assert corrupt.loads >= 2
    with pytest.raises(EngineStateError):
        ray.get(worker.generate.remote(PROMPTS, max_tokens=2))
    with pytest.raises(EngineStateError):
        ray.get(worker.score.remote(PROMPTS, RESPONSES))
    assert receiver.version == 1                         # the failed version never served
    report = WeightSync(receiver, bucket_bytes=BUCKET_BYTES).push(policy)
    assert report.version == receiver.version == 2
    assert ray.get(worker.score.remote(PROMPTS, RESPONSES)) == local.score(PROMPTS, RESPONSES)


def _nudge(policy, seed: int) -> None:
    """An optimizer step: every LoRA B moves (so every attention unit travels again)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.01 * torch.randn(p.shape, generator=g).to(p.dtype))


def test_collective_push_delivers_what_the_in_process_push_loads(pushed, worker, policy):
    """Over the gloo group, the actor loads byte for byte what was sent and what an in-process
    push of the same policy loads, so it serves the same numbers exactly."""
    local, *_ = pushed
    _nudge(policy, seed=1)
    collective = CollectiveWeightReceiver(worker)
    report = WeightSync(collective, bucket_bytes=BUCKET_BYTES).push(policy, digest=True)
    local_report = WeightSync(local, bucket_bytes=BUCKET_BYTES).push(policy, digest=True)
    assert report.full and report.buckets > 1 and report.buckets == local_report.buckets
    assert collective.received_digests() == [report.digests]
    assert report.digests == local_report.digests and local.received_digests() == report.digests
    assert ray.get(worker.score.remote(PROMPTS, RESPONSES)) == local.score(PROMPTS, RESPONSES)
    _nudge(policy, seed=2)                             # a second push over the same group
    report = WeightSync(collective, bucket_bytes=BUCKET_BYTES).push(policy, digest=True)
    WeightSync(local, bucket_bytes=BUCKET_BYTES).push(policy)
    assert collective.received_digests() == [report.digests]
    assert ray.get(worker.score.remote(PROMPTS, RESPONSES)) == local.score(PROMPTS, RESPONSES)


@ray.remote(num_cpus=0)
class _Sink:
    """The transport's end of an engine, without the engine: joins the weight group, receives
    buckets and keeps their digests. It stands in for a second engine that dies mid-push."""

    def __init__(self, info: dict):
        self._info, self._version, self._group, self.digests = info, info["version"], None, {}

    def info(self):
        return {**self._info, "version": self._version}

    def version(self):
        return self._version

    def begin_update(self, version, digest=False, delta=False):
        self.digests = {}

    def join_weight_group(self, address, rank, world, timeout_s):
        from qerl_rollout.workers.collective import weight_group, weight_store

        self._group = weight_group(weight_store(address, rank, world, timeout_s), rank, world, timeout_s)

    def receive(self, layout):
        from qerl_rollout.wire.bucket import digests
        from qerl_rollout.workers.collective import receive_bucket

        self.digests.update(digests(receive_bucket(self._group, layout)))

    def commit(self, version):
        self._version = version

    def abort(self, reason):
        pass


class _KillBefore:
    """Passes every call to a receiver; kills `actor` (and waits until it is dead) before
    bucket `at` is loaded."""

    def __init__(self, inner, actor, at: int):
        self.inner, self.actor, self.at, self.loads = inner, actor, at, 0
        self.mode, self.scheme, self.precision, self.manifest = inner.mode, inner.scheme, inner.precision, inner.manifest

    @property
    def version(self):
        return self.inner.version

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def load(self, bucket):
        self.loads += 1
        if self.loads == self.at:
            ray.get(self.actor.version.remote())         # its calls run in order: bucket at-1 is in
            ray.kill(self.actor)
            _wait_dead(self.actor)
        self.inner.load(bucket)


def _wait_dead(actor, timeout_s: float = 30.0) -> None:
    """Until calls to `actor` fail (`ray.kill` returns before the process is gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.version.remote())
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("the killed actor still answers")


def test_an_engine_dying_mid_collective_push_is_named_and_leaves_no_one_waiting(pushed, worker, policy):
    """Engine 1 dies between two buckets: the send to it fails at once (not after the group's
    60 s timeout), engine 0 still gets every byte of that bucket and is told to abort, and a
    later push into engine 0 alone, over a new group, serves the in-process engine's numbers."""
    local, *_ = pushed
    sink = _Sink.remote(ray.get(worker.info.remote()))
    killer = _KillBefore(CollectiveWeightReceiver([worker, sink], timeout_s=60), sink, at=2)
    _nudge(policy, seed=3)
    sync = WeightSync(killer, bucket_bytes=BUCKET_BYTES, retry_full_on_transport_error=False)
    start = time.monotonic()
    with pytest.raises(TransportError, match="weight send failed to engine 1: .*(closed|reset|Read error)"):
        sync.push(policy)
    assert time.monotonic() - start < 30
    assert killer.loads == 2
    with pytest.raises(EngineStateError):            # the update engine 0 began never commits
        ray.get(worker.generate.remote(PROMPTS, max_tokens=2))
    WeightSync(CollectiveWeightReceiver(worker), bucket_bytes=BUCKET_BYTES).push(policy)
    WeightSync(local, bucket_bytes=BUCKET_BYTES).push(policy)
    assert ray.get(worker.score.remote(PROMPTS, RESPONSES)) == local.score(PROMPTS, RESPONSES)


@pytest.mark.parametrize("case", ["bfloat16", "float8_e4m3fn", "uint8", "float32",
                                  "bfloat16_transposed", "float32_scalar"])
def test_flattened_bucket_round_trip_is_bit_exact(case):
    tensor = _special_values(case)
    odd = torch.arange(7, dtype=torch.uint8)           # 7 bytes: the next tensor starts aligned anyway
    layout, buffer = flatten([("odd", odd), ("x.weight", tensor), ("empty", torch.empty(0, 3))])
    assert layout.offsets == (0, ALIGN, ALIGN + -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN)
    back = dict(unflatten(layout, buffer))
    assert torch.equal(back["odd"], odd) and back["empty"].shape == (0, 3)
    got = back["x.weight"]
    assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape)
    assert got.reshape(-1).view(torch.uint8).tolist() == tensor.contiguous().reshape(-1).view(torch.uint8).tolist()
    assert got.data_ptr() == buffer.data_ptr() + ALIGN          # a view of the buffer, no copy
    with pytest.raises(ValueError, match="arrived as"):
        unflatten(layout, buffer[:-1])


def test_unpacked_tensors_view_the_packed_bytes():
    t = torch.randn(4, 8).to(torch.bfloat16)
    packed = pack_bucket([("w", t)])
    (_, back), = unpack_bucket(packed)
    assert back.data_ptr() == t.data_ptr() and torch.equal(back, t)   # no copy in-process
    with pytest.raises(ValueError, match="twice"):
        pack_bucket([("w", t), ("w", t)])


@ray.remote
def _unpack_in_other_process(packed):
    (name, t), *_ = unpack_bucket(packed)
    return name, t.dtype, tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _special_values(case: str) -> torch.Tensor:
    """Tensors holding every bit pattern (8-bit) or the awkward floats (NaN, +-inf, -0.0, subnormal)."""
    if case in ("float8_e4m3fn", "uint8"):
        return torch.arange(256, dtype=torch.uint8).view(getattr(torch, case)).reshape(16, 16)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3.0e38])
    values = torch.cat([specials, torch.randn(58, generator=torch.Generator().manual_seed(0))])
    if case == "bfloat16":
        return values.to(torch.bfloat16).reshape(8, 8)
    if case == "bfloat16_transposed":
        return values.to(torch.bfloat16).reshape(8, 8).t()
    if case == "float32":
        return values.reshape(8, 8)
    return torch.tensor(0.1234567)   # float32_scalar (0-d, like an NVFP4 global scale)


@pytest.mark.parametrize("name, engine_nodes, want", [
    ("auto", ["10.0.0.1", "10.0.0.1"], "object_store"),   # one node: shared memory (measured faster)
    ("auto", ["10.0.0.1", "10.0.0.2"], "collective"),     # an engine elsewhere
    ("collective", ["10.0.0.1"], "collective"), ("object_store", ["10.0.0.2"], "object_store"),
])
def test_auto_transport_follows_where_the_engines_are(name, engine_nodes, want):
    from qerl_rollout.placement.ray import resolve_transport

    assert resolve_transport(name, "10.0.0.1", engine_nodes) == want
