"""qerl_rollout: fast GRPO rollouts for MoE LLMs from an FP8/NVFP4 copy of the policy.

The public entry points are importable from the top level; they are loaded lazily so that
`import qerl_rollout` does not pull in vLLM (only `RolloutEngine` needs it).
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "QuantConfig": "qerl_rollout.rollout.types",
    "RolloutEngine": "qerl_rollout.rollout.engine",
    "prepare_export": "qerl_rollout.rollout.engine",
    "Sample": "qerl_rollout.rollout.types",
    "WeightSync": "qerl_rollout.sync.weight_sync",
    "SyncReport": "qerl_rollout.sync.weight_sync",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qerl_rollout' has no attribute {name!r}")
