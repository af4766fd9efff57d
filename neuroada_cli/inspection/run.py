"""``neuroada inspect run=DIR``: plots and a markdown page describing one training run.

Reads only the run directory's files (train_log.jsonl, run.json, adapter/, eval/), never the model:
the adapter tensors are read straight from ``adapter_model.safetensors`` and matched by key suffix, so
both adapter layouts (PEFT's ``base_model.model.<layer>.neuroada_delta`` and the first release's
``<layer>.delta``) work. Writes ``<run>/inspect/`` (or ``output``) in one atomic rename: ``loss.png``;
for NeuroAda runs ``selection.png``, ``selection_layers.png`` and ``layers.png``; ``confusion_<task>.png``
per classification task evaluated; and ``report.md`` linking them. The adapter does not record d_in, so
input axes end at the largest selected index.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import plots as inspect_plots
from ..atomic import atomic_directory
from ..errors import UserError, reading
from .report import render_report

logger = logging.getLogger(__name__)
RERUN_EVAL = "delete it and re-run `neuroada eval run=DIR`"

INSPECT_DIR = "inspect"
REPORT_NAME = "report.md"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIXES = ("base_model.model.",)  # PEFT's prefix; may appear more than once on wrapped models
DELTA_SUFFIXES = (".neuroada_delta", ".delta")
INDEX_SUFFIXES = (".neuroada_indices", ".neuroada_idx", ".indices")
VALIDATION_KEYS = ("selection", "validation")  # train_log lines carrying a dict of validation metrics


@dataclass
class LayerStats:
    """What one NeuroAda layer's adapter tensors say about its selected cells."""

    name: str
    group: str  # the name after the layer number, e.g. "self_attn.q_proj": one projection type
    number: int | None  # the layer number in the name (the last numeric component)
    d_out: int
    cells: int
    cells_per_row: tuple[int, int]  # (fewest, most) cells in a row
    rows_with_cells: int
    rows_moved: int  # rows with at least one non-zero delta
    column_counts: np.ndarray  # column_counts[i] = cells reading input feature i
    delta_norm: float

    @property
    def distinct_columns(self) -> int:
        return int(np.count_nonzero(self.column_counts))

    def top_inputs(self, n: int = 3) -> list[tuple[int, float]]:
        return top_inputs(self.column_counts, n)


def top_inputs(counts: np.ndarray, n: int = 3) -> list[tuple[int, float]]:
    """The n input features read by the most cells, with their share of all cells (ties: lower index)."""
    total = counts.sum()
    if total == 0:
        return []
    order = np.argsort(-counts, kind="stable")[:n]
    return [(int(i), float(counts[i] / total)) for i in order if counts[i] > 0]


def split_layer_name(name: str) -> tuple[int | None, str]:
    """("model.layers.3.self_attn.q_proj") -> (3, "self_attn.q_proj"); a name without a number is its own group."""
    parts = name.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    if not numbered or numbered[-1] == len(parts) - 1:
        return None, name
    last = numbered[-1]
    return int(parts[last]), ".".join(parts[last + 1:])


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _layer_tensors(weights: Path) -> dict[str, dict[str, np.ndarray]]:
    """layer name -> {"delta": array, "indices": array} for every layer that has both."""
    from safetensors import safe_open

    found: dict[str, dict[str, np.ndarray]] = {}
    with reading(weights, "adapter weights", "restore the adapter from a checkpoint or retrain"), \
            safe_open(str(weights), framework="pt") as handle:  # a truncated file fails at open or at a tensor
        for key in handle.keys():
            name = _strip_prefixes(key)
            for role, suffixes in (("delta", DELTA_SUFFIXES), ("indices", INDEX_SUFFIXES)):
                suffix = next((s for s in suffixes if name.endswith(s)), None)
                if suffix is not None:
                    tensor = handle.get_tensor(key)
                    found.setdefault(name[: -len(suffix)], {})[role] = tensor.float().numpy() if role == "delta" \
                        else tensor.long().numpy()
    return {name: roles for name, roles in found.items() if len(roles) == 2}


def layer_stats(name: str, delta: np.ndarray, indices: np.ndarray) -> LayerStats:
    """Statistics of one layer; ``indices`` [d_out, k] input columns (negative = no cell, for ragged rows)."""
    if indices.ndim != 2 or delta.shape != indices.shape:
        raise UserError(f"adapter layer {name!r} has indices {list(indices.shape)} and deltas {list(delta.shape)}; "
                        "inspect reads [d_out, k] layouts: update neuroada")
    present = indices >= 0
    per_row = present.sum(axis=1)
    moved = ((delta != 0) & present).any(axis=1)
    columns = indices[present]
    number, group = split_layer_name(name)
    return LayerStats(
        name=name, group=group, number=number, d_out=int(indices.shape[0]), cells=int(present.sum()),
        cells_per_row=(int(per_row.min()), int(per_row.max())) if per_row.size else (0, 0),
        rows_with_cells=int((per_row > 0).sum()), rows_moved=int(moved.sum()),
        column_counts=np.bincount(columns, minlength=int(columns.max(initial=-1)) + 1),
        delta_norm=float(np.linalg.norm(np.where(present, delta, 0.0))),
    )


