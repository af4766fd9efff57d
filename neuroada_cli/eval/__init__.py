"""Evaluation: the LLM-Adapters commonsense and arithmetic suites (GLUE joins through the registry).

Entry points: ``evaluate(model, tokenizer, tasks, ...)`` and ``run_eval_from_config(cfg, ...)``
(eval/runner.py); the task interface is in eval/base.py, task lookup in eval/registry.py.
"""
from .base import EvalOptions, EvalTask, Example, TaskData
from .registry import all_tasks, get_task, register, resolve_tasks, suite_tasks, suites
from .runner import evaluate, prepare_model, read_results, results_table, run_eval_from_config, summary

__all__ = [
    "EvalOptions", "EvalTask", "Example", "TaskData", "all_tasks", "evaluate", "get_task", "prepare_model",
    "read_results", "register", "resolve_tasks", "results_table", "run_eval_from_config", "suite_tasks",
    "suites", "summary",
]
