"""NeuroAda (the method): a trainable delta at the k largest input connections of every target neuron.

On a quantized base (model.quantization) the layers run unmerged (neuroada.mode=auto): the 4/8-bit weights are
never written. The cells are still chosen on the full-precision weights when the checkpoint has them (read from
its safetensors files layer by layer, see models.full_precision_weights), so the adapter is the one a bf16 run
selects, carries that base's fingerprint and merges exactly into it (``neuroada export``).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import config_value


def selection_weights(cfg, model, config):
    """{target layer: its full-precision weight, read lazily} for a quantized ``model``; None otherwise or when
    the checkpoint has none (pre-quantized): then core selects on the dequantized weights."""
    from ..core.model import find_targets
    from ..models import full_precision_weights, is_quantized, torch_dtype

    checkpoint = getattr(model, "neuroada_checkpoint", None)
    if not is_quantized(model) or checkpoint is None:
        return None
    shapes = {name: (module.out_features, module.in_features) for name, module in find_targets(model, config).items()}
    return full_precision_weights(checkpoint, shapes, torch_dtype(config_value(cfg, "model.dtype", "float32")),
                                  prefix=getattr(model, "base_model_prefix", ""))


def merge_into_dequantized(model):
    """Every NeuroAda layer on a bitsandbytes base replaced by a dense nn.Linear holding dequantized W + delta
    (fp32 sum, rounded once to the compute dtype), the other quantized layers dequantized: the unmerged quantized
    forward as a plain model (eval.merge=true on a quantized run; ``neuroada export`` merges into the
    full-precision base instead)."""
    import torch
    from torch import nn

    from ..core import neuroada_layers
    from ..core.quantized import dequantized_weight
    from ..models import drop_quantization
    from ..models.loading import quiet_transformers

    for name, layer in neuroada_layers(model).items():
        base = layer.base_layer
        dtype = getattr(base, "compute_dtype", None) or model.dtype
        weight = dequantized_weight(base).to(base.weight.device)
        for adapter in layer.active_adapters:  # PEFT's dense update W_merged - W, fp32
            weight += layer.get_delta_weight(adapter).to(weight.device)
        dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device,
                          dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if base.bias is not None:
                dense.bias.copy_(base.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, dense)
    if hasattr(model, "neuroada_config"):
        del model.neuroada_config
    if getattr(model, "hf_quantizer", None) is not None:  # the layers NeuroAda did not adapt
        with quiet_transformers():
            model.dequantize()
    drop_quantization(model)
    return model


def _mode(cfg) -> dict:
    """neuroada.mode for NeuroAdaConfig; auto (the default: unmerged iff the base is quantized) is left to it."""
    mode = config_value(cfg, "neuroada.mode", "auto")
    return {} if mode == "auto" else {"mode": mode}


class NeuroAdaMethod:
    name = "neuroada"

    def describe(self, cfg) -> str:
        n = cfg.neuroada
        placement = "" if n.scope == "neuron" else f", scope={n.scope}"
        coverage = "" if n.neuron_fraction >= 1 else f", {n.neuron_fraction:g} of neurons"
        quantized = config_value(cfg, "model.quantization")
        base = f", on an {quantized} base" if quantized else ""
        return f"neuroada k={n.k} ({n.selection}{placement}{coverage}{base})"

    def base_source(self, cfg, adapter_dir: Path | None) -> tuple[str, str | None]:
        return config_value(cfg, "model.name_or_path"), config_value(cfg, "model.gguf_file")

    def gradient_batch_count(self, cfg) -> int:
        return cfg.neuroada.gradient_batches if cfg.neuroada.selection == "gradient" else 0

    def attach(self, cfg, model, *, gradient_batches=None, resume_dir: Path | None = None):
        """Resume restores the checkpoint's adapter with its saved cells, so gradient selection is not re-run."""
        from .. import NeuroAdaConfig, inject

        if resume_dir is not None:
            return self.load_for_eval(cfg, model, Path(resume_dir) / "adapter")
        from .targets import resolve_targets

        n = cfg.neuroada
        # A model on the meta device (trainer.strategy=fsdp, processes > 0) only needs the layout: its values come
        # from process 0, so any selection with the same shapes will do (gradient scores could not be computed).
        selection = "magnitude" if next(model.parameters()).is_meta else n.selection
        # all-linear is expanded here, on the loaded model; the adapter config records the resolved names
        config = NeuroAdaConfig(k=n.k, target_modules=resolve_targets(n.target_modules, model), selection=selection,
                                train_bias=n.train_bias, modules_to_save=list(n.modules_to_save), seed=n.seed,
                                impl=n.impl, scope=n.scope, neuron_fraction=n.neuron_fraction, **_mode(cfg))
        try:
            weights = selection_weights(cfg, model, config)
            extra = {"weights": weights} if weights is not None else {}
            return inject(model, config, gradient_batches=gradient_batches, **extra)
        except UserError:
            raise
        except ValueError as err:  # shape problems the method library reports as ValueError
            raise UserError(f"cannot apply NeuroAda: {err}") from None

    def load_for_eval(self, cfg, model, adapter_dir: Path):
        """On a quantized base the fingerprint is checked against the full-precision weights (when the checkpoint
        has them): the adapter was selected on those."""
        from .. import load_adapter
        from ..core.adapter import read_adapter
        from ..models import is_quantized

        weights = selection_weights(cfg, model, read_adapter(adapter_dir).config) if is_quantized(model) else None
        return load_adapter(model, adapter_dir, **({"weights": weights} if weights is not None else {}))

    def merge(self, model):
        """Deltas added to the base weights in fp32 (rounded once), NeuroAda layers replaced by nn.Linear; on a
        quantized base into a dequantized copy (merge_into_dequantized)."""
        from .. import neuroada_layers, unload
        from ..models import is_quantized

        if not neuroada_layers(model):
            return model, False
        if is_quantized(model):
            return merge_into_dequantized(model), True
        return unload(model), True

    def count(self, model) -> dict:
        from .. import count_parameters
        from ..models.quantized import packed_parameter_excess

        # ParameterCount's names with run.json's suffixes: trainable_params, ..., trainable_percent.
        counts = {("trainable_percent" if key == "percent" else f"{key}_params"): value
                  for key, value in count_parameters(model).as_dict().items()}
        excess = packed_parameter_excess(model)  # 4-bit weights: count what they hold, as for the bf16 base
        if excess:
            counts["total_params"] += excess
            counts["trainable_percent"] = 100.0 * counts["trainable_params"] / counts["total_params"]
        return counts

    def save(self, model, tokenizer, path: Path) -> None:
        from .. import save_adapter

        save_adapter(model, path)
