"""Adapter files in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors`` (never pickle).

One format for ``save_adapter`` and ``PeftModel.save_pretrained`` (see peft_tuner.py for the keys): the
config is a ``NeuroAdaPeftConfig``'s JSON (``"peft_type": "NEUROADA"``, written by adapter_format.py without
importing peft), so ``PeftModel.from_pretrained`` reads
what ``save_adapter`` writes and ``load_adapter`` reads what PEFT writes. Per target layer the file holds
the delta values ([d_out, k] fp32), their column indices in the smallest integer type that fits d_in
(int16 up to 32767 inputs, else int32) and a fingerprint of the base values at those cells, checked on
load so that an adapter is never applied to another base model; plus trained biases and fully trained
modules (``modules_to_save``).

Adapters of the first release (``"format": "neuroada-adapter"``, keys ``<layer>.delta`` / ``.indices``)
still load: ``read_adapter`` turns both into one in-memory form.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_directory
from ..errors import UserError, one_line, reading
from .config import NeuroAdaConfig
from .quantized import QUANTIZED_FINGERPRINT_RTOL
from .model import saved_module_names, inject, neuroada_layers
from .adapter_format import (
    PEFT_KEY_PREFIX,
    PEFT_TYPE_NAME,
    adapter_config_dict,
    base_digest,
    fingerprint,
    fingerprint_matches,
    index_dtype,
    wrong_base_error,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_FORMAT = "neuroada-adapter"  # the first release's own layout (format_version 1)
LEGACY_FORMAT_VERSION = 1


@dataclass
class AdapterContents:
    """An adapter file read into memory, whichever layout it was written in."""

    config: NeuroAdaConfig
    base_model: str | None
    indices: dict[str, torch.Tensor]  # layer name -> [d_out, k] int64 columns
    deltas: dict[str, torch.Tensor]
    fingerprints: dict[str, torch.Tensor]  # layer name -> [3] float64
    shapes: dict[str, tuple[int, int] | None] = field(default_factory=dict)  # known only for legacy files
    # general cell layout (scope=layer|global, neuron_fraction < 1): layer -> [d_out] cells per row; its
    # indices and deltas are then 1-D [n] in CSR order (see NeuroAdaLinear)
    row_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    saved_modules: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> value


def adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the adapter_config.json content (a NeuroAdaPeftConfig's fields) save_adapter writes."""
    layers = neuroada_layers(model)
    config: NeuroAdaConfig | None = getattr(model, "neuroada_config", None)
    if not layers or config is None:
        raise UserError("this model has no NeuroAda layers; call inject(model, config) or load_adapter first")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        key = PEFT_KEY_PREFIX + name
        tensors[f"{key}.neuroada_delta"] = layer.delta.detach().float().cpu().contiguous()
        tensors[f"{key}.neuroada_indices"] = layer.neuroada_idx.to(index_dtype(layer.in_features)).cpu().contiguous()
        if layer.neuroada_row_counts is not None:  # counts <= d_in, so the index dtype holds them
            counts = layer.neuroada_row_counts.to(index_dtype(layer.in_features)).cpu().contiguous()
            tensors[f"{key}.neuroada_row_counts"] = counts
        tensors[f"{key}.neuroada_fingerprint"] = fingerprint(layer.neuroada_orig)
        if config.train_bias and layer.base_layer.bias is not None:
            tensors[f"{key}.base_layer.bias"] = layer.base_layer.bias.detach().cpu().contiguous()
    for saved in saved_module_names(model, config.modules_to_save):
        for pname, param in model.get_submodule(saved).named_parameters():
            tensors[f"{PEFT_KEY_PREFIX}{saved}.{pname}"] = param.detach().cpu().contiguous()
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_config = adapter_config_dict(config, base_name,
                                      base_digest({name: layer.neuroada_orig for name, layer in layers.items()}))
    return tensors, peft_config


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter directory atomically: a crash leaves the previous adapter (or nothing), never half."""
    tensors, peft_config = adapter_state(model)
    path = Path(path)
    with atomic_directory(path) as staging:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        # PeftConfig.save_pretrained's bytes: sorted keys, indent 2, no newline at the end
        (staging / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
    return path


def read_adapter(path: str | os.PathLike) -> AdapterContents:
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise UserError(f"{str(path)!r} is not a NeuroAda adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    meta, tensors = _read_files(config_file, weights_file)
    try:
        if meta.get("format") == LEGACY_FORMAT:
            if meta.get("format_version", 0) > LEGACY_FORMAT_VERSION:
                raise UserError(f"adapter {str(path)!r} has format version {meta['format_version']}; upgrade neuroada")
            contents = _from_legacy(meta, tensors)
        elif meta.get("peft_type") != PEFT_TYPE_NAME:
            kind = meta.get("peft_type") or meta.get("format")
            raise UserError(f"{str(config_file)!r} is not a NeuroAda adapter config (type {kind!r}); "
                            "load it with the method that wrote it")
        else:
            contents = _from_peft(meta, tensors)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"{str(config_file)!r} is damaged (bad or missing entry {_short(err)}); restore the "
                        "adapter from its run or retrain it") from None
    _check_contents(contents, path)
    return contents


def _short(err: Exception) -> str:
    return one_line(err, 123)


def _read_files(config_file: Path, weights_file: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the tensors; a truncated or garbled file is an error naming it."""
    fix = "restore the adapter from its run or retrain it"
    with reading(config_file, "adapter config", fix):
        meta = json.loads(config_file.read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise UserError(f"{str(config_file)!r} is damaged (not a JSON object); restore the adapter or retrain it")
    with reading(weights_file, "adapter weights", fix):
        tensors = load_file(str(weights_file))
    return meta, tensors


def _check_contents(contents: AdapterContents, path: Path) -> None:
    """The config against the tensors: the same layers in every part, [d_out, k] shapes with the config's k,
    indices >= 0 (the upper bound is checked against the model), a fingerprint per layer."""
    where = str(path / WEIGHTS_NAME)
    k = contents.config.k
    parts = {"indices": contents.indices, "deltas": contents.deltas, "fingerprints": contents.fingerprints}
    layers = set(contents.indices)
    if not layers:
        raise UserError(f"{where!r} holds no NeuroAda layers; it is not the adapter its config describes")
    for part, values in parts.items():
        if set(values) != layers:
            odd = sorted(set(values) ^ layers)[0]
            raise UserError(f"{where!r} is inconsistent: layer {odd!r} is missing from the {part} or only there; "
                            "restore the adapter from its run or retrain it")
    for name in sorted(layers):
        idx, delta = contents.indices[name], contents.deltas[name]
        if name in contents.row_counts:
            counts = contents.row_counts[name]
            if idx.ndim != 1 or idx.shape != delta.shape or counts.ndim != 1 or int(counts.sum()) != idx.numel() \
                    or (counts.numel() and int(counts.min()) < 0):
                raise UserError(f"{where!r} is damaged: layer {name!r} has {idx.numel()} cells but row counts summing "
                                f"to {int(counts.sum())} (or deltas {tuple(delta.shape)}); retrain the adapter")
            if idx.numel() and int(idx.min()) < 0:
                raise UserError(f"{where!r} is damaged: layer {name!r} has negative input indices; retrain the adapter")
            continue
        if idx.ndim != 2 or idx.shape != delta.shape or idx.shape[1] != k:
            raise UserError(f"adapter {str(path)!r} does not match its config: layer {name!r} has indices "
                            f"{tuple(idx.shape)} and deltas {tuple(delta.shape)}, but k={k} needs [d_out, {k}]; "
                            f"restore {CONFIG_NAME} or retrain")
        if idx.numel() and int(idx.min()) < 0:
            raise UserError(f"{where!r} is damaged: layer {name!r} has negative input indices; retrain the adapter")


def _from_peft(meta: dict, tensors: dict[str, torch.Tensor]) -> AdapterContents:
    config = NeuroAdaConfig.from_dict(meta)  # validates every field (one home for the rules and messages)
    contents = AdapterContents(config=config, base_model=meta.get("base_model_name_or_path"),
                               indices={}, deltas={}, fingerprints={})
    suffixes = (".neuroada_delta", ".neuroada_indices", ".neuroada_fingerprint", ".neuroada_row_counts")
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_KEY_PREFIX)
        if name.endswith(".neuroada_indices"):
            contents.indices[name.removesuffix(".neuroada_indices")] = value.long()
        elif name.endswith(".neuroada_delta"):
            contents.deltas[name.removesuffix(".neuroada_delta")] = value
        elif name.endswith(".neuroada_row_counts"):
            contents.row_counts[name.removesuffix(".neuroada_row_counts")] = value.long()
        elif name.endswith(".neuroada_fingerprint"):
            contents.fingerprints[name.removesuffix(".neuroada_fingerprint")] = value
        elif name.endswith(".base_layer.bias"):
            contents.biases[name.removesuffix(".base_layer.bias")] = value
        elif not name.endswith(suffixes):
            contents.saved_modules[name] = value
    return contents


