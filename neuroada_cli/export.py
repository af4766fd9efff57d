"""``neuroada export run=DIR [output=PATH]``: the run's adapter merged into a plain transformers checkpoint.

The result loads with ``AutoModelForCausalLM.from_pretrained(PATH)`` alone: no neuroada, no peft, no
extra modules (NeuroAda: ``unload`` merges every delta in fp32 and rounds once to the base dtype). The merge
runs on the accelerator when there is one (the same fp32 add and one rounding as on CPU, so the same
weights), and falls back to the CPU when the model does not fit there.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import UserError

logger = logging.getLogger(__name__)


def merge_device():
    """The accelerator's device (CUDA, or whatever torch.accelerator reports), else the CPU."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return torch.device(accelerator.current_accelerator())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_merge_device(model, device=None):
    """``model`` on ``device`` (default ``merge_device()``) when all of it sits on the CPU; a model placed
    elsewhere already (quantised, device_map) stays where it is, and one that does not fit stays on the CPU."""
    import torch

    device = merge_device() if device is None else torch.device(device)
    if device.type == "cpu" or any(p.device.type != "cpu" for p in model.parameters()):
        return model
    try:
        return model.to(device)
    except torch.OutOfMemoryError:
        model.to("cpu")
        torch.cuda.empty_cache() if device.type == "cuda" else None
        logger.warning("the model does not fit on %s; merging on the CPU", device)
        return model


def export(run: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    from .atomic import atomic_directory, check_writable_dir
    from .config import load_run_config
    from .methods import load_base, load_trained
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

    # An export is always merged, whatever the run chose for its evaluation, into the full-precision base (a run
    # trained on a 4/8-bit base too: its cells were chosen on those weights).
    base, tokenizer = load_base(cfg, adapter, full_precision=True)
    model, tokenizer, _ = load_trained(cfg, adapter, merge=True, model=to_merge_device(base), tokenizer=tokenizer,
                                       full_precision=True)
    drop_quantization(model)
    with atomic_directory(target) as staging:  # an interrupted export leaves no half checkpoint behind
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
