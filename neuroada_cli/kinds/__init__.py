"""Task kinds: what a kind of task owns (examples, collation, loss, validation), looked up in one table.

The recipe (train.py) never asks which kind it runs: it calls the bound kind object. One class per kind
(``kinds/causal_lm.py``, ``kinds/classification.py``, ``kinds/preference.py``), no base class; this module
imports no torch/transformers (config validation imports the name table).

    kind = get_kind(cfg.task.kind).from_config(cfg)   # plain values inside; no cfg kept
    kind.model_options() -> dict            # extra options for models.load_model_and_tokenizer
    kind.prepare_model(model) -> None       # after loading (e.g. GLUE head dropout)
    kind.check_inputs() -> None             # fast data checks before the slow model load
    kind.train_examples(tokenizer) -> list[dict]              # tokenised; each has "input_ids"
    kind.validation_examples(tokenizer) -> list[dict] | None   # None: no validation in this run
    kind.weight(example) -> int             # its share of the loss normaliser (target tokens, or 1)
    kind.collate(examples, pad_id) -> dict[str, torch.Tensor]
    kind.loss_sum(model, batch) -> torch.Tensor               # SUM over the batch, fp32; the recipe divides
    kind.evaluate(model, examples, pad_id, batch_size) -> dict   # includes the primary metric and "loss"
    kind.primary_metric -> (metric name, higher_is_better)

Validation (train.py + validation.py): when ``validation_examples`` gives examples (and ``trainer.validate``),
the recipe calls ``evaluate`` on process 0 every ``trainer.eval_every`` optimizer steps and at each epoch end,
logs {"step", "validation": metrics}, keeps the best adapter by ``primary_metric`` as adapter/ (the final one
as adapter_last/) and stops after ``trainer.early_stopping_patience`` evaluations without improvement.
"""
from __future__ import annotations

import importlib
from typing import Any, Protocol

from ..errors import UserError

KIND_MODULES = {
    "causal_lm": "neuroada_cli.kinds.causal_lm:CausalLM",
    "sequence_classification": "neuroada_cli.kinds.classification:SequenceClassification",
    "preference": "neuroada_cli.kinds.preference:Preference",
}
KIND_NAMES = tuple(KIND_MODULES)


class TaskKind(Protocol):
    """A bound task kind (structural: any class with these members is one)."""

    name: str
    primary_metric: tuple[str, bool]
    auto_class: str            # the transformers Auto class models.py loads (e.g. "AutoModelForCausalLM")
    peft_task_type: str        # PEFT's task type for the LoRA baseline ("CAUSAL_LM", "SEQ_CLS")
    reads_data_files: bool     # whether data.train_file / val_file / val_fraction apply

    @classmethod
    def from_config(cls, cfg) -> "TaskKind": ...

    def model_options(self) -> dict: ...

    def prepare_model(self, model) -> None: ...

    def check_inputs(self) -> None: ...

    def train_examples(self, tokenizer) -> list[dict]: ...

    def validation_examples(self, tokenizer) -> list[dict] | None: ...

    def weight(self, example: dict) -> int: ...

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, Any]: ...

    def loss_sum(self, model, batch: dict) -> Any: ...

    def evaluate(self, model, examples: list[dict], pad_id: int, batch_size: int) -> dict: ...


def get_kind(name: str) -> type[TaskKind]:
    """The kind class for ``name`` (``cfg.task.kind``); UserError naming the valid kinds."""
    if name not in KIND_MODULES:
        raise UserError(f"task.kind={name!r} is unknown; use one of: {', '.join(KIND_NAMES)}")
    module_name, class_name = KIND_MODULES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
