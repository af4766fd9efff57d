"""The table printed after a sweep (``neuroada train -m ...``): one row per job, one column per eval task.

Reads each run's ``eval/results.json`` (written when ``eval.after_train`` is true); runs without one
are listed with their run directory and "-" values, so a partly evaluated sweep still shows what exists.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .runner import read_results


def read_run_results(run_dir: Path) -> dict:
    return read_results(Path(run_dir) / "eval")["tasks"]


def sweep_table(jobs: Sequence[tuple[Sequence[str], Path]]):
    """A rich Table for (job overrides, run dir) pairs, or None when no run has eval results.

    A job is labelled by the overrides that differ between jobs (what the sweep varied).
    """
    from rich.table import Table

    shared = set.intersection(*(set(overrides) for overrides, _ in jobs)) if jobs else set()
    rows = [(" ".join(o for o in overrides if o not in shared), Path(run), read_run_results(run))
            for overrides, run in jobs]
    columns: dict[str, str] = {}  # task -> its primary metric, in first-seen order
    for _, _, tasks in rows:
        for name, entry in tasks.items():
            if entry.get("done"):
                columns.setdefault(name, entry.get("metric", ""))
    if not columns:
        return None
    table = Table(title="neuroada sweep summary")
    table.add_column("job", justify="left")
    for name, metric in columns.items():
        table.add_column(f"{name}\n{metric}", justify="right")
    table.add_column("run", justify="left")
    for label, run, tasks in rows:
        values = [f"{100 * tasks[name]['value']:.2f}" if tasks.get(name, {}).get("done") else "-" for name in columns]
        table.add_row(label or "(defaults)", *values, str(run))
    return table
