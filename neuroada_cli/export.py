"""``neuroada export run=DIR [output=PATH]``: the run's adapter merged into a plain transformers checkpoint.

The result loads with ``AutoModelForCausalLM.from_pretrained(PATH)`` alone: no neuroada, no peft, no
extra modules (NeuroAda: ``unload`` merges every delta in fp32 and rounds once to the base dtype).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


def export(run: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    from .config import load_run_config
    from .eval.runner import prepare_model
    from .models import drop_quantization

    run = Path(run)
    cfg = load_run_config(run)
    adapter = run / "adapter"
    if not adapter.is_dir():
        raise UserError(f"{str(run)!r} has no adapter/ yet (did the training finish?); nothing to export")
    target = Path(output) if output else run / "merged"
    if target.exists() and any(target.iterdir()):
        raise UserError(f"export target {str(target)!r} is not empty; pass output=ANOTHER_PATH or remove it")

    cfg.eval.merge = True  # an export is always merged, whatever the run chose for its evaluation
    model, tokenizer, _ = prepare_model(cfg, adapter=adapter)
    drop_quantization(model)

    # Write next to the target and rename: an interrupted export leaves no half checkpoint behind.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
