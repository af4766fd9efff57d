"""neuroada: NeuroAda fine-tuning (neuron-wise sparse bypasses) from the command line and as a library."""
from .method import (
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

__version__ = "0.1.0"
__all__ = [
    "NeuroAdaConfig", "NeuroAdaLinear", "ParameterCount", "count_parameters", "inject", "load_adapter",
    "merge", "neuroada_layers", "save_adapter", "set_impl", "unload", "unmerge", "__version__",
]
