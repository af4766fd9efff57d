"""Training sets: a stem under the data directory, a JSON file, or (online only) a hub dataset.

Stems name ``<data dir>/llm_adapters/<stem>/train.json`` (or ``.json.gz``); the LLM-Adapters
ones are commonsense_15k, commonsense_170k, math_10k and math_50k, but any folder laid out the
same way works. Rows are the LLM-Adapters objects ``{instruction, input, output, answer}``.

``load_records`` is what a causal-LM run reads: those rows, or the user's own file (``data.train_file``, any
format of data/formats.py), plus the validation records (``data.val_file`` or ``data.val_fraction``).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from .. import paths
from ..errors import UserError
from .llm_adapters import REQUIRED_FIELDS, TEXT_FIELDS, find_file, load_rows
from .prompts import build_prompt, build_target

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
    from .files import hub_rows

    table = hub_rows(dataset, split="train", what=f"training set {dataset!r} (a hub dataset id)",
                     fix="use a stem under data.dir (e.g. commonsense_15k) or a local JSON file")
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
    return seeded_subset(_all_rows(_checked_stem(dataset), paths.data_dir(data_dir)), limit, seed)


def _checked_stem(dataset) -> str:
    if not isinstance(dataset, str) or not dataset.strip():
        raise UserError("task.train_dataset is empty; give a stem such as commonsense_15k, a JSON path or a hub id")
    return dataset.strip()


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


# ------------------------------------------------------------------------------------- your own data
def split_validation(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training part, validation part) of ``records``: a seeded ``fraction`` held out, both kept in file order."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise UserError(f"data.val_fraction={fraction!r} must be a number between 0 and 1 (e.g. 0.05) or null")
    count = round(len(records) * fraction)
    if not 1 <= count < len(records):
        raise UserError(f"data.val_fraction={fraction} of {len(records)} training rows leaves no validation or no "
                        "training row; use a larger file, another fraction, or data.val_file")
    # its own seed stream: the held-out rows do not depend on data.train_limit's draw
    held_out = set(random.Random(f"neuroada-validation:{seed}").sample(range(len(records)), count))
    return ([r for i, r in enumerate(records) if i not in held_out],
            [r for i, r in enumerate(records) if i in held_out])


def _limited_with_validation(records: list, limit: int, fraction: float, seed: int) -> tuple[list, list]:
    """``limit`` training rows (the same draw as without validation) + fraction x limit held-out rows from the rest."""
    split_validation(records, fraction, seed)  # the same value checks
    train = seeded_subset(records, limit, seed)
    chosen = {id(row) for row in train}
    rest = [row for row in records if id(row) not in chosen]
    count = min(max(1, round(limit * fraction)), len(rest))
    held_out = set(random.Random(f"neuroada-validation:{seed}").sample(range(len(rest)), count))
    return train, [row for i, row in enumerate(rest) if i in held_out]


def file_records(source: str, key: str, data_format: str, template: str) -> list[dict]:
    """Normalised records (data/formats.py) of a user file or hub dataset named by config key ``key``."""
    from .files import read_table
    from .formats import to_records

    label, rows = read_table(source, key)
    return to_records(rows, data_format, label, template)


def load_records(*, train_dataset: str, data_dir: str | Path | None, template: str, train_file: str | None = None,
                 data_format: str = "auto", limit: int | None = None, seed: int = 0, val_file: str | None = None,
                 val_fraction: float | None = None) -> tuple[list[dict], list[dict] | None]:
    """(training records, validation records or None) of a causal-LM run.

    Training rows come from ``train_file`` (any format, data/formats.py) when given, else from the
    LLM-Adapters set ``train_dataset`` with ``template`` (exactly the rows ``load_train_rows`` gives).
    Validation: ``val_file`` (same formats), or a seeded ``val_fraction`` of the rows the run trains on
    (``limit`` of them when set; neither = None). With a ``limit`` smaller than the file, the training rows are
    exactly those of a run without validation and the validation rows (fraction x limit) come from the rest.
    """
    from .formats import check_format

    check_format(data_format)
    if val_file is not None and val_fraction is not None:
        raise UserError("data.val_file and data.val_fraction are both set; keep one (set the other to null)")
    if train_file is not None:
        records = file_records(train_file, "data.train_file", data_format, template)
    else:
        rows = _all_rows(_checked_stem(train_dataset), paths.data_dir(data_dir))
        records = [{"prompt": build_prompt(row, template), "completion": build_target(row, template)} for row in rows]
    validation = None
    if val_fraction is not None and limit is not None and limit < len(records):
        return _limited_with_validation(records, limit, val_fraction, seed)
    if val_fraction is not None:
        records, validation = split_validation(records, val_fraction, seed)
    elif val_file is not None:
        validation = file_records(val_file, "data.val_file", data_format, template)
    return seeded_subset(records, limit, seed), validation
