"""Builders for the tiny checkpoints (see the package docstring)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS_FILES = ("corpus_prose.txt", "corpus_math.txt")

# Larger Qwen3-MoE shapes (overrides of the `qwen3_moe` family) for benchmarks and the CPU
# int8 run: 0.43B / 0.53B parameters with the experts holding 95% of them.
_MID_MOE = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                intermediate_size=512, moe_intermediate_size=512, num_experts=32, num_experts_per_tok=4)
SIZES = {
    "tiny": {},
    "moe_430m": {**_MID_MOE, "num_hidden_layers": 8},
    "moe_1gb": {**_MID_MOE, "num_hidden_layers": 10},
}

# Shared by every family: small enough for a 2-core CPU, large enough for vLLM's CPU kernels.
_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=0,
)


def _qwen3_moe() -> dict:
    return dict(
        model_type="qwen3_moe",
        num_hidden_layers=2,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        mlp_only_layers=[],
    )


def _qwen2_moe() -> dict:
    return dict(
        model_type="qwen2_moe",
        num_hidden_layers=2,
        intermediate_size=512,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=256,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        norm_topk_prob=False,
        mlp_only_layers=[],
        qkv_bias=True,
    )


def _mixtral() -> dict:
    return dict(
        model_type="mixtral",
        num_hidden_layers=2,
        intermediate_size=128,
        num_local_experts=4,
        num_experts_per_tok=2,
    )


def _deepseek_v3() -> dict:
    # Layer 0 dense (first_k_dense_replace=1), layer 1 MoE with one shared expert and the
    # sigmoid router with e_score_correction_bias; MLA attention with small ranks.
    return dict(
        model_type="deepseek_v3",
        num_hidden_layers=2,
        intermediate_size=512,
        moe_intermediate_size=128,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        topk_method="noaux_tc",      # vLLM creates e_score_correction_bias only for this method
        scoring_func="sigmoid",
        routed_scaling_factor=1.0,
        norm_topk_prob=True,
        q_lora_rank=None,
        kv_lora_rank=256,            # vLLM's MLA supports kv_lora_rank + rope dim in {320, 512, 576}
        qk_nope_head_dim=64,
        qk_rope_head_dim=64,
        v_head_dim=64,
        num_key_value_heads=4,
        rope_interleave=True,
    )


def _olmoe() -> dict:
    # OLMoE: q/k norms over the whole projection, softmax router without renormalization.
    return dict(
        model_type="olmoe",
        num_hidden_layers=2,
        intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    )


def _qwen3_dense() -> dict:
    return dict(model_type="qwen3", num_hidden_layers=2, intermediate_size=512)


FAMILIES = {
    "qwen3_moe": _qwen3_moe,
    "qwen2_moe": _qwen2_moe,
    "mixtral": _mixtral,
    "deepseek_v3": _deepseek_v3,
    "olmoe": _olmoe,
    "qwen3": _qwen3_dense,
}


def tiny_config(family: str, **overrides):
    """The transformers config of a tiny `family` model (`overrides` replace any field)."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {sorted(FAMILIES)}")
    fields = {**_COMMON, **FAMILIES[family](), **overrides}
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def build_tokenizer(out_dir: str | Path):
    """Train the byte-level BPE tokenizer on the shipped corpus and save it to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    here = Path(__file__).parent
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(here / f) for f in _CORPUS_FILES], trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    hf.chat_template = CHATML_TEMPLATE
    hf.save_pretrained(str(out_dir))
    return hf


def build_tiny_model(family: str, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random-weight `family` checkpoint (BF16 safetensors + tokenizer) to `out_dir`.

    Weights are drawn from N(0, 0.02) by transformers' initializer under `torch.manual_seed(seed)`,
    so the same (family, seed, overrides) always gives the same bytes.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(family, **overrides)
    tokenizer = build_tokenizer(out)
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
    (out / "qerl_tiny.json").write_text(json.dumps({"family": family, "seed": seed}))
    return out
