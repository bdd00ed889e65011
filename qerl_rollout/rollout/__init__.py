"""The rollout engine: the only package that imports vLLM (lazily, in `engine.py`)."""

from qerl_rollout.rollout.types import EngineStateError, QuantConfig, Sample
from qerl_rollout.wire.receiver import WeightReceiver

__all__ = ["EngineStateError", "QuantConfig", "Sample", "WeightReceiver"]
