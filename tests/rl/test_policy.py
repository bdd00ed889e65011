"""The BF16 + LoRA policy on the tiny Qwen3-MoE: scoring, reference, training, AQN isolation.

Two policies are built once for the module: the BF16 one the trainer uses, and an fp32 twin
for checks that need exact arithmetic (padding, micro-batch invariance), where BF16 round-off
across differently shaped batches (~2e-3 here) would hide a real bug.
"""

import copy
import dataclasses

import pytest
import torch

from qerl_rollout.rl.aqn import AQNConfig, aqn_stream
from qerl_rollout.rl.grpo import GRPOConfig, group_advantages
from qerl_rollout.rl.mismatch import MismatchConfig
from qerl_rollout.rl.policy import Policy, PolicyConfig, TokenBatch

PAD = 0


def _random_batch(seed, n=8):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 1024, (int(k),), generator=gen).tolist()
               for k in torch.randint(3, 9, (n,), generator=gen)]
    responses = [torch.randint(3, 1024, (int(k),), generator=gen).tolist()
                 for k in torch.randint(2, 7, (n,), generator=gen)]
    return prompts, responses


@pytest.fixture(scope="module")
def policy_cfg(tiny_qwen3_moe):
    return PolicyConfig(model_path=str(tiny_qwen3_moe), device="cpu", lr=5e-3, total_steps=100,
                        micro_batch_size=4)


@pytest.fixture(scope="module")
def policy(policy_cfg):
    return Policy(policy_cfg, GRPOConfig(group_size=4))


@pytest.fixture(scope="module")
def policy_fp32(policy_cfg):
    return Policy(dataclasses.replace(policy_cfg, dtype="float32"), GRPOConfig(group_size=4))


def test_batch_layout():
    batch = TokenBatch.from_token_lists([[5, 6], [7]], [[8], [9, 10, 11]], PAD)
    assert batch.input_ids.tolist() == [[5, 6, 8, 0, 0], [0, 7, 9, 10, 11]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 2, 2], [0, 0, 1, 2, 3]]
    assert batch.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert batch.response_ids.tolist() == [[8, 0, 0], [9, 10, 11]]


def test_logprobs_score_exactly_the_response_tokens(policy_fp32):
    prompts, responses = _random_batch(0, n=2)
    batch = TokenBatch.from_token_lists(prompts, responses, PAD)
    logp = policy_fp32.logprobs(batch)
    assert logp.shape == batch.response_mask.shape
    assert (logp[batch.response_mask == 0] == 0).all()
    # reference: full forward of the unpadded sequence, token t scored by the logits at t - 1
    for row, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            log_probs = torch.log_softmax(policy_fp32.model(input_ids=ids).logits.float(), -1)
        expected = log_probs[0, len(p) - 1 : -1].gather(-1, ids[0, len(p) :, None]).squeeze(-1)
        torch.testing.assert_close(logp[row, : len(r)], expected, atol=1e-5, rtol=0)
        # off by one (token t scored by the logits at t) would differ by far more than 1e-5
        shifted = log_probs[0, len(p) :].gather(-1, ids[0, len(p) :, None]).squeeze(-1)
        assert (shifted - expected).abs().max() > 1e-2


