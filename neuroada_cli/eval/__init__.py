"""Evaluation: the commonsense and arithmetic suites (eval/commonsense.py, eval/arithmetic.py) and GLUE
(neuroada_cli/glue/eval_tasks.py), all behind the task interface of eval/base.py and found through eval/registry.py.

Entry points: ``evaluate(model, tokenizer, tasks, ...)`` and ``run_eval_from_config(cfg, ...)`` (eval/runner.py).
"""
from .base import EvalOptions, EvalTask, Example, TaskData
from .registry import all_tasks, get_task, register, resolve_tasks, suite_tasks, suites
from .runner import evaluate, read_results, results_table, run_eval_from_config

__all__ = [
    "EvalOptions", "EvalTask", "Example", "TaskData", "all_tasks", "evaluate", "get_task", "read_results",
    "register", "resolve_tasks", "results_table", "run_eval_from_config", "suite_tasks", "suites",
]
