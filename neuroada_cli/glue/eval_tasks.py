"""GLUE eval tasks (sequence classification) behind the eval interface of eval/base.py.

Names: ``glue/cola glue/sst2 glue/mrpc glue/qqp glue/stsb glue/mnli glue/mnli_mm glue/qnli glue/rte``
(aliases: the bare task name, e.g. ``rte``). Suite: ``glue``. Registered through eval/registry.py's
SUITE_MODULES (this module's ``TASKS``).

Protocol (LoReFT / NeuroAda authors, see glue/data.py): the score is computed on the REPORT part of
the validation split (``loreft_split`` with the run seed); the other part is the model-selection part
the training recipe evaluates after every epoch. MNLI reports matched (``glue/mnli``, validation_matched)
and mismatched (``glue/mnli_mm``, validation_mismatched) as two tasks. Predictions are the argmax of the
logits (the raw score for stsb); metrics through the shipped ``evaluate`` module (glue/metrics.py), offline.

The split depends on the seed and the tokens on the max length, which ``load``/``predict`` do not
receive: the runner calls ``task.configure(seed=trainer.seed, max_length=data.max_length)`` for a bound
copy (defaults without it: LoReFT's first seed 42 and length 256).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..eval.base import Advance, EvalOptions, Example, TaskData, limit_rows
from ..kinds.classification import predict_logits
from .data import encode, report_rows, split_path
from .metrics import score
from .tasks import GLUE_TASKS, glue_task

DEFAULT_SEED = 42
DEFAULT_MAX_LENGTH = 256


@dataclass(frozen=True)
class GlueEvalTask:
    name: str                       # glue/rte
    glue_name: str                  # rte (the glue/tasks.py task)
    split: str                      # the validation split cut by loreft_split
    aliases: tuple[str, ...] = ()
    seed: int = DEFAULT_SEED
    max_length: int = DEFAULT_MAX_LENGTH
    suite: str = "glue"

    @property
    def metric(self) -> str:
        return glue_task(self.glue_name).primary_metric

    @property
    def regression(self) -> bool:
        return glue_task(self.glue_name).is_regression

    def configure(self, *, seed: int | None = None, max_length: int | None = None) -> "GlueEvalTask":
        """A copy bound to a run's ``trainer.seed`` (the LoReFT split) and ``data.max_length``; None keeps a value.

        The runner calls this hook (eval/base.py) before loading, so ``neuroada eval`` scores the report
        part of the run that trained the adapter.
        """
        changes = {key: int(value) for key, value in (("seed", seed), ("max_length", max_length)) if value is not None}
        return dataclasses.replace(self, **changes)

    def load(self, data_dir: Path, limit: int | None) -> TaskData:
        rows = limit_rows(report_rows(self.glue_name, data_dir, self.seed, self.split), limit)
        if not rows:
            raise UserError(f"eval task {self.name}: the report part of {self.split} is empty; "
                            "the split needs >= 2 rows")
        columns = glue_task(self.glue_name).text_columns
        examples = [Example(index=row["idx"], prompt=" ||| ".join(row[c] for c in columns), gold=str(row["label"]),
                            row=row) for row in rows]
        path = split_path(data_dir, self.glue_name, self.split) or Path(data_dir) / "glue" / self.glue_name / self.split
        return TaskData(examples=examples, path=path)

    def check(self, options: EvalOptions) -> None:
        if options.scoring != "generate":
            # classification has one way to score; refusing avoids a results.json that claims otherwise
            raise UserError(f"eval.scoring={options.scoring} does not apply to GLUE task {self.name}; "
                            "leave eval.scoring=generate (GLUE predicts from the classification head)")

    def rule(self, options: EvalOptions) -> str:
        return "regression score" if self.regression else "argmax"

    def settings(self, options: EvalOptions) -> dict[str, Any]:
        return {"rule": self.rule(options), "scoring": "classification head", "split": self.split,
                "part": "report (LoReFT split)",
                "seed": self.seed, "max_length": self.max_length}

    def predict(self, model, tokenizer, examples: list[Example], options: EvalOptions,
                advance: Advance | None = None) -> list[dict]:
        encoded = encode([example.row for example in examples], tokenizer, self.glue_name, self.max_length)
        logits = predict_logits(model, encoded, tokenizer.pad_token_id, options.batch_size, advance=advance)
        records = []
        for example, row_logits in zip(examples, logits.tolist()):
            gold = example.row["label"]
            predicted = row_logits[0] if self.regression else max(range(len(row_logits)), key=row_logits.__getitem__)
            records.append({
                "index": example.index, "prompt": example.prompt, "generation": "",
                "extracted": predicted, "gold": gold,
                "correct": None if self.regression else predicted == gold,
                "logits": [round(value, 5) for value in row_logits],
            })
        return records

    def score(self, records: list[dict]) -> dict[str, Any]:
        return score(self.glue_name, [r["extracted"] for r in records], [r["gold"] for r in records])


def _tasks() -> list[GlueEvalTask]:
    tasks = []
    for name, spec in GLUE_TASKS.items():
        if name == "mnli":
            tasks.append(GlueEvalTask("glue/mnli", "mnli", "validation_matched", ("mnli", "mnli_m", "glue/mnli_m")))
            tasks.append(GlueEvalTask("glue/mnli_mm", "mnli", "validation_mismatched", ("mnli_mm",)))
        else:
            tasks.append(GlueEvalTask(f"glue/{name}", name, spec.selection_split, (name,)))
    return tasks


TASKS = _tasks()
