"""Where a run's processes go, and whether that can work, decided before anything starts.

How it works. `plan_layout(cfg, model_config, cluster)` turns the config (placement.mode,
trainer.num_workers = N, rollout.num_engines = M, rollout.tensor_parallel_size = TP, the
BF16 baseline engine when one is asked for) into a `Layout`: a list of Ray placement-group
bundles and, for every trainer worker and engine, the bundle it lives in and the share of it
it asks for. It checks the combination against the model's `config.json` and the cluster's
resources (`ray.cluster_resources()`), and raises one line naming what does not fit:

- split: trainer worker i gets a bundle of 1 GPU, engine j a bundle of TP GPUs (vLLM runs
  its TP ranks on the GPUs Ray gives the actor), the baseline one more; the GPUs needed are
  N + (M [+1]) * TP.
- colocated: bundle i holds 1 GPU shared by trainer worker i and engine i (half a GPU each
  as Ray counts; memory is shared by sleeping the engine and offloading the trainer between
  phases), so N == M and TP == 1; the baseline gets a bundle of its own.
- On CPUs (no GPUs in the cluster, or placement.use_gpus=false) bundles hold CPUs only:
  `placement.trainer_num_cpus` per worker, `placement.rollout_num_cpus` per engine.
- TP must divide the attention heads; KV heads must divide by TP or TP by them (vLLM then
  replicates them); fp8_block needs every TP shard's width (attention, dense and expert
  intermediate) to be a multiple of the 128-wide blocks, nvfp4 of its 16-wide groups.
- FSDP2 shards experts across trainer ranks: every rank must hold at least one.

Left out: bundles that span nodes for one engine (TP within a node only) and pipeline
parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qerl_rollout.quant import SCHEMES, get_scheme


class LayoutError(ValueError):
    """The placement cannot work for this model and cluster (one line saying why)."""


class WorkerDiedError(RuntimeError):
    """A trainer worker or engine process of the run died; the message names it."""


@dataclass(frozen=True)
class Slot:
    """One actor's place: its bundle and what it asks of it."""

    bundle: int
    num_cpus: float
    num_gpus: float


@dataclass
class Layout:
    mode: str
    use_gpus: bool
    bundles: list[dict[str, float]] = field(default_factory=list)
    trainers: list[Slot] = field(default_factory=list)
    engines: list[Slot] = field(default_factory=list)
    baseline: Slot | None = None

    def needs(self, resource: str) -> float:
        return sum(b.get(resource, 0.0) for b in self.bundles)

    def describe(self) -> str:
        unit = "GPU" if self.use_gpus else "CPU"
        return (f"{self.mode}: {len(self.trainers)} trainer worker(s), {len(self.engines)} engine(s)"
                f"{' + a BF16 baseline engine' if self.baseline else ''} in {len(self.bundles)} "
                f"bundle(s), {self.needs(unit):g} {unit}s")


def plan_layout(cfg, model_config: dict, cluster: dict[str, float], with_baseline: bool) -> Layout:
    """The layout of a Ray run (placement split or colocated); raises LayoutError if it cannot work."""
    p, r = cfg.placement, cfg.rollout
    use_gpus = {"true": True, "false": False}.get(p.use_gpus, cluster.get("GPU", 0) > 0)
    check_model(model_config, r.tensor_parallel_size, r.scheme, cfg.trainer.num_workers)
    layout = Layout(p.mode, use_gpus)
    if p.mode == "split":
        _split(layout, cfg)
    elif p.mode == "colocated":
        _colocated(layout, cfg)
    else:
        raise LayoutError(f"placement.mode={p.mode} runs no Ray actors")
    if with_baseline:
        layout.baseline = _add(layout, p.rollout_num_cpus, r.tensor_parallel_size)
    _check_fits(layout, cluster)
    return layout


def _add(layout: Layout, cpus: float, gpus: float) -> Slot:
    bundle = {"CPU": cpus, **({"GPU": gpus} if layout.use_gpus else {})}
    layout.bundles.append(bundle)
    return Slot(len(layout.bundles) - 1, cpus, gpus if layout.use_gpus else 0)


def _split(layout: Layout, cfg) -> None:
    p, r = cfg.placement, cfg.rollout
    layout.trainers = [_add(layout, p.trainer_num_cpus, 1) for _ in range(cfg.trainer.num_workers)]
    layout.engines = [_add(layout, p.rollout_num_cpus, r.tensor_parallel_size) for _ in range(r.num_engines)]


def _colocated(layout: Layout, cfg) -> None:
    p, r = cfg.placement, cfg.rollout
    n, m = cfg.trainer.num_workers, r.num_engines
    if n != m or r.tensor_parallel_size != 1:
        raise LayoutError(f"placement.mode=colocated pairs trainer worker i with engine i on one GPU: "
                         f"needs trainer.num_workers == rollout.num_engines and "
                         f"rollout.tensor_parallel_size=1 (got {n}, {m}, {r.tensor_parallel_size})")
    share = 0.5 if layout.use_gpus else 0
    for _ in range(n):
        slot = _add(layout, p.trainer_num_cpus + p.rollout_num_cpus, 1)
        layout.trainers.append(Slot(slot.bundle, p.trainer_num_cpus, share))
        layout.engines.append(Slot(slot.bundle, p.rollout_num_cpus, share))


def _check_fits(layout: Layout, cluster: dict[str, float]) -> None:
    for resource in ("GPU", "CPU"):
        need, have = layout.needs(resource), cluster.get(resource, 0.0)
        if need > have:
            raise LayoutError(f"the layout ({layout.describe()}) needs {need:g} {resource}s; the Ray "
                             f"cluster has {have:g}")
        biggest = max((b.get(resource, 0.0) for b in layout.bundles), default=0)
        if resource == "GPU" and biggest > cluster.get("max_gpus_per_node", have):
            raise LayoutError(f"an engine needs {biggest:g} GPUs on one node; the largest node has "
                             f"{cluster['max_gpus_per_node']:g}")


def check_model(model_config: dict, tp: int, scheme: str, trainer_ranks: int) -> None:
    """TP against the model's heads and widths, FSDP2 expert shards against the trainer ranks."""
    text = model_config.get("text_config", model_config)
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads", heads)
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    if heads % tp:
        raise LayoutError(f"rollout.tensor_parallel_size={tp} does not divide the model's {heads} "
                         "attention heads")
    if kv_heads % tp and tp % kv_heads:
        raise LayoutError(f"rollout.tensor_parallel_size={tp} and the model's {kv_heads} KV heads: "
                         "one must divide the other")
    block = get_scheme(scheme).block_width if scheme in SCHEMES else None
    if block and tp > 1:
        widths = {"attention (heads x head_dim)": heads * head_dim,
                  "intermediate_size": text.get("intermediate_size"),
                  "moe_intermediate_size": text.get("moe_intermediate_size")}
        for what, width in widths.items():
            if width and (width % tp or (width // tp) % block):
                raise LayoutError(f"{scheme} with rollout.tensor_parallel_size={tp}: each shard of "
                                 f"{what}={width} must be a multiple of {block} wide "
                                 f"({width}/{tp} = {width / tp:g})")
    experts = next((text[k] for k in ("num_experts", "num_local_experts", "n_routed_experts")
                    if text.get(k)), None)
    if experts and trainer_ranks > 1:
        chunk = -(-experts // trainer_ranks)
        if (trainer_ranks - 1) * chunk >= experts:
            raise LayoutError(f"trainer.num_workers={trainer_ranks} leaves a rank without any of the "
                             f"{experts} experts (FSDP2 shards them {chunk} per rank)")
