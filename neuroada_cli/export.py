"""``neuroada export run=DIR [output=PATH]``: the run's adapter merged into a plain transformers checkpoint.

The result loads with ``AutoModelForCausalLM.from_pretrained(PATH)`` alone: no neuroada, no peft, no
extra modules (NeuroAda: ``unload`` merges every delta in fp32 and rounds once to the base dtype).
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


def export(run: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    from .atomic import atomic_directory, check_writable_dir
    from .config import load_run_config
    from .methods import load_trained
    from .models import drop_quantization

    run = Path(run)
    cfg = load_run_config(run)
    adapter = run / "adapter"
    if not adapter.is_dir():
        raise UserError(f"{str(run)!r} has no adapter/ yet (did the training finish?); nothing to export")
    target = Path(output) if output else run / "merged"
    if target.is_dir() and any(target.iterdir()):
        raise UserError(f"export target {str(target)!r} is not empty; pass output=ANOTHER_PATH or remove it")
    check_writable_dir(target, "output")  # a file in the way or a read-only folder: before the model loads

    # An export is always merged, whatever the run chose for its evaluation.
    model, tokenizer, _ = load_trained(cfg, adapter, merge=True)
    drop_quantization(model)
    with atomic_directory(target) as staging:  # an interrupted export leaves no half checkpoint behind
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
