"""The memory and push plan of a run, from the model's config.json alone (no weight is read).

How it works. The model is built on the meta device from its config (`transformers`), wrapped
in the run's LoRA exactly as the trainer wraps it (`rl.policy.lora_config`), and cut by the
quant plan the sync uses (`quant.plan.build_plan`); every figure below is arithmetic on those
shapes and the run's config, per GPU, in GiB:

- trainer rank (one of N FSDP2 ranks): its 1/N of the BF16 weights; its 1/N of the fp32 LoRA
  parameters, their gradients and the two AdamW moments (4 + 4 + 8 bytes each); the largest
  decoder layer all-gathered whole in BF16 for its forward or backward; activations of one
  micro-batch (`policy.micro_batch_size` rows of T = `task.max_prompt_tokens +
  rollout.max_tokens` tokens, `_layer_saved`): what autograd keeps for the backward, counted
  term by term for the transformers layers with peft LoRA, per token and layer: the fp32 input
  of both RMSNorms (8H bytes) and of the q/k norms, the BF16 q, attention output, k and v, the
  fp32 copy of each adapted linear's input plus its r-wide A output (the adapters are fp32),
  and per routed expert the gate/up output, its activation and the expert output (6I + 2H),
  plus, for a LoRA-adapted expert parameter, its input per route and the merged BF16 weight
  (E x N x K, kept whole per layer); with gradient checkpointing the BF16 input of every layer
  plus one layer's saved set, without it every layer's; then the final norm's fp32 input, the
  lm_head adapter's input and the fp32 log-softmax kept for the backward, and the forward's
  transient logits (BF16, the fp32 copy and its tempered copy: 10 bytes per logit). Tested
  against the bytes autograd really saves (within 1% on Qwen3-MoE, Qwen2-MoE, Mixtral; the
  MLA attention of DeepSeek-V3 is not modelled, its q/k/v terms are those of plain attention)
  and the measured RSS peak of a step; and the save: each rank writes its own shards of the
  trainable tensors and their optimizer state to disk (`Policy.save_state`, DCP), staged
  through host memory a few MB at a time: no GPU memory beyond the step's state without its
  activations, nothing gathered, and the frozen base never written;
- engine (per TP rank): the weights as the scheme stores them (`QuantScheme.nbytes` for every
  quantized tensor, BF16 for the exempt ones), divided by TP; KV cache: what
  `gpu_memory_utilization` leaves after the weights, in tokens (2 x layers x KV heads x
  head_dim BF16 values per token and TP rank);
- local: the trainer and the process's engines on one GPU; the engines share
  `gpu_memory_utilization` (the BF16 baseline engine, when the run has one, takes half);
- the BF16 baseline engine (when the run has one): the same weights in BF16, in its half of
  a local run's share or on a GPU of its own (split, colocated), at the rollout's TP;
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
    bf16_engine_bytes: int      # the same weights in BF16 (the baseline engine's)
    delta_bytes: int            # the units that hold a LoRA-adapted tensor (a delta push)
    layers: int
    hidden: int
    vocab: int
    kv_heads: int
    head_dim: int
    saved_per_token: int        # bytes autograd keeps per token, summed over the decoder layers
    saved_fixed: int            # ... whatever the tokens (merged expert LoRA weights), summed
    layer_saved_per_token: int  # the largest of one layer (its checkpointed recompute)
    layer_saved_fixed: int
    head_per_token: int         # per kept token: the lm_head adapter's fp32 input and A output
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


def count(config: dict, policy_cfg, scheme: str, precision=None) -> Counts:
    """Parameter and byte counts of `config` with `policy_cfg`'s LoRA (meta device); the engine's
    bytes as `precision` (`quant.plan.Precision`) quantizes it."""
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
    plan = build_plan(hf, scheme if scheme != "bf16" else DEFAULT_SCHEME, precision)
    peft_model = get_peft_model(model, lora_config(policy_cfg))
    lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    adapted = {_plain(n) for n, p in peft_model.named_parameters() if p.requires_grad}
    # A tied lm_head has no checkpoint name of its own: the engine stores the embedding once.
    stored = {d.name: (_stored_bytes(d, scheme), unit_of(d.checkpoint_names[0]))
              for d in plan.decisions.values() if d.checkpoint_names}
    changed = {unit for name, (_, unit) in stored.items() if name.rsplit(".", 1)[0] in adapted}
    engine = sum(b for b, _ in stored.values())
    bf16_engine = sum(d.nbytes for d in plan.decisions.values() if d.checkpoint_names)
    delta = sum(b for b, unit in stored.values() if unit in changed)
    text = hf.get_text_config()
    rank = policy_cfg.lora_rank
    saved = [_layer_saved(block, text, rank) for block in peft_model.base_model.model.model.layers]
    head = peft_model.base_model.model.lm_head
    head_per_token = 4 * head.in_features + 4 * rank if hasattr(head, "lora_A") else 0
    return Counts(base, lora, layer, engine, bf16_engine, delta, text.num_hidden_layers, text.hidden_size,
                  text.vocab_size, text.num_key_value_heads,
                  getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                  saved_per_token=sum(t for t, _ in saved), saved_fixed=sum(f for _, f in saved),
                  layer_saved_per_token=max(t for t, _ in saved),
                  layer_saved_fixed=max(f for _, f in saved),   # an upper bound if layers differ
                  head_per_token=head_per_token, tied=bool(getattr(hf, "tie_word_embeddings", False)))


def _layer_saved(block, text, rank: int) -> tuple[int, int]:
    """(bytes per token, bytes whatever the tokens) that autograd keeps for one decoder layer's
    backward, with frozen BF16 weights and fp32 LoRA (the terms of the module docstring)."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    modules = dict(block.named_modules())
    hidden, head_dim = text.hidden_size, getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    q, kv = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    per_token = 8 * hidden + 4 * q + 4 * kv + 2 * head_dim  # 2 RMSNorms (fp32); q, out, k, v, rotary (BF16)
    if "self_attn.q_norm" in modules:
        per_token += 4 * (q + kv)                           # q/k norms keep their fp32 input
    moe = "mlp.gate" in modules and any(n.startswith("mlp.experts") for n in modules)
    if moe:
        k, inter = text.num_experts_per_tok, getattr(text, "moe_intermediate_size", None) or text.intermediate_size
        per_token += k * (6 * inter + 2 * hidden)           # gate/up, act, expert output per route
        per_token += 4 * text.num_experts + 24 * k          # router softmax (fp32), top-k and route ids
        if "mlp.shared_expert" in modules:                  # Qwen2-MoE: a dense expert, gated
            per_token += 6 * text.shared_expert_intermediate_size + 2 * hidden
    else:
        k, per_token = 1, per_token + 6 * text.intermediate_size
    fixed = 0
    for module in modules.values():
        if isinstance(module, ParamWrapper):                # LoRA on a 3-D expert parameter
            experts, n, k_in = getattr(module.get_base_layer(), module.parameter_name).shape
            per_token += k * 2 * k_in                       # its BF16 input per route
            fixed += 2 * experts * (n * k_in + rank * (n + k_in))   # merged weight, BF16 A and B
        elif isinstance(module, LoraLayer):                 # fp32 copy of the input, A output
            per_token += 4 * module.in_features + 4 * rank
    return per_token, fixed


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
    return experts * per * get_scheme(decision.scheme).nbytes(n // per, k)


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
    baseline_kv = None
    if cfg.wants_baseline:   # local: the other half of the share; else a GPU of its own, same TP
        bf16 = counts.bf16_engine_bytes / tp
        baseline_kv = max(share * gpu_gib * GIB - bf16, 0.0)
        out.rows.append({"role": "baseline engine (BF16)", "component": f"weights (bf16, TP {tp})", "gib": bf16 / GIB})
        out.rows.append({"role": "baseline engine (BF16)",
                         "component": f"KV cache ({int(baseline_kv // kv_token)} tokens)", "gib": baseline_kv / GIB})
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
    out.refusal = _refusal(out, trainer, weights, kv, gpu_gib, baseline_kv)
    return out


def _activation_bytes(cfg, counts: Counts) -> float:
    """The activation peak of one micro-batch: the forward ends holding every saved tensor and
    the transient logits. With checkpointing the backward recomputes one layer at a time; its
    saved set is added whole: the head's tensors are freed by then, but the recomputed layer's
    gradients take their place. Measured on the tiny Qwen3-MoE (16 x 256 tokens, AMD EPYC), a
    whole step's RSS peak is 1.07-1.09x this plus the LoRA grads and moments without
    checkpointing (allocator and autograd buffers beyond the tensors), 0.99x with it
    (tests/test_planner.py)."""
    return sum(activation_parts(cfg, counts).values())


def activation_parts(cfg, counts: Counts) -> dict[str, float]:
    """Bytes of one micro-batch's activations: what the forward leaves saved for the backward
    in the decoder layers (`layers`; with gradient checkpointing only each layer's BF16 input)
    and in the head (`head`: the final norm, lm_head's adapter, the fp32 log-softmax), one
    layer's saved set when the backward recomputes it (`recompute`, checkpointing only), and
    the logits the forward holds at once before the log-softmax (`transient logits`)."""
    rows, response = cfg.policy.micro_batch_size, cfg.rollout.max_tokens
    tokens = rows * (cfg.task.max_prompt_tokens + response)
    # Every layer keeps its norms' fp32 inputs but the first layer's input norm (the frozen
    # embedding's output needs no grad); the final norm's makes up for it. With checkpointing
    # the layers keep only their BF16 inputs and the final norm's 4H is kept on its own.
    if cfg.policy.gradient_checkpointing:
        layers = counts.layers * tokens * counts.hidden * 2 + tokens * 4 * counts.hidden
        recompute = tokens * counts.layer_saved_per_token + counts.layer_saved_fixed
    else:
        layers, recompute = tokens * counts.saved_per_token + counts.saved_fixed, 0
    head = rows * (response + 1) * counts.head_per_token + rows * response * counts.vocab * 4
    return {"layers": layers, "recompute": recompute, "head": head,
            "transient logits": rows * response * counts.vocab * 10}


def _refusal(out: Plan, trainer: dict, weights: float, kv: float, gpu_gib: float,
             baseline_kv: float | None) -> str | None:
    """One line for the first role over its GPU, naming the largest component."""
    budget = gpu_gib * GIB
    if sum(trainer.values()) > budget:
        part = max(trainer, key=trainer.get)
        return (f"trainer rank: {sum(trainer.values()) / GIB:.1f} GiB of a {gpu_gib:g} GiB GPU "
                f"(largest: {part}, {trainer[part] / GIB:.1f} GiB)")
    if weights > budget or kv <= 0:
        return f"engine: weights {weights / GIB:.1f} GiB leave no KV cache on a {gpu_gib:g} GiB GPU"
    if baseline_kv is not None and baseline_kv <= 0:
        bf16 = next(r["gib"] for r in out.rows if r["role"] == "baseline engine (BF16)")
        return (f"baseline engine (BF16): weights {bf16:.1f} GiB leave no KV cache in its "
                f"{'half of ' if out.peaks.get('local: trainer + engines') else ''}"
                f"rollout.gpu_memory_utilization of a {gpu_gib:g} GiB GPU "
                "(set rollout.baseline_every=0 and eval.bf16=false, or give it more)")
    if out.peaks.get("local: trainer + engines", 0) > gpu_gib:
        return (f"local: trainer {out.peaks['trainer rank (step)']:.1f} GiB + engines "
                f"{out.peaks['local: trainer + engines'] - out.peaks['trainer rank (step)']:.1f} GiB "
                f"(rollout.gpu_memory_utilization) of a {gpu_gib:g} GiB GPU")
    if "colocated: push phase" in out.peaks and out.peaks["colocated: push phase"] > gpu_gib:
        return (f"colocated push phase: {out.peaks['colocated: push phase']:.1f} GiB of a {gpu_gib:g} GiB GPU "
                "(the trainer and the engine's weights; its KV cache wakes after the trainer leaves)")
    return None
