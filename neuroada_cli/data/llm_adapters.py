"""Reading LLM-Adapters JSON files (a JSON list of {instruction, input, output, answer} objects).

The same loader serves training sets (commonsense_15k, math_10k, ...) and the eval sets
(<data dir>/llm_adapters/<task>/test.json). Files may also be gzipped (``.json.gz``).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from ..errors import UserError, reading

REQUIRED_FIELDS = ("instruction", "output")
TEXT_FIELDS = ("instruction", "input", "output", "answer")


def find_file(directory: Path, stem: str) -> Path | None:
    """``<directory>/<stem>.json`` or ``.json.gz``, whichever exists."""
    for suffix in (".json", ".json.gz"):
        candidate = directory / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_rows(path: str | Path, required: tuple[str, ...] = REQUIRED_FIELDS) -> list[dict]:
    """Load and validate one LLM-Adapters file; a malformed file or row is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} not found; check data.dir / NEUROADA_DATA_DIR")
    opener = gzip.open if path.suffix == ".gz" else open
    # json, encoding, gzip (BadGzipFile, EOFError of a truncated .gz) and disk errors: one line naming the file
    with reading(path, "data file", "expected a JSON list of objects (fix the file or fetch it again)"), \
            opener(path, "rt", encoding="utf-8") as handle:
        rows = json.load(handle)
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {number} is {type(row).__name__}, expected an object")
        for field in required:
            if not isinstance(row.get(field), str):
                raise UserError(f"{path}: row {number} has no text field {field!r}")
        for field in TEXT_FIELDS:
            value = row.get(field, "")
            if value is None:
                row[field] = ""
            elif not isinstance(value, (str, int, float)):
                raise UserError(f"{path}: row {number} field {field!r} is {type(value).__name__}, expected text")
            else:
                row[field] = str(value) if field == "answer" else value
    return rows
