"""The NeuroAda method as a small library: config, selection, layer, model operations, adapter files."""
from .adapter import load_adapter, save_adapter
from .config import NeuroAdaConfig
from .layer import NeuroAdaLinear
from .model import ParameterCount, count_parameters, inject, merge, neuroada_layers, set_impl, unload, unmerge

__all__ = [
    "NeuroAdaConfig", "NeuroAdaLinear", "ParameterCount", "count_parameters", "inject", "load_adapter",
    "merge", "neuroada_layers", "save_adapter", "set_impl", "unload", "unmerge",
]
