"""neuroada: NeuroAda fine-tuning (neuron-wise sparse bypasses) from the command line and as a library.

The Python API (``from neuroada_cli import inject, NeuroAdaPeftConfig, ...``) is exported lazily (PEP 562):
importing the package loads neither torch, transformers nor peft, so ``neuroada --help``, ``ls``, ``cp`` and
``validate`` answer in well under a second; the first use of a name imports its module.

NeuroAda registers itself with PEFT (``core/peft_tuner.py``) when that module is imported: through
``NeuroAdaPeftConfig`` or, so that ``PeftModel.from_pretrained`` reads NeuroAda adapters after a plain
``import neuroada_cli``, as soon as ``peft`` itself is imported (a one-shot import hook, below).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

# public name -> the module that defines it
_EXPORTS = {
    "NeuroAdaConfig": "neuroada_cli.core.config",
    "NeuroAdaLinear": "neuroada_cli.core.layer",
    "ParameterCount": "neuroada_cli.core.model",
    "count_parameters": "neuroada_cli.core.model",
    "disabled": "neuroada_cli.core.model",
    "inject": "neuroada_cli.core.model",
    "merge": "neuroada_cli.core.model",
    "neuroada_layers": "neuroada_cli.core.model",
    "set_impl": "neuroada_cli.core.model",
    "unload": "neuroada_cli.core.model",
    "unmerge": "neuroada_cli.core.model",
    "load_adapter": "neuroada_cli.core.adapter",
    "save_adapter": "neuroada_cli.core.adapter",
    "NeuroAdaPeftConfig": "neuroada_cli.core.peft_tuner",  # importing it registers NeuroAda with PEFT
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def _version() -> str:
    """The one version number lives in pyproject.toml (read on first use: importlib.metadata is slow)."""
    from importlib import metadata

    try:
        return metadata.version("neuroada")
    except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        globals()[name] = _version()
        return globals()[name]
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _RegisterWithPeft(importlib.abc.MetaPathFinder):
    """Imports core.peft_tuner right after ``peft`` finishes importing, then leaves ``sys.meta_path``.

    Availability checks (``importlib.util.find_spec("peft")``, as transformers does) also reach this finder;
    it stays in place until an import actually executes peft.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module, finder = spec.loader.exec_module, self

        def exec_module(module):
            run_module(module)
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            importlib.import_module("neuroada_cli.core.peft_tuner")

        spec.loader.exec_module = exec_module
        return spec


if "peft" in sys.modules:
    importlib.import_module("neuroada_cli.core.peft_tuner")
elif not any(isinstance(finder, _RegisterWithPeft) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithPeft())
