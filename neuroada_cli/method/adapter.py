"""Compact adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` (never pickle).

Per target layer the file holds the delta values ([d_out, k] fp32) and their column indices in the
smallest integer type that fits d_in (int16 up to 32767 inputs, else int32), plus trained biases and
fully trained modules (``modules_to_save``). The config records a fingerprint of the base weights the
cells were selected on, checked on load so that an adapter is never applied to another base model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UserError
from .config import NeuroAdaConfig
from .model import _saved_module_names, inject, neuroada_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "neuroada-adapter"
FORMAT_VERSION = 1
FINGERPRINT_RTOL = 5e-3  # tolerates a base reloaded in another dtype (bf16 rounding), not another model


def _index_dtype(d_in: int) -> torch.dtype:
    return torch.int16 if d_in <= torch.iinfo(torch.int16).max else torch.int32


def layer_fingerprint(orig: torch.Tensor) -> list[float]:
    """Sum, |sum| and sum of squares of the original selected values, in float64."""
    values = orig.detach().double().cpu()
    return [values.sum().item(), values.abs().sum().item(), values.square().sum().item()]


def _fingerprint_digest(layers: dict) -> str:
    """A short id of the base (bf16-rounded selected values), shown in messages and run records."""
    digest = hashlib.sha256()
    for name in sorted(layers):
        digest.update(name.encode())
        digest.update(layers[name].neuroada_orig.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def adapter_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and JSON metadata save_adapter writes (also used for in-memory checkpoints)."""
    layers = neuroada_layers(model)
    config: NeuroAdaConfig | None = getattr(model, "neuroada_config", None)
    if not layers or config is None:
        raise UserError("this model has no NeuroAda layers; call inject(model, config) or load_adapter first")
    tensors: dict[str, torch.Tensor] = {}
    meta_layers = {}
    for name, layer in layers.items():
        d_out, d_in = layer.base_layer.weight.shape
        tensors[f"{name}.delta"] = layer.neuroada_delta.detach().float().cpu().contiguous()
        tensors[f"{name}.indices"] = layer.neuroada_idx.to(_index_dtype(d_in)).cpu().contiguous()
        if config.train_bias and layer.base_layer.bias is not None:
            tensors[f"{name}.bias"] = layer.base_layer.bias.detach().cpu().contiguous()
        meta_layers[name] = {"shape": [d_out, d_in], "k": layer.k, "fingerprint": layer_fingerprint(layer.neuroada_orig)}
    for saved in _saved_module_names(model, config.modules_to_save):
        for pname, param in model.get_submodule(saved).named_parameters():
            tensors[f"modules_to_save.{saved}.{pname}"] = param.detach().cpu().contiguous()
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "base_model": base_name,
        "base_fingerprint": _fingerprint_digest(layers),
        "layers": meta_layers,
    }
    return tensors, meta


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter directory atomically: a crash leaves the previous adapter (or nothing), never half."""
    tensors, meta = adapter_state(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": FORMAT})
        (staging / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise UserError(f"{str(path)!r} is not a NeuroAda adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    meta = json.loads(config_file.read_text())
    if meta.get("format") != FORMAT:
        raise UserError(f"{str(config_file)!r} is not a NeuroAda adapter config (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"adapter {str(path)!r} has format version {meta['format_version']}; upgrade neuroada")
    return meta, load_file(str(weights_file))


def _check_fingerprint(model: nn.Module, meta: dict, where: str) -> None:
    for name, layer in neuroada_layers(model).items():
        expected = meta["layers"][name]["fingerprint"]
        got = layer_fingerprint(layer.neuroada_orig)
        scale = max(expected[1], 1e-12)
        same = (
            abs(got[0] - expected[0]) <= FINGERPRINT_RTOL * scale
            and abs(got[1] - expected[1]) <= FINGERPRINT_RTOL * scale
            and abs(got[2] - expected[2]) <= FINGERPRINT_RTOL * max(expected[2], 1e-12)
        )
        if not same:
            raise UserError(
                f"adapter {where!r} was made for another base model (weights of layer {name!r} differ; "
                f"adapter base: {meta.get('base_model')!r}); load it onto the model it was trained on"
            )


def load_adapter(model: nn.Module, path: str | os.PathLike, *, impl: str | None = None) -> nn.Module:
    """Apply a saved adapter: inject with its saved cells if needed, check the base, copy the values."""
    meta, tensors = read_adapter(path)
    config = NeuroAdaConfig.from_dict({**meta["config"], **({"impl": impl} if impl else {})})
    saved_indices = {name: tensors[f"{name}.indices"].long() for name in meta["layers"]}
    layers = neuroada_layers(model)
    if not layers:
        modules = dict(model.named_modules())
        for name, info in meta["layers"].items():
            module = modules.get(name)
            if not isinstance(module, nn.Linear) or list(module.weight.shape) != info["shape"]:
                found = None if module is None else tuple(getattr(module, "weight", torch.empty(0)).shape)
                raise UserError(
                    f"adapter {str(path)!r} expects layer {name!r} of shape {tuple(info['shape'])}, this model has "
                    f"{found}; load it onto the model it was trained on"
                )
        inject(model, config, indices=saved_indices)
        layers = neuroada_layers(model)
    elif set(layers) != set(meta["layers"]) or any(
        not torch.equal(layers[n].neuroada_idx.cpu(), saved_indices[n]) for n in layers
    ):
        raise UserError(f"adapter {str(path)!r} selects other cells than the adapter already on this model")
    _check_fingerprint(model, meta, str(path))
    with torch.no_grad():
        for name, layer in layers.items():
            layer.neuroada_delta.copy_(tensors[f"{name}.delta"])
            if f"{name}.bias" in tensors:
                layer.base_layer.bias.copy_(tensors[f"{name}.bias"])
        prefix = "modules_to_save."
        for key, value in tensors.items():
            if key.startswith(prefix):
                target = model.get_parameter(key[len(prefix):])
                target.copy_(value)
    return model
