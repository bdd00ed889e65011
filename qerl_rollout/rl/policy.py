"""The trainable policy: a transformers causal LM in BF16 with peft LoRA adapters.

`Policy` loads a checkpoint directory in BF16, attaches LoRA to attention projections
(`target_modules`) and optionally to fused MoE expert parameters (`target_parameters`, e.g.
"mlp.experts.gate_up_proj"), and owns the AdamW optimizer with linear warmup + cosine decay.
Only the adapters train; peft keeps them in fp32 beside the BF16 base weights.

Batches are `TokenBatch`es: prompts left-padded to P, responses right-padded to R, so row b is
[pad.. prompt | response ..pad] and every response starts at column P. Position ids count only
real tokens, so padding changes nothing but round-off. Log-probabilities come back as (B, R),
one per response token, zero on response padding; prompt tokens are never scored.

`reference_logprobs` runs the same model inside `disable_adapter()`, so the KL reference costs
a forward pass, not a second copy of the weights. `train_step` is one optimizer step of GRPO:
mismatch correction against the rollout log-probs (`rl.mismatch`), the loss (`rl.grpo`)
accumulated over micro-batches with whole-batch denominators, gradient clipping, AdamW, LR
schedule.

Distributed (`Policy(..., distributed=True)`, inside an initialised torch.distributed group):
rank 0 loads the checkpoint on the CPU with the seeded adapters, the other ranks build the
same model on the meta device (no weight read), all shard it with FSDP2, and rank 0
broadcasts one tensor at a time while each rank keeps its shard (`rl.fsdp.load_sharded`). Each rank
gets its rows of the global batch; the whole-batch denominators (tokens, sequences, padded
length) are all-reduced before the loss, so the summed gradient is that of the global
token-mean, not a mean of per-rank means. Row blocks differ by one, so a rank may have one
micro-batch fewer than another; it runs zero-weighted filler passes to the common count, since
each FSDP2 forward and backward is a collective (unequal counts hang).

Routing (MoE models, `rl.routing`): `backward` counts the experts each router picks for the
real tokens of its training forward (`experts/trainer/*`) and, when the batch carries the
rollout's routes (`TokenBatch.routes`), compares them with its own (`router/topk_agreement`,
`router/flip_rate`, `experts/rollout/*`); sharded, the counts are all-reduced, so every rank
returns the whole batch's figures. With `routing_replay="r3"` every forward of the step routes
by the rollout's experts (R3), the weights recomputed from the trainer's own router logits.

Checkpoints (`save_state` / `load_state`) are torch.distributed.checkpoint directories of
the trainable state alone (the frozen base is the model checkpoint's): each rank writes and
reads its own shards, nothing is gathered, and a state written by N ranks loads into M (one
process included) exactly. `lora_tensors` and `save_adapter` gather the adapters whole (small:
the LoRA factors only) for the weight sync's reference and the user's adapter.
Left out: multiple PPO epochs inside one call (call `train_step` again with the same
`logp_old`).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qerl_rollout.rl.grpo import GRPOConfig, entropy_from_logits, grpo_loss
from qerl_rollout.rl.mismatch import MismatchConfig, correct_mismatch
from qerl_rollout.rl.routing import RouterHooks

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
ROUTING_REPLAY = ("none", "r3")


@dataclass
class PolicyConfig:
    """Model, adapters and optimizer of the trainer."""

    model_path: str = ""
    dtype: str = "bfloat16"
    device: str = "auto"  # "auto": cuda when available, else cpu
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS
    target_parameters: tuple[str, ...] = ()  # e.g. ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    gradient_checkpointing: bool = False
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    total_steps: int = 1000
    max_grad_norm: float = 1.0
    micro_batch_size: int = 8
    seed: int = 0
    # Logits are divided by the rollout's sampling temperature before the log-softmax, so the
    # trainer's log-probs and the engine's (vLLM processed_logprobs) describe the same
    # distribution and the TIS ratio is unbiased. Sample with top_p=1: the trainer has no top-p.
    temperature: float = 1.0
    # "r3": every forward of a step (logp_old, the KL reference, the training forward and its
    # checkpointed recompute) routes each token to the experts the rollout chose for it
    # (`TokenBatch.routes`), with weights from the trainer's router logits (`rl.routing`).
    routing_replay: str = "none"

    def __post_init__(self):
        if self.routing_replay not in ROUTING_REPLAY:
            raise ValueError(f"unknown routing_replay {self.routing_replay!r}; choose from {ROUTING_REPLAY}")


@dataclass
class TokenBatch:
    """Prompt+response token ids laid out for scoring. L = P + R columns.

    input_ids, attention_mask, position_ids: (B, L); response_mask: (B, R) float, 1 on real
    response tokens. `prompt_len` is P; response token r of row b is input_ids[b, P + r].
    routes: None, or the rollout's experts per token, (B, L, moe_layers, k) int16 aligned with
    input_ids, -1 where a token has none (padding); see `rl.routing`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int
    routes: torch.Tensor | None = None

    @classmethod
    def from_token_lists(
        cls, prompts: list[list[int]], responses: list[list[int]], pad_id: int, routes=None
    ) -> TokenBatch:
        """Left-pad prompts, right-pad responses, and build masks and position ids. `routes`:
        per row, a (tokens, moe_layers, k) array of the experts of the row's first tokens
        (prompt, then response; at most len(prompt) + len(response) of them)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: a response token needs at least one token before it")
        P = max(len(p) for p in prompts)
        R = max(1, max(len(r) for r in responses))
        rows, attn, resp_mask = [], [], []
        for p, r in zip(prompts, responses):
            rows.append([pad_id] * (P - len(p)) + list(p) + list(r) + [pad_id] * (R - len(r)))
            attn.append([0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (R - len(r)))
            resp_mask.append([1.0] * len(r) + [0.0] * (R - len(r)))
        attention_mask = torch.tensor(attn, dtype=torch.long)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return cls(
            input_ids=torch.tensor(rows, dtype=torch.long),
            attention_mask=attention_mask,
            position_ids=position_ids,
            response_mask=torch.tensor(resp_mask, dtype=torch.float32),
            prompt_len=P,
            routes=None if routes is None else _route_columns(routes, prompts, responses, P, P + R),
        )

    @classmethod
    def from_samples(cls, samples, pad_id: int) -> tuple[TokenBatch, torch.Tensor]:
        """Rollout samples (`.prompt_token_ids`, `.token_ids`, `.logprobs`, `.routes`) ->
        (batch, (B, R) rollout logprobs right-padded with 0, in the batch's response layout).
        The batch carries the samples' routes when every sample has them."""
        routes = [s.routes for s in samples]
        batch = cls.from_token_lists([s.prompt_token_ids for s in samples],
                                     [s.token_ids for s in samples], pad_id,
                                     routes=routes if all(r is not None for r in routes) else None)
        logp = torch.zeros(batch.response_mask.shape)
        for i, s in enumerate(samples):
            logp[i, : len(s.logprobs)] = torch.tensor(s.logprobs, dtype=torch.float32)
        return batch, logp

    @property
    def response_ids(self) -> torch.Tensor:
        """(B, R) response token ids (padding included; see response_mask)."""
        return self.input_ids[:, self.prompt_len :]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> TokenBatch:
        """Rows [start, stop) as a new batch (views, no copy)."""
        return TokenBatch(
            self.input_ids[start:stop],
            self.attention_mask[start:stop],
            self.position_ids[start:stop],
            self.response_mask[start:stop],
            self.prompt_len,
            None if self.routes is None else self.routes[start:stop],
        )

    def to(self, device) -> TokenBatch:
        return TokenBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.response_mask.to(device),
            self.prompt_len,
            None if self.routes is None else self.routes.to(device),
        )


