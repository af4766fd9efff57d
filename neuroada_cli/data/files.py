"""Reading the user's own data files: JSON, JSON Lines, CSV or Parquet through ``datasets``' local loaders,
or a hub dataset id when the hub is online.

``read_table(source, key)`` returns ``(label, rows)``: plain dicts, one per record, and the label that error
messages use for the file. ``key`` is the config key the source came from (``data.train_file``), so every
error names what to change. Rows are numbered from 1 in messages (the first record is row 1).
"""
from __future__ import annotations

from pathlib import Path

from .. import paths
from ..errors import UserError, one_line, reading

# file suffix -> datasets builder; compressed JSON is read by the same builder
LOADERS = {".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json", ".csv": "csv",
           ".parquet": "parquet"}


def loader_for(path: Path) -> str | None:
    """The ``datasets`` builder for a file name (by its suffix), None when unsupported."""
    name = path.name.lower()
    return next((builder for suffix, builder in LOADERS.items() if name.endswith(suffix)), None)


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "owner/name" (optionally ":split"); anything with a file suffix is a path.
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or loader_for(Path(source)) is not None


def read_table(source: str, key: str) -> tuple[str, list[dict]]:
    """``(label, rows)`` of a local data file, or of a hub dataset ``owner/name[:split]`` (default split train)."""
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"{key} is empty; give a JSON, JSONL, CSV or Parquet file (or a hub dataset id)")
    source = source.strip()
    path = Path(source).expanduser()
    if path.is_dir():
        raise UserError(f"{key}={source!r} is a folder; give a JSON, JSONL, CSV or Parquet file inside it")
    if path.is_file():
        return str(path), _read_file(path, key)
    if _looks_like_path(source):
        raise UserError(f"{key}={source!r}: file not found; check the path")
    return _read_hub(source, key)


def _load_quietly(*args, **kwargs):
    """``datasets.load_dataset`` without its progress bars (they would interleave with the run's own output)."""
    import datasets

    were_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(*args, **kwargs)
    finally:
        if not were_disabled:
            datasets.enable_progress_bars()


def _text_columns(path: Path):
    """``datasets.Features`` reading every column of a CSV file (named by its header line) as text."""
    import csv

    import datasets

    with open(path, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def _read_file(path: Path, key: str) -> list[dict]:
    builder = loader_for(path)
    if builder is None:
        raise UserError(f"{path}: unsupported file type; {key} takes .json, .jsonl, .csv or .parquet "
                        "(.json.gz / .jsonl.gz too)")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty; give a file with at least one record")
    if builder in ("json", "csv"):
        check_utf8(path)  # before the loaders, whose decode errors name neither the row nor the line
    try:
        # CSV cells stay text: pandas would turn a completion " 2" into the number 2 (losing its space)
        options = {"features": _text_columns(path)} if builder == "csv" else {}
        table = _load_quietly(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # pyarrow / json / datasets raise many types for "cannot parse this"
        raise UserError(f"{path}: cannot read it as {builder.upper()} ({one_line(err, 200)}); check the file's "
                        "format") from None
    rows = _table_rows(table, path)
    if not rows:
        raise UserError(f"{path}: the file has no records; give a file with at least one record")
    return rows


def check_utf8(path: Path) -> None:
    """UserError naming the first line (and, for JSON Lines, the row) that is not UTF-8 text."""
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    lines_are_rows = ".jsonl" in path.name.lower()
    row = 0
    with reading(path, "data file", "check the file (and its compression)"), opener(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            row += bool(line.strip())
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                where = f"row {row} (line {number})" if lines_are_rows else f"line {number}"
                raise UserError(f"{path}: {where} is not UTF-8 text (byte 0x{line[err.start]:02x} at column "
                                f"{err.start + 1}); save the file as UTF-8 or fix or remove that row") from None


def _table_rows(table, path: Path) -> list[dict]:
    """The loaded table as plain dicts; a cell that is not UTF-8 (Parquet can hold such bytes) names its row."""
    try:
        return table.to_list()
    except UnicodeDecodeError:
        for number in range(len(table)):
            try:
                table[number]
            except UnicodeDecodeError as err:
                raise UserError(f"{path}: row {number + 1} is not UTF-8 text (byte 0x{err.object[err.start]:02x}); "
                                "fix or remove that row") from None
        raise


def _read_hub(source: str, key: str) -> list[dict]:
    name, _, split = source.partition(":")
    rows = hub_rows(name, split=split or "train", what=f"{key}={source!r}: no such file, and as a hub dataset id",
                    fix="give a local file or a hub id owner/name[:split]")
    if not rows:
        raise UserError(f"hub dataset {source!r} has no records; check {key}")
    return rows


def hub_rows(name: str, config: str | None = None, *, split: str, what: str, fix: str) -> list[dict]:
    """The rows of a hub dataset split: the one hub loader (own data, training sets, GLUE).

    UserError "<what>: the hub is offline ...; <fix>" without touching the network when ``paths.hub_offline()``,
    "<what>: the hub download failed (<reason>); <fix>" when loading fails.
    """
    if paths.hub_offline():
        raise UserError(f"{what}: the hub is offline (HF_HUB_OFFLINE) so it cannot be fetched; {fix}")
    try:
        table = _load_quietly(name, config, split=split) if config else _load_quietly(name, split=split)
    except Exception as err:  # network, auth, cache, not found: datasets raises many unrelated types
        reason = one_line(err, 200)
        raise UserError(f"{what}: the hub download failed ({reason}); {fix}") from None
    return [dict(row) for row in table]