@pytest.mark.parametrize("dtype_tol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_logprobs_are_padding_safe(policy, policy_fp32, dtype_tol):
    """Scores of a row alone equal its scores inside a padded, micro-batched batch.

    fp32: equal to round-off. bf16: 2e-2, about 10x the round-off measured between batch shapes.
    """
    name, tol = dtype_tol
    pol = policy_fp32 if name == "fp32" else policy
    prompts, responses = _random_batch(1)
    batch = TokenBatch.from_token_lists(prompts, responses, PAD)
    together = pol.logprobs(batch, micro_batch_size=3)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        alone = pol.logprobs(TokenBatch.from_token_lists([p], [r], PAD))
        torch.testing.assert_close(together[i, : len(r)], alone[0], atol=tol, rtol=0)
    # control: attending to the pads (a missing attention mask) moves the scores far past tol
    leaky = copy.copy(batch)
    leaky.attention_mask = torch.ones_like(batch.attention_mask)
    diff = (pol.logprobs(leaky) - together).abs().max().item()
    assert diff > 10 * tol


def test_reference_is_the_base_model_without_a_second_copy(policy_fp32, tiny_qwen3_moe):
    from transformers import AutoModelForCausalLM

    prompts, responses = _random_batch(2)
    batch = TokenBatch.from_token_lists(prompts, responses, PAD)
    policy_fp32.train_step(batch, group_advantages(torch.arange(8.0), 4))  # adapters now != 0
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe, dtype=torch.float32)
    with torch.no_grad():
        out = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids).logits[:, batch.prompt_len - 1 : -1]
    expected = torch.log_softmax(out.float(), -1).gather(-1, batch.response_ids[..., None])
    expected = expected.squeeze(-1) * batch.response_mask
    torch.testing.assert_close(policy_fp32.reference_logprobs(batch), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(policy_fp32.logprobs(batch), expected, atol=1e-3)
    # one set of base weights: only LoRA tensors train, and each base tensor exists once
    names = [n for n, _ in policy_fp32.model.named_parameters()]
    assert len(names) == len(set(names))
    assert all("lora_" in n for n, p in policy_fp32.model.named_parameters() if p.requires_grad)


def test_micro_batch_size_does_not_change_the_gradient(policy_fp32):
    prompts, responses = _random_batch(3)
    batch = TokenBatch.from_token_lists(prompts, responses, PAD)
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), 4)
    grads, default_size = [], policy_fp32.cfg.micro_batch_size
    for size in (8, 3):
        policy_fp32.cfg.micro_batch_size = size
        policy_fp32.backward(batch, adv)
        grads.append([p.grad.clone() for p in policy_fp32.trainable])
        policy_fp32.optimizer.zero_grad(set_to_none=True)
    policy_fp32.cfg.micro_batch_size = default_size
    for whole, parts in zip(*grads):
        torch.testing.assert_close(parts, whole, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_fixed_batch_training_raises_the_objective(policy):
    """A few GRPO steps on one batch: the loss (fixed logp_old) falls, sum A * logp rises."""
    prompts, responses = _random_batch(4)
    batch = TokenBatch.from_token_lists(prompts, responses, PAD)
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), 4)
    mask = batch.response_mask
    logp_old = policy.logprobs(batch)
    reference = policy.reference_logprobs(batch)
    gen = torch.Generator().manual_seed(0)
    logp_rollout = logp_old + 0.05 * torch.randn(logp_old.shape, generator=gen)

    def objective():
        return ((adv[:, None] * policy.logprobs(batch) * mask).sum() / mask.sum()).item()

    start, losses = objective(), []
    for _ in range(4):
        metrics = policy.train_step(batch, adv, logp_rollout=logp_rollout, logp_old=logp_old)
        losses.append(metrics["loss"])
    end = objective()
    assert losses[-1] < losses[0] - 0.05, losses
    assert end > start + 0.05, (start, end)
    for key in ("is_weight_mean", "rollout_corr/k3_kl", "pg_clipfrac", "grad_norm", "lr"):
        assert key in metrics
    # the adapters moved the policy; the reference (adapters off) did not move
    assert not torch.allclose(policy.logprobs(batch), logp_old, atol=1e-2)
    torch.testing.assert_close(policy.reference_logprobs(batch), reference)
    print(f"\nfixed-batch: loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
          f"objective {start:.4f} -> {end:.4f}")


def test_flipped_advantages_lower_the_objective(policy_fp32):
    """The sign check on the real model: training on -A lowers sum A * logp."""
    prompts, responses = _random_batch(5)
    batch = TokenBatch.from_token_lists(prompts, responses, PAD)
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), 4)
    mask = batch.response_mask

    def objective():
        return ((adv[:, None] * policy_fp32.logprobs(batch) * mask).sum() / mask.sum()).item()

    start = objective()
    policy_fp32.train_step(batch, -adv)
    assert objective() < start


