"""GLUE metrics against values worked out by hand from the formulas (not from the same library), and the
shipped ``evaluate`` module loaded offline giving the same numbers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from neuroada_cli.errors import UserError
from neuroada_cli.glue import metrics
from neuroada_cli.glue.metrics import glue_metrics, primary_metric

# Binary case used for CoLA / MRPC: TP = 4 (i 0,4,6,7), FP = 1 (i 1), TN = 2 (i 2,5), FN = 1 (i 3).
PREDS = [1, 1, 0, 0, 1, 0, 1, 1]
LABELS = [1, 0, 0, 1, 1, 0, 1, 1]


def test_cola_matthews_by_hand():
    tp, fp, tn, fn = 4, 1, 2, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))  # 7 / 15
    assert glue_metrics("cola", PREDS, LABELS) == pytest.approx({"matthews_correlation": mcc})
    assert mcc == pytest.approx(7 / 15)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_f1_and_their_mean(task):
    precision, recall = 4 / 5, 4 / 5
    f1 = 2 * precision * recall / (precision + recall)
    accuracy = 6 / 8
    assert glue_metrics(task, PREDS, LABELS) == pytest.approx(
        {"accuracy": accuracy, "f1": f1, "combined_score": (accuracy + f1) / 2})


def test_f1_positive_class_is_one():
    # Only the negative class is ever right: F1 of class 1 is 0 even though accuracy is 0.5.
    assert glue_metrics("mrpc", [0, 0], [1, 0]) == pytest.approx({"accuracy": 0.5, "f1": 0.0, "combined_score": 0.25})


def test_stsb_pearson_spearman_by_hand():
    preds, labels = [1.0, 2.0, 3.0, 10.0], [1.0, 3.0, 2.0, 4.0]
    # Pearson: deviations (-3,-2,-1,6) and (-1.5,.5,-.5,1.5): cov 13, squares 50 and 5.
    pearson = 13 / math.sqrt(50 * 5)
    # Spearman: ranks (1,2,3,4) and (1,3,2,4): deviations (-1.5,-.5,.5,1.5), (-1.5,.5,-.5,1.5) -> 4 / 5.
    spearman = 4 / 5
    assert glue_metrics("stsb", preds, labels) == pytest.approx(
        {"pearson": pearson, "spearmanr": spearman, "combined_score": (pearson + spearman) / 2})


def test_stsb_spearman_uses_average_ranks_for_ties():
    # Label ranks (1, 2.5, 2.5, 4): deviations (-1.5,0,0,1.5) vs (-1.5,-.5,.5,1.5): 4.5 / sqrt(4.5 * 5).
    result = glue_metrics("stsb", [0.1, 0.2, 0.3, 0.4], [0.0, 2.5, 2.5, 5.0])
    assert result["spearmanr"] == pytest.approx(4.5 / math.sqrt(4.5 * 5))


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte"])
def test_accuracy_only_tasks(task):
    assert glue_metrics(task, PREDS, LABELS) == pytest.approx({"accuracy": 0.75})


def test_mnli_three_classes_and_logits():
    logits = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    assert glue_metrics("mnli", logits, [0, 1, 1, 0]) == pytest.approx({"accuracy": 0.75})
    assert glue_metrics("rte", [[2.0, 1.0], [0.0, 3.0]], [0, 0]) == pytest.approx({"accuracy": 0.5})
    assert glue_metrics("stsb", [[1.0], [2.0], [3.0]], [1.0, 2.0, 3.0])["pearson"] == pytest.approx(1.0)


@pytest.mark.parametrize("task", ["cola", "mrpc", "stsb"])
def test_metrics_are_symmetric_so_pyreft_swapped_arguments_do_not_matter(task):
    preds, labels = (PREDS, LABELS) if task != "stsb" else ([0.5, 1.0, 4.0, 2.0], [1.0, 1.5, 3.0, 3.5])
    assert glue_metrics(task, preds, labels) == pytest.approx(glue_metrics(task, labels, preds))


def test_constant_predictions_give_zero_not_nan():
    assert glue_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == {"pearson": 0.0, "spearmanr": 0.0,
                                                                      "combined_score": 0.0}
    assert glue_metrics("cola", [1, 1, 1], [0, 1, 1]) == {"matthews_correlation": 0.0}


def test_primary_metric():
    assert primary_metric("cola") == "matthews_correlation"
    assert primary_metric("glue/stsb") == "pearson"
    assert [primary_metric(t) for t in ("sst2", "mrpc", "qqp", "mnli", "qnli", "rte")] == ["accuracy"] * 6


def test_bad_inputs():
    with pytest.raises(UserError, match="unknown GLUE task"):
        glue_metrics("squad", [1], [1])
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        glue_metrics("rte", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="at least one"):
        glue_metrics("rte", [], [])
    with pytest.raises(ValueError, match="shape"):
        glue_metrics("rte", np.zeros((2, 3)), [0, 1])


# ------------------------------------------------------------------ the evaluate module, offline

@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Offline flags set, and any socket connection fails: loading must not need the network."""
    import socket

    for name in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")

    def refuse(*_args, **_kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(metrics, "_LOADED", {})  # load from the package again, not from this process's cache


STSB_PREDS, STSB_LABELS = [0.1, 2.6, 2.4, 4.9, 3.3], [0.0, 2.5, 2.5, 5.0, 1.2]
CASES = [("cola", PREDS, LABELS), ("mrpc", PREDS, LABELS), ("qqp", [0, 0, 1], [1, 0, 1]), ("rte", PREDS, LABELS),
         ("mnli", [0, 2, 1, 1], [0, 1, 1, 2]), ("stsb", STSB_PREDS, STSB_LABELS)]


def test_metric_module_ships_inside_the_package():
    assert metrics.METRIC_DIR.is_dir()
    assert (metrics.METRIC_DIR / "neuroada_glue.py").is_file()  # evaluate.load wants <dir>/<dir name>.py


@pytest.mark.parametrize("task,preds,labels", CASES)
def test_evaluate_load_from_the_package_path_offline_gives_glue_metrics(no_network, task, preds, labels):
    import evaluate

    module = evaluate.load(str(metrics.METRIC_DIR), config_name=task)
    assert isinstance(module, evaluate.Metric)
    got = module.compute(predictions=preds, references=labels)
    expected = glue_metrics(task, preds, labels)
    assert got == expected  # exactly: same function, stsb scores kept float64 (float32 would move them)
    assert metrics.load_metric(task).compute(predictions=preds, references=labels) == expected


def test_score_takes_logits_and_goes_through_the_module(no_network):
    logits = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    assert metrics.score("mnli", logits, [0, 1, 1, 0]) == {"accuracy": 0.75}
    assert set(metrics._LOADED) == {"mnli"}
    assert metrics.score("stsb", np.array(STSB_PREDS)[:, None], STSB_LABELS) == glue_metrics("stsb", STSB_PREDS,
                                                                                            STSB_LABELS)


def test_metric_module_refuses_an_unknown_config(no_network):
    import evaluate

    with pytest.raises(KeyError, match="config_name must be one of"):
        evaluate.load(str(metrics.METRIC_DIR), config_name="squad")
