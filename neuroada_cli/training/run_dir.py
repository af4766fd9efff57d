"""The run directory on disk: occupancy check, atomic checkpoints, the train log, the run record.

Layout (the same for every method)::

    <output_dir>/config.yaml        resolved config, including the actual output_dir
    <output_dir>/train_log.jsonl    one JSON object per logged optimizer step
    <output_dir>/adapter/           the trained adapter (NeuroAda: save_adapter; LoRA: PEFT adapter); with
                                    validation, the best evaluation's
    <output_dir>/adapter_last/      with validation only: the final weights
    <output_dir>/run.json           parameter counts, memory, timings, adapter size, validation, package version
    <output_dir>/checkpoints/step-N/   adapter/ + trainer_state.pt (optimizer, scheduler, RNG, step, validation)
    <output_dir>/trackers/          trainer.report_to: TensorBoard events, MLflow file store, wandb offline run
    <output_dir>/.neuroada.lock     while a run is on it: its pid, host, start (run_lock.py; one run per directory)

Checkpoints go through ``atomic.atomic_directory`` (a hidden temporary directory renamed into place), so
a run killed at any moment leaves either the previous checkpoint or the new one, never half of one; the next
checkpoint write removes the staging folders such a kill left (``atomic.remove_leftovers``).
"""
from __future__ import annotations

import importlib.metadata
import json
import random
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ..atomic import atomic_directory, remove_leftovers, write_atomic
from ..errors import UserError, one_line, reading

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
RUN_MARKERS = ("config.yaml", "train_log.jsonl", "run.json", CHECKPOINTS, "adapter")


def holds_run(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in RUN_MARKERS)


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary directories of a killed write are ignored)."""
    root = output_dir / CHECKPOINTS
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / "trainer_state.pt").is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> tuple[int, Path] | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def write_checkpoint(output_dir: Path, step: int, write: Callable[[Path], None], keep: int = 1) -> Path:
    """Call ``write(folder)`` on an empty folder that becomes checkpoints/step-<step> atomically; keep the
    last ``keep`` checkpoints."""
    root = output_dir / CHECKPOINTS
    final = root / f"step-{step}"
    with atomic_directory(final) as folder:
        write(folder)
    for _, old in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    remove_leftovers(root)  # staging folders of checkpoint writes killed in an earlier session (dead writers only)
    return final


def truncate_log(log_path: Path, last_step: int) -> None:
    """Drop log lines past ``last_step`` (written by a killed run after its last checkpoint)."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the kill
    write_atomic(log_path, "".join(f"{line}\n" for line in kept))


def peak_memory() -> dict:
    """Peak memory of this process: CUDA max allocated on GPU, else the peak resident set size."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "peak_memory_kind": "cuda_max_allocated"}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return {"peak_memory_bytes": int(peak_kib * scale), "peak_memory_kind": "rss"}


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def git_commit() -> str | None:
    """The commit of the source checkout this package runs from (an editable install), else None.

    A wheel install has no checkout; a venv inside some other repository must not report that
    repository's commit, so the package's own ``__init__.py`` has to be tracked by the repository found.
    """
    package = Path(__file__).resolve().parent
    try:
        tracked = subprocess.run(["git", "-C", str(package), "ls-files", "--error-unmatch", "__init__.py"],
                                 capture_output=True, text=True, timeout=5)
        if tracked.returncode != 0:
            return None
        head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() or None


def source_version() -> dict:
    """run.json's record of the code that ran: the installed package version and, from a checkout, the commit."""
    try:
        version = importlib.metadata.version("neuroada")
    except importlib.metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        version = None
    return {"package_version": version, "git_commit": git_commit()}


def trainer_state(step: int, position: tuple[int, int], optimizer, scheduler, extra: dict | None = None) -> dict:
    """Everything besides the adapter that a resumed run needs to continue bitwise (``extra``: loop state
    such as the best selection score so far; plain JSON-like values)."""
    import numpy as np
    import torch

    numpy_state = np.random.get_state()
    return {
        "step": step, "epoch": position[0], "batch_in_epoch": position[1],
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "extra": extra or {},
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }


TRAINER_STATE_KEYS = ("step", "optimizer", "scheduler", "rng")
_DAMAGED_FIX = "delete that checkpoint folder to resume from an earlier one, or start a new run"


def read_trainer_state(checkpoint: Path) -> dict:
    """A checkpoint's trainer_state.pt, checked: UserError naming the file when it is damaged."""
    import torch

    path = checkpoint / "trainer_state.pt"
    with reading(path, "trainer state", _DAMAGED_FIX):  # truncated zip, pickle errors, unreadable file
        state = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in TRAINER_STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(f"trainer state {str(path)!r} is damaged (no {', '.join(missing)}); {_DAMAGED_FIX}")
    return state


def restore_trainer_state(state: dict, checkpoint: Path, optimizer, scheduler) -> tuple[int, dict]:
    """Restore optimizer, scheduler and RNG states from ``read_trainer_state``; returns its step and ``extra``."""
    import numpy as np
    import torch

    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy(), *rng["numpy"][2:]))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
        raise UserError(f"{str(checkpoint / 'trainer_state.pt')!r} does not fit this run ({one_line(err, 150)}); "
                        "resume with the config that wrote it, or start a new run") from None
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"]), state.get("extra", {})

