"""Prompt datasets from jsonl or parquet, tokenized once, served in a resumable shuffled order.

`load_rows(path)` reads a .jsonl (one JSON object a line) or .parquet file into dicts.
`PromptDataset` turns rows into `PromptExample`s: it reads the prompt from `prompt_field` and
the reference answer from `answer_field` (dotted paths such as "reward_model.ground_truth"
reach into nested dicts, as in verl's parquet files). A prompt is a string or a list of chat
messages; when the tokenizer has a chat template it is applied with the generation prompt
(a string becomes one user message, after `system_prompt` if set); without one the text is
tokenized as is. Bad rows — unreadable JSON, a missing field, an empty prompt, a prompt longer
than `max_prompt_tokens` — are counted per reason and skipped with one warning that says how
many; only a dataset with no usable row is an error, and that happens at load, never mid-run.

`PromptSampler` deals batches from a permutation per epoch drawn from (seed, epoch), so the
order is fixed by the seed; its cursor (epoch, position) round-trips through
`state_dict` / `load_state_dict`, and a restored sampler continues with the same batches.
Left out: streaming datasets larger than memory, and multi-file globs.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
_MISSING = object()


@dataclass
class PromptDataConfig:
    """Where prompts come from and how they become token ids."""

    path: str = ""
    prompt_field: str = "prompt"
    answer_field: str | None = "answer"  # None: no reference answers
    max_prompt_tokens: int = 512
    apply_chat_template: bool = True
    system_prompt: str | None = None
    shuffle: bool = True
    seed: int = 0


@dataclass
class PromptExample:
    """One usable prompt: its text as given, token ids ready for generation, the answer."""

    prompt: str
    prompt_ids: list[int]
    answer: str | None
    index: int  # row number in the source file
    meta: dict[str, Any] = field(default_factory=dict)


def load_rows(path: str | Path) -> list[dict | None]:
    """Rows of a .jsonl or .parquet file; a line that is not a JSON object becomes None."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: expected .jsonl or .parquet")
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        rows.append(row if isinstance(row, dict) else None)
    return rows


def get_field(row: dict, dotted: str):
    """row["a"]["b"] for "a.b", or _MISSING."""
    value: Any = row
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def prompt_text(prompt: str | list[dict]) -> str:
    """The text of a prompt value: the string, or the messages' contents joined by newlines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt)


def encode_prompt(prompt: str | list[dict], tokenizer, cfg: PromptDataConfig) -> list[int]:
    """Token ids of a prompt, through the chat template when the tokenizer has one."""
    if cfg.apply_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if cfg.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt_text(prompt), add_special_tokens=False)["input_ids"]


class PromptDataset:
    """Validated, tokenized prompts; `len()`, indexing, and `skipped` (reason -> count)."""

    def __init__(self, rows: list[dict | None], tokenizer, cfg: PromptDataConfig):
        self.cfg = cfg
        self.examples: list[PromptExample] = []
        self.skipped: Counter[str] = Counter()
        for index, row in enumerate(rows):
            example, reason = self._example(index, row, tokenizer)
            if example is None:
                self.skipped[reason] += 1
            else:
                self.examples.append(example)
        self._report(len(rows))

    @classmethod
    def from_file(cls, cfg: PromptDataConfig, tokenizer) -> PromptDataset:
        return cls(load_rows(cfg.path), tokenizer, cfg)

    def _example(self, index: int, row, tokenizer) -> tuple[PromptExample | None, str]:
        if row is None:
            return None, "unreadable row"
        prompt = get_field(row, self.cfg.prompt_field)
        if prompt is _MISSING or prompt is None:
            return None, f"missing {self.cfg.prompt_field!r}"
        if not isinstance(prompt, (str, list)) or not prompt_text(prompt).strip():
            return None, "empty prompt"
        answer = None
        if self.cfg.answer_field:
            answer = get_field(row, self.cfg.answer_field)
            if answer is _MISSING or answer is None:
                return None, f"missing {self.cfg.answer_field!r}"
            answer = str(answer)
        prompt_ids = encode_prompt(prompt, tokenizer, self.cfg)
        if len(prompt_ids) > self.cfg.max_prompt_tokens:
            return None, f"longer than {self.cfg.max_prompt_tokens} tokens"
        return PromptExample(prompt_text(prompt), prompt_ids, answer, index), ""

    def _report(self, total: int) -> None:
        if not self.examples:
            raise ValueError(f"no usable prompt in {total} rows: {dict(self.skipped)}")
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
            logger.warning(
                "skipped %d of %d prompt rows (%s)", sum(self.skipped.values()), total, reasons
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PromptExample:
        return self.examples[i]


class PromptSampler:
    """Endless batches of examples, reshuffled each epoch from (seed, epoch); resumable."""

    def __init__(self, dataset: PromptDataset, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.dataset, self.batch_size = dataset, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[PromptExample]:
        """The next `batch_size` examples; a batch may run across an epoch boundary."""
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            batch.append(self.dataset[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "size": len(self.dataset)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("size", len(self.dataset)) != len(self.dataset):
            raise ValueError(f"cursor is for {state['size']} prompts, dataset has {len(self.dataset)}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)
