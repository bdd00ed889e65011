"""The memory and push plan of a run, from the model's config.json alone (no weight is read).

How it works. The model is built on the meta device from its config (`transformers`), wrapped
in the run's LoRA exactly as the trainer wraps it (`rl.policy.lora_config`), and cut by the
quant plan the sync uses (`quant.plan.build_plan`); every figure below is arithmetic on those
shapes and the run's config, per GPU, in GiB:

- trainer rank (one of N FSDP2 ranks): its 1/N of the BF16 weights; its 1/N of the fp32 LoRA
  parameters, their gradients and the two AdamW moments (4 + 4 + 8 bytes each); the largest
  decoder layer all-gathered whole in BF16 for its forward or backward; activations of one
  micro-batch (`policy.micro_batch_size` rows of `task.max_prompt_tokens +
  rollout.max_tokens` tokens): with gradient checkpointing the BF16 input of every layer
  plus one layer's working set, without it every layer's working set, where a layer's working
  set is estimated as T x (10 H + 3 k I) BF16 values (attention projections and norms; the k
  routed experts' gate, up and product), plus the response logits in BF16 and their fp32
  log-softmax (R x V x 10 bytes); and the save: each rank writes its own shards of the
  trainable tensors and their optimizer state to disk (`Policy.save_state`, DCP), staged
  through host memory a few MB at a time: no GPU memory beyond the step's state without its
  activations, nothing gathered, and the frozen base never written;
- engine (per TP rank): the weights as the scheme stores them (`QuantScheme.nbytes` for every
  quantized tensor, BF16 for the exempt ones), divided by TP; KV cache: what
  `gpu_memory_utilization` leaves after the weights, in tokens (2 x layers x KV heads x
  head_dim BF16 values per token and TP rank);
- local: the trainer and the process's engines on one GPU; the engines share
  `gpu_memory_utilization` (the BF16 baseline engine, when the run has one, takes half);
- colocated: each phase's peak on a GPU shared by a trainer rank and an engine
  (`placement.phases`; train: the trainer, the engine asleep; rollout: the engine, the
  trainer on the host; push: the trainer without its activations and the engine's weights,
  whose KV cache wakes only after the trainer has left);
- per step: the push's bytes, full and delta (the units LoRA touches), and their time at
  `--gbps` (a stated transport bandwidth, not a measurement);
- host RAM of rank 0's node while the model loads: rank 0 reads the whole BF16 checkpoint and
  broadcasts it, the other ranks build on the meta device (`rl.fsdp.load_sharded`); a model
  with tied embeddings is read by every rank.

A rank over `--gpu-gib` is refused in one line naming the rank, the component and the GiB.
Left out: vLLM's own activation and CUDA-graph memory (inside its utilization), the CUDA
context (~0.5 GiB per process), allocator fragmentation, and the Ray object store's copies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qerl_rollout.config import CONFIG_DIR
from qerl_rollout.quant import DEFAULT_SCHEME

GIB = 2**30
SHAPES = CONFIG_DIR / "shapes"


@dataclass
class Counts:
    """What the arithmetic needs from the model, counted on the meta device."""

    base_params: int            # every BF16 parameter (the trainer's checkpoint)
    lora_params: int            # trainable fp32 LoRA parameters
    layer_params: int           # the largest decoder layer's BF16 parameters
    engine_bytes: int           # the weights as the scheme stores them (the full push)
    delta_bytes: int            # the units that hold a LoRA-adapted tensor (a delta push)
    layers: int
    hidden: int
    vocab: int
    kv_heads: int
    head_dim: int
    topk_intermediate: int      # k x moe_intermediate_size (MoE) or intermediate_size (dense)
    tied: bool = False          # tie_word_embeddings: every trainer rank reads the checkpoint


@dataclass
class Plan:
    rows: list[dict] = field(default_factory=list)   # role, component, gib
    peaks: dict[str, float] = field(default_factory=dict)
    push: dict[str, float] = field(default_factory=dict)
    gpu_gib: float = 80.0
    refusal: str | None = None

    def table(self) -> str:
        lines = [f"{'role':<22} {'component':<44} {'GiB':>8}"]
        lines += [f"{r['role']:<22} {r['component']:<44} {r['gib']:>8.2f}" for r in self.rows]
        lines += [f"{'peak ' + role:<67} {gib:>8.2f}" for role, gib in self.peaks.items()]
        lines.append(f"push: full {self.push['full_gib']:.2f} GiB ({self.push['full_s']:.1f} s), "
                     f"delta {self.push['delta_gib']:.2f} GiB ({self.push['delta_s']:.1f} s) "
                     f"at {self.push['gbps']:g} GB/s; GPUs of {self.gpu_gib:g} GiB")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"rows": self.rows, "peaks": self.peaks, "push": self.push, "gpu_gib": self.gpu_gib,
                "refusal": self.refusal}


def model_config(model_path: str, shape: str) -> dict:
    """The model's config.json: from `model.path`, else the shipped shape `configs/shapes/<shape>.json`."""
    if model_path:
        return json.loads((Path(model_path) / "config.json").read_text())
    path = SHAPES / f"{shape}.json"
    if not shape or not path.is_file():
        known = sorted(p.stem for p in SHAPES.glob("*.json"))
        raise ValueError(f"no model to plan: set model.path, or model.shape to one of {known}")
    return json.loads(path.read_text())