def _route_columns(routes, prompts, responses, P: int, width: int) -> torch.Tensor:
    """(B, width, layers, k) int16: row b's routes from its first token's column (P - its
    prompt length) on, -1 elsewhere."""
    shapes = {tuple(r.shape[1:]) for r in routes}
    if len(shapes) != 1:
        raise ValueError(f"the rows' routes differ in (layers, k): {sorted(shapes)}")
    out = torch.full((len(routes), width, *shapes.pop()), -1, dtype=torch.int16)
    for b, (r, p, resp) in enumerate(zip(routes, prompts, responses)):
        if len(r) > len(p) + len(resp):
            raise ValueError(f"row {b} has routes for {len(r)} tokens but {len(p) + len(resp)} tokens")
        start = P - len(p)
        out[b, start: start + len(r)] = torch.from_numpy(np.array(r, dtype=np.int16))   # a copy: Ray's arrays are read-only
    return out


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_lora_model(cfg: PolicyConfig, device: torch.device):
    """Load `cfg.model_path` in `cfg.dtype` and wrap it in a peft LoRA model. On the meta
    device nothing is read but the config: the same modules, names, dtypes and shapes, with
    no storage (a sharded rank's frame for the weights rank 0 broadcasts)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, cfg.dtype)
    if device.type == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model_path), dtype=dtype)
            return _with_lora(model.eval(), cfg)        # eval(): as from_pretrained leaves it
    model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype)
    return _with_lora(model.to(device), cfg)


def _with_lora(model, cfg: PolicyConfig):
    from peft import get_peft_model

    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, lora_config(cfg))


def lora_config(cfg: PolicyConfig):
    """The peft `LoraConfig` of the policy (also what `planner` counts on the meta device)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules) or None,
        target_parameters=list(cfg.target_parameters) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_optimizer(params, cfg: PolicyConfig):
    """AdamW over `params` with linear warmup then cosine decay to 0 at `total_steps`."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.total_steps)
    return optimizer, scheduler


class Policy:
    """BF16 base + LoRA adapters, with log-prob scoring and a GRPO `train_step`."""

    def __init__(
        self,
        cfg: PolicyConfig,
        grpo: GRPOConfig | None = None,
        mismatch: MismatchConfig | None = None,
        *,
        distributed: bool = False,
    ):
        self.cfg = cfg
        self.grpo = grpo or GRPOConfig()
        self.mismatch = mismatch or MismatchConfig()
        self.device = _resolve_device(cfg.device)
        self.distributed = distributed
        with torch.random.fork_rng(devices=[]):  # seeded LoRA init, global RNG left alone
            torch.manual_seed(cfg.seed)
            if distributed:
                from qerl_rollout.rl.fsdp import load_sharded

                self.model = load_sharded(lambda device: load_lora_model(cfg, device), self.device)
            else:
                self.model = load_lora_model(cfg, self.device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(self.trainable, cfg)
        self.step = 0
        self.routing = RouterHooks.attach(self.model)   # None for a dense model
        self.replay = cfg.routing_replay == "r3"
        if self.replay:
            if self.routing is None:
                raise ValueError("routing_replay=r3 needs a MoE model: this one has no routers")
            self.routing.check_replayable()

    # --- scoring -------------------------------------------------------------------------

    def _forward(self, batch: TokenBatch, with_entropy: bool = False):
        """-> ((b, R) log-probs of the response tokens, (b, R) entropy or None); grads flow."""
        batch = batch.to(self.device)
        R = batch.response_mask.shape[1]
        out = self.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            logits_to_keep=R + 1,
            use_cache=False,
        )
        logits = out.logits[:, :-1].float() / self.cfg.temperature  # P-1+r predicts token r
        log_probs = torch.log_softmax(logits, dim=-1)
        logp = log_probs.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
        logp = logp * batch.response_mask
        entropy = entropy_from_logits(logits) * batch.response_mask if with_entropy else None
        return logp, entropy

    @torch.no_grad()
    def logprobs(self, batch: TokenBatch, micro_batch_size: int | None = None) -> torch.Tensor:
        """(B, R) log-probs of the response tokens under the current policy (adapters on).

        Scored in eval mode (no LoRA dropout), so they serve as logp_old.
        """
        was_training = self.model.training
        self.model.eval()
        try:
            parts = []
            for sl in self._micro_slices(len(batch), micro_batch_size):
                rows = _rows_or_filler(batch, sl).to(self.device)
                with self._replaying(rows):
                    parts.append(self._forward(rows)[0])
        finally:
            self.model.train(was_training)
        return torch.cat(parts)[:len(batch)]

    @torch.no_grad()
    def reference_logprobs(self, batch: TokenBatch, micro_batch_size: int | None = None):
        """(B, R) log-probs under the base model: the same weights with the adapters disabled."""
        with self.model.disable_adapter():
            return self.logprobs(batch, micro_batch_size)

    # --- training ------------------------------------------------------------------------

    def train_step(
        self,
        batch: TokenBatch,
        advantages: torch.Tensor,
        logp_rollout: torch.Tensor | None = None,
        logp_old: torch.Tensor | None = None,
        logp_ref: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One optimizer step on `batch` with (B,) advantages; returns metrics.

        logp_old (B, R) defaults to the current policy's log-probs (one update per batch,
        on-policy); logp_rollout (B, R), when given, drives the mismatch correction; logp_ref
        is computed with the adapters off when `kl_coef > 0` and it is not given.
        """
        metrics = self.backward(batch, advantages, logp_rollout, logp_old, logp_ref)
        metrics.update(self.optimizer_step())
        return metrics

    def backward(
        self,
        batch: TokenBatch,
        advantages: torch.Tensor,
        logp_rollout: torch.Tensor | None = None,
        logp_old: torch.Tensor | None = None,
        logp_ref: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Accumulate the GRPO loss gradient of `batch` into the adapters' `.grad` (no step).

        The batch is cut into `micro_batch_size` rows; each micro-batch loss is divided by the
        whole batch's token / sequence counts, so the accumulated gradient does not depend on
        the micro-batch size beyond BF16 round-off (a one-row micro-batch takes another CPU
        GEMM kernel: measured 7e-4 relative on the tiny Qwen3-MoE, micro-batch 1 vs 64).
        """
        if self.replay and batch.routes is None:
            raise ValueError("routing_replay=r3: the batch carries no rollout routes (TokenBatch.routes)")
        self.model.train()
        mask = batch.response_mask.to(self.device)
        advantages = advantages.to(self.device).float()
        logp_old = (self.logprobs(batch) if logp_old is None else logp_old).to(self.device)
        is_weights, metrics = None, {}
        if logp_rollout is not None:
            is_weights, mask, metrics = correct_mismatch(
                logp_old, logp_rollout.to(self.device), mask, self.mismatch
            )
        if self.grpo.kl_coef > 0 and logp_ref is None:
            logp_ref = self.reference_logprobs(batch)
        logp_ref = None if logp_ref is None else logp_ref.to(self.device)
        denominators = self._denominators(mask)
        want_entropy = self.grpo.entropy_coef > 0
        logp_new, entropies, loss_total = [], [], 0.0
        if self.routing is not None:
            self.routing.reset()
        for sl in self._micro_slices(len(batch)):
            rows = _rows_or_filler(batch, sl).to(self.device)
            with self._replaying(rows):          # through the backward: a recompute routes alike
                with self._counting_routes(rows if sl is not None else None):
                    logp, entropy = self._forward(rows, want_entropy)
                if sl is None:   # a filler pass: zero gradient, but every FSDP2 collective joined
                    (logp.sum() * 0.0).backward()
                    continue
                loss, _ = grpo_loss(
                    logp, logp_old[sl], advantages[sl], mask[sl], self.grpo,
                    is_weights=None if is_weights is None else is_weights[sl],
                    logp_ref=None if logp_ref is None else logp_ref[sl],
                    entropy=entropy, **denominators,
                )
                loss.backward()
            loss_total += loss.item()
            logp_new.append(logp.detach())
            entropies.append(entropy if entropy is None else entropy.detach())
        metrics.update(self._batch_metrics(logp_new, entropies, logp_old, advantages, mask,
                                           is_weights, logp_ref))
        metrics["loss"] = loss_total
        if self.routing is not None:   # the whole batch's figures, the same on every rank
            if self.distributed:
                self.routing.all_reduce()
            metrics.update(self.routing.metrics())
        return metrics

    @contextmanager
    def _counting_routes(self, rows: TokenBatch | None):
        """Count the routes of `rows`' real tokens in the forward inside, and compare them with
        the rollout's where the rows carry routes (`rl.routing`); a filler pass (None) or a
        dense model counts nothing. `rows` are on the model's device: moved once, not per router."""
        if self.routing is None or rows is None:
            yield
            return
        with self.routing.counting(rows.attention_mask, rows.routes):
            yield

    @contextmanager
    def _replaying(self, rows: TokenBatch):
        """Under routing_replay=r3, route the forwards (and recomputes) inside by `rows.routes`."""
        if not self.replay or rows.routes is None:
            yield
            return
        with self.routing.replaying(rows.routes):
            yield

    def _micro_slices(self, rows: int, size: int | None = None) -> list[slice | None]:
        """Row slices of the micro-batches of a `rows`-row batch, in order.

        Sharded, every forward and backward of an FSDP2 model is a collective (each group's
        weights are all-gathered for it, its gradients reduce-scattered after it), so every
        rank must run the same number of them. Ranks get row blocks that differ by one, so the
        count is all-reduced (MAX) and a rank with fewer micro-batches ends with `None`s: filler
        passes over its first row whose loss is multiplied by 0 (exactly zero gradient).
        """
        size = size or self.cfg.micro_batch_size
        slices: list[slice | None] = [slice(i, i + size) for i in range(0, rows, size)]
        if self.distributed:
            import torch.distributed as dist

            count = torch.tensor([len(slices)], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            slices += [None] * (int(count.item()) - len(slices))
        return slices

    def _denominators(self, mask: torch.Tensor) -> dict:
        """Whole-batch counts of the loss; summed (the padded length: max-ed) over ranks.

        Clamped: a batch the rejection emptied gives a zero gradient, not NaN.
        """
        counts = torch.stack([mask.sum(), (mask.sum(-1) > 0).sum().to(mask.dtype)])
        horizon = torch.tensor([float(self.grpo.horizon or mask.shape[-1])])
        if self.distributed:
            import torch.distributed as dist

            counts, horizon = counts.to(self.device), horizon.to(self.device)
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            dist.all_reduce(horizon, op=dist.ReduceOp.MAX)
        return {"num_tokens": counts[0].clamp(min=1), "num_seqs": counts[1].clamp(min=1),
                "horizon": int(horizon.item())}

    def optimizer_step(self) -> dict[str, float]:
        """Clip the gradient norm, step AdamW and the LR schedule, clear the gradients."""
        from qerl_rollout.dist import full_tensor

        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"grad_norm": grad_norm.item(), "lr": lr}

    @torch.no_grad()
    def _batch_metrics(self, logp_new, entropies, logp_old, advantages, mask, is_weights, logp_ref):
        """Loss-side metrics over the whole batch (micro-batches glued back together)."""
        entropy = None if entropies[0] is None else torch.cat(entropies)
        _, metrics = grpo_loss(
            torch.cat(logp_new), logp_old, advantages, mask, self.grpo,
            is_weights=is_weights, logp_ref=logp_ref, entropy=entropy,
        )
        metrics["response_tokens"] = mask.sum().item()
        return metrics

    def save_state(self, path: str | Path) -> None:
        """Write what a run needs to continue training (LoRA tensors, AdamW moments, LR
        schedule, step) into directory `path` with torch.distributed.checkpoint (DCP).

        The frozen base is left out (`ignore_frozen_params`). Sharded: a collective in which
        each rank writes its own shards to `__<rank>_0.distcp` and rank 0 the `.metadata`
        index of every chunk's global offsets; nothing is gathered. Single process: the same
        format, one file. Every rank must see `path` (one filesystem for all of them).
        """
        import torch.distributed.checkpoint as dcp

        with _no_dist_quiet():
            dcp.save(self._dcp_state(), checkpoint_id=str(path), no_dist=not self.distributed)

    def load_state(self, path: str | Path) -> None:
        """Restore `save_state`'s directory in place. Each rank reads only the chunks that
        overlap its own shards, so a state written by N ranks loads into M (1 included): DCP
        places every chunk by its global offsets. The trainable tensors must be exactly the
        checkpoint's, with their shapes, else ValueError naming the first that differ."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._dcp_state()
        _check_saved_tensors(path, state["model"])
        with _no_dist_quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=not self.distributed)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=_dcp_options())
        self.scheduler.load_state_dict(state["schedule"]["scheduler"])
        self.step = state["schedule"]["step"]

    def _dcp_state(self) -> dict:
        """The DCP state: this rank's shards (DTensors when sharded) of the trainable tensors
        and of the AdamW state keyed by parameter name, plus the schedule. An optimizer that
        has not stepped gets its state initialised first (a zero-gradient step at lr 0), so a
        fresh policy has tensors to load into."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model, self.optimizer, options=_dcp_options())
        return {"model": model, "optim": optim,
                "schedule": {"scheduler": self.scheduler.state_dict(), "step": self.step}}

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, whole, on the CPU.

        Distributed: a collective that gathers the trainable tensors only (the frozen BF16 base
        is never gathered: `ignore_frozen_params`), one at a time, onto rank 0's CPU
        (`cpu_offload`); the other ranks get an empty dict.
        """
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if not self.distributed:
            return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if n in names}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        full = get_model_state_dict(self.model, options=options)
        return {n: t.detach().cpu().clone() for n, t in full.items() if n in names}

    def to_device(self, device: str | torch.device) -> None:
        """Move parameters, gradients and optimizer state (colocated placement: off the GPU
        while the engine generates, back for the step). Leaving a GPU empties this process's
        allocator cache: the engine beside it is another process and cannot use the blocks
        torch keeps cached here."""
        self.model.to(device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    state[key] = value.to(device)
        if torch.device(device).type != "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def load_lora(self, lora: dict[str, torch.Tensor]) -> None:
        """Set every trainable tensor from full (unsharded) values, keyed as `state_dict()['lora']`."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if params.keys() != lora.keys():
            raise ValueError(f"LoRA tensors differ: missing {sorted(params.keys() - lora.keys())[:3]}, "
                             f"unexpected {sorted(lora.keys() - params.keys())[:3]}")
        if self.distributed:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            set_model_state_dict(self.model, lora, options=StateDictOptions(full_state_dict=True, strict=False))
            return
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(lora[name])

    def save_adapter(self, path: str | Path) -> None:
        """Write the LoRA adapter (peft format) to `path`. Distributed: every rank calls it (the
        adapters are gathered whole) and rank 0 writes. LoRA on lm_head or embeddings leaves
        the vocabulary as it is, so the adapter holds the LoRA factors alone, not a copy of
        those base weights (peft's "auto" would add them, and warn, on one process only)."""
        if not self.distributed:
            self.model.save_pretrained(str(path), save_embedding_layers=False)
            return
        import torch.distributed as dist
        from peft import get_peft_model_state_dict

        lora = self.lora_tensors()
        if dist.get_rank() == 0:
            state = get_peft_model_state_dict(self.model, state_dict=lora, save_embedding_layers=False)
            self.model.save_pretrained(str(path), state_dict=state, save_embedding_layers=False)


def _rows_or_filler(batch: TokenBatch, sl: slice | None) -> TokenBatch:
    """The rows of micro-batch `sl`; for a filler pass (`None`), the batch's first row."""
    return batch.rows(0, 1) if sl is None else batch.rows(sl.start, sl.stop)


def _dcp_options():
    """The trainable tensors only; `strict=False` lets the set leave the frozen base as it is
    (`_check_saved_tensors` and DCP's own load check that every trainable one is there)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


@contextmanager
def _no_dist_quiet():
    """DCP warns on every single-process save and load that it assumes one process; `no_dist`
    already says so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _check_saved_tensors(path: str | Path, model_state: dict) -> None:
    """The checkpoint in `path` holds exactly these trainable tensors, with these global shapes
    (DCP itself would skip a tensor the checkpoint has and the policy lacks)."""
    from torch.distributed.checkpoint import FileSystemReader

    saved = {k[len("model."):]: v.size for k, v in FileSystemReader(str(path)).read_metadata()
             .state_dict_metadata.items() if k.startswith("model.")}
    ours = {k: tuple(v.shape) for k, v in model_state.items()}
    if saved.keys() != ours.keys():
        raise ValueError(f"the checkpoint's LoRA tensors differ from the policy's: missing "
                         f"{sorted(ours.keys() - saved.keys())[:3]}, unexpected {sorted(saved.keys() - ours.keys())[:3]}")
    shapes = [k for k in ours if tuple(saved[k]) != ours[k]]
    if shapes:
        raise ValueError(f"the checkpoint's {shapes[0]} is {tuple(saved[shapes[0]])}, the policy's "
                         f"{ours[shapes[0]]} (another lora_rank or model?)")


# Per-rank train_step metrics -> the global batch's: sums, values every rank shares, and
# token-weighted means of the per-rank means (exact for token means; the ESS, per-row and other
# nonlinear statistics become the weighted mean of the ranks' values).
_SUMMED = ("loss", "response_tokens")
_SHARED = ("grad_norm", "lr")   # and every `experts/` and `router/` key: all-reduced, the same on every rank
_MAXED = ("is_weight_max",)


def combine_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """The metrics of one distributed `train_step` from its ranks' metrics (rank order)."""
    if len(per_rank) == 1:
        return dict(per_rank[0])
    weights = [m["response_tokens"] for m in per_rank]
    total = sum(weights) or 1.0
    out = {}
    for key in per_rank[0]:
        values = [m[key] for m in per_rank]
        if key in _SUMMED:
            out[key] = sum(values)
        elif key in _SHARED or key.startswith(("experts/", "router/")):
            out[key] = values[0]
        elif key in _MAXED:
            out[key] = max(values)
        else:
            out[key] = sum(v * w for v, w in zip(values, weights)) / total
    return out
