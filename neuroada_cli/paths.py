"""Where things live: the packaged configs, recipes and data sample, the data directory and the model cache.

configs/ and recipes/ sit at the repository's top level and ship inside the wheel as the packages
``neuroada_cli.configs`` and ``neuroada_cli.recipes`` (pyproject maps them); they are found through
``importlib.resources``, never relative to a source checkout, so an installed wheel works from any directory.
"""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from .errors import UserError


def _package_dir(package: str) -> Path:
    """The directory of an installed package (a plain install or an editable one; never a zip)."""
    return Path(str(files(package)))


SAMPLE_DATA_DIR = _package_dir("neuroada_cli") / "data" / "sample"


def configs_dir() -> Path:
    """configs/: the Hydra config groups (model/, task/, trainer/ ...) and train.yaml."""
    return _package_dir("neuroada_cli.configs")


def recipes_dir() -> Path:
    """recipes/: one YAML file per recipe, holding only its deltas over configs/train.yaml."""
    return _package_dir("neuroada_cli.recipes")


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data directory: an explicit value, else $NEUROADA_DATA_DIR, else the packaged sample."""
    value = explicit if explicit not in (None, "") else os.environ.get("NEUROADA_DATA_DIR") or None
    if value is None:
        return SAMPLE_DATA_DIR
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UserError(
            f"data directory {str(path)!r} does not exist; set data.dir=PATH or NEUROADA_DATA_DIR "
            "to a folder holding llm_adapters/ and glue/, or leave both unset to use the packaged sample"
        )
    return path


def hub_offline() -> bool:
    """True when the user asked for no hub access (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE or TRANSFORMERS_OFFLINE).

    The one place that decides whether hub ids (models, datasets) may be fetched.
    """
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in names)


def cache_dir() -> Path:
    """Cache for converted models (e.g. GGUF -> safetensors): $NEUROADA_CACHE_DIR or ~/.cache/neuroada."""
    value = os.environ.get("NEUROADA_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "neuroada"
