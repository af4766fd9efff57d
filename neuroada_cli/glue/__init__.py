"""GLUE in one place: the task table, the data and its LoReFT split, the metrics and the eval tasks.

What lives where (dependencies point down this list, never up):

* ``tasks.py``     — ``GlueTask``, ``GLUE_TASKS``, ``glue_task(name)``: text columns, labels, the head
  (``num_labels``, ``problem_type``), metrics, primary metric, splits.
* ``data.py``      — ``load_split`` (local JSONL(.gz), else the hub), ``loreft_split`` and the selection /
  report parts, ``encode`` (tokenizer pair API), ``collate_classification``.
* ``metrics.py``   — ``glue_metrics``, ``primary_metric``, ``load_metric(task)`` / ``score`` (the same
  numbers through the ``evaluate`` module ``neuroada_glue/`` shipped in this package, loaded offline).
* ``../kinds/classification.py`` — the sequence-classification task kind the training recipe calls
  (loss, head dropout, prediction, per-epoch selection metrics).
* ``eval_tasks.py`` — the ``glue/<task>`` eval tasks (registered in eval/registry.py).
"""
from .tasks import GLUE_TASKS, GlueTask, glue_task

__all__ = ["GLUE_TASKS", "GlueTask", "glue_task"]
