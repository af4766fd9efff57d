"""The GLUE metric of the neuroada toolkit as an ``evaluate`` module (one config per GLUE task).

Load it offline from the installed package::

    import evaluate
    from neuroada_cli.glue.metrics import METRIC_DIR
    metric = evaluate.load(str(METRIC_DIR), config_name="mrpc")
    metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])  # {"accuracy": ..., "f1": ..., "combined_score": ...}

The numbers are ``neuroada_cli.glue.metrics.glue_metrics``: the keys and definitions of the hub's
``glue`` metric, plus ``combined_score`` (mean of the keys) when a task has more than one, and 0.0
instead of nan for a correlation of constant inputs. Predictions are class ids (int64), or scores
(float64) for stsb; take the argmax of logits first.
"""
import datasets
import evaluate

from neuroada_cli.glue.metrics import glue_metrics
from neuroada_cli.glue.tasks import GLUE_TASKS

_CITATION = """\
@inproceedings{wang2018glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={Proceedings of the 2018 EMNLP Workshop BlackboxNLP},
  year={2018}
}
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: class ids (int), or similarity scores (float) for stsb.
    references: gold labels, the same type.
Returns: the task's metrics, e.g. accuracy; accuracy, f1, combined_score; pearson, spearmanr, combined_score;
    matthews_correlation.
"""


class NeuroadaGlue(evaluate.Metric):
    def _info(self):
        if self.config_name not in GLUE_TASKS:
            raise KeyError(f"config_name must be one of {', '.join(GLUE_TASKS)}, got {self.config_name!r}")
        # float64 for stsb scores: float32 would round them and move the correlations.
        dtype = "float64" if GLUE_TASKS[self.config_name].is_regression else "int64"
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
            reference_urls=["https://gluebenchmark.com/"],
        )

    def _compute(self, predictions, references):
        return glue_metrics(self.config_name, predictions, references)
