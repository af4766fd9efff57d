"""Sequence classification (GLUE): one example per row, a classification head, one loss term per example.

The GLUE task table (glue/tasks.py) decides the head (``num_labels``, ``problem_type``), the text columns,
the metrics and the primary metric; glue/data.py gives the rows, the LoReFT split and the tokens. This kind
binds them to one run's plain values and adds what the recipe needs:

* ``loss_sum``: cross-entropy, or squared error for a 1-output (regression, stsb) head, SUMMED over the
  batch in fp32; every example weighs 1, so the recipe divides by the examples of the global batch exactly
  as it divides the causal-LM token loss by the target tokens.
* ``validation_examples``: the LoReFT model-selection part of the validation split (for the run seed);
  ``evaluate`` scores it with the task's GLUE metrics (through the shipped ``evaluate`` module) plus "loss".
* ``prepare_model``: ``task.head_dropout`` on the head's dropout modules.
* ``predict_logits``: batched, length-sorted inference in input order (also used by the GLUE eval tasks).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..data.batching import length_sorted_batches
from ..data.tokenize import check_max_length
from ..errors import UserError
from ..glue import data as glue_data
from ..glue.metrics import score
from ..glue.tasks import PROBLEM_TYPES, GlueTask, glue_task

if TYPE_CHECKING:  # torch is imported inside the functions: `neuroada ls` lists GLUE tasks through this module
    import torch


class SequenceClassification:
    name = "sequence_classification"
    auto_class = "AutoModelForSequenceClassification"  # a new head on top of the checkpoint
    peft_task_type = "SEQ_CLS"
    reads_data_files = False  # a GLUE task reads its own splits (the task table)

    def __init__(self, *, task: str, data_dir: str | Path | None, max_length: int, train_limit: int | None,
                 seed: int, head_dropout: float | None = None, num_labels: int | None = None,
                 problem_type: str | None = None):
        self.spec: GlueTask = glue_task(task)
        _check_head(self.spec, num_labels, problem_type)
        check_max_length(max_length, "data.max_length")
        if head_dropout is not None and not 0.0 <= head_dropout < 1.0:
            raise UserError(f"task.head_dropout={head_dropout} must be in [0, 1) or null (the checkpoint's)")
        self.data_dir, self.max_length = data_dir, max_length
        self.train_limit, self.seed, self.head_dropout = train_limit, seed, head_dropout
        self._rows: list[dict] | None = None

    @classmethod
    def from_config(cls, cfg) -> "SequenceClassification":
        from ..config_schema import config_value

        if config_value(cfg, "data.packing", False):  # the head reads one example per row (its last token)
            raise UserError("data.packing=true is for causal LMs; task.kind=sequence_classification classifies one "
                            "example per row: set data.packing=false")
        return cls(task=config_value(cfg, "task.train_dataset"), data_dir=config_value(cfg, "data.dir"),
                   max_length=config_value(cfg, "data.max_length"), train_limit=config_value(cfg, "data.train_limit"),
                   seed=config_value(cfg, "trainer.seed", 0), head_dropout=config_value(cfg, "task.head_dropout"),
                   num_labels=config_value(cfg, "task.num_labels"), problem_type=config_value(cfg, "task.problem_type"))

    @property
    def primary_metric(self) -> tuple[str, bool]:
        return self.spec.primary_metric, True  # every GLUE metric is better higher

    @property
    def regression(self) -> bool:
        return self.spec.is_regression

    # ---------------------------------------------------------------------------------- model
    def model_options(self) -> dict:
        """The head from the task table, for ``models.load_model_and_tokenizer``."""
        return {"num_labels": self.spec.num_labels, "problem_type": self.spec.problem_type}

    def prepare_model(self, model) -> None:
        set_head_dropout(model, self.head_dropout)

    # ----------------------------------------------------------------------------------- data
    def check_inputs(self) -> None:
        """Read the training rows now (a missing or malformed file fails before the slow model load)."""
        self._training_rows()

    def _training_rows(self) -> list[dict]:
        if self._rows is None:
            self._rows = glue_data.train_rows(self.spec.name, self.data_dir, self.train_limit, self.seed)
        return self._rows

    def train_examples(self, tokenizer) -> list[dict]:
        examples = glue_data.encode(self._training_rows(), tokenizer, self.spec.name, self.max_length)
        if not examples:
            raise UserError(f"GLUE {self.spec.name}/{self.spec.train_split} has no rows; check the file under "
                            "<data dir>/glue/ (data.dir)")
        return examples

    def validation_examples(self, tokenizer) -> list[dict]:
        """The LoReFT model-selection part of the validation split (it depends on the run seed)."""
        rows = glue_data.selection_rows(self.spec.name, self.data_dir, self.seed)
        return glue_data.encode(rows, tokenizer, self.spec.name, self.max_length)

    def weight(self, example: dict) -> int:
        return 1  # every example counts once in the global-batch normaliser

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        return glue_data.collate_classification(examples, pad_id, regression=self.regression)

    # ---------------------------------------------------------------------------- loss, eval
    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        return loss_sum(model, batch)

    def evaluate(self, model, examples: list[dict], pad_id: int, batch_size: int) -> dict:
        """The task's GLUE metrics on encoded examples, plus "loss" (mean per example)."""
        return self.evaluation_metrics([self.evaluation_part(model, examples, pad_id, batch_size)])

    def evaluation_part(self, model, examples: list[dict], pad_id: int, batch_size: int) -> dict:
        """One process's share of a sharded evaluation (training/validation.py): its logits and labels, as
        plain Python values (they travel between processes)."""
        logits = predict_logits(model, examples, pad_id, batch_size, collate=self.collate)
        return {"logits": logits.tolist(), "labels": [example["labels"] for example in examples]}

    def evaluation_metrics(self, parts: list[dict]) -> dict:
        """The metrics of every part together (GLUE metrics do not depend on the order of the examples)."""
        import torch

        logits = torch.tensor([row for part in parts for row in part["logits"]], dtype=torch.float32)
        labels = [label for part in parts for label in part["labels"]]
        metrics = score(self.spec.name, logits.numpy(), labels)
        metrics["loss"] = _loss_from_logits(logits, torch.tensor(labels)).item() / len(labels)
        return metrics