def count(config: dict, policy_cfg, scheme: str) -> Counts:
    """Parameter and byte counts of `config` with `policy_cfg`'s LoRA (meta device)."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from qerl_rollout.quant.plan import build_plan
    from qerl_rollout.rl.policy import lora_config
    from qerl_rollout.wire.stream import unit_of

    hf = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    base = sum(p.numel() for p in model.parameters())
    layers = model.model.layers
    layer = max(sum(p.numel() for p in block.parameters()) for block in layers)
    plan = build_plan(hf, scheme if scheme != "bf16" else DEFAULT_SCHEME)
    peft_model = get_peft_model(model, lora_config(policy_cfg))
    lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    adapted = {_plain(n) for n, p in peft_model.named_parameters() if p.requires_grad}
    # A tied lm_head has no checkpoint name of its own: the engine stores the embedding once.
    stored = {d.name: (_stored_bytes(d, scheme), unit_of(d.checkpoint_names[0]))
              for d in plan.decisions.values() if d.checkpoint_names}
    changed = {unit for name, (_, unit) in stored.items() if name.rsplit(".", 1)[0] in adapted}
    if any(u.endswith(".experts") for u in changed):   # experts travel all together (WeightSync)
        changed |= {unit for _, unit in stored.values() if unit.endswith(".experts")}
    engine = sum(b for b, _ in stored.values())
    delta = sum(b for b, unit in stored.values() if unit in changed)
    text = hf.get_text_config()
    k = getattr(text, "num_experts_per_tok", None)
    inter = k * text.moe_intermediate_size if k else text.intermediate_size
    return Counts(base, lora, layer, engine, delta, text.num_hidden_layers, text.hidden_size,
                  text.vocab_size, text.num_key_value_heads,
                  getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads, inter,
                  tied=bool(getattr(hf, "tie_word_embeddings", False)))


def _plain(name: str) -> str:
    """A peft parameter name -> the plain module path it adapts (`...self_attn.q_proj`)."""
    name = name.removeprefix("base_model.model.")
    for marker in (".lora_A", ".lora_B"):
        name = name.split(marker)[0]
    return name


def _stored_bytes(decision, scheme: str) -> int:
    if scheme == "bf16" or not decision.quantized:
        return decision.nbytes
    from qerl_rollout.quant import get_scheme

    shape = decision.shape
    experts, n, k = (shape[0], shape[1], shape[2]) if len(shape) == 3 else (1, shape[0], shape[1])
    per = len(decision.checkpoint_names) // experts      # fused gate/up: 2 tensors per expert
    return experts * per * get_scheme(scheme).nbytes(n // per, k)


def plan(cfg, counts: Counts, gpu_gib: float = 80.0, gbps: float = 10.0) -> Plan:
    """The plan of run config `cfg` (a TrainConfig) for a model with `counts` (module docstring)."""
    n, r = cfg.trainer.num_workers, cfg.rollout
    out = Plan(gpu_gib=gpu_gib)
    trainer = {
        "BF16 weights (1/N)": counts.base_params * 2 / n,
        "LoRA fp32 params (1/N)": counts.lora_params * 4 / n,
        "LoRA grads (1/N)": counts.lora_params * 4 / n,
        "AdamW moments (1/N)": counts.lora_params * 8 / n,
        "one layer all-gathered (BF16)": counts.layer_params * 2 if n > 1 else 0,
        "activations (one micro-batch)": _activation_bytes(cfg, counts),
    }
    for component, nbytes in trainer.items():
        out.rows.append({"role": "trainer rank", "component": component, "gib": nbytes / GIB})
    train_gib = sum(trainer.values()) / GIB
    # A save: each rank writes its own shards (`Policy.save_state`), nothing gathered.
    save_gib = (sum(trainer.values()) - trainer["activations (one micro-batch)"]) / GIB
    tp = r.tensor_parallel_size
    weights = counts.engine_bytes / tp
    local = cfg.placement.mode == "local"
    share = r.gpu_memory_utilization / (cfg.engines_per_local_gpu if local else 1)
    kv = max(share * gpu_gib * GIB - weights, 0.0)
    kv_token = 2 * counts.layers * max(counts.kv_heads // tp, 1) * counts.head_dim * 2
    out.rows.append({"role": "engine (per TP rank)", "component": f"weights ({r.scheme}, TP {tp})", "gib": weights / GIB})
    out.rows.append({"role": "engine (per TP rank)", "component": f"KV cache ({int(kv // kv_token)} tokens)",
                     "gib": kv / GIB})
    engine_gib = (weights + kv) / GIB
    out.peaks = {"trainer rank (step)": train_gib, "trainer rank (save)": save_gib, "engine": engine_gib}
    if local:   # one GPU: the trainer beside what vLLM may take for all the process's engines
        out.peaks["local: trainer + engines"] = train_gib + r.gpu_memory_utilization * gpu_gib
    if cfg.placement.mode == "colocated":
        push_gib = (sum(trainer.values()) - trainer["activations (one micro-batch)"] + weights) / GIB
        out.peaks.update({"colocated: train phase": train_gib, "colocated: rollout phase": engine_gib,
                          "colocated: push phase": push_gib})
    readers = n if counts.tied else 1     # tied: every rank reads it (on one node, at worst)
    out.peaks["host RAM of rank 0's node (model load)"] = readers * counts.base_params * 2 / GIB
    full, delta = counts.engine_bytes / GIB, counts.delta_bytes / GIB
    out.push = {"full_gib": full, "delta_gib": delta, "gbps": gbps,
                "full_s": counts.engine_bytes / (gbps * 1e9), "delta_s": counts.delta_bytes / (gbps * 1e9)}
    out.refusal = _refusal(out, trainer, weights, kv, gpu_gib)
    return out


def _activation_bytes(cfg, counts: Counts) -> float:
    tokens = cfg.policy.micro_batch_size * (cfg.task.max_prompt_tokens + cfg.rollout.max_tokens)
    working = tokens * (10 * counts.hidden + 3 * counts.topk_intermediate) * 2
    kept = counts.layers * tokens * counts.hidden * 2 + working if cfg.policy.gradient_checkpointing \
        else counts.layers * working
    logits = cfg.policy.micro_batch_size * cfg.rollout.max_tokens * counts.vocab * 10
    return kept + logits


def _refusal(out: Plan, trainer: dict, weights: float, kv: float, gpu_gib: float) -> str | None:
    """One line for the first role over its GPU, naming the largest component."""
    budget = gpu_gib * GIB
    if sum(trainer.values()) > budget:
        part = max(trainer, key=trainer.get)
        return (f"trainer rank: {sum(trainer.values()) / GIB:.1f} GiB of a {gpu_gib:g} GiB GPU "
                f"(largest: {part}, {trainer[part] / GIB:.1f} GiB)")
    if weights > budget or kv <= 0:
        return f"engine: weights {weights / GIB:.1f} GiB leave no KV cache on a {gpu_gib:g} GiB GPU"
    if out.peaks.get("local: trainer + engines", 0) > gpu_gib:
        return (f"local: trainer {out.peaks['trainer rank (step)']:.1f} GiB + engines "
                f"{out.peaks['local: trainer + engines'] - out.peaks['trainer rank (step)']:.1f} GiB "
                f"(rollout.gpu_memory_utilization) of a {gpu_gib:g} GiB GPU")
    if "colocated: push phase" in out.peaks and out.peaks["colocated: push phase"] > gpu_gib:
        return (f"colocated push phase: {out.peaks['colocated: push phase']:.1f} GiB of a {gpu_gib:g} GiB GPU "
                "(the trainer and the engine's weights; its KV cache wakes after the trainer leaves)")
    return None