def _from_legacy(meta: dict, tensors: dict[str, torch.Tensor]) -> AdapterContents:
    layers = meta["layers"]
    return AdapterContents(
        config=NeuroAdaConfig.from_dict(meta["config"]),
        base_model=meta.get("base_model"),
        indices={name: tensors[f"{name}.indices"].long() for name in layers},
        deltas={name: tensors[f"{name}.delta"] for name in layers},
        fingerprints={name: torch.tensor(info["fingerprint"], dtype=torch.float64) for name, info in layers.items()},
        shapes={name: tuple(info["shape"]) for name, info in layers.items()},
        biases={name: tensors[f"{name}.bias"] for name in layers if f"{name}.bias" in tensors},
        saved_modules={key.removeprefix("modules_to_save."): value for key, value in tensors.items()
                       if key.startswith("modules_to_save.")},
    )


def _check_shapes(model: nn.Module, contents: AdapterContents, where: str) -> None:
    modules = dict(model.named_modules())
    for name, idx in contents.indices.items():
        module = modules.get(name)
        rows = contents.row_counts[name].shape[0] if name in contents.row_counts else idx.shape[0]
        expected = contents.shapes.get(name) or (rows, None)
        top = int(idx.max()) if idx.numel() else -1  # a layer may hold no cell (scope=global)
        fits = isinstance(module, nn.Linear) and module.out_features == expected[0] and (
            expected[1] is None or module.in_features == expected[1]) and top < module.in_features
        if not fits:
            base = f" (trained on {contents.base_model})" if contents.base_model else ""
            if not isinstance(module, nn.Linear):
                raise UserError(f"adapter {where!r}{base} adapts layer {name!r}, which this model does not have "
                                "(another architecture); load it onto the model it was trained on")
            found = (module.out_features, module.in_features)
            if module.out_features == expected[0] and top >= module.in_features:
                raise UserError(f"adapter {where!r}{base} selects input {top} of layer {name!r}, which has "
                                f"{module.in_features} inputs; the adapter is damaged or belongs to another model")
            wanted = tuple(expected) if expected[1] is not None else f"({expected[0]}, >{top})"
            raise UserError(f"adapter {where!r}{base} expects layer {name!r} of shape {wanted}, this model has "
                            f"{found}; load it onto the model it was trained on")