def read_layer_stats(adapter_dir: Path) -> list[LayerStats]:
    """Every NeuroAda layer of the adapter, ordered by layer number then name; [] when it holds none."""
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        return []
    layers = [layer_stats(name, roles["delta"], roles["indices"]) for name, roles in _layer_tensors(weights).items()]
    return sorted(layers, key=lambda s: (s.number if s.number is not None else -1, s.name))


def selection_histograms(layers: list[LayerStats]) -> dict[str, np.ndarray]:
    """group -> cells per input index summed over the group's layers (their sum is the group's cell count)."""
    histograms: dict[str, np.ndarray] = {}
    for layer in layers:
        counts = layer.column_counts
        previous = histograms.get(layer.group, np.zeros(0, dtype=counts.dtype))
        width = max(len(previous), len(counts))
        histograms[layer.group] = (np.pad(previous, (0, width - len(previous)))
                                   + np.pad(counts, (0, width - len(counts))))
    return histograms


def selection_matrices(layers: list[LayerStats]) -> dict[str, tuple[list[int], np.ndarray]]:
    """group -> (layer numbers, [layers, inputs] share of each layer's rows reading each input)."""
    grouped: dict[str, list[LayerStats]] = {}
    for layer in layers:
        grouped.setdefault(layer.group, []).append(layer)
    matrices = {}
    for group, members in grouped.items():
        width = max(len(layer.column_counts) for layer in members)
        shares = np.stack([np.pad(layer.column_counts, (0, width - len(layer.column_counts))) / max(layer.d_out, 1)
                           for layer in members])
        matrices[group] = ([layer.number if layer.number is not None else i for i, layer in enumerate(members)],
                           shares)
    return matrices


# ------------------------------------------------------------------------------ train log and eval outputs
def read_train_log(path: Path) -> tuple[list[tuple[int, float]], dict[str, list[tuple[int, float]]]]:
    """(train loss by step, validation metric name -> [(step, value)]). Unknown lines and keys are skipped,
    and so is a torn last line (a run killed while writing)."""
    train: list[tuple[int, float]] = []
    validation: dict[str, list[tuple[int, float]]] = {}
    with reading(path, "train log", "restore it from the run or inspect another run"):
        text = path.read_text(encoding="utf-8")
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        step = record["step"]
        metrics = {}
        for key in VALIDATION_KEYS:
            if isinstance(record.get(key), dict):
                metrics.update(record[key])
        if _is_number(record.get("val_loss")):
            metrics["loss"] = record["val_loss"]
        for name, value in metrics.items():
            if _is_number(value):
                validation.setdefault(name, []).append((step, float(value)))
        if _is_number(record.get("loss")) and record.get("split") in (None, "train"):
            train.append((step, float(record["loss"])))  # top-level "loss" is the train loss
    return train, validation


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _eval_dir(run_dir: Path) -> Path | None:
    for name in ("eval", "eval_after_train"):
        if (run_dir / name).is_dir():
            return run_dir / name
    return None


def read_predictions(eval_dir: Path) -> dict[str, list[dict]]:
    """task name (e.g. "glue/rte") -> its prediction records."""
    folder = eval_dir / "predictions"
    tasks = {}
    for path in sorted(folder.rglob("*.jsonl")) if folder.is_dir() else []:
        task = path.relative_to(folder).with_suffix("").as_posix()
        tasks[task] = read_prediction_file(path)
    return tasks


def read_prediction_file(path: Path) -> list[dict]:
    """The records of one predictions file. The eval runner writes these files atomically, so a torn line is
    outside damage: a torn LAST line (a copy cut short, a writer killed mid-line, as the train log allows) is
    skipped with a note, since the report of the other records stays true and says how many it read; a bad
    line before the end means the file is damaged and is one error naming the file and the line."""
    with reading(path, "predictions file", RERUN_EVAL):
        lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if position == len(lines) - 1:
                logger.warning("%s: line %d is cut short (%s); inspect skipped it and read the %d lines before it",
                               path, number, err.msg, len(records))
                break
            raise UserError(f"predictions file {str(path)!r} is damaged (line {number} is not valid JSON: "
                            f"{err.msg}); {RERUN_EVAL}") from None
        if not isinstance(record, dict):
            raise UserError(f"predictions file {str(path)!r} is damaged (line {number} is not a JSON object); "
                            f"{RERUN_EVAL}")
        records.append(record)
    return records


