"""The local placement: trainer and engine(s) in this process (`placement.mode=local`).

`LocalPlacement` implements `placement.interface.Placement` (its Ray twin is
`placement.ray.RayPlacement`): its trainer is one `placement.trainer.PolicyTrainer` (rank 0 of
1, the same wrapper each Ray trainer rank is), its rollout and baseline `LocalRollout`s, one
vLLM engine each; `phase(name)` moves nothing in one process.
"""

from __future__ import annotations

from pathlib import Path

from qerl_rollout.placement.phases import check_phase
from qerl_rollout.placement.trainer import PolicyTrainer


class LocalRollout:
    """The rollout engine in this process (the in-process twin of `placement.ray.EnginePool`);
    this process is also the driver, so it makes the engine's export first (`prepare_export`)."""

    def __init__(self, model_dir, quant, **engine_kwargs):
        from qerl_rollout.rollout.engine import RolloutEngine, prepare_export

        self.engine = RolloutEngine(model_dir, quant, export_dir=prepare_export(model_dir, quant),
                                    **engine_kwargs)
        self.receiver = self.engine

    def generate(self, prompt_token_ids, **sampling):
        return self.engine.generate(prompt_token_ids, **sampling)

    def score(self, prompt_token_ids, response_token_ids):
        return self.engine.score(prompt_token_ids, response_token_ids)

    def score_each(self, prompt_token_ids, response_token_ids):
        return [self.engine.score(prompt_token_ids, response_token_ids)]

    def close(self):
        self.engine.close()


class LocalPlacement:
    """A `PolicyTrainer`, the rollout engine and the BF16 baseline engine (when asked) in this process."""

    def __init__(self, cfg, model_dir: Path, policy_cfg, grpo, *, with_baseline: bool, engine_options: dict):
        from qerl_rollout.config import QuantConfig
        from qerl_rollout.rl.policy import Policy
        from qerl_rollout.rollout.engine import set_engine_env

        r = cfg.rollout
        self.baseline = self.rollout = None
        self.trainer = PolicyTrainer(Policy(policy_cfg, grpo, cfg.mismatch))
        set_engine_env(r.kv_cache_gib)
        try:
            self.rollout = LocalRollout(model_dir, QuantConfig(r.scheme, r.mode, r.precision), **engine_options)
            self.trainer.connect("rollout", self.rollout.receiver, bucket_bytes=r.bucket_mb << 20,
                                 delta=cfg.sync.delta)
            if with_baseline:
                self.baseline = LocalRollout(model_dir, QuantConfig("bf16", r.mode),
                                             **{**engine_options, "return_routes": False})   # routes: rollout only
                self.trainer.connect("baseline", self.baseline.receiver, bucket_bytes=r.bucket_mb << 20,
                                     delta=cfg.sync.delta)
        except BaseException:
            self.close()
            raise

    def phase(self, name: str) -> None:
        """Nothing moves in one process (the name is still checked, as colocated would)."""
        check_phase(name)

    def close(self) -> None:
        for engine in (self.baseline, self.rollout):
            if engine is not None:
                engine.close()
