"""The trainable methods behind one interface, looked up in one table: NeuroAda, LoRA (PEFT baseline), full,
head only (linear probe).

One small class per method (``methods/neuroada.py``, ``lora.py``, ``full.py``,
``head.py``); nothing else compares method
names. ``METHOD_NAMES`` feeds the config schema's allowed values, so adding a method is: write its class,
add it to ``METHOD_MODULES``. This module imports no torch/transformers (config validation imports it).

    method = get_method(cfg.method)
    source, gguf_file = method.base_source(cfg, adapter_dir)   # what base to load (full: its saved model)
    model = method.attach(cfg, model, gradient_batches=..., resume_dir=...)
    method.count(model); method.save(model, tokenizer, path)
    model = method.load_for_eval(cfg, model, adapter_dir); plain = method.merge(model)

Config objects stop at this boundary: the method library (``neuroada_cli/core/``) gets plain values.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Protocol

from ..config_schema import config_value  # noqa: F401  (re-exported: the method classes read plain values with it)
from ..errors import UserError

METHOD_MODULES = {
    "neuroada": "neuroada_cli.methods.neuroada:NeuroAdaMethod",
    "lora": "neuroada_cli.methods.lora:LoraMethod",
    "full": "neuroada_cli.methods.full:FullMethod",
    "head": "neuroada_cli.methods.head:HeadMethod",
}
METHOD_NAMES = tuple(METHOD_MODULES)


class Method(Protocol):
    """What the recipe, eval and export need from a method (structural: no base class)."""

    name: str

    def describe(self, cfg) -> str:
        """One line for `neuroada validate`, e.g. "neuroada k=20 (magnitude)"."""

    def base_source(self, cfg, adapter_dir: Path | None) -> tuple[str, str | None]:
        """(name_or_path, gguf_file) of the base model to load, given the run's adapter/ (or None)."""


    def gradient_batch_count(self, cfg) -> int:
        """How many training global batches attach wants (NeuroAda selection=gradient); 0 = none."""

    def attach(self, cfg, model, *, gradient_batches=None, resume_dir: Path | None = None):
        """The trainable model; ``resume_dir`` (a checkpoint folder) restores its trained weights."""

    def load_for_eval(self, cfg, model, adapter_dir: Path):
        """``model`` (a loaded base) with the saved adapter applied."""

    def merge(self, model) -> tuple[Any, bool]:
        """(plain transformers model with the adapter folded into its weights, whether anything was merged)."""

    def count(self, model) -> dict:
        """run.json's counts: trainable_params, total_params, trainable_percent (+ the method's split)."""

    def save(self, model, tokenizer, path: Path) -> None:
        """Write adapter/ (or the whole model for full fine-tuning)."""


def get_method(name: str) -> Method:
    """The method object for ``name`` (``cfg.method``); UserError naming the valid names."""
    if name not in METHOD_MODULES:
        raise UserError(f"method={name!r} is unknown; use one of: {', '.join(METHOD_NAMES)}")
    module_name, class_name = METHOD_MODULES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()


def counts_line(counts: dict) -> str:
    """run.json's counts as one line: "trainable N of M (P%) = bypass a + head b" (the method's own split)."""
    parts = [f"{key[:-len('_params')]} {value:,}" for key, value in counts.items()
             if key.endswith("_params") and key not in ("trainable_params", "total_params")]
    return (f"trainable {counts['trainable_params']:,} of {counts['total_params']:,} "
            f"({counts['trainable_percent']:.3f}%)" + (f" = {' + '.join(parts)}" if parts else ""))


