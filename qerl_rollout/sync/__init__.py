"""Weight sync: merge LoRA, requantize through the plan, bucket, stream into the engine.

`merge` is pure (torch only); `weight_sync` drives it and the wire format (`qerl_rollout.wire`:
units, encoding, buckets) against a `wire.receiver.WeightReceiver`; `sharded` is the FSDP2
ranks' form, `verify` the push check. Transports across processes live in `qerl_rollout.workers`.
"""
