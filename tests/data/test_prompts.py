"""Prompt datasets: jsonl/parquet, chat template, bad rows skipped and counted, resumable order."""

import json
import logging

import pytest

from qerl_rollout.data import PromptDataConfig, PromptDataset, PromptSampler, load_rows
from qerl_rollout.rewards.synthetic import get_task


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3_moe):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3_moe)


GOOD = [{"question": f"What is {i} + {i}?", "gold": str(2 * i)} for i in range(10)]


def _write_jsonl(path, rows, extra_lines=()):
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_and_parquet_load_the_same_rows(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = _write_jsonl(tmp_path / "p.jsonl", GOOD)
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD), parquet)
    assert load_rows(jsonl) == load_rows(parquet) == GOOD
    cfg = PromptDataConfig(path=str(parquet), prompt_field="question", answer_field="gold")
    ds = PromptDataset.from_file(cfg, tokenizer)
    assert len(ds) == 10 and ds[3].answer == "6" and ds[3].prompt == "What is 3 + 3?"


def test_chat_template_applied_when_present(tokenizer):
    cfg = PromptDataConfig(prompt_field="question", answer_field="gold", system_prompt="Be brief.")
    ex = PromptDataset(GOOD[:1], tokenizer, cfg)[0]
    text = tokenizer.decode(ex.prompt_ids)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 0 + 0?"
                    "<|im_end|>\n<|im_start|>assistant\n")
    raw = PromptDataset(GOOD[:1], tokenizer, PromptDataConfig(
        prompt_field="question", answer_field="gold", apply_chat_template=False))[0]
    assert tokenizer.decode(raw.prompt_ids) == "What is 0 + 0?"


def test_chat_message_prompts_and_nested_answer_field(tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "Add 2 and 2."}],
             "reward_model": {"ground_truth": 4}}]  # verl's parquet layout
    cfg = PromptDataConfig(answer_field="reward_model.ground_truth")
    ex = PromptDataset(rows, tokenizer, cfg)[0]
    assert ex.answer == "4" and ex.prompt == "Add 2 and 2."
    assert tokenizer.decode(ex.prompt_ids).endswith("Add 2 and 2.<|im_end|>\n<|im_start|>assistant\n")


def test_bad_rows_are_counted_and_skipped_with_one_warning(tmp_path, tokenizer, caplog):
    bad = [
        {"gold": "1"},  # missing prompt
        {"question": "   ", "gold": "1"},  # empty prompt
        {"question": "What?"},  # missing answer
        {"question": "word " * 400, "gold": "1"},  # too long
        {"question": 42, "gold": "1"},  # not text
    ]
    path = _write_jsonl(tmp_path / "mixed.jsonl", GOOD[:3] + bad, extra_lines=["{not json"])
    cfg = PromptDataConfig(path=str(path), prompt_field="question", answer_field="gold",
                           max_prompt_tokens=64)
    with caplog.at_level(logging.WARNING, logger="qerl_rollout.data.prompts"):
        ds = PromptDataset.from_file(cfg, tokenizer)
    assert len(ds) == 3
    assert sum(ds.skipped.values()) == 6
    assert ds.skipped["missing 'question'"] == 1 and ds.skipped["missing 'gold'"] == 1
    assert ds.skipped["empty prompt"] == 2 and ds.skipped["unreadable row"] == 1
    assert ds.skipped["longer than 64 tokens"] == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "skipped 6 of 9 prompt rows" in warnings[0]
    assert [ex.index for ex in ds] == [0, 1, 2]


def test_no_usable_row_fails_at_load(tokenizer):
    with pytest.raises(ValueError, match="no usable prompt"):
        PromptDataset([{"x": 1}], tokenizer, PromptDataConfig())


def test_sampler_is_deterministic_and_reshuffles_each_epoch(tokenizer):
    ds = PromptDataset(GOOD, tokenizer, PromptDataConfig(prompt_field="question",
                                                         answer_field="gold"))
    def order(sampler, n):
        return [ex.index for _ in range(n) for ex in sampler.next_batch()]

    a, b = order(PromptSampler(ds, 5, seed=1), 4), order(PromptSampler(ds, 5, seed=1), 4)
    assert a == b
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:]) == list(range(10))
    assert a[:10] != a[10:]  # a new permutation per epoch
    assert a != order(PromptSampler(ds, 5, seed=2), 4)
    assert order(PromptSampler(ds, 5, shuffle=False), 2) == list(range(10))


def test_sampler_resumes_from_its_cursor(tokenizer):
    ds = PromptDataset(GOOD, tokenizer, PromptDataConfig(prompt_field="question",
                                                         answer_field="gold"))
    reference = PromptSampler(ds, 3, seed=7)
    expected = [[ex.index for ex in reference.next_batch()] for _ in range(8)]
    first = PromptSampler(ds, 3, seed=7)
    for _ in range(4):  # stop mid-epoch (12 of 10: second epoch, position 2)
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    resumed = PromptSampler(ds, 3, seed=0)
    resumed.load_state_dict(state)
    assert [[ex.index for ex in resumed.next_batch()] for _ in range(4)] == expected[4:]
    with pytest.raises(ValueError):
        PromptSampler(PromptDataset(GOOD[:5], tokenizer, PromptDataConfig(
            prompt_field="question", answer_field="gold")), 3).load_state_dict(state)


def test_synthetic_task_rows_feed_the_dataset(tokenizer):
    rows = get_task("digit_count").rows(16, seed=0)
    ds = PromptDataset(rows, tokenizer, PromptDataConfig())
    assert len(ds) == 16 and all(ex.answer.isdigit() for ex in ds)
    digits = PromptDataset(get_task("digits").rows(4), tokenizer, PromptDataConfig(answer_field=None))
    assert len(digits) == 4 and digits[0].answer is None
