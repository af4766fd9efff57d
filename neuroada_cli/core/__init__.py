"""The NeuroAda method as a small library: config, selection, layer, model operations, adapter files.

Exports are lazy (PEP 562): ``from neuroada_cli.core.config import MODES`` (config validation, the CLI's fast
face) imports neither torch nor peft; the first use of a name below imports its module. Registering NeuroAda
with PEFT happens when the PEFT face (core.peft_tuner, or NeuroAdaPeftConfig from here) is imported.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "NeuroAdaConfig": "config", "NeuroAdaLinear": "layer", "NeuroAdaPeftConfig": "peft_tuner",
    "ParameterCount": "model", "count_parameters": "model", "inject": "model", "merge": "model",
    "neuroada_layers": "model", "disabled": "model", "set_impl": "model", "unload": "model", "unmerge": "model",
    "load_adapter": "adapter", "save_adapter": "adapter",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