def _check_head(spec: GlueTask, num_labels, problem_type) -> None:
    """A config value for the head is optional (null = the table's); one that contradicts the table is refused."""
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise UserError(f"task.problem_type={problem_type!r} is not valid for GLUE; use one of "
                        f"{', '.join(PROBLEM_TYPES)} or null (derived from the GLUE task)")
    if num_labels is not None and num_labels != spec.num_labels:
        raise UserError(f"task.num_labels={num_labels!r} contradicts GLUE {spec.name} ({spec.num_labels} "
                        "label(s)); set task.num_labels=null to take it from the GLUE task table")
    if problem_type is not None and problem_type != spec.problem_type:
        raise UserError(f"task.problem_type={problem_type} contradicts GLUE {spec.name} ({spec.problem_type}); "
                        "set task.problem_type=null to take it from the GLUE task table")


def _forward(model, batch: dict) -> torch.Tensor:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return model(**inputs).logits.float()


def _loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
    return F.cross_entropy(logits, labels.long(), reduction="sum")


def loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed loss of the batch in fp32: cross-entropy, or squared error for a 1-output (regression) head."""
    return _loss_from_logits(_forward(model, batch), batch["labels"])


def predict_logits(model, examples: list[dict], pad_id: int, batch_size: int, device=None,
                   advance=None, collate=None) -> torch.Tensor:
    """Logits [n, num_labels] in input order; length-sorted batches, inference mode, train/eval mode restored.

    ``advance(n)`` is called as batches finish (a progress bar); ``collate`` defaults to glue/data.py's.
    """
    import torch

    if not examples:
        raise UserError("no examples to evaluate")
    collate = collate or (lambda chunk, pad: glue_data.collate_classification(chunk, pad))
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[torch.Tensor | None] = [None] * len(examples)
    try:
        with torch.inference_mode():
            for indices in length_sorted_batches(examples, batch_size):
                batch = collate([examples[i] for i in indices], pad_id)
                logits = _forward(model, {key: value.to(device) for key, value in batch.items()}).cpu()
                for row, i in enumerate(indices):
                    outputs[i] = logits[row]
                if advance is not None:
                    advance(len(indices))
    finally:
        model.train(was_training)
    return torch.stack(outputs)


def set_head_dropout(model, probability: float | None) -> None:
    """Set the dropout applied before the classification head (BERT: model.dropout; RoBERTa: classifier.dropout).

    transformers reads ``config.classifier_dropout`` only at construction, so the modules are changed
    directly; None keeps the checkpoint's value (hidden_dropout_prob).
    """
    import torch

    if probability is None:
        return
    if not 0.0 <= probability < 1.0:
        raise UserError(f"task.head_dropout={probability} must be in [0, 1)")
    found = []
    classifier = getattr(model, "classifier", None)
    for owner in (model, classifier):
        module = getattr(owner, "dropout", None) if owner is not None else None
        if isinstance(module, torch.nn.Dropout):
            module.p = float(probability)
            found.append(module)
    if not found:
        raise UserError(f"task.head_dropout is set but {type(model).__name__} has no head dropout to set; "
                        "use task.head_dropout=null")
    model.config.classifier_dropout = float(probability)
