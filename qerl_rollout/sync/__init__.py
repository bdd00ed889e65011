"""Weight sync: merge LoRA, requantize through the plan, bucket, stream into the engine.

`merge`, `stream` and `bucket` are pure (torch only); `weight_sync` drives them against a
`WeightReceiver`. Transports across processes live in `qerl_rollout.workers`.
"""
