"""The 8 commonsense tasks (LLM-Adapters test sets): boolq piqa siqa hellaswag winogrande arc_e arc_c obqa.

Protocol (pyreft/NeuroAda): prompt = instruction + "\\n"; greedy, 32 new tokens; the prediction is the
text after "the correct answer is " (``eval.commonsense_rule=trigger``) or LLM-Adapters' first answer
word in the generation (``first_match``); accuracy by exact match with the gold ``answer``.
``eval.scoring=loglik|loglik_norm`` instead scores "the correct answer is <candidate>" for each option
listed in the instruction's "Answer format: a/b/c" line and picks the most likely one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.llm_adapters import find_file, load_rows
from ..data.prompts import build_prompt
from ..errors import UserError
from .base import Advance, EvalOptions, Example, TaskData, limit_rows
from .extract import TRIGGER, accuracy, commonsense_trigger, first_match
from .generation import generate_texts
from .loglik import choose, score_continuations

DEFAULT_MAX_NEW_TOKENS = 32
_ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\n]+)")
_ANSWERS_1_TO_5 = tuple(f"answer{i}" for i in range(1, 6))


def parse_choices(instruction: str, fallback: tuple[str, ...]) -> tuple[str, ...]:
    """The options of one question, from its "Answer format: a/b/c" line (else the task's label set)."""
    found = _ANSWER_FORMAT.search(instruction)
    if found:
        choices = tuple(part.strip() for part in found.group(1).split("/") if part.strip())
        if choices:
            return choices
    return fallback


def resolve_file(data_dir: Path, name: str, directory: str, approx_stem: str | None = None) -> tuple[Path, bool]:
    """``<data dir>/llm_adapters/<directory>/test.json(.gz)``, else the approximate stand-in if any."""
    folder = Path(data_dir) / "llm_adapters" / directory
    path = find_file(folder, "test")
    if path is not None:
        return path, False
    if approx_stem is not None:
        path = find_file(folder, approx_stem)
        if path is not None:
            return path, True
    also = f" (or {approx_stem}.json.gz)" if approx_stem else ""
    raise UserError(
        f"eval task {name}: test file not found; expected {folder / 'test.json'} (or .json.gz){also}; "
        "set data.dir / NEUROADA_DATA_DIR to a folder holding llm_adapters/"
    )


@dataclass(frozen=True)
class CommonsenseTask:
    name: str
    directory: str
    labels: tuple[str, ...]            # the task's answer words (LLM-Adapters' first_match regex)
    aliases: tuple[str, ...] = ()
    approx_stem: str | None = None     # hellaswag: test_approx.json.gz when test.json is absent
    suite: str = "commonsense"
    metric: str = "accuracy"

    def load(self, data_dir: Path, limit: int | None) -> TaskData:
        path, approx = resolve_file(data_dir, self.name, self.directory, self.approx_stem)
        rows = limit_rows(load_rows(path, required=("instruction",)), limit)
        examples = []
        for index, row in enumerate(rows):
            gold = str(row.get("answer", "")).strip()
            if not gold:
                raise UserError(f"{path}: row {index} has no gold 'answer'; eval needs one per row")
            examples.append(Example(index, build_prompt(row, "commonsense"), gold, row,
                                    parse_choices(row["instruction"], self.labels)))
        return TaskData(examples, path, approx)

    def check(self, options: EvalOptions) -> None:
        options.validate()

    def rule(self, options: EvalOptions) -> str:
        if options.scoring == "generate":
            return options.commonsense_rule
        return "argmax_loglik_per_token" if options.scoring == "loglik_norm" else "argmax_loglik"

    def settings(self, options: EvalOptions) -> dict[str, Any]:
        generating = options.scoring == "generate"
        return {
            "scoring": options.scoring,
            "rule": self.rule(options),
            "max_new_tokens": (options.max_new_tokens or DEFAULT_MAX_NEW_TOKENS) if generating else None,
        }

    def extract(self, generation: str, rule: str) -> str:
        if rule == "trigger":
            return commonsense_trigger(generation)
        return first_match(generation, self.labels)

    def predict(self, model, tokenizer, examples: list[Example], options: EvalOptions,
                advance: Advance | None = None) -> list[dict]:
        prompts = [example.prompt for example in examples]
        if options.scoring == "generate":
            generations = generate_texts(
                model, tokenizer, prompts, max_new_tokens=options.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                batch_size=options.batch_size, advance=advance,
            )
            records = []
            for example, generation in zip(examples, generations):
                extracted = self.extract(generation, options.commonsense_rule)
                records.append(_record(example, generation, extracted))
            return records
        continuations = [[TRIGGER + choice for choice in example.choices] for example in examples]
        scores = score_continuations(model, tokenizer, prompts, continuations,
                                     batch_size=options.batch_size, advance=advance)
        normalize = options.scoring == "loglik_norm"
        records = []
        for example, candidate_scores in zip(examples, scores):
            best = choose(candidate_scores, normalize)
            record = _record(example, None, example.choices[best])
            record["scores"] = {
                choice: (total / n if normalize else total)
                for choice, (total, n) in zip(example.choices, candidate_scores)
            }
            records.append(record)
        return records

    def score(self, records: list[dict]) -> dict[str, Any]:
        return accuracy(records)


def _record(example: Example, generation: str | None, extracted: str) -> dict:
    return {
        "index": example.index,
        "prompt": example.prompt,
        "generation": generation,
        "extracted": extracted,
        "gold": example.gold,
        "correct": extracted == example.gold,
    }


TASKS = [
    CommonsenseTask("boolq", "boolq", ("true", "false")),
    CommonsenseTask("piqa", "piqa", ("solution1", "solution2")),
    CommonsenseTask("siqa", "social_i_qa", _ANSWERS_1_TO_5, aliases=("social_i_qa",)),
    CommonsenseTask("hellaswag", "hellaswag", tuple(f"ending{i}" for i in range(1, 5)), approx_stem="test_approx"),
    CommonsenseTask("winogrande", "winogrande", ("option1", "option2")),
    CommonsenseTask("arc_e", "ARC-Easy", _ANSWERS_1_TO_5, aliases=("arc-easy",)),
    CommonsenseTask("arc_c", "ARC-Challenge", _ANSWERS_1_TO_5, aliases=("arc-challenge",)),
    CommonsenseTask("obqa", "openbookqa", _ANSWERS_1_TO_5, aliases=("openbookqa",)),
]
