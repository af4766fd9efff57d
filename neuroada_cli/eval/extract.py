"""Answer extraction rules and metrics for the LLM-Adapters eval suites.

The rules reproduce the authors' harness (pyreft's LoReFT ``compute_metrics.py``, which NeuroAda reuses,
itself following LLM-Adapters' ``evaluate.py`` / ``commonsense_evaluate.py``):

- ``trigger`` (commonsense, pyreft): the text after the first ``"the correct answer is "``, with whitespace
  stripped and nothing else, must equal the gold label exactly. No trigger -> empty prediction -> wrong.
  So ``"true."`` or ``"true and ..."`` count as wrong: the authors strip whitespace only.
- ``first_match`` (commonsense, LLM-Adapters): the first occurrence of any of the task's answer words
  (``true|false``, ``solution1|solution2``, ...) anywhere in the generation.
- ``last_number`` (arithmetic): commas removed, the last match of ``-?\\d+\\.?\\d*``; correct when
  ``|pred - gold| <= 0.001`` (the authors compare with ``<=``). No number -> wrong (the authors use inf).
- AQuA ``authors``: the first capital A-E anywhere in the generation, even inside a word ("Answer" -> "A").
  AQuA ``strict``: the letter of the last ``answer is (X)`` / ``answer: X`` phrase, else of the last ``(X)``;
  a letter inside a word never counts.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

TRIGGER = "the correct answer is "
NUMBER_TOLERANCE = 1e-3

COMMONSENSE_RULES = ("trigger", "first_match")
AQUA_RULES = ("authors", "strict")

_NUMBER = re.compile(r"-?\d+\.?\d*")
_AUTHORS_LETTER = re.compile(r"A|B|C|D|E")
# "answer is (D)", "answer is D.", "Answer: (C)", "the correct answer is option B" (letter not part of a word)
_STRICT_ANSWER_PHRASE = re.compile(
    r"(?i:answer)\s*(?:(?i:is)|:)\s*(?:(?i:option|choice)\s*)?\(?([A-E])\)?(?![A-Za-z0-9])"
)
_STRICT_PAREN = re.compile(r"\(([A-E])\)")


def after_trigger(text: str, trigger: str = TRIGGER) -> str | None:
    """The text after the first ``trigger`` (left-stripped like pyreft), or None when it is absent."""
    start = text.find(trigger)
    if start < 0:
        return None
    return text[start + len(trigger):].lstrip()


def commonsense_trigger(generation: str) -> str:
    """pyreft's rule: what follows the trigger, whitespace-stripped; '' when there is no trigger."""
    rest = after_trigger(generation)
    return "" if rest is None else rest.strip()


def first_match(generation: str, words: Sequence[str]) -> str:
    """LLM-Adapters' rule: the earliest occurrence of any answer word in the generation ('' if none)."""
    if not words:
        return ""
    # Longer words first so that e.g. "answer10" would never be read as "answer1" (alternation is ordered).
    pattern = "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))
    found = re.search(pattern, generation.strip())
    return found.group(0) if found else ""


def last_number(text: str) -> float | None:
    """The last number in ``text`` (commas removed, sign and decimals kept); None when there is none."""
    matches = _NUMBER.findall(text.replace(",", ""))
    if not matches:
        return None
    try:
        return float(matches[-1])
    except ValueError:  # cannot happen with this pattern, kept as the authors' inf fallback
        return None


def numbers_match(prediction: float | None, gold: str | float) -> bool:
    """The authors' numeric check: ``|pred - gold| <= 0.001``; a missing prediction is wrong."""
    if prediction is None or not math.isfinite(prediction):
        return False
    return abs(prediction - float(gold)) <= NUMBER_TOLERANCE


def aqua_letter(generation: str, rule: str = "authors") -> str:
    """The AQuA option letter under ``rule`` (``authors`` or ``strict``); '' when none is found."""
    text = generation.strip()
    if rule == "authors":
        found = _AUTHORS_LETTER.search(text)
        return found.group(0) if found else ""
    if rule == "strict":
        phrases = _STRICT_ANSWER_PHRASE.findall(text)
        if phrases:
            return phrases[-1]
        parens = _STRICT_PAREN.findall(text)
        return parens[-1] if parens else ""
    raise ValueError(f"unknown AQuA rule {rule!r}; expected one of {AQUA_RULES}")


def accuracy(records: Iterable[dict]) -> dict:
    """Accuracy over records carrying a boolean ``correct``: {'accuracy', 'correct', 'n'}."""
    flags = [bool(record["correct"]) for record in records]
    n = len(flags)
    correct = sum(flags)
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n}
