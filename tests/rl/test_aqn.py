"""AQN: the exact sigma schedule, and noise that touches only norm weights of a copy."""

import pytest
import torch

from qerl_rollout.rl.aqn import AQNConfig, apply_aqn, aqn_sigma, aqn_stream


def qerl_schedule(start, end, stages):
    """QeRL's get_sigma_schedule: stages - 1 geometric values from start to end."""
    return [start * (end / start) ** (i / (stages - 2)) for i in range(stages - 1)]


def test_schedule_is_zero_in_first_interval_then_geometric():
    total, K = 100, 10
    trend = qerl_schedule(1e-2, 1e-4, K)
    for step in range(total + 1):
        interval = min(step // (total // K), K - 1)
        expected = 0.0 if interval == 0 else trend[interval - 1]
        assert aqn_sigma(step, total) == pytest.approx(expected, rel=1e-12, abs=0)
    assert aqn_sigma(9, total) == 0.0
    assert aqn_sigma(10, total) == pytest.approx(1e-2, rel=1e-12)
    assert aqn_sigma(50, total) == pytest.approx(1e-3, rel=1e-12)  # interval 5: halfway in log
    assert aqn_sigma(99, total) == pytest.approx(1e-4, rel=1e-12)
    assert aqn_sigma(500, total) == pytest.approx(1e-4, rel=1e-12)  # past the end: last value


def test_schedule_with_uneven_intervals():
    # 25 steps, K = 10: interval = floor(step * 10 / 25); step 2 -> 0, step 3 -> 1, step 24 -> 9
    assert aqn_sigma(2, 25) == 0.0
    assert aqn_sigma(3, 25) == pytest.approx(1e-2)
    assert aqn_sigma(24, 25) == pytest.approx(1e-4)


def _weights():
    torch.manual_seed(0)
    return [
        ("model.layers.0.input_layernorm.weight", torch.ones(4096)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8)),
        ("model.layers.0.self_attn.q_norm.weight", torch.ones(64, dtype=torch.bfloat16)),
        ("model.layers.0.mlp.gate.weight", torch.randn(8, 16)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(8)),
        ("model.norm.weight", torch.ones(4096)),
    ]


def test_noise_only_on_norm_weights_and_inputs_untouched():
    original = _weights()
    before = [(n, t.clone()) for n, t in original]
    out = dict(apply_aqn(original, 0.01, torch.Generator().manual_seed(0)))
    for (name, tensor), (_, copy) in zip(original, before):
        assert torch.equal(tensor, copy), f"{name} was mutated"
    norm = out["model.layers.0.input_layernorm.weight"]
    assert norm.dtype == torch.float32
    assert (norm - 1).std().item() == pytest.approx(0.01, rel=0.05)  # 4096 draws: ~1.1% s.e.
    assert not torch.equal(out["model.norm.weight"], torch.ones(4096))
    assert out["model.layers.0.self_attn.q_norm.weight"].dtype == torch.bfloat16
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate.weight",
                 "model.layers.0.self_attn.q_proj.bias"):
        assert out[name] is dict(original)[name]


def test_exclude_and_zero_sigma_pass_through():
    original = _weights()
    out = dict(apply_aqn(original, 0.01, torch.Generator().manual_seed(0),
                         exclude=("input_layernorm",)))
    assert out["model.layers.0.input_layernorm.weight"] is original[0][1]
    assert all(a[1] is b[1] for a, b in zip(original, apply_aqn(original, 0.0)))


def test_stream_is_reproducible_per_step_and_off_by_default():
    cfg = AQNConfig(enabled=True)
    a = dict(aqn_stream(_weights(), step=50, total_steps=100, cfg=cfg))
    b = dict(aqn_stream(_weights(), step=50, total_steps=100, cfg=cfg))
    c = dict(aqn_stream(_weights(), step=51, total_steps=100, cfg=cfg))
    name = "model.norm.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    assert (a[name] - 1).std().item() == pytest.approx(1e-3, rel=0.05)
    off = dict(aqn_stream(_weights(), 50, 100, AQNConfig()))
    assert torch.equal(off[name], torch.ones(4096))
