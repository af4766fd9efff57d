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
    from .models import load_model_and_tokenizer

    run = Path(run)
    cfg = load_run_config(run)
    adapter = run / "adapter"
    if not adapter.is_dir():
        raise UserError(f"{str(run)!r} has no adapter/ yet (did the training finish?); nothing to export")
    target = Path(output) if output else run / "merged"
    if target.exists() and any(target.iterdir()):
        raise UserError(f"export target {str(target)!r} is not empty; pass output=ANOTHER_PATH or remove it")

    source = str(adapter) if cfg.method == "full" else cfg.model.name_or_path
    model, tokenizer = load_model_and_tokenizer(
        source, kind=cfg.task.kind, dtype=cfg.model.dtype, gguf_file=None if cfg.method == "full" else cfg.model.gguf_file,
        family=cfg.model.family, num_labels=cfg.task.num_labels, problem_type=cfg.task.problem_type,
    )
    if cfg.method == "neuroada":
        from . import load_adapter, unload

        model = unload(load_adapter(model, adapter))
    elif cfg.method == "lora":
        from .methods import import_peft

        model = import_peft().PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    _drop_quantization(model)

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


def _drop_quantization(model) -> None:
    """A merged model is plain dense weights; a leftover quantizer would make save/load treat it otherwise."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for flag in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
