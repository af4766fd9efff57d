"""Task name -> task object, and suite -> its tasks.

Suites are provided by modules that expose ``TASKS`` (a list of objects following
``base.EvalTask``): eval/commonsense.py, eval/arithmetic.py and glue/eval_tasks.py. To add a suite, write
such a module and add its name to ``SUITE_MODULES``; or call ``register(task)`` at run time. Names are matched
case-insensitively against each task's ``name`` and ``aliases`` (plus its data ``directory``, if any).
"""
from __future__ import annotations

import importlib
from typing import Sequence

from ..errors import UserError
from .base import EvalTask

SUITE_MODULES = (
    "neuroada_cli.eval.commonsense",
    "neuroada_cli.eval.arithmetic",
    "neuroada_cli.glue.eval_tasks",
)

_TASKS: dict[str, EvalTask] = {}      # canonical name -> task, in registration order
_LOOKUP: dict[str, str] = {}          # lower-cased name/alias -> canonical name
_LOADED: list[bool] = []


def register(task: EvalTask) -> EvalTask:
    """Add a task (and its aliases); a name already taken by another task is an error."""
    keys = {task.name.lower(), *(alias.lower() for alias in task.aliases)}
    for key in keys:
        owner = _LOOKUP.get(key)
        if owner is not None and owner != task.name:
            raise ValueError(f"eval task name {key!r} is already used by task {owner!r}")
    _TASKS[task.name] = task
    for key in keys:
        _LOOKUP[key] = task.name
    return task


def _ensure_loaded() -> None:
    if _LOADED:
        return
    _LOADED.append(True)
    for module_name in SUITE_MODULES:
        for task in importlib.import_module(module_name).TASKS:
            register(task)


def all_tasks() -> list[EvalTask]:
    _ensure_loaded()
    return list(_TASKS.values())


def suites() -> list[str]:
    return list(dict.fromkeys(task.suite for task in all_tasks()))


def suite_tasks(suite: str) -> list[EvalTask]:
    tasks = [task for task in all_tasks() if task.suite == suite]
    if not tasks:
        raise UserError(f"unknown eval suite {suite!r}; valid suites: {', '.join(suites())}")
    return tasks


def get_task(name: str) -> EvalTask:
    _ensure_loaded()
    key = str(name).strip().lower()
    if key in _LOOKUP:
        return _TASKS[_LOOKUP[key]]
    raise UserError(
        f"unknown eval task {name!r}; valid tasks: {', '.join(_TASKS)} (or a suite: {', '.join(suites())})"
    )


def resolve_tasks(names: Sequence[str] | str | None, suite: str | None = None) -> list[EvalTask]:
    """Tasks from a list of names (a suite name expands to its tasks), else the tasks of ``suite``.

    Duplicates are dropped, order kept. Nothing to run is a UserError.
    """
    if isinstance(names, str):
        names = [part for part in names.replace(",", " ").split() if part]
    if names:
        chosen: list[EvalTask] = []
        for name in names:
            key = str(name).strip().lower()
            chosen += suite_tasks(key) if key in suites() else [get_task(name)]
        return list({task.name: task for task in chosen}.values())
    if suite:
        return suite_tasks(suite)
    raise UserError(
        "no eval tasks: set eval.tasks=[boolq,piqa] or task.eval_suite "
        f"({', '.join(suites())})"
    )
