"""The T != 1 contract: the engine's sampled-token logprobs are the trainer's log-softmax(logits / T).

TIS weights are pi_old / pi_rollout per token, so both sides must describe the same
distribution: the one sampled from. vLLM returns `processed_logprobs` (after temperature);
`Policy` divides its logits by `PolicyConfig.temperature`. On the unquantized tiny model (BF16
engine and trainer holding the same weights; LoRA B starts at 0) they agree up to BF16 kernel
noise. A logit error dz moves a log-softmax(z / T) by (dz_i - E_p[dz]) / T, at most
2 max|dz| / T: measured on this test's prompts with sampling seeds 0-7 (AMD EPYC Zen 3), the
max gap was 0.006-0.021 at T = 1 and 0.024-0.057 at T = 0.7 (2 x 0.021 / 0.7 = 0.059), so
ATOL = 0.08. A trainer scoring at T = 1 instead was off by 0.29-0.43 over the same seeds,
more than 3 x ATOL, which the second check asserts, so the comparison can fail. (Before each
prompt had its own sample streams, this seed's samples gave 0.05 at most.)
"""

from __future__ import annotations

from qerl_rollout import QuantConfig, RolloutEngine
from qerl_rollout.rl.policy import Policy, PolicyConfig, TokenBatch

T = 0.7
ATOL = 0.08


def _max_gap(policy_logp, batch, samples) -> float:
    gaps = [abs(policy_logp[i, j].item() - lp)
            for i, s in enumerate(samples) for j, lp in enumerate(s.logprobs)]
    return max(gaps)


def test_engine_logprobs_are_the_trainers_at_the_sampling_temperature(tiny_qwen3_moe):
    engine = RolloutEngine(tiny_qwen3_moe, QuantConfig("bf16"), max_model_len=128)
    samples = engine.generate([[5, 6, 7, 8], [300, 301, 302]], n=4, max_tokens=12, temperature=T,
                              seed=3, ignore_eos=True)
    engine.close()
    batch, _ = TokenBatch.from_samples(samples, pad_id=0)
    at_t = Policy(PolicyConfig(model_path=str(tiny_qwen3_moe), device="cpu", temperature=T))
    gap = _max_gap(at_t.logprobs(batch), batch, samples)
    print(f"engine vs trainer at T={T}: max |dlogp| = {gap:.4f}")
    assert gap < ATOL
    at_one = Policy(PolicyConfig(model_path=str(tiny_qwen3_moe), device="cpu", temperature=1.0))
    assert _max_gap(at_one.logprobs(batch), batch, samples) > 3 * ATOL
