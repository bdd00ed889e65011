"""Tiny random-weight models and a locally trained tokenizer, for tests and CPU demos.

Nothing here touches the network. `build_tokenizer` trains a byte-level BPE tokenizer with the
`tokenizers` library on the text files shipped beside this module and saves it as a Hugging
Face tokenizer (with a ChatML chat template). `build_tiny_model` instantiates one of the
supported architectures from a small config with seeded random weights and writes a normal
`save_pretrained` checkpoint (safetensors, BF16) that both transformers and vLLM load.

Sizes are just large enough that vLLM's CPU backend accepts them: hidden 256, head_dim 64,
expert intermediate 128, two or three layers. The checkpoints are deterministic for a given
(family, seed), so a cache keyed on those is safe. `SIZES` names larger Qwen3-MoE shapes
(`moe_430m`, `moe_1gb`) for benchmarks and the CPU int8 run.
"""

from qerl_rollout.tiny.models import FAMILIES, SIZES, build_tiny_model, build_tokenizer, tiny_config

__all__ = ["FAMILIES", "SIZES", "build_tiny_model", "build_tokenizer", "tiny_config"]
