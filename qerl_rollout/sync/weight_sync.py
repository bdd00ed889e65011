"""WeightSync: after an optimizer step, make the rollout engine serve the trainer's new policy.

How a push works (`WeightSync.push(model)`):

1. Select. Fingerprints (tensor identity + in-place version counter, see `merge.fingerprint`)
   tell which trainer tensors changed since the last push. Every unit (engine layer group,
   see `wire.stream`) that holds a changed tensor is re-sent whole; the first push, or
   `full=True`, sends everything. With LoRA on attention only, the experts never travel again.
2. Preflight, before the engine is touched: every checkpoint name and shape the push will
   produce is checked against the engine's manifest, and every changed raw tensor (base
   weights and LoRA factors) is checked for NaN/Inf. A failure raises with the tensor's name
   and the engine keeps serving its current version.
3. Stream, in layer order: merge LoRA (fp32) -> cut into checkpoint pieces -> group into
   units -> requantize through the plan (`wire.stream.encode_unit`) -> bucket -> `engine.load`.
   The trainer's weights are read, never written, and no second full state dict is built:
   at most one decoder layer plus one bucket is alive at a time.
4. Commit: the engine bumps its version and drops its prefix cache. If anything fails after
   the first bucket was loaded, the engine is told to `abort` and refuses to generate until a
   push completes; a failure in the transport or engine (not in the trainer's tensors) is
   retried once as a full push.

Delta pushes (`WeightSync(..., delta=True)`, config `sync.delta`): after the first push, every
tensor the engine already holds travels as the blocks of its bytes that changed (`wire.delta`,
chosen by `sync.code_delta`); the engine applies them to its copy of the last committed push,
checks the result and loads whole tensors. A full push (`full=True`, the first, the retry and
every push after a failed one) sends every tensor whole.

`push(..., digest=True)` also records a digest of every tensor sent (`report.digests`) and asks
the engine to record the same of what it loads: the exact half of the push check
(`sync.verify`).

Sharded trainers (`WeightSync(..., sharded=True)` on every FSDP2 rank, the receiver on rank 0
and None elsewhere): the ranks agree on what changed (the union of their fingerprints) and on
any preflight failure (all raise it), each merges and quantizes the rows it holds, and rank 0
assembles complete tensors and loads them (`sync.sharded`). A transport failure is not
retried here: the other ranks would not follow; the caller re-pushes on every rank.

Left out: overlapping requantization with transport (the phases run one after the other;
`report.seconds` shows where the time goes), and a rollback of a half-applied push to the
previous weights (it would need a second copy of the engine's weights).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from qerl_rollout.quant import DEFAULT_SCHEME
from qerl_rollout.quant.plan import Precision, QuantPlan, build_plan
from qerl_rollout.sync.code_delta import CodeTracker
from qerl_rollout.sync.merge import fingerprint, merged_named_tensors, raw_tensors
from qerl_rollout.sync.sharded import first_error_over_ranks, sharded_payloads, union_over_ranks
from qerl_rollout.wire.bucket import buckets, digests, nbytes
from qerl_rollout.wire.receiver import WeightReceiver
from qerl_rollout.wire.stream import (
    NormTransform,
    all_finite,
    encode_unit,
    pieces,
    unit_of,
    units,
)

log = logging.getLogger(__name__)
DEFAULT_BUCKET_BYTES = 256 << 20


class PushError(RuntimeError):
    """A push was refused (preflight) or failed; the message says what and where."""


class TransportError(RuntimeError):
    """The engine or the transport failed during a push (not the trainer's tensors)."""


def _engine_call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise TransportError(f"{type(e).__name__}: {e}") from e


@dataclass
class SyncReport:
    """What one push did. `seconds` has merge, quantize, load, commit, preflight and total."""

    version: int
    full: bool
    tensors_sent: int
    bytes_sent: int          # on the wire: with `delta`, patches in place of the tensors they patch
    bytes_bf16: int          # trainer bytes (BF16) covered by this push
    units_sent: int
    buckets: int
    seconds: dict[str, float] = field(default_factory=dict)
    retried: bool = False
    digests: dict[str, str] | None = None   # name -> digest of what was sent (push(digest=True))
    # Rows of quantized codes this push changed over those compared with the last push's,
    # overall ("all") and per module kind (`sync.code_delta`); empty on a first push.
    changed_code_fraction: dict[str, float] = field(default_factory=dict)
    bytes_whole: int = 0     # what the tensors of this push weigh whole (= bytes_sent without deltas)

    @property
    def wire_ratio(self) -> float:
        return self.bytes_sent / self.bytes_bf16 if self.bytes_bf16 else 0.0


class _Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def timed(self, name: str, it: Iterator):
        while True:
            with self.phase(name):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item


def _base_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class WeightSync:
    """Streams a trainer model into a `WeightReceiver` (a `RolloutEngine` or a transport to one)."""

    def __init__(
        self,
        engine: WeightReceiver | None,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        plan: QuantPlan | None = None,
        retry_full_on_transport_error: bool = True,
        sharded: bool = False,
        scheme: str | None = None,
        precision: Precision | None = None,
        delta: bool = False,
    ):
        """`sharded`: every rank of an FSDP2 trainer makes one; `engine` on rank 0 only, and
        `scheme` and `precision` (the engine's) on the others, which never talk to it.
        `delta`: delta pushes (module docstring)."""
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        if engine is None and not (sharded and scheme):
            raise ValueError("only the non-zero ranks of a sharded sync run without an engine, "
                             "and they need the engine's scheme")
        self.engine = engine
        self.scheme = engine.scheme if engine is not None else scheme
        self.precision = engine.precision if engine is not None else (precision or Precision())
        self.sharded = sharded
        self.bucket_bytes = bucket_bytes
        self.retry = retry_full_on_transport_error and not sharded
        self._plan = plan
        self._manifest = None
        self._pushed: dict[str, tuple] | None = None
        self._norms_transformed = False   # the engine's norms differ from the trainer's
        self._codes = CodeTracker()       # `sync.code_delta`: which quantized codes pushes change
        self.delta = delta
        self._failed = False              # the last push failed: the engine's copies are unknown

    # -- public ---------------------------------------------------------------------------
    def push(self, model: nn.Module, *, full: bool = False, norm_transform: NormTransform | None = None,
             version: int | None = None, digest: bool = False) -> SyncReport | None:
        """Stream `model` (transformers or peft) into the engine; returns the report (None on
        the non-zero ranks of a sharded sync).

        `norm_transform(name, tensor) -> tensor` changes norm weights on their way to the
        engine only (adaptive quantization noise); with it, every norm is re-sent. `version`
        (default: the engine's + 1) numbers the new weights, e.g. to continue a resumed run's.
        `digest`: the report and the engine both record what travelled (`sync.verify`).
        """
        clock = _Clock()
        with clock.phase("total"):
            with clock.phase("preflight"):
                plan = self._plan_for(model)
                now = fingerprint(model)
                full = full or self._pushed is None or (self.delta and self._failed)
                changed = set(now) if full else {n for n in now if self._pushed.get(n) != now[n]}
                if self.sharded:
                    changed = union_over_ranks(changed)
                resend_norms = norm_transform is not None or self._norms_transformed
                names = self._names_to_send(plan, changed, resend_norms)
                version = self._preflight(model, plan, names, changed, version)
            try:
                report = self._stream(model, plan, names, version, full, norm_transform, clock, digest)
            except TransportError as e:
                if not self.retry:
                    raise
                log.warning("push of version %d failed in transport (%s); re-pushing in full", version, e)
                report = self._stream(model, plan, set(plan.decisions), version, True, norm_transform,
                                      clock, digest)
                report.retried = True
        if report is not None:
            report.seconds = clock.seconds
        self._pushed = now
        self._norms_transformed = norm_transform is not None
        return report

    def rebase(self, before: dict[str, tuple], after: dict[str, tuple]) -> None:
        """Carry the last push's record across a move that keeps every value (a trainer's
        `to_device` round trip, which gives every tensor new storage and so a new
        fingerprint): a tensor unchanged since that push before the move (`before`, a
        `merge.fingerprint`) is unchanged after it (`after`); one that had changed stays
        changed. Without this every push after a move would be full."""
        if self._pushed is None:
            return
        for name, key in before.items():
            if self._pushed.get(name) == key and name in after:
                self._pushed[name] = after[name]

    @property
    def plan(self) -> QuantPlan | None:
        return self._plan

    # -- steps ----------------------------------------------------------------------------
    def _plan_for(self, model: nn.Module) -> QuantPlan:
        scheme = self.scheme if self.scheme != "bf16" else DEFAULT_SCHEME
        if self._plan is None:
            # From the config (meta device): plain transformers names, whatever peft wrapped.
            self._plan = build_plan(_base_model(model).config, scheme, self.precision)
        return self._plan

    def _names_to_send(self, plan: QuantPlan, changed: set[str], with_norms: bool) -> set[str]:
        """Whole units of what changed (and every norm's with `with_norms`)."""
        unit_names = {unit_of(ck) for n in changed if n in plan.decisions
                      for ck in plan[n].checkpoint_names}
        if with_norms:
            unit_names |= self._units_of(plan, lambda d: d.category == "norm")
        return {n for n, d in plan.decisions.items()
                if any(unit_of(ck) in unit_names for ck in d.checkpoint_names)}

    @staticmethod
    def _units_of(plan: QuantPlan, keep) -> set[str]:
        return {unit_of(ck) for d in plan.decisions.values() if keep(d) for ck in d.checkpoint_names}

    def _preflight(self, model: nn.Module, plan: QuantPlan, names: set[str], changed: set[str],
                   version: int | None) -> int | None:
        """Check the push before the engine is touched; returns the version it will serve.

        A sharded sync agrees on the outcome first, so every rank raises or none does (a rank
        that raised alone would leave the others waiting in the push's collectives).
        """
        error = None
        try:
            self._check_tensors(model, plan, changed)
            if self.engine is not None:
                version = self._next_version(version)
                if self._manifest is None:
                    self._manifest = self.engine.manifest()
                expected = self._expected_shapes(plan, names)
                self._check_manifest(expected, full=len(names) == len(plan.decisions))
        except PushError as e:
            error = ("push", str(e))
        except Exception as e:         # the engine or its transport failed to answer
            if not self.sharded:
                raise TransportError(f"{type(e).__name__}: {e}") from e
            error = ("transport", f"{type(e).__name__}: {e}")
        if self.sharded:
            error = first_error_over_ranks(error)
        if error:
            kind, message = error
            raise (PushError if kind == "push" else TransportError)(message)
        return version

    def _next_version(self, version: int | None) -> int:
        served = self.engine.version
        version = served + 1 if version is None else version
        if version <= served:
            raise PushError(f"version {version} is not newer than the served {served}")
        return version

    def _check_tensors(self, model: nn.Module, plan: QuantPlan, changed: set[str]) -> None:
        unknown = sorted(n for n in changed if n not in plan.decisions)
        if unknown:
            raise PushError(f"trainer tensors unknown to the quant plan: {unknown[:5]}")
        for name, own, t in raw_tensors(model):
            if name in changed and not all_finite(t):
                raise PushError(f"refusing to push: trainer tensor {own!r} has NaN/Inf values; "
                                "the engine keeps serving its current version")

    @staticmethod
    def _expected_shapes(plan: QuantPlan, names: set[str]) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for name in names:
            meta = torch.empty(plan[name].shape, device="meta")
            for ck_names, stack in plan.checkpoint_stacks(name, meta):
                shape = tuple(stack.shape[1:]) if len(ck_names) > 1 else tuple(stack.shape)
                shapes.update((ck, shape) for ck in ck_names)
        return shapes

    def _check_manifest(self, expected: dict[str, tuple[int, ...]], full: bool):
        manifest = self._manifest
        kernel = self.engine.mode == "kernel"
        for ck, shape in expected.items():
            if kernel and ck + "_packed" in manifest:   # NVFP4 stores x.weight as (N, K/2) uint8
                ck, shape = ck + "_packed", (*shape[:-1], shape[-1] // 2)
            if ck not in manifest:
                raise PushError(f"engine has no tensor named {ck!r} (trainer/engine model mismatch)")
            if tuple(manifest[ck][0]) != shape:
                raise PushError(f"shape mismatch for {ck!r}: trainer {shape}, engine {tuple(manifest[ck][0])}")
        if full and not kernel:
            missing = sorted(set(manifest) - set(expected))
            if missing:
                raise PushError(f"engine expects tensors the trainer lacks: {missing[:5]}")

    def _payloads(self, model, plan, names, norm_transform, clock, counts) -> Iterator[list]:
        """Encoded units in layer order (see the module docstring, step 3)."""
        if self.sharded:
            yield from sharded_payloads(model, plan, names, self.scheme, norm_transform, clock, counts)
            return
        merged = clock.timed("merge", merged_named_tensors(model, names))
        for unit in units(pieces(plan, merged)):
            counts["bytes_bf16"] += sum(p.tensor.numel() * p.tensor.element_size() for p in unit.pieces)
            with clock.phase("quantize"):
                payload = encode_unit(unit, plan, self.scheme, norm_transform)
            yield payload   # outside the timer: the consumer loads buckets meanwhile

    def _stream(self, model, plan, names, version, full, norm_transform, clock,
                digest: bool = False) -> SyncReport | None:
        counts = {"bytes_bf16": 0}
        encoded = self._payloads(model, plan, names, norm_transform, clock, counts)
        if self.engine is None:         # a non-zero rank of a sharded sync: its collectives only
            for _ in encoded:
                pass
            return None
        sent = n_buckets = n_tensors = 0
        sent_digests = {} if digest else None
        codes = self._codes.start(plan, patches=self.delta and not full)
        whole = {"bytes": 0}

        def observed():
            for payload in encoded:
                whole["bytes"] += nbytes(payload)
                if digest:
                    sent_digests.update(digests(payload))
                with clock.phase("code_delta"):
                    yield codes.observe(payload)

        self._failed = True
        try:
            asks = {k: True for k, on in (("digest", digest), ("delta", self.delta)) if on}
            _engine_call(self.engine.begin_update, version, **asks)
            for bucket in buckets(observed(), self.bucket_bytes):
                with clock.phase("load"):
                    _engine_call(self.engine.load, bucket)
                n_buckets += 1
                n_tensors += len(bucket)
                sent += nbytes(bucket)
            with clock.phase("commit"):
                _engine_call(self.engine.commit, version)
        except ValueError as e:
            self._abort(encoded, str(e))
            raise PushError(str(e)) from e
        except Exception as e:
            self._abort(encoded, str(e))
            raise
        self._failed = False
        n_units = len({unit_of(ck) for n in names for ck in plan[n].checkpoint_names})
        return SyncReport(version, full, n_tensors, sent, counts["bytes_bf16"], n_units, n_buckets,
                          digests=sent_digests, changed_code_fraction=self._codes.commit(codes),
                          bytes_whole=whole["bytes"])

    def _abort(self, encoded: Iterator, reason: str) -> None:
        """A sharded rank 0 first finishes the walk, so the other ranks' collectives complete
        and they return (the error is rank 0's to raise); then the engine is told. An engine
        that cannot be told (a dead one) is logged: the push's own error is what is raised."""
        if self.sharded:
            for _ in encoded:
                pass
        try:
            self.engine.abort(reason)
        except Exception as e:
            log.warning("the engine could not be told to abort: %s: %s", type(e).__name__, e)
