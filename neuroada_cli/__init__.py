"""neuroada: NeuroAda fine-tuning (neuron-wise sparse bypasses) from the command line and as a library."""
from importlib import metadata as _metadata

from .core import (
    NeuroAdaConfig,
    NeuroAdaLinear,
    ParameterCount,
    count_parameters,
    inject,
    load_adapter,
    merge,
    neuroada_layers,
    save_adapter,
    set_impl,
    unload,
    unmerge,
)
from .core.peft_tuner import NeuroAdaPeftConfig  # importing it registers NeuroAda with PEFT

try:  # the one version number lives in pyproject.toml
    __version__ = _metadata.version("neuroada")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
__all__ = [
    "NeuroAdaConfig", "NeuroAdaLinear", "NeuroAdaPeftConfig", "ParameterCount", "count_parameters", "inject",
    "load_adapter", "merge", "neuroada_layers", "save_adapter", "set_impl", "unload", "unmerge", "__version__",
]
