"""Answer extraction rules (authors' harness + the strict AQuA rule) and accuracy, on hand-made strings."""
from __future__ import annotations

import math

import pytest

from neuroada_cli.eval.commonsense import TASKS as COMMONSENSE, parse_choices
from neuroada_cli.eval.extract import (
    accuracy, after_trigger, aqua_letter, commonsense_trigger, first_match, last_number, numbers_match,
)


# ------------------------------------------------------------------------------ commonsense rules
@pytest.mark.parametrize("generation, expected", [
    ("the correct answer is true", "true"),
    ("the correct answer is  false  \n", "false"),               # whitespace only is stripped
    ("the correct answer is true.", "true."),                    # punctuation is kept (pyreft) -> wrong
    ("the correct answer is answer2 because ...", "answer2 because ..."),
    ("I think it is true", ""),                                  # no trigger -> empty -> wrong
    ("", ""),
    ("The correct answer is true", ""),                          # the trigger is case-sensitive
    ("the correct answer is solution1 the correct answer is solution2", "solution1 the correct answer is solution2"),
])
def test_commonsense_trigger_rule(generation, expected):
    assert commonsense_trigger(generation) == expected


def test_after_trigger_distinguishes_absent_from_empty():
    assert after_trigger("no answer here") is None
    assert after_trigger("the correct answer is ") == ""


@pytest.mark.parametrize("generation, words, expected", [
    ("the correct answer is false, not true", ("true", "false"), "false"),
    ("solution2 looks better than solution1", ("solution1", "solution2"), "solution2"),
    ("Answer1 is wrong; answer3", ("answer1", "answer2", "answer3"), "answer3"),  # case-sensitive like LLM-Adapters
    ("the answer is 5", ("answer1", "answer2"), ""),
    ("untrue", ("true", "false"), "true"),                      # LLM-Adapters matches inside words too
])
def test_first_match_rule(generation, words, expected):
    assert first_match(generation, words) == expected


def test_choices_come_from_the_answer_format_line():
    instruction = "Q?\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3"
    assert parse_choices(instruction, ("x",)) == ("answer1", "answer2", "answer3")
    assert parse_choices("Option1: a Option2: b Answer format: option1/option2", ()) == ("option1", "option2")
    assert parse_choices("no format line", ("true", "false")) == ("true", "false")
    labels = {task.name: task.labels for task in COMMONSENSE}
    assert labels["boolq"] == ("true", "false") and labels["hellaswag"][-1] == "ending4"


# -------------------------------------------------------------------------------- numeric answers
@pytest.mark.parametrize("text, expected", [
    ("The answer is 42.", 42.0),
    ("3 + 4 = 7 and then 7 * 2 = 14", 14.0),                     # the last number wins
    ("He paid $1,234 in total", 1234.0),                         # thousands separators removed
    ("1,234,567.5 apples", 1234567.5),
    ("The temperature fell to -3.5 degrees", -3.5),
    ("a loss of -12", -12.0),
    ("0.75 of the cake", 0.75),
    ("The answer is 5.", 5.0),                                   # trailing period is not a decimal
    ("Step 1: 10 - 4 = 6. The answer is 6", 6.0),
    ("no digits here", None),
    ("", None),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_numbers_match_uses_the_authors_tolerance():
    assert numbers_match(15.0, "15.0")
    assert numbers_match(1.8333, "1.8333333333333335")           # |diff| < 0.001
    assert numbers_match(2.0005, "2")
    assert not numbers_match(2.002, "2")
    assert not numbers_match(None, "2")
    assert not numbers_match(math.inf, "2")
    assert numbers_match(-3.5, "-3.5")


# ------------------------------------------------------------------------------------ AQuA letters
@pytest.mark.parametrize("generation, authors, strict", [
    ("The answer is (D).", "D", "D"),
    ("Answer: C", "A", "C"),                           # authors: the "A" of "Answer" comes first
    ("Because 2 + 2 = 4, the answer is B", "B", "B"),
    ("Answer Choices (A) 1 (B) 2; so the answer is (E)", "A", "E"),
    ("Both (A) and (C) fit, but (C) is exact", "B", "C"),  # authors read the "B" of "Both"
    ("Dividing by Eight gives the result", "D", ""),    # letters inside words never count for strict
    ("the answer is a bit unclear (B)", "B", "B"),     # lowercase "a" is not an option letter
    ("no letters here", "", ""),
    ("", "", ""),
])
def test_aqua_rules(generation, authors, strict):
    assert aqua_letter(generation, "authors") == authors
    assert aqua_letter(generation, "strict") == strict


def test_aqua_rejects_unknown_rule():
    with pytest.raises(ValueError):
        aqua_letter("(A)", "lenient")


# --------------------------------------------------------------------------------------- metrics
def test_accuracy_counts_correct_records():
    records = [{"correct": True}, {"correct": False}, {"correct": True}, {"correct": True}]
    assert accuracy(records) == {"accuracy": 0.75, "correct": 3, "n": 4}
    assert accuracy([]) == {"accuracy": 0.0, "correct": 0, "n": 0}