def load_trained(cfg, adapter_dir: str | os.PathLike | None, *, merge: bool, model=None, tokenizer=None,
                 full_precision: bool = False):
    """(model, tokenizer, info): the run's base with its adapter applied, merged (fp32) if ``merge``.

    ``model``/``tokenizer``: an already-loaded model (e.g. right after training) instead of loading the base;
    ``adapter_dir`` None = the base alone (or the adapter is already on ``model``). Used by eval and export.
    A run with ``model.quantization``: unmerged on the quantized base; ``merge`` folds the adapter into a
    dequantized copy of it (eval.merge); ``full_precision`` (export) loads the base unquantized instead and merges
    there, exactly as into the base a bf16 run would have trained on (the cells were chosen on those weights).
    """
    method = get_method(config_value(cfg, "method", "neuroada"))
    adapter = Path(adapter_dir) if adapter_dir is not None else None
    if adapter is not None and not adapter.is_dir():
        raise UserError(f"adapter {str(adapter_dir)!r} not found; pass the adapter/ folder of a training run")
    if model is not None and full_precision:
        from ..models import is_quantized

        if is_quantized(model):  # the trained model sits on the quantized base: load the full-precision one
            if adapter is None:
                raise ValueError("load_trained: full_precision on a quantized model needs its saved adapter_dir")
            model = None
    if model is None:
        model, tokenizer = load_base(cfg, adapter, full_precision=full_precision, training=False)
        model = method.load_for_eval(cfg, model, adapter) if adapter is not None else model
    elif adapter is not None:
        model = method.load_for_eval(cfg, model, adapter)
    if tokenizer is None:
        raise ValueError("load_trained: pass tokenizer together with model")
    merged = False
    if merge:
        model, merged = method.merge(model)
    info = {"name_or_path": config_value(cfg, "model.name_or_path"), "dtype": config_value(cfg, "model.dtype"),
            "quantization": None if full_precision else config_value(cfg, "model.quantization"),
            "method": method.name, "adapter": str(adapter_dir) if adapter_dir is not None else None,
            "adapter_files": _fingerprint(adapter), "merged": merged, "recipe": config_value(cfg, "recipe")}
    return model, tokenizer, info


def load_base(cfg, adapter_dir: Path | None, *, kind=None, empty: bool = False, full_precision: bool = False,
              training: bool = True):
    """(model, tokenizer): the base the run's method needs (full fine-tuning: its saved model), loaded with the
    config's model keys and the task kind's head options; ``empty`` builds it on the meta device (fsdp);
    ``full_precision`` ignores model.quantization (export); ``training`` False (eval, export) skips the refusals
    that only concern training on a quantized base. The one place training, eval and export turn a
    config into a loaded base."""
    from ..kinds import get_kind
    from ..models import check_quantization, load_model_and_tokenizer

    quantization = None if full_precision else config_value(cfg, "model.quantization")
    check_quantization(quantization)  # a missing bitsandbytes: one line, before the tokenizer or any weight loads
    if quantization is not None and training:
        refuse_on_quantized_base(cfg, quantization)
    kind = kind or get_kind(config_value(cfg, "task.kind", "causal_lm")).from_config(cfg)
    source, gguf_file = get_method(config_value(cfg, "method", "neuroada")).base_source(cfg, adapter_dir)
    return load_model_and_tokenizer(
        source, kind=kind.name, dtype=config_value(cfg, "model.dtype", "float32"), gguf_file=gguf_file,
        family=config_value(cfg, "model.family", "auto"),
        attn_implementation=config_value(cfg, "model.attn_implementation"), empty=empty, quantization=quantization,
        **kind.model_options())


def refuse_on_quantized_base(cfg, quantization: str) -> None:
    """One line, before the model loads, for what cannot train on a frozen 4/8-bit base."""
    method = config_value(cfg, "method", "neuroada")
    if config_value(cfg, "trainer.strategy") == "fsdp":
        raise UserError(QUANTIZED_FSDP_REFUSAL.format(quantization=quantization))
    if method == "full":
        raise UserError(f"method=full cannot train a model.quantization={quantization} base (its 4/8-bit weights "
                        "take no gradient); use method=neuroada or method=lora, or model.quantization=null")
    if method == "neuroada" and config_value(cfg, "neuroada.selection") == "gradient":
        raise UserError(f"neuroada.selection=gradient is not available on a model.quantization={quantization} base; "
                        "use selection=magnitude (chosen on the full-precision weights)")


# FSDP2 itself can shard a bitsandbytes 4-bit layer: with bnb_4bit_quant_storage = the model dtype the packed
# codes are ordinary bf16 rows, and Linear4bit restores its quantization state from the module after the
# all-gather (a 2-process gloo probe gave the unsharded forward bitwise, backward ran). What is missing is the
# strategy's side: its lean loading builds every model on the meta device and fills it from process 0's copy,
# and a bitsandbytes model quantizes while it loads, so it cannot be built that way; nor do its checkpoints know
# packed weights. Until that is wired, refuse.
QUANTIZED_FSDP_REFUSAL = ("model.quantization={quantization} is not supported with trainer.strategy=fsdp yet (its "
                          "lean loading builds the model on the meta device, which a bitsandbytes base cannot be); "
                          "use trainer.strategy=ddp: a 4-bit base is small enough to replicate")


def _fingerprint(folder: Path | None) -> str | None:
    """Size and mtime of the adapter's files: a retrained adapter at the same path is not "the same"."""
    if folder is None or not folder.is_dir():
        return None
    stats = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in folder.iterdir() if p.is_file())
    return ";".join(f"{name}:{size}:{mtime}" for name, size, mtime in stats)
