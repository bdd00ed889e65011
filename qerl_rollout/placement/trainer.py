"""`PolicyTrainer`: the one trainer wrapper, a `rl.policy.Policy` plus one `WeightSync` per
engine set it feeds ("rollout", "baseline"), behind `interface.Trainer`.

How it works. The local placement holds one (rank 0 of 1) and calls it directly; on Ray each
FSDP2 rank is one (`workers.trainer.TrainerWorker` adds the actor's process group and its
transport) and `workers.trainer.RayTrainer` calls all of them. What differs by rank lives
here, once: a sharded rank's sync quantizes its own rows and only rank 0 talks to the
engines; every rank writes and reads its own shards of a checkpoint; a sharded trainer holds
no whole policy for the push check's reference. `policy` stays reachable for what needs the model itself
(router statistics, local placement only).
"""

from __future__ import annotations

from pathlib import Path

from qerl_rollout.rl.policy import Policy
from qerl_rollout.sync.weight_sync import WeightSync
from qerl_rollout.wire.receiver import WeightReceiver


class PolicyTrainer:
    def __init__(self, policy: Policy | None = None, *, rank: int = 0, world: int = 1):
        self.policy = policy
        self.rank, self.world = rank, world
        self.syncs: dict[str, WeightSync] = {}

    def connect(self, target: str, receiver: WeightReceiver | None, *, bucket_bytes: int,
                scheme: str | None = None, precision=None, retry: bool = True, delta: bool = False) -> None:
        """A sync into `receiver` (rank 0; None on the other ranks of a sharded trainer, which
        name the engine's `scheme` and `precision`). `retry=False` where the caller retries on
        every rank; `delta`: delta pushes (`sync.delta`)."""
        self.syncs[target] = WeightSync(receiver, sharded=self.world > 1, scheme=scheme, precision=precision,
                                        bucket_bytes=bucket_bytes, retry_full_on_transport_error=retry,
                                        delta=delta)

    def train_step(self, batch, advantages, logp_rollout) -> dict:
        return self.policy.train_step(batch, advantages, logp_rollout=logp_rollout)

    def push(self, target: str = "rollout", *, noise=None, version: int | None = None,
             full: bool = False, digest: bool = False):
        return self.syncs[target].push(self.policy.model, norm_transform=noise and noise.transform(),
                                       version=version, full=full, digest=digest)

    def reference_logprobs(self, probe, scheme: str) -> list[list[float]] | None:
        """The push check's reference: the probe under the policy's QDQ copy (`sync.verify`);
        None on a sharded trainer, which holds no whole policy to copy."""
        if self.world > 1:
            return None
        from qerl_rollout.sync.verify import reference_logprobs

        return reference_logprobs(self.policy.model, scheme, probe, self.syncs["rollout"].precision)

    def save_state(self, path: str | Path) -> None:
        """This rank's shards into checkpoint directory `path` (`Policy.save_state`; a
        collective on a sharded trainer: every rank calls it)."""
        self.policy.save_state(path)

    def load_state(self, path: str | Path) -> None:
        self.policy.load_state(path)

    def lora_tensors(self) -> dict | None:
        """The LoRA tensors whole on rank 0, None on the others (a collective when sharded)."""
        lora = self.policy.lora_tensors()
        return lora if self.rank == 0 else None

    def save_adapter(self, path: str | Path) -> None:
        self.policy.save_adapter(path)

    def to_device(self, device: str) -> None:
        """Move this rank's state; the syncs keep their delta record (`WeightSync.rebase`)."""
        from qerl_rollout.sync.merge import fingerprint

        before = fingerprint(self.policy.model)
        self.policy.to_device(device)
        after = fingerprint(self.policy.model)
        for sync in self.syncs.values():
            sync.rebase(before, after)

    def close(self) -> None:
        """Nothing to release: the policy goes with this object (an actor: with its process)."""
