"""The run directory on disk: occupancy check, atomic checkpoints, the train log, the run record.

Layout (the same for every method)::

    <output_dir>/config.yaml        resolved config, including the actual output_dir
    <output_dir>/train_log.jsonl    one JSON object per logged optimizer step
    <output_dir>/adapter/           the trained adapter (NeuroAda: save_adapter; LoRA: PEFT adapter)
    <output_dir>/run.json           parameter counts, memory, timings, adapter size, git commit
    <output_dir>/checkpoints/step-N/   adapter/ + trainer_state.pt (optimizer, scheduler, RNG, step)

Checkpoints are written to a hidden temporary directory and renamed into place, so a run killed at
any moment leaves either the previous checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from . import paths

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
    """Call ``write(tmp_dir)`` then rename tmp_dir to checkpoints/step-<step>; keep the last ``keep``."""
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _fsync_tree(directory: Path) -> None:
    """Flush file contents before the rename makes the checkpoint visible (survives a power cut)."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


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
    log_path.write_text("".join(f"{line}\n" for line in kept))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_json(path: Path, value: dict) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


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
    try:
        result = subprocess.run(
            ["git", "-C", str(paths.REPO_DIR), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


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


def load_trainer_state(checkpoint: Path, optimizer, scheduler) -> tuple[int, dict]:
    """Restore optimizer, scheduler and RNG states from a checkpoint; returns its step and ``extra``."""
    import numpy as np
    import torch

    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy(), *rng["numpy"][2:]))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"]), state.get("extra", {})
