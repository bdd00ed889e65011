"""Prompt datasets (jsonl / parquet) with a resumable shuffled sampler.

The synthetic CPU tasks live in `qerl_rollout.rewards.synthetic` beside their rewards; their
`rows(n, seed)` feed `PromptDataset` like any file's rows.
"""

from qerl_rollout.data.prompts import (
    PromptDataConfig,
    PromptDataset,
    PromptExample,
    PromptSampler,
    load_rows,
)

__all__ = ["PromptDataConfig", "PromptDataset", "PromptExample", "PromptSampler", "load_rows"]