def _is_label(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def confusion_counts(records: list[dict]) -> np.ndarray | None:
    """[gold, predicted] counts when every record is a class label id; None for regression and generated text.
    A record without a predicted label (``extracted`` null) is left out."""
    if not records or not all(_is_label(r.get("gold")) for r in records):
        return None
    if not all(_is_label(r.get("extracted")) or r.get("extracted") is None for r in records):
        return None
    scored = [r for r in records if r.get("extracted") is not None]
    classes = max([r["gold"] + 1 for r in records] + [r["extracted"] + 1 for r in scored]
                  + [len(r["logits"]) for r in records if isinstance(r.get("logits"), list)])
    matrix = np.zeros((classes, classes), dtype=np.int64)
    for record in scored:
        matrix[record["gold"], record["extracted"]] += 1
    return matrix


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with reading(path, "", "re-run the step that writes it"):
        value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise UserError(f"{str(path)!r} is damaged (not a JSON object); re-run the step that writes it")
    return value


def run_method(run_info: dict, adapter_dir: Path) -> str:
    """neuroada | lora | full | head | unknown: run.json's method, else what the adapter folder looks like."""
    if run_info.get("method"):
        return str(run_info["method"])
    config = _read_json(adapter_dir / "adapter_config.json")
    kind = str(config.get("peft_type") or config.get("format") or "").lower()
    if "neuroada" in kind:
        return "neuroada"
    if kind:
        return kind
    if (adapter_dir / "head_config.json").is_file():
        return "head"
    return "full" if (adapter_dir / "config.json").is_file() else "unknown"


# ------------------------------------------------------------------------------ the command
def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} not found; pass run=DIR, the folder `neuroada train` printed")
    if not (run_dir / "train_log.jsonl").is_file():
        raise UserError(f"{str(run_dir)!r} has no train_log.jsonl; pass run=DIR, the folder `neuroada train` printed")
    if not (run_dir / "adapter").is_dir():
        raise UserError(f"{str(run_dir)!r} has no adapter/ yet; let the run finish (or resume it with "
                        "trainer.resume=true), then inspect it")


def _output_dir(run_dir: Path, output) -> Path:
    target = Path(output) if output is not None else run_dir / INSPECT_DIR
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / REPORT_NAME).exists())):
        raise UserError(f"output {str(target)!r} exists and is not an inspect folder; pass output= a new folder")
    return target


def inspect_run(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write the run's plots and ``report.md`` into ``<run_dir>/inspect/`` (or ``output``); return that folder.

    A previous inspect folder there is replaced as a whole, in one rename.
    """
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    target = _output_dir(run_dir, output)
    run_info = _read_json(run_dir / "run.json")
    method = run_method(run_info, run_dir / "adapter")
    train, validation = read_train_log(run_dir / "train_log.jsonl")
    layers = read_layer_stats(run_dir / "adapter")  # [] unless the adapter holds sparse-bypass (NeuroAda) layers
    eval_dir = _eval_dir(run_dir)
    results = _read_json(eval_dir / "results.json") if eval_dir else {}
    confusions = {task: matrix for task, records in (read_predictions(eval_dir) if eval_dir else {}).items()
                  if (matrix := confusion_counts(records)) is not None}

    images: dict[str, bytes] = {"loss.png": inspect_plots.loss_figure(train, validation)}
    histograms = selection_histograms(layers)
    group_top = {group: top_inputs(counts) for group, counts in histograms.items()}
    if layers:
        layer_counts = {group: sum(1 for s in layers if s.group == group) for group in histograms}
        images["selection.png"] = inspect_plots.selection_figure(histograms, layer_counts, group_top)
        images["selection_layers.png"] = inspect_plots.selection_by_layer_figure(selection_matrices(layers))
        images["layers.png"] = inspect_plots.layers_figure(_layer_series(layers))
    confusion_files = {}
    for task, matrix in confusions.items():
        confusion_files[task] = f"confusion_{task.replace('/', '_')}.png"
        images[confusion_files[task]] = inspect_plots.confusion_figure(matrix, task)

    report = render_report(run_dir=run_dir, run_info=run_info, method=method, train=train, validation=validation,
                           layers=layers, histograms=histograms, group_top=group_top, results=results,
                           confusion_files=confusion_files, eval_name=eval_dir.name if eval_dir else None)
    with atomic_directory(target) as staging:
        for name, data in images.items():
            (staging / name).write_bytes(data)
        (staging / REPORT_NAME).write_text(report, encoding="utf-8")
    return target


def _layer_series(layers: list[LayerStats]) -> dict[str, list[tuple[int, float, float]]]:
    """group -> [(layer number or position, delta norm, share of rows moved)] for layers_figure."""
    series: dict[str, list[tuple[int, float, float]]] = {}
    for position, layer in enumerate(layers):
        x = layer.number if layer.number is not None else position
        series.setdefault(layer.group, []).append((x, layer.delta_norm, layer.rows_moved / max(layer.d_out, 1)))
    return series
