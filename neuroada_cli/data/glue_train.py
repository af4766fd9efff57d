"""GLUE training pieces for train.py: examples, the per-example loss, batched prediction, head dropout.

train.py stays generic; for ``task.kind == "sequence_classification"`` it calls

    examples = train_examples(task, data_dir, tokenizer, max_length, limit, seed)
    selection = selection_examples(task, data_dir, tokenizer, max_length, seed)  # LoReFT model-selection part
    batch = collate(examples_subset, pad_id)                                     # dynamic padding
    loss_sum = loss_sum(model, batch)                                            # sum over examples
    metrics = evaluate_examples(model, selection, task, pad_id, batch_size)     # inference_mode, length-sorted
    set_head_dropout(model, p)

The loss is a SUM over the examples of the batch (cross-entropy, or squared error for stsb) so
train.py can divide by the number of examples in the whole global batch, exactly as it divides the
causal-LM token loss by the number of target tokens: every example counts once (``targets`` = 1).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ..errors import UserError
from .train_sets import seeded_subset
from .batching import length_sorted_batches
from .glue import collate_classification, encode, glue_task, load_split, loreft_split


def train_examples(task: str, data_dir, tokenizer, max_length: int, limit: int | None, seed: int) -> list[dict]:
    spec = glue_task(task)
    rows = seeded_subset(load_split(spec.name, spec.train_split, data_dir), limit, seed)
    return encode(rows, tokenizer, spec.name, max_length)


def selection_rows(task: str, data_dir, seed: int) -> list[dict]:
    """The LoReFT model-selection part of the task's validation split (depends on the run seed)."""
    spec = glue_task(task)
    return loreft_split(load_split(spec.name, spec.selection_split, data_dir), seed)[0]


def selection_examples(task: str, data_dir, tokenizer, max_length: int, seed: int) -> list[dict]:
    return encode(selection_rows(task, data_dir, seed), tokenizer, task, max_length)


def collate(examples: list[dict], pad_id: int) -> dict:
    return collate_classification(examples, pad_id)


def _forward(model, batch: dict) -> torch.Tensor:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return model(**inputs).logits.float()


def loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed loss of the batch in fp32: cross-entropy, or squared error for a 1-output (regression) head."""
    logits = _forward(model, batch)
    labels = batch["labels"]
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
    return F.cross_entropy(logits, labels, reduction="sum")


def predict_logits(model, examples: list[dict], pad_id: int, batch_size: int, device=None,
                   advance=None) -> torch.Tensor:
    """Logits [n, num_labels] in input order; length-sorted batches, inference mode, eval mode restored."""
    if not examples:
        raise UserError("no examples to evaluate")
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


def evaluate_examples(model, examples: list[dict], task: str, pad_id: int, batch_size: int, device=None) -> dict:
    """The task's GLUE metrics on encoded examples (e.g. the selection part, after every epoch)."""
    from ..eval.glue_metrics import glue_metrics

    logits = predict_logits(model, examples, pad_id, batch_size, device)
    return glue_metrics(task, logits.numpy(), [example["labels"] for example in examples])


def set_head_dropout(model, probability: float | None) -> None:
    """Set the dropout applied before the classification head (BERT: model.dropout; RoBERTa: classifier.dropout).

    transformers reads ``config.classifier_dropout`` only at construction, so the modules are changed
    directly; None keeps the checkpoint's value (hidden_dropout_prob).
    """
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