def load_adapter(model: nn.Module, path: str | os.PathLike, *, impl: str | None = None, mode: str | None = None,
                 weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Apply a saved adapter: inject with its saved cells if needed, check the base, copy the values.

    ``mode`` overrides the saved neuroada.mode (e.g. unmerged on a shared base). ``weights`` (layer name ->
    full-precision W): on a quantized base, the original values and the fingerprint check come from them;
    without them the check compares the dequantized values with a tolerance for the quantization error.
    """
    # Guard (engineer D, issue 10 (e)): one adapter per model. Loading over an existing adapter would
    # silently replace its values or mix two selections; the caller must start from a fresh base.
    if neuroada_layers(model) or hasattr(model, "peft_config"):
        raise UserError(f"this model already has an adapter; load {str(path)!r} onto a fresh base model "
                        "(or call unload(model) first)")
    contents = read_adapter(path)
    where = str(path)
    overrides = {key: value for key, value in (("impl", impl), ("mode", mode)) if value}
    config = contents.config if not overrides else NeuroAdaConfig.from_dict({**contents.config.to_dict(), **overrides})
    _check_shapes(model, contents, where)
    inject(model, config, indices={name: (contents.row_counts[name], idx) if name in contents.row_counts else idx
                                   for name, idx in contents.indices.items()}, weights=weights)
    layers = neuroada_layers(model)
    for name, layer in layers.items():
        expected = contents.fingerprints.get(name)
        tolerance = QUANTIZED_FINGERPRINT_RTOL if layer.quantized and name not in (weights or {}) else None
        if expected is not None and not fingerprint_matches(expected, fingerprint(layer.neuroada_orig), tolerance):
            raise wrong_base_error(where, name)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.delta.copy_(contents.deltas[name])
            if name in contents.biases:
                layer.base_layer.bias.copy_(contents.biases[name])
        for param_name, value in contents.saved_modules.items():
            model.get_parameter(param_name).copy_(value)
    return model
