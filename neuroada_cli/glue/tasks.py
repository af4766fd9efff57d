"""The GLUE task table: what each task reads, predicts and reports. Everything GLUE-specific derives from it.

API::

    GLUE_TASKS: dict[str, GlueTask]          # cola sst2 mrpc qqp stsb mnli qnli rte
    glue_task(name) -> GlueTask               # "rte", "glue/rte", "RTE", "sts-b" ...; UserError if unknown

A task owns its text columns, label count and problem type (what the classification head is built
with: ``num_labels``, ``problem_type``), its metric keys and primary metric (the model-selection and
reported number), and its splits (which validation split the LoReFT protocol cuts).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

REGRESSION = "regression"
SINGLE_LABEL = "single_label_classification"
PROBLEM_TYPES = (REGRESSION, SINGLE_LABEL)


@dataclass(frozen=True)
class GlueTask:
    name: str
    text_columns: tuple[str, ...]          # one column, or a sentence pair fed to the pair API
    num_labels: int                        # 1 = regression (stsb)
    label_names: tuple[str, ...]           # HF ClassLabel names; () for stsb
    metrics: tuple[str, ...]               # keys glue_metrics() returns, as evaluate's "glue" names them
    primary_metric: str                    # model selection and the reported number (higher is better)
    train_split: str = "train"
    validation_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)  # labels hidden (-1): loading them is a UserError

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def problem_type(self) -> str:
        """transformers' ``config.problem_type`` for the head: regression (stsb) or single-label."""
        return REGRESSION if self.is_regression else SINGLE_LABEL

    @property
    def selection_split(self) -> str:
        """The validation split LoReFT cuts for model selection (mnli: validation_matched)."""
        return self.validation_splits[0]

    @property
    def splits(self) -> tuple[str, ...]:
        return (self.train_split, *self.validation_splits, *self.test_splits)


_ACC = ("accuracy",)
_ACC_F1 = ("accuracy", "f1", "combined_score")
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", ("sentence",), 2, ("unacceptable", "acceptable"),
                     ("matthews_correlation",), "matthews_correlation"),
    "sst2": GlueTask("sst2", ("sentence",), 2, ("negative", "positive"), _ACC, "accuracy"),
    "mrpc": GlueTask("mrpc", ("sentence1", "sentence2"), 2, ("not_equivalent", "equivalent"),
                     _ACC_F1, "accuracy"),
    "qqp": GlueTask("qqp", ("question1", "question2"), 2, ("not_duplicate", "duplicate"),
                    _ACC_F1, "accuracy"),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), 1, (),
                     ("pearson", "spearmanr", "combined_score"), "pearson"),
    "mnli": GlueTask("mnli", ("premise", "hypothesis"), 3, ("entailment", "neutral", "contradiction"),
                     _ACC, "accuracy", validation_splits=("validation_matched", "validation_mismatched"),
                     test_splits=("test_matched", "test_mismatched")),
    "qnli": GlueTask("qnli", ("question", "sentence"), 2, ("entailment", "not_entailment"), _ACC, "accuracy"),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), 2, ("entailment", "not_entailment"), _ACC, "accuracy"),
}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli"}


def glue_task(name: str) -> GlueTask:
    """The task for ``name`` ("rte", "glue/rte", "RTE", "sts-b"); UserError listing valid tasks."""
    key = str(name).strip().lower()
    key = key[len("glue/"):] if key.startswith("glue/") else key
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise UserError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]
