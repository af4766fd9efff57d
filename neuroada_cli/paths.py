"""Where things live: configs, recipes, the data directory and the model cache."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
SAMPLE_DATA_DIR = PACKAGE_DIR / "data" / "sample"


def configs_dir() -> Path:
    return REPO_DIR / "configs"


def recipes_dir() -> Path:
    return REPO_DIR / "recipes"


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


def cache_dir() -> Path:
    """Cache for converted models (e.g. GGUF -> safetensors): $NEUROADA_CACHE_DIR or ~/.cache/neuroada."""
    value = os.environ.get("NEUROADA_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "neuroada"
