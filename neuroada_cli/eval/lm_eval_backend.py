"""lm-evaluation-harness as an eval backend: any lm-eval task on an in-memory (merged) model.

lm-eval's HF wrapper accepts a model object, so the adapter is merged here first by the caller and the
harness never reloads weights. Tasks come from lm-eval's registry plus ``include_path`` (a folder of task
YAMLs, e.g. a local multiple-choice set on a JSONL file: offline-friendly). lm-eval is an optional extra.
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import UserError


def _metric_name(key: str) -> str:
    """lm-eval reports ``acc,none`` (metric, filter); keep the filter only when there is one."""
    metric, _, filter_name = key.partition(",")
    return metric if filter_name in ("", "none") else f"{metric}/{filter_name}"


def evaluate_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    include_defaults: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval ``tasks`` on ``model``; returns {task: {metric: value, ..., "n": examples scored}}.

    ``include_defaults=False`` reads only ``include_path`` (skips indexing lm-eval's thousands of task YAMLs,
    which takes most of a minute).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("eval.backend=lm_eval needs lm-evaluation-harness; install it with "
                        "pip install 'neuroada[lm_eval]' (or pip install lm-eval)") from None
    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"lm-eval include path {str(include_path)!r} is not a folder; point it at your task YAMLs")
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None,
                          include_defaults=include_defaults or include_path is None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval tasks {unknown} are unknown; check the names (lm-eval ls tasks) or the include path")
    device = str(next(model.parameters()).device)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    output = lm_eval.simple_evaluate(
        model=wrapped, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot, task_manager=manager,
        log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    results = {}
    for task, values in output["results"].items():
        metrics = {_metric_name(key): value for key, value in values.items()
                   if key != "alias" and isinstance(value, (int, float)) and "_stderr" not in key}
        samples = output.get("n-samples", {}).get(task, {})
        if "effective" in samples:
            metrics["n"] = samples["effective"]
        results[task] = metrics
    return results
