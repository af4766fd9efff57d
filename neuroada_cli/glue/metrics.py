"""GLUE metrics computed offline, with the names and definitions of ``evaluate.load("glue", task)``.

API::

    glue_metrics(task, predictions, labels) -> dict[str, float]   # values in 0..1 (x100 for tables)
    primary_metric(task) -> str                                     # the model-selection / reported key
    METRIC_DIR                                                      # the evaluate module shipped here
    load_metric(task) -> evaluate.Metric                            # evaluate.load(METRIC_DIR, config_name=task)
    score(task, predictions, labels) -> dict[str, float]           # glue_metrics, through the evaluate module

The same numbers are available to any ``evaluate`` user, offline, from the installed package::

    evaluate.load(str(neuroada_cli.glue.metrics.METRIC_DIR), config_name="rte")

(``neuroada_glue/neuroada_glue.py``: an ``evaluate.Metric`` whose ``_compute`` calls glue_metrics;
``evaluate`` copies a local script into its modules cache and never touches the network for it.)

| task                         | keys                                    | primary              |
|------------------------------|-----------------------------------------|----------------------|
| cola                         | matthews_correlation                    | matthews_correlation |
| stsb                         | pearson, spearmanr, combined_score      | pearson              |
| mrpc, qqp                    | accuracy, f1, combined_score            | accuracy             |
| sst2, mnli, qnli, rte        | accuracy                                | accuracy             |

``combined_score`` is the mean of the other keys, as pyreft adds it when a task has more than
one metric. The primary metrics are the NeuroAda authors' ``subtask2metric`` (train_our.py) and
the ``--metric_for_best_model`` of pyreft's GLUE scripts. F1 is binary with positive class 1
(equivalent / duplicate), as evaluate's glue metric (sklearn's default).

``predictions`` may be class ids / scores (shape [n]) or raw logits (shape [n, num_labels], argmax
taken; stsb [n, 1] squeezed). pyreft calls ``metric.compute(predictions=labels,
references=preds)`` (swapped); every metric here is symmetric in its two arguments, so the
numbers are the same.

One deliberate difference from evaluate: a correlation that is undefined because the predictions
(or labels) are constant is reported as 0.0, not nan, so "best epoch" comparisons stay ordered.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from .tasks import glue_task

logger = logging.getLogger(__name__)


def primary_metric(task: str) -> str:
    return glue_task(task).primary_metric


def _as_predictions(predictions, num_labels: int) -> np.ndarray:
    array = np.asarray(predictions)
    if array.ndim == 2:
        if num_labels == 1:
            if array.shape[1] != 1:
                raise ValueError(f"stsb predictions must have shape [n] or [n, 1], got {array.shape}")
            return array[:, 0].astype(np.float64)
        if array.shape[1] != num_labels:
            raise ValueError(f"logits must have shape [n, {num_labels}], got {array.shape}")
        return array.argmax(axis=1)
    if array.ndim != 1:
        raise ValueError(f"predictions must be 1-D (ids or scores) or 2-D logits, got shape {array.shape}")
    return array.astype(np.float64) if num_labels == 1 else array.astype(np.int64)


def _correlation(kind: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    from scipy import stats

    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        logger.warning("%s correlation is undefined for constant inputs; reporting 0.0", kind)
        return 0.0
    function = stats.pearsonr if kind == "pearson" else stats.spearmanr
    value = float(function(predictions, labels)[0])
    return 0.0 if math.isnan(value) else value


def glue_metrics(task: str, predictions, labels) -> dict[str, float]:
    """The task's metrics (keys as evaluate's "glue" metric, plus combined_score when > 1 metric)."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    spec = glue_task(task)
    predictions = _as_predictions(predictions, spec.num_labels)
    labels = np.asarray(labels, dtype=np.float64 if spec.is_regression else np.int64).reshape(-1)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("glue_metrics needs at least one example")

    if spec.name == "cola":
        result = {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    elif spec.is_regression:
        result = {"pearson": _correlation("pearson", predictions, labels),
                  "spearmanr": _correlation("spearman", predictions, labels)}
    else:
        result = {"accuracy": float((predictions == labels).mean())}
        if "f1" in spec.metrics:
            result["f1"] = float(f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0.0))
    if len(result) > 1:
        result["combined_score"] = float(np.mean(list(result.values())))
    return result


def _metric_dir():
    from importlib.resources import files

    return files("neuroada_cli.glue") / "neuroada_glue"


METRIC_DIR = _metric_dir()
_LOADED: dict[str, object] = {}


def load_metric(task: str):
    """The task's GLUE metric as an ``evaluate`` module, loaded from the package (no network)."""
    import evaluate

    name = glue_task(task).name
    if name not in _LOADED:  # loading copies and imports the script: once per task and process is enough
        _LOADED[name] = evaluate.load(str(METRIC_DIR), config_name=name, keep_in_memory=True)
    return _LOADED[name]


def score(task: str, predictions, labels) -> dict[str, float]:
    """glue_metrics computed through the shipped ``evaluate`` module (class ids, or scores for stsb)."""
    spec = glue_task(task)
    predictions = _as_predictions(predictions, spec.num_labels)
    return load_metric(spec.name).compute(predictions=predictions, references=labels)
