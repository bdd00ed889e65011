"""The wire format between trainer and engine: what a push carries, and who may receive it.

`stream` cuts trainer tensors into checkpoint pieces and engine-layer units and encodes a unit
into its payload (compressed-tensors tensors for quantized layers; `decode_payload` is an
emulate engine's inverse), `bucket` groups payloads for a transport and digests them, and
`receiver.WeightReceiver` is the engine side's protocol. Pure torch: `sync` (the sender) and
`rollout` (the receiver) both import it, and neither imports the other.
"""
