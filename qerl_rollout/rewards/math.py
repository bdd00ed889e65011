"""Math answer rewards checked with math-verify.

The reference answer may be a bare value ("42", "\\frac{1}{2}"), a GSM8K solution whose last
line is "#### 42", or LaTeX with \\boxed{}. The response's answer is, in order of preference,
its last \\boxed{...}, its "#### value" line, or (GSM8K style, `fallback_last_number=True`) its
last number. Both are parsed by math-verify and compared with `verify`, which handles numeric
equality (1/2 == 0.5), LaTeX normalization and units. Reward 1.0 if equal, else 0.0.

math-verify's timeouts use SIGALRM, which only works in a process's main thread; off the main
thread they are disabled. Left out: partial credit, and multi-answer (set) questions.
"""

from __future__ import annotations

import re
import threading

_GSM8K_ANSWER = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def gsm8k_answer(text: str) -> str | None:
    """The value after the last "####", commas and trailing period removed, or None."""
    found = _GSM8K_ANSWER.findall(text)
    if not found:
        return None
    return found[-1].strip().replace(",", "").rstrip(".").strip() or None


def last_number(text: str) -> str | None:
    """The last number in `text` (thousands separators dropped), or None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def extract_answer(text: str, fallback_last_number: bool = True) -> str | None:
    """The final answer a text states: last \\boxed{}, else "#### x", else its last number."""
    for extractor in (last_boxed, gsm8k_answer):
        found = extractor(text)
        if found is not None:
            return found
    return last_number(text) if fallback_last_number else None


def _parse(value: str):
    from math_verify import parse

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return parse(f"${value}$", parsing_timeout=timeout)


def answers_match(predicted: str, reference: str) -> bool:
    """True when math-verify finds the two answer strings equal."""
    from math_verify import verify

    gold, pred = _parse(reference), _parse(predicted)
    if not gold or not pred:
        return predicted.strip() == reference.strip()
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return bool(verify(gold, pred, timeout_seconds=timeout))


def math_reward(prompt: str, response: str, answer: str | None, **meta) -> float:
    """1.0 if the response's final answer equals the reference answer (math-verify), else 0.0."""
    if answer is None:
        raise ValueError("math_reward needs a reference answer")
    reference = extract_answer(str(answer), fallback_last_number=False) or str(answer).strip()
    predicted = extract_answer(response)
    if predicted is None:
        return 0.0
    return 1.0 if answers_match(predicted, reference) else 0.0
