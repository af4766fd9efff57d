"""Eval orchestration: tasks -> predictions/<task>.jsonl + results.json + a rich table.

``evaluate(model, tokenizer, tasks, ...)`` runs already-loaded models (the train loop can call it);
``run_eval_from_config(cfg, ...)`` is what ``neuroada eval`` calls: it loads the base model, applies an
adapter and merges it (fp32) when ``eval.merge`` is true (``methods.load_trained``), and evaluates
``eval.tasks`` or the suite of ``task.eval_suite``, on the accelerator's device (eval/processes.py: the model
is moved there after loading, a quantized one is loaded there). Under ``accelerate launch --num_processes N``
every process predicts a share of each task's examples; process 0 gathers them in input order, scores them and
is the only one that writes (``write_results`` is the one writer of results.json).

Resumability: each task's predictions file and its entry in results.json are written atomically
(temp file + rename) as soon as the task finishes. On a re-run, a task is skipped when its entry
is marked done, was made with the same settings (scoring, rule, max_new_tokens, limit, data file,
n) and its predictions file holds exactly n lines.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from typing import Sequence

from ..atomic import check_writable_dir, finite_or_none, write_atomic, write_json
from ..errors import UserError
from ..methods import config_value, load_trained
from .base import EvalOptions, EvalTask, TaskData
from .processes import Processes, current_processes, place
from .registry import get_task, resolve_tasks

RESULTS_FORMAT = 1
BACKENDS = ("native", "lm_eval")  # eval.backend: our suites, or lm-evaluation-harness tasks


# ------------------------------------------------------------------------------------------ files
def _count_lines(path: Path) -> int:
    if not path.is_file():
        return -1
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def read_results(output_dir: Path) -> dict:
    """The existing results.json of ``output_dir`` (an empty skeleton when absent or unreadable)."""
    path = Path(output_dir) / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(results, dict) and isinstance(results.get("tasks"), dict):
            return results
    except (OSError, json.JSONDecodeError):
        pass
    return {"format": RESULTS_FORMAT, "tasks": {}}


def suite_averages(task_entries: dict[str, dict]) -> dict[str, dict]:
    """Mean of the primary metric per suite over the finished tasks, and whether the suite is complete."""
    from .registry import suite_tasks

    grouped: dict[str, list[str]] = {}
    for name, entry in task_entries.items():
        if entry.get("done"):
            grouped.setdefault(entry["suite"], []).append(name)
    averages = {}
    for suite, members in grouped.items():
        try:
            expected = {task.name for task in suite_tasks(suite)}
        except UserError:
            expected = set(members)
        averages[suite] = {
            "metric": task_entries[members[0]]["metric"],
            "average": sum(task_entries[m]["value"] for m in members) / len(members),
            "tasks": members,
            "suite_size": len(expected),
            "complete": expected <= set(members),
        }
    return averages


# ------------------------------------------------------------------------------------ the runner
def _task_settings(task: EvalTask, options: EvalOptions, data: TaskData, limit: int | None, model: dict) -> dict:
    # The model identity is part of it, so results of another model/adapter in the same folder are redone.
    return {**task.settings(options), "limit": limit, "n": len(data.examples), "data_file": str(data.path),
            "model": model}


def _resumable(entry: dict | None, settings: dict, predictions: Path) -> bool:
    return bool(entry) and entry.get("done") is True and entry.get("settings") == settings \
        and _count_lines(predictions) == settings["n"]


def _progress(enabled: bool, console):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled,
    )


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str | EvalTask],
    *,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    limit: int | None = None,
    batch_size: int = 16,
    scoring: str = "generate",
    max_new_tokens: int | None = None,
    commonsense_rule: str = "trigger",
    aqua_rule: str = "authors",
    progress: bool = True,
    run_info: dict | None = None,
    console=None,
    processes: Processes | None = None,
) -> dict:
    """Evaluate ``tasks`` (names or task objects), write the outputs and return the results dict.

    ``processes`` (default: this process alone): each process predicts its share of every task's examples
    (eval/processes.py), process 0 gathers them in input order, scores and writes; every process returns the
    same results dict.
    """
    from rich.console import Console

    processes = processes or Processes()
    main = processes.is_main
    console = console or Console()
    options = EvalOptions(batch_size=batch_size, scoring=scoring, max_new_tokens=max_new_tokens,
                          commonsense_rule=commonsense_rule, aqua_rule=aqua_rule).validate()
    chosen = [get_task(task) if isinstance(task, str) else task for task in tasks]
    if not chosen:
        raise UserError("no eval tasks given; set eval.tasks=[boolq,piqa] or task.eval_suite")
    for task in chosen:  # every user mistake surfaces before any model time is spent
        task.check(options)
    loaded = {task.name: task.load(Path(data_dir), limit) for task in chosen}

    output_dir = Path(output_dir)
    predictions_dir = output_dir / "predictions"
    results, todo = {}, []
    if main:  # process 0 alone reads and writes the output folder; the others learn what to run
        predictions_dir.mkdir(parents=True, exist_ok=True)
        results = read_results(output_dir)
        results.update({
            "format": RESULTS_FORMAT,
            "model": dict(run_info or {}),
            "data_dir": str(data_dir),
            "options": {"limit": limit, "batch_size": batch_size, "scoring": scoring,
                        "max_new_tokens": max_new_tokens, "commonsense_rule": commonsense_rule,
                        "aqua_rule": aqua_rule},
            "processes": processes.world,
            "device": str(processes.device),
        })
        for task in chosen:
            settings = _task_settings(task, options, loaded[task.name], limit, results["model"])
            if _resumable(results["tasks"].get(task.name), settings, predictions_dir / f"{task.name}.jsonl"):
                results["tasks"][task.name]["resumed"] = True
            else:
                todo.append(task.name)
    todo = processes.broadcast(todo)
    ran: list[str] = []
    with _progress(progress and main, console) as bar:
        for task in chosen:
            ran.append(task.name)
            if task.name not in todo:
                continue
            data = loaded[task.name]
            share = [data.examples[i] for i in processes.share(len(data.examples))]
            label = task.name if processes.world == 1 else f"{task.name} (1/{processes.world} of the examples)"
            bar_id = bar.add_task(label, total=len(share), rate="")
            started = time.perf_counter()

            def advance(n: int, bar_id=bar_id, started=started) -> None:
                bar.advance(bar_id, n)
                done = bar.tasks[bar.task_ids.index(bar_id)].completed
                bar.update(bar_id, rate=f"{done / max(time.perf_counter() - started, 1e-9):.2f} ex/s")

            records = task.predict(model, tokenizer, share, options, advance) if share else []
            shares = processes.gather(records)
            seconds = time.perf_counter() - started
            if main:
                records = processes.merge(len(data.examples), shares)
                _finish_task(task, records, options, data, limit, seconds, processes.world, results, output_dir)
    if main:
        write_results(output_dir, results)  # also when every task was resumed: the header and "resumed" marks
        console.print(results_table(results, ran))
        console.print(f"results: {output_dir / 'results.json'}")
    return processes.broadcast(results)


def _finish_task(task: EvalTask, records: list[dict], options: EvalOptions, data: TaskData, limit: int | None,
                 seconds: float, world: int, results: dict, output_dir: Path) -> None:
    """Score one task, write its predictions file and its entry in results.json (process 0)."""
    settings = _task_settings(task, options, data, limit, results["model"])
    metrics = task.score(records)
    write_atomic(output_dir / "predictions" / f"{task.name}.jsonl",
                 "".join(json.dumps(finite_or_none(r), ensure_ascii=False, allow_nan=False) + "\n" for r in records))
    results["tasks"][task.name] = {
        "suite": task.suite,
        "n": len(records),
        "metric": task.metric,
        "value": metrics[task.metric],
        "metrics": metrics,
        "rule": settings.get("rule"),
        "scoring": settings.get("scoring", options.scoring),  # a task may score its own way (GLUE: head)
        "max_new_tokens": settings.get("max_new_tokens"),
        "limit": limit,
        "data_file": str(data.path),
        "approx": data.approx,
        "settings": settings,
        "done": True,
        "processes": world,  # not a setting: a re-run with another process count predicts the same
        "seconds": round(seconds, 3),
        "examples_per_second": round(len(records) / seconds, 3) if seconds > 0 else None,
        "finished_at": _now(),
    }
    write_results(output_dir, results)


def write_results(output_dir: Path, results: dict) -> None:
    """The one writer of results.json: suite averages and the time stamp brought up to date, then written
    atomically (a task's entry lands as soon as it finishes, so an interrupted run resumes)."""
    results["suites"] = suite_averages(results["tasks"])
    results["timestamp"] = _now()
    write_json(Path(output_dir) / "results.json", results)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def results_table(results: dict, names: Sequence[str]):
    """A rich table of ``names`` (task rows) followed by the suite averages."""
    from rich.table import Table

    table = Table(title="neuroada eval")
    for column, justify in (("task", "left"), ("n", "right"), ("metric", "left"), ("value", "right"),
                            ("rule", "left"), ("scoring", "left")):
        table.add_column(column, justify=justify)
    for name in names:
        entry = results["tasks"][name]
        label = name + (" (approx data)" if entry.get("approx") else "") + (" (resumed)" if entry.get("resumed") else "")
        table.add_row(label, str(entry["n"]), entry["metric"], f"{100 * entry['value']:.2f}",
                      str(entry.get("rule")), str(entry.get("scoring")))
    suites = {results["tasks"][name]["suite"] for name in names}
    for suite, info in results.get("suites", {}).items():
        if suite in suites:
            note = "" if info["complete"] else f" ({len(info['tasks'])}/{info['suite_size']} tasks)"
            table.add_row(f"[bold]{suite} average{note}", "", info["metric"], f"[bold]{100 * info['average']:.2f}", "", "")
    return table


# ------------------------------------------------------------------------------ config-level entry
def default_output_dir(explicit: str | None, run_dir: str | os.PathLike | None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    if run_dir is not None:
        return Path(run_dir) / "eval"
    return Path("outputs") / "eval" / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def check_eval_inputs(cfg) -> tuple[list[EvalTask], Path]:
    """Resolve the eval tasks of ``cfg`` and check options and test files (fast one-line errors).

    Used before loading a model here and before training (a missing test file should fail at once).
    """
    from .. import paths

    e = cfg["eval"]
    data_dir = paths.data_dir(config_value(cfg, "data.dir"))
    tasks = resolve_tasks(config_value(cfg, "eval.tasks"), config_value(cfg, "task.eval_suite"))
    # Optional task hook: bind run values a task's data depends on (GLUE: the seeded split, max length).
    run_values = {"seed": config_value(cfg, "trainer.seed"), "max_length": config_value(cfg, "data.max_length")}
    tasks = [task.configure(**run_values) if callable(getattr(task, "configure", None)) else task for task in tasks]
    options = EvalOptions(batch_size=e["batch_size"], scoring=e["scoring"], max_new_tokens=e["max_new_tokens"],
                          commonsense_rule=e["commonsense_rule"], aqua_rule=e["aqua_rule"]).validate()
    for task in tasks:
        task.check(options)
        task.load(data_dir, 1)  # the test file exists and parses
    return tasks, data_dir


def run_eval_from_config(
    cfg,
    *,
    adapter: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    model=None,
    tokenizer=None,
    progress: bool = True,
    console=None,
) -> dict:
    """``neuroada eval``: resolve tasks and data first (fast one-line errors), then load, merge, evaluate.

    ``adapter`` (default ``eval.adapter``, which the CLI sets): an adapter folder (NeuroAda ``adapter/``;
    the PEFT folder for method=lora; the saved model folder for method=full); none = the base model.
    ``run_dir`` (default ``eval.run_dir``): the training run, recorded in results.json and giving the
    default output folder ``<run>/eval``. ``model``/``tokenizer``: an in-memory model (e.g. right after
    training) instead of loading ``cfg.model``; it is merged in place when ``eval.merge`` is true.
    """
    e = cfg["eval"]
    adapter = adapter if adapter is not None else config_value(cfg, "eval.adapter")
    run_dir = run_dir if run_dir is not None else config_value(cfg, "eval.run_dir")
    lm_eval = config_value(cfg, "eval.backend", "native") == "lm_eval"
    processes = current_processes()
    if lm_eval and processes.world > 1:
        raise UserError(f"eval.backend=lm_eval runs in one process (this launch has {processes.world}); start it "
                        "without accelerate launch, or use eval.backend=native to share the examples")
    if not lm_eval:
        tasks, data_dir = check_eval_inputs(cfg)
    merge = bool(config_value(cfg, "eval.merge", True))
    output_dir = default_output_dir(e["output_dir"], run_dir)
    if processes.is_main:  # before the model loads; only process 0 writes there
        check_writable_dir(output_dir, "eval.output_dir" if e["output_dir"] else "the eval output folder")
    output_dir = Path(processes.broadcast(str(output_dir)))  # a timestamped default: process 0's name
    if model is None:  # a new head (GLUE on a base model) is initialised alike on every process and every run
        import torch

        torch.manual_seed(int(config_value(cfg, "trainer.seed", 0) or 0))
    model, tokenizer, info = load_trained(cfg, adapter, merge=merge, model=model, tokenizer=tokenizer)
    model = place(model, processes.device)  # the accelerator's device, in the dtype it was loaded in
    if run_dir is not None:
        info["run_dir"] = str(run_dir)
    if lm_eval:
        return _run_lm_eval(cfg, model, tokenizer, info, output_dir, console)
    return evaluate(
        model, tokenizer, tasks, data_dir=data_dir, output_dir=output_dir,
        limit=e["limit"], batch_size=e["batch_size"], scoring=e["scoring"], max_new_tokens=e["max_new_tokens"],
        commonsense_rule=e["commonsense_rule"], aqua_rule=e["aqua_rule"], progress=progress,
        run_info=info, console=console, processes=processes,
    )


def _run_lm_eval(cfg, model, tokenizer, info: dict, output_dir: Path, console=None) -> dict:
    """eval.backend=lm_eval: the (merged) in-memory model through lm-evaluation-harness; its scores land in the
    same results.json as our suites' (suite "lm_eval", primary metric: acc_norm, else acc, else the first)."""
    from rich.console import Console

    from .lm_eval_backend import evaluate_lm_eval

    e = cfg["eval"]
    scores = evaluate_lm_eval(
        model, tokenizer, list(e["tasks"]), include_path=e["lm_eval_include_path"], limit=e["limit"],
        num_fewshot=e["num_fewshot"], batch_size=e["batch_size"], seed=config_value(cfg, "trainer.seed", 0),
        include_defaults=not e["lm_eval_only_included"])
    results = read_results(output_dir)
    results.update({"format": RESULTS_FORMAT, "model": info, "backend": "lm_eval", "processes": 1,
                    "device": str(next(model.parameters()).device)})
    for task, metrics in scores.items():
        metric = next((m for m in ("acc_norm", "acc", "exact_match") if m in metrics),
                      next(m for m in metrics if m != "n"))
        results["tasks"][task] = {
            "suite": "lm_eval", "n": metrics.get("n"), "metric": metric, "value": metrics[metric],
            "metrics": metrics, "rule": "lm-eval", "scoring": "lm-eval", "limit": e["limit"],
            "settings": {"backend": "lm_eval", "num_fewshot": e["num_fewshot"], "limit": e["limit"]},
            "done": True, "finished_at": _now(),
        }
    write_results(output_dir, results)
    console = console or Console()
    console.print(results_table(results, list(scores)))
    console.print(f"results: {output_dir / 'results.json'}")
    return results
