"""The local placement: trainer and engine(s) in this process (`placement.mode=local`).

`LocalPlacement` offers what the training loop needs from any placement (the Ray twin is
`workers.placement.RayPlacement`):

    trainer    train_step(batch, advantages, logp_rollout) -> metrics
               push(target, noise=, version=, full=, digest=) -> SyncReport  (noise: rl.aqn.NormNoise)
               reference_logprobs(probe, scheme) -> per-token logprobs, or None
               state_dict() / load_state_dict(state) / save_adapter(path)
    rollout    generate(prompt_ids, **sampling) -> [Sample], score(...), score_each(...), receiver
    baseline   the BF16 engine, or None
    phase(name)  nothing to do in one process
    close()

`LocalTrainer` is a `rl.policy.Policy` plus one `WeightSync` per engine it feeds ("rollout",
"baseline"); `policy` stays reachable for what needs the model itself (router statistics).
"""

from __future__ import annotations

from pathlib import Path

from qerl_rollout.phases import check_phase


class LocalRollout:
    """The rollout engine in this process (the in-process twin of `workers.placement.EnginePool`);
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


class LocalTrainer:
    """A `Policy` and the weight syncs into its engines, behind the trainer interface."""

    def __init__(self, policy, bucket_bytes: int):
        self.policy = policy
        self.bucket_bytes = bucket_bytes
        self.syncs = {}

    def connect(self, target: str, receiver) -> None:
        from qerl_rollout.sync.weight_sync import WeightSync

        self.syncs[target] = WeightSync(receiver, bucket_bytes=self.bucket_bytes)

    def train_step(self, batch, advantages, logp_rollout) -> dict:
        return self.policy.train_step(batch, advantages, logp_rollout=logp_rollout)

    def push(self, target: str = "rollout", *, noise=None, version: int | None = None,
             full: bool = False, digest: bool = False):
        return self.syncs[target].push(self.policy.model, norm_transform=noise and noise.transform(),
                                       version=version, full=full, digest=digest)

    def reference_logprobs(self, probe, scheme: str):
        """The push check's reference: the probe under the policy's QDQ copy (`sync.verify`)."""
        from qerl_rollout.sync.verify import reference_logprobs

        return reference_logprobs(self.policy.model, scheme, probe)

    def state_dict(self) -> dict:
        return self.policy.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state)

    def save_adapter(self, path) -> None:
        self.policy.save_adapter(path)

    def close(self) -> None:
        pass


class LocalPlacement:
    def __init__(self, cfg, model_dir: Path, policy_cfg, grpo, *, with_baseline: bool, engine_options: dict):
        from qerl_rollout.config import QuantConfig
        from qerl_rollout.rl.policy import Policy
        from qerl_rollout.rollout.engine import set_engine_env

        r = cfg.rollout
        self.baseline = self.rollout = None
        self.trainer = LocalTrainer(Policy(policy_cfg, grpo, cfg.mismatch), r.bucket_mb << 20)
        set_engine_env(r.kv_cache_gib)
        try:
            self.rollout = LocalRollout(model_dir, QuantConfig(r.scheme, r.mode), **engine_options)
            self.trainer.connect("rollout", self.rollout.receiver)
            if with_baseline:
                self.baseline = LocalRollout(model_dir, QuantConfig("bf16", r.mode), **engine_options)
                self.trainer.connect("baseline", self.baseline.receiver)
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
