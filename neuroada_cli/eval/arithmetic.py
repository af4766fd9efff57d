"""The 7 arithmetic tasks (LLM-Adapters test sets): multiarith gsm8k addsub aqua singleeq svamp mawps.

Protocol (pyreft/NeuroAda ``task_config["math"]``): the Alpaca prompt; greedy, up to 512 new tokens;
the authors read the text after "### Response:" of the decoded prompt+generation, i.e. the generation
itself (we decode only the new tokens). Numeric tasks: the last number, correct when
``|pred - gold| <= 0.001``. AQuA: an option letter A-E (``eval.aqua_rule``: ``authors`` = first capital
A-E anywhere, ``strict`` = "answer is (X)" / "(X)"). Generation only: log-likelihood scoring is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.llm_adapters import load_rows
from ..data.prompts import build_prompt
from ..errors import UserError
from .base import Advance, EvalOptions, Example, TaskData, limit_rows
from .commonsense import resolve_file
from .extract import accuracy, aqua_letter, last_number, numbers_match
from .generation import generate_texts

DEFAULT_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class ArithmeticTask:
    name: str
    directory: str
    letters: bool = False              # AQuA: the answer is an option letter, not a number
    aliases: tuple[str, ...] = ()
    suite: str = "arithmetic"
    metric: str = "accuracy"

    def load(self, data_dir: Path, limit: int | None) -> TaskData:
        path, approx = resolve_file(data_dir, self.name, self.directory)
        rows = limit_rows(load_rows(path, required=("instruction",)), limit)
        examples = []
        for index, row in enumerate(rows):
            gold = str(row.get("answer", "")).strip()
            if self.letters:
                if gold not in ("A", "B", "C", "D", "E"):
                    raise UserError(f"{path}: row {index} answer {gold!r} is not an option letter A-E")
            else:
                try:
                    float(gold)
                except ValueError:
                    raise UserError(f"{path}: row {index} answer {gold!r} is not a number") from None
            examples.append(Example(index, build_prompt(row, "alpaca"), gold, row))
        return TaskData(examples, path, approx)

    def check(self, options: EvalOptions) -> None:
        options.validate()
        if options.scoring != "generate":
            raise UserError(
                f"eval task {self.name} is generation only; eval.scoring={options.scoring} applies to the "
                "multiple-choice commonsense tasks; use eval.scoring=generate"
            )

    def rule(self, options: EvalOptions) -> str:
        return f"aqua_{options.aqua_rule}" if self.letters else "last_number"

    def settings(self, options: EvalOptions) -> dict[str, Any]:
        return {
            "scoring": options.scoring,
            "rule": self.rule(options),
            "max_new_tokens": options.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        }

    def predict(self, model, tokenizer, examples: list[Example], options: EvalOptions,
                advance: Advance | None = None) -> list[dict]:
        generations = generate_texts(
            model, tokenizer, [example.prompt for example in examples],
            max_new_tokens=options.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            batch_size=options.batch_size, advance=advance,
        )
        records = []
        for example, generation in zip(examples, generations):
            if self.letters:
                extracted = aqua_letter(generation, options.aqua_rule)
                correct = extracted == example.gold
            else:
                extracted = last_number(generation)
                correct = numbers_match(extracted, example.gold)
            records.append({
                "index": example.index,
                "prompt": example.prompt,
                "generation": generation,
                "extracted": extracted,
                "gold": example.gold,
                "correct": correct,
            })
        return records

    def score(self, records: list[dict]) -> dict[str, Any]:
        return accuracy(records)


TASKS = [
    ArithmeticTask("multiarith", "MultiArith"),
    ArithmeticTask("gsm8k", "gsm8k"),
    ArithmeticTask("addsub", "AddSub"),
    ArithmeticTask("aqua", "AQuA", letters=True),
    ArithmeticTask("singleeq", "SingleEq"),
    ArithmeticTask("svamp", "SVAMP"),
    ArithmeticTask("mawps", "mawps"),
]
