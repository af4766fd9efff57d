"""Training sets: a stem under the data directory, a JSON file, or (online only) a hub dataset.

Stems name ``<data dir>/llm_adapters/<stem>/train.json`` (or ``.json.gz``); the LLM-Adapters
ones are commonsense_15k, commonsense_170k, math_10k and math_50k, but any folder laid out the
same way works. Rows are the LLM-Adapters objects ``{instruction, input, output, answer}``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from .. import paths
from ..errors import UserError
from .llm_adapters import REQUIRED_FIELDS, TEXT_FIELDS, find_file, load_rows

KNOWN_STEMS = ("commonsense_15k", "commonsense_170k", "math_10k", "math_50k")
_JSON_SUFFIXES = (".json", ".json.gz")


def available_train_sets(data_dir: Path) -> list[str]:
    """Stems with a train file under ``<data_dir>/llm_adapters/``."""
    root = Path(data_dir) / "llm_adapters"
    if not root.is_dir():
        return []
    return sorted(folder.name for folder in root.iterdir() if folder.is_dir() and find_file(folder, "train"))


def _looks_like_path(dataset: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with a slash or a JSON suffix is a path.
    return dataset.endswith(_JSON_SUFFIXES) or dataset.startswith((".", "/", "~")) or dataset.count("/") > 1


def _hub_offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _missing(dataset: str, directory: Path) -> UserError:
    expected = directory / "llm_adapters" / dataset / "train.json"
    present = available_train_sets(directory)
    listing = ", ".join(present) if present else "none"
    origin = f" (LLM-Adapters ft-training_set/{dataset}.json)" if dataset in KNOWN_STEMS else ""
    return UserError(
        f"training set {dataset!r} not found: expected {expected} (or .json.gz); set data.dir=PATH or "
        f"NEUROADA_DATA_DIR to a folder holding llm_adapters/{dataset}/train.json{origin}, or give a JSON file path; "
        f"training sets in {directory}: {listing}"
    )


def _hub_rows(dataset: str) -> list[dict]:
    if _hub_offline():
        raise UserError(
            f"training set {dataset!r} looks like a hub dataset id but the hub is offline (HF_HUB_OFFLINE); "
            "use a stem under data.dir (e.g. commonsense_15k) or a local JSON file"
        )
    try:
        from datasets import load_dataset

        table = load_dataset(dataset, split="train")
    except Exception as err:  # datasets raises many unrelated types for "not found / no network"
        raise UserError(
            f"could not load hub dataset {dataset!r} ({type(err).__name__}); use a stem under data.dir "
            "(e.g. commonsense_15k) or a local JSON file"
        ) from None
    rows = []
    for number, row in enumerate(table):
        if not all(isinstance(row.get(field), str) for field in REQUIRED_FIELDS):
            raise UserError(f"hub dataset {dataset!r}: row {number} lacks text fields {', '.join(REQUIRED_FIELDS)}")
        rows.append({field: "" if row.get(field) is None else str(row[field]) for field in TEXT_FIELDS})
    return rows


def seeded_subset(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """``limit`` rows drawn with ``random.Random(seed)``, kept in file order (all rows when limit is None)."""
    if limit is None:
        return rows
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UserError(f"data.train_limit={limit!r} must be a positive integer or null")
    if limit >= len(rows):
        return rows
    chosen = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[index] for index in chosen]


def load_train_rows(dataset: str, data_dir: str | Path | None, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Rows of a training set.

    ``dataset``: a stem (``<data_dir>/llm_adapters/<stem>/train.json[.gz]``), a path to a JSON
    file (a list of objects) or to a folder holding ``train.json[.gz]``, or a hub dataset id
    ("owner/name", online only; its ``train`` split needs instruction and output columns). ``data_dir`` None means
    ``paths.data_dir()`` ($NEUROADA_DATA_DIR, else the packaged sample).

    ``limit`` keeps a random subset of that many rows, drawn with ``random.Random(seed)`` and
    returned in file order: deterministic for a given seed, and unlike "first N" it does not
    over-represent whatever task the file starts with (commonsense_15k is grouped by task).
    """
    if not isinstance(dataset, str) or not dataset.strip():
        raise UserError("task.train_dataset is empty; give a stem such as commonsense_15k, a JSON path or a hub id")
    dataset = dataset.strip()
    return seeded_subset(_all_rows(dataset, paths.data_dir(data_dir)), limit, seed)


def _all_rows(dataset: str, directory: Path) -> list[dict]:
    """Every row of a stem (under ``directory``), a JSON file or folder, or a hub dataset, in that order."""
    if "/" not in dataset and os.sep not in dataset and not dataset.endswith(_JSON_SUFFIXES):
        found = find_file(directory / "llm_adapters" / dataset, "train")
        if found is None:
            raise _missing(dataset, directory)
        return load_rows(found)
    path = Path(dataset).expanduser()
    if path.is_file():
        return load_rows(path)
    found = find_file(path, "train") if path.is_dir() else None
    if found is not None:
        return load_rows(found)
    if _looks_like_path(dataset):
        raise UserError(f"training file {dataset!r} not found; check task.train_dataset")
    return _hub_rows(dataset)
