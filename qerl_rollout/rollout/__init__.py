"""The rollout engine: the only package that imports vLLM (lazily, in `engine.py`)."""

from qerl_rollout.rollout.types import EngineStateError, Sample, WeightReceiver

__all__ = ["EngineStateError", "Sample", "WeightReceiver"]
