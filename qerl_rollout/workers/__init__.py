"""Ray actors and transports; with `placement.ray`, the only code that imports ray
(ARCHITECTURE.md, "The package map").

`rollout_worker`: the `RolloutWorker` actor that owns a vLLM `RolloutEngine`.
`trainer`: the `TrainerWorker` actor (one FSDP2 rank: a `placement.trainer.PolicyTrainer` with
its process group) and `RayTrainer`, which drives N of them.
`transport`: `RayWeightReceiver`, the trainer-side end of a weight push through Ray's
object store, and the GPU transports' design.
`collective`: `CollectiveWeightReceiver`, the same push over a gloo group from the trainer
straight into each engine actor (`rollout.transport=collective`).
"""

from qerl_rollout.workers.collective import CollectiveWeightReceiver
from qerl_rollout.workers.rollout_worker import (
    RolloutWorker,
    RolloutWorkerActor,
    start_rollout_worker,
)
from qerl_rollout.workers.transport import (
    PackedBucket,
    RayWeightReceiver,
    pack_bucket,
    unpack_bucket,
)

__all__ = ["CollectiveWeightReceiver", "PackedBucket", "RayWeightReceiver", "RolloutWorker", "RolloutWorkerActor",
           "pack_bucket", "start_rollout_worker", "unpack_bucket"]
