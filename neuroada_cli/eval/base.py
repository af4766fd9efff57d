"""The eval task interface shared by every suite (commonsense, arithmetic, GLUE).

A task is any object with the attributes and methods of ``EvalTask`` (a structural Protocol, no base
class to inherit). The runner only ever does::

    data = task.load(data_dir, limit)                    # -> TaskData (examples + which file)
    task.check(options)                                  # UserError for unsupported option values
    records = task.predict(model, tokenizer, data.examples, options, advance)
    metrics = task.score(records)                        # {"accuracy": ..., ...}; primary = task.metric
    rule = task.rule(options)                            # how answers were read, for results.json

Optional: ``task.configure(seed=..., max_length=...) -> task`` (a bound copy); ``run_eval_from_config``
calls it when present with ``trainer.seed`` and ``data.max_length`` (GLUE's seeded validation split).

``records`` are JSON-ready dicts, one per example in input order, with at least
``index, prompt, generation, extracted, gold, correct``; they are written verbatim to
``predictions/<task>.jsonl``. A GLUE task can keep ``generation`` empty and put logits or labels in
``extracted`` — the runner does not look inside records, ``score`` does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from ..errors import UserError
from .extract import AQUA_RULES, COMMONSENSE_RULES

SCORINGS = ("generate", "loglik", "loglik_norm")
# ``advance(n)`` moves the progress bar by n examples; predict() calls it as batches finish.
Advance = Callable[[int], None]


@dataclass(frozen=True)
class Example:
    """One eval item: the exact prompt text, the gold label as text, and the source row."""

    index: int                       # position in the data file
    prompt: str
    gold: str
    row: dict = field(repr=False, default_factory=dict)
    choices: tuple[str, ...] = ()    # multiple-choice labels (loglik candidates, first_match words)


@dataclass(frozen=True)
class TaskData:
    examples: list[Example]
    path: Path                       # the file the examples came from
    approx: bool = False             # True when an approximate stand-in file was used (hellaswag)


@dataclass(frozen=True)
class EvalOptions:
    """Eval settings as plain values (no config object reaches the task code)."""

    batch_size: int = 16
    scoring: str = "generate"                 # generate | loglik | loglik_norm
    max_new_tokens: int | None = None         # None = the suite default (32 commonsense, 512 arithmetic)
    commonsense_rule: str = "trigger"         # trigger | first_match
    aqua_rule: str = "authors"                # authors | strict

    def validate(self) -> "EvalOptions":
        if self.scoring not in SCORINGS:
            raise UserError(f"eval.scoring={self.scoring!r} is not valid; use one of {', '.join(SCORINGS)}")
        if self.commonsense_rule not in COMMONSENSE_RULES:
            raise UserError(
                f"eval.commonsense_rule={self.commonsense_rule!r} is not valid; use one of {', '.join(COMMONSENSE_RULES)}"
            )
        if self.aqua_rule not in AQUA_RULES:
            raise UserError(f"eval.aqua_rule={self.aqua_rule!r} is not valid; use one of {', '.join(AQUA_RULES)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"eval.batch_size={self.batch_size!r} must be a whole number >= 1")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise UserError(f"eval.max_new_tokens={self.max_new_tokens!r} must be a whole number >= 1 or null")
        return self


@runtime_checkable
class EvalTask(Protocol):
    name: str            # canonical name the user types: "boolq", "arc_e", "gsm8k", ...
    suite: str           # "commonsense" | "arithmetic" | "glue"
    aliases: tuple[str, ...]   # other accepted names (data directory names), matched case-insensitively
    metric: str          # primary metric key in score()'s result

    def load(self, data_dir: Path, limit: int | None) -> TaskData: ...

    def check(self, options: EvalOptions) -> None: ...

    def settings(self, options: EvalOptions) -> dict[str, Any]: ...

    def rule(self, options: EvalOptions) -> str: ...

    def predict(self, model, tokenizer, examples: list[Example], options: EvalOptions,
                advance: Advance | None = None) -> list[dict]: ...

    def score(self, records: list[dict]) -> dict[str, Any]: ...


def limit_rows(rows: list[dict], limit: int | None) -> list[dict]:
    """The first ``limit`` rows (deterministic, so a limited run is a prefix of the full one)."""
    if limit is None:
        return rows
    if not isinstance(limit, int) or limit < 1:
        raise UserError(f"eval.limit={limit!r} must be a whole number >= 1 or null")
    return rows[:limit]
