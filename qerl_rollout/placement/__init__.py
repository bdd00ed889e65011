"""Where a run's trainer and engines live, behind one interface the training loop speaks.

`interface`: the `Trainer`, `Rollout` and `Placement` Protocols.
`trainer`: `PolicyTrainer`, the one trainer wrapper (a Policy and its weight syncs), used in
this process by `local` and in every Ray trainer rank (`workers.trainer.TrainerWorker`).
`local`: `LocalPlacement`, everything in this process (`placement.mode=local`).
`ray`: `RayPlacement` (cluster, placement group, trainer workers, engines) and `EnginePool`
(M engines behind one generate / score / receiver), for split and colocated.
`phases`: what each phase of a colocated step needs on a shared GPU, and the moves between.

Nothing is imported here: `ray` pulls in Ray, which the local placement never needs.
"""
