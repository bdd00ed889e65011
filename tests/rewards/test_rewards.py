"""Rewards: math-verify answers, format checks, the registry, and the synthetic tasks."""

import threading

import pytest

from qerl_rollout.rewards import get_reward, register_reward, reward_names, weighted_reward
from qerl_rollout.rewards.format import (
    boxed_format_reward,
    gsm8k_format_reward,
    think_format_reward,
)
from qerl_rollout.rewards.math import extract_answer, last_boxed, math_reward
from qerl_rollout.rewards.synthetic import TASKS, digit_count_reward, digits_reward, get_task

GSM8K_SOLUTION = "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72"


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("48 + 24 = 72 so the answer is \\boxed{72}.", GSM8K_SOLUTION, 1.0),
        ("She sold 72 clips.\n#### 72", GSM8K_SOLUTION, 1.0),
        ("She sold 72 clips in total.", GSM8K_SOLUTION, 1.0),  # last number, GSM8K style
        ("She sold 71 clips.\n#### 71", GSM8K_SOLUTION, 0.0),
        ("#### 1,234", "1234", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\frac{1}{3}}", "\\boxed{\\frac{1}{2}}", 0.0),
        ("I do not know.", "7", 0.0),
        ("first 7 then \\boxed{8}", "8", 1.0),  # the boxed answer wins over the last number
        ("\\boxed{8} but actually 7", "7", 0.0),
    ],
)
def test_math_reward(response, answer, expected):
    assert math_reward("q", response, answer) == expected


def test_math_reward_needs_an_answer():
    with pytest.raises(ValueError):
        math_reward("q", "\\boxed{1}", None)


def test_math_reward_off_the_main_thread():
    """math-verify's SIGALRM timeouts only work in the main thread; workers call from others."""
    results = []
    thread = threading.Thread(target=lambda: results.append(math_reward("q", "#### 72", "72")))
    thread.start()
    thread.join()
    assert results == [1.0]


def test_extractors():
    assert last_boxed("a \\boxed{\\frac{a}{b}} and \\boxed{x^{2}}") == "x^{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert extract_answer("#### 3,000.") == "3000"
    assert extract_answer("no digits", fallback_last_number=True) is None


def test_format_rewards():
    assert boxed_format_reward("q", "so \\boxed{3}") == 1.0
    assert boxed_format_reward("q", "so \\boxed{ }") == 0.0
    assert gsm8k_format_reward("q", "work\n#### 12") == 1.0
    assert gsm8k_format_reward("q", "the answer is 12") == 0.0
    assert think_format_reward("q", "<think>hmm</think> 12") == 1.0
    assert think_format_reward("q", "12 <think>hmm</think>") == 0.0


def test_registry_names_and_module_function(tmp_path, monkeypatch):
    for name in ("math", "boxed_format", "gsm8k_format", "think_format", *TASKS):
        assert name in reward_names()
    assert get_reward("math") is math_reward
    (tmp_path / "user_rewards.py").write_text(
        "def length_reward(prompt, response, answer=None, **meta):\n"
        "    return float(len(response))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_reward("user_rewards:length_reward")
    assert fn("p", "abcd", None, response_ids=[1, 2]) == 4.0
    with pytest.raises(AttributeError):
        get_reward("user_rewards:missing")
    with pytest.raises(KeyError):
        get_reward("no_such_reward")


def test_register_and_weighted_sum():
    @register_reward("test_constant_half")
    def half(prompt, response, answer=None, **meta):
        return 0.5

    assert get_reward("test_constant_half") is half
    with pytest.raises(ValueError):
        register_reward("math")(half)
    combined = weighted_reward({"math": 1.0, "boxed_format": 0.1, "test_constant_half": 2.0})
    assert combined("q", "\\boxed{4}", "4") == pytest.approx(1.0 + 0.1 + 1.0)
    assert combined("q", "\\boxed{5}", "4") == pytest.approx(0.1 + 1.0)


# --- synthetic tasks -------------------------------------------------------------------------


def test_digits_reward_gives_dense_partial_credit():
    assert digits_reward("p", "123 456") == 1.0
    assert digits_reward("p", "12ab") == 0.5
    assert digits_reward("p", "abc") == 0.0
    assert digits_reward("p", "") == 0.0
    # more digits, more reward: a gradient a random policy can climb
    scores = [digits_reward("p", "x" * (4 - k) + "7" * k) for k in range(5)]
    assert scores == sorted(scores) and len(set(scores)) == 5


def test_digit_count_reward():
    assert digit_count_reward("p", "12345", "5") == 1.0
    assert digit_count_reward("p", "1234", "5") == pytest.approx(0.8)
    assert digit_count_reward("p", "1234567", "5") == pytest.approx(0.6)
    assert digit_count_reward("p", "no digits", "5") == 0.0
    assert digit_count_reward("p", "9" * 20, "5") == 0.0


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_rows_are_deterministic_and_fit_their_reward(name):
    task = get_task(name)
    rows = task.rows(20, seed=3)
    assert rows == task.rows(20, seed=3) and rows != task.rows(20, seed=4)
    for row in rows:
        assert row["prompt"].strip()
        assert 0.0 <= task.reward(row["prompt"], "12 ab 3", row["answer"]) <= 1.0


def test_random_tokens_already_earn_digits_reward(tiny_qwen3_moe):
    """A uniformly random policy must score well above 0 and below 1 (room to learn)."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3_moe)
    rng = random.Random(0)
    scores = [digits_reward("p", tok.decode([rng.randrange(3, len(tok)) for _ in range(8)]))
              for _ in range(400)]
    mean = sum(scores) / len(scores)
    assert 0.15 < mean < 0.6, mean