def test_kl_term_uses_the_reference(policy):
    prompts, responses = _random_batch(6)
    batch = TokenBatch.from_token_lists(prompts, responses, PAD)
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), 4)
    policy.train_step(batch, adv)  # move the adapters off their zero start
    policy.grpo.kl_coef = 0.1
    try:
        metrics = policy.backward(batch, adv)
        policy.optimizer.zero_grad(set_to_none=True)
    finally:
        policy.grpo.kl_coef = 0.0
    assert metrics["kl"] > 0


def test_aqn_stream_leaves_the_trainer_weights_untouched(policy):
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    stream = ((n, p.detach()) for n, p in policy.model.named_parameters())
    noisy = dict(aqn_stream(stream, step=50, total_steps=100, cfg=AQNConfig(enabled=True)))
    changed = [n for n in noisy if not torch.equal(noisy[n], before[n])]
    assert changed and all("norm" in n for n in changed)
    for name, param in policy.model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_lora_on_fused_experts_with_gradient_checkpointing(policy_cfg):
    cfg = dataclasses.replace(policy_cfg, gradient_checkpointing=True, micro_batch_size=8,
                       target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
    pol = Policy(cfg, GRPOConfig(group_size=4), MismatchConfig(level="sequence"))
    expert_lora = {n: p.detach().clone() for n, p in pol.model.named_parameters()
                   if p.requires_grad and "experts" in n}
    assert expert_lora, "no LoRA on the fused experts"
    prompts, responses = _random_batch(7)
    batch = TokenBatch.from_token_lists(prompts, responses, PAD)
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), 4)
    logp = pol.logprobs(batch)
    pol.train_step(batch, adv, logp_rollout=logp)
    moved = [n for n, p in pol.model.named_parameters() if n in expert_lora
             and not torch.equal(p, expert_lora[n])]
    assert moved


def test_optimizer_warmup_then_cosine_schedule():
    import math

    from qerl_rollout.rl.policy import build_optimizer

    param = torch.nn.Parameter(torch.zeros(3))
    cfg = PolicyConfig(lr=1e-3, warmup_steps=4, total_steps=14)
    optimizer, scheduler = build_optimizer([param], cfg)
    lrs = []
    for _ in range(14):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warmup
    progress = (9 - 4) / (14 - 4)
    assert lrs[9] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert lrs[-1] < lrs[9] < lrs[4]


def test_from_samples_lays_rollout_logprobs_out_like_the_responses():
    from qerl_rollout.rollout.types import Sample

    samples = [Sample(0, [7, 8, 9], [-0.1, -0.2, -0.3], 4, prompt_token_ids=[1, 2]),
               Sample(0, [5], [-0.5], 4, prompt_token_ids=[3, 4, 6])]
    batch, logp = TokenBatch.from_samples(samples, pad_id=0)
    assert batch.prompt_len == 3
    assert batch.response_ids.tolist() == [[7, 8, 9], [5, 0, 0]]
    expected = torch.tensor([[-0.1, -0.2, -0.3], [-0.5, 0.0, 0.0]], dtype=torch.float32)
    assert torch.equal(logp, expected)
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_dr_grpo_divides_by_the_configured_horizon_not_the_padded_length(policy_fp32):
    """seq-mean-token-sum-norm: the loss is sum / seqs / horizon. With horizon = 2x the batch's
    padded length the loss halves exactly; with horizon 0 (unset) it is the padded length."""
    prompts, responses = _random_batch(5)
    batch = TokenBatch.from_token_lists(prompts, responses, PAD)
    adv = group_advantages(torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0]), 4)
    padded = batch.response_mask.shape[1]
    losses = {}
    for horizon in (0, padded, 2 * padded):
        policy_fp32.grpo = GRPOConfig(group_size=4, agg="seq-mean-token-sum-norm", horizon=horizon)
        losses[horizon] = policy_fp32.backward(batch, adv)["loss"]
        policy_fp32.optimizer.zero_grad(set_to_none=True)
    policy_fp32.grpo = GRPOConfig(group_size=4)
    assert losses[0] == losses[padded]
    assert abs(losses[2 * padded] - losses[padded] / 2) <= 1e-7 * abs(losses[padded])
    assert losses[padded] != 0
