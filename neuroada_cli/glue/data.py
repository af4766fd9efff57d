"""GLUE rows and tokens: loading a split, the LoReFT split, tokenisation and classification batches.

API::

    load_split(task, split, data_dir=None) -> list[dict]          # validated {<text columns>, label, idx}
    split_path(data_dir, task, split) -> Path | None
    train_rows(task, data_dir, limit, seed) -> list[dict]         # data.train_limit rows, seeded
    selection_rows(task, data_dir, seed) / report_rows(...)       # the two LoReFT parts of validation
    loreft_split(rows, seed=42) -> (selection_rows, report_rows)
    loreft_split_indices(n, seed=42) -> (selection_indices, report_indices)
    encode(rows, tokenizer, task, max_length) -> list[dict]
    collate_classification(examples, pad_id, regression=None) -> dict[str, torch.Tensor]

Eval batches come from ``data.batching.length_sorted_batches`` (shared with the LLM eval).

Data layout: ``<data dir>/glue/<task>/<split>.jsonl`` or ``.jsonl.gz``, one JSON object per line with
the Hugging Face ``glue`` columns and label encodings (see GlueTask.text_columns / label_names;
stsb labels are floats in 0..5). ``idx`` is kept as stored (in the packaged sample it is the row's
index in the full split); rows without one get their position. When the file is missing and the
hub is allowed (``paths.hub_offline()`` is false) the split is fetched with
``datasets.load_dataset("nyu-mll/glue", task)`` (the hub's current name of ``glue``); otherwise
a one-line UserError names the expected path.

The LoReFT protocol (what pyreft's and the NeuroAda authors' GLUE runs report), read in
stanfordnlp/pyreft ``examples/loreft/train.py`` and FightingFighting/NeuroAda ``train_our.py``
(``build_dataset``, commit 0ed987c4):

* ``set_seed(seed)`` is the first thing the run does; nothing draws from torch's CPU generator
  before the split (tokenizer and dataset loading do not), so the split depends on the run seed.
* the validation split named by ``-test_split`` (``validation``; ``validation_matched`` for MNLI)
  is cut with ``torch.utils.data.random_split(ds, [n - m, m])``, m = 1000 if n > 5000 else n // 2.
  random_split draws ``torch.randperm(n)``: the first n - m permuted indices are the report part
  ("in_test", where the published score is computed), the last m the model-selection part
  ("in_train", evaluated every epoch; the best epoch by the task's primary metric is kept).
* ``loreft_split_indices`` reproduces this with a private generator seeded like the global one
  (same Mersenne-Twister stream, so the same permutation), without touching global RNG state.

Choices made here (documented, not in the sources): each part is returned in file order (pyreft
iterates in permutation order; no metric depends on order). MNLI: pyreft only ever splits
validation_matched; we apply the same rule to validation_mismatched too, so both MNLI scores come
from rows the selection never saw in the same proportion. The split is for the run seed: pass
trainer.seed, not a constant, to match a pyreft run with that seed.

Tokenisation follows pyreft's LoReftGLUEDataset: ``tokenizer(s1[, s2], truncation=True,
max_length=max_length)`` (pair API, longest_first truncation; LoReFT uses max_length 256). pyreft
appends one masked pad token and uses unk as pad; neither changes logits, so we pad normally.
We keep ``token_type_ids`` when the tokenizer returns them: BERT-family models (MiniLM) use
segment ids for sentence pairs, RoBERTa's tokenizer does not return them.
"""
from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

from ..data.tokenize import check_max_length
from ..data.train_sets import seeded_subset
from ..errors import UserError, reading
from ..paths import data_dir as resolve_data_dir
from ..paths import hub_offline
from .tasks import GlueTask, glue_task

HUB_DATASET = "nyu-mll/glue"
SELECTION_SIZE_LARGE = 1000      # selection rows when a validation split has more than ...
LARGE_SPLIT_THRESHOLD = 5000     # ... this many rows; otherwise half (rounded down) is selection
STSB_RANGE = (0.0, 5.0)

# Splits the project's GLUE data bundle does not ship (its README lists them as missing): named in
# the error so a user does not hunt for a file that was never there.
MISSING_FROM_DATA_BUNDLE = {
    ("mnli", "train"), ("mnli", "validation_matched"), ("mnli", "validation_mismatched"),
    ("qqp", "train"), ("qqp", "validation"), ("qnli", "train"),
}


# ----------------------------------------------------------------------------------------- loading

def split_path(data_dir: str | os.PathLike, task: str, split: str) -> Path | None:
    """The existing ``glue/<task>/<split>.jsonl`` (preferred) or ``.jsonl.gz``, else None."""
    folder = Path(data_dir) / "glue" / glue_task(task).name
    for suffix in (".jsonl", ".jsonl.gz"):
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    return None


def _check_label(spec: GlueTask, label, where: str):
    """The label as int (classification) or float (stsb); UserError naming ``where`` if invalid."""
    if spec.is_regression:
        ok = isinstance(label, (int, float)) and not isinstance(label, bool) and math.isfinite(label)
        if not ok or not STSB_RANGE[0] <= label <= STSB_RANGE[1]:
            raise UserError(f"{where}: label {label!r} is outside stsb's range 0..5 (a float similarity score)")
        return float(label)
    if isinstance(label, float) and label.is_integer():
        label = int(label)  # e.g. 1.0 written by pandas
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < spec.num_labels:
        hint = " (GLUE test labels are hidden as -1; use a validation split)" if label == -1 else ""
        raise UserError(f"{where}: label {label!r} is outside {spec.name}'s range 0..{spec.num_labels - 1} "
                        f"({', '.join(spec.label_names)}){hint}")
    return label


def _validate_row(spec: GlueTask, row, where: str, position: int) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for column in spec.text_columns:
        if not isinstance(row.get(column), str):
            raise UserError(f"{where}: missing text column {column!r} (a {spec.name} row needs "
                            f"{', '.join(spec.text_columns)}, label)")
    if "label" not in row:
        raise UserError(f"{where}: missing 'label'")
    clean = {column: row[column] for column in spec.text_columns}
    clean["label"] = _check_label(spec, row["label"], where)
    clean["idx"] = int(row["idx"]) if isinstance(row.get("idx"), int) else position
    return clean


def _read_jsonl(path: Path, spec: GlueTask) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    # reading(): any decoding fault (a truncated gzip, bad UTF-8, an I/O error) is one line naming the file
    with reading(path, "GLUE data file", "expected UTF-8 JSON Lines, optionally gzipped; restore or re-create it"):
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}: line {number} is not valid JSON ({err.msg}); "
                                    "expected one JSON object per line") from None
                rows.append(_validate_row(spec, row, f"{path}: line {number}", len(rows)))
    return rows


def _load_from_hub(spec: GlueTask, split: str, expected: Path) -> list[dict]:
    from ..data.files import hub_rows

    dataset = hub_rows(HUB_DATASET, spec.name, split=split, what=f"GLUE {spec.name}/{split} is not at {expected}(.gz)",
                       fix="put the file there or set data.dir=PATH")
    where = f"hub {HUB_DATASET}/{spec.name}/{split}"
    return [_validate_row(spec, row, f"{where}: row {i}", i) for i, row in enumerate(dataset)]


def load_split(task: str, split: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Rows ``{<text columns>, label, idx}`` of one GLUE split, validated.

    ``data_dir`` None resolves like the CLI (``$NEUROADA_DATA_DIR``, else the packaged sample).
    Local ``glue/<task>/<split>.jsonl(.gz)`` wins; the hub is tried only when it is missing and
    the hub is allowed. Every problem is a one-line UserError naming the file and line.
    """
    spec = glue_task(task)
    if split not in spec.splits:
        raise UserError(f"GLUE {spec.name} has no split {split!r}; valid splits: {', '.join(spec.splits)}")
    root = resolve_data_dir(data_dir)
    path = split_path(root, spec.name, split)
    if path is not None:
        return _read_jsonl(path, spec)
    expected = root / "glue" / spec.name / f"{split}.jsonl"
    if not hub_offline():
        return _load_from_hub(spec, split, expected)
    absent = (" (the benchmark data bundle this project is tested with has no MNLI or QQP splits and no QNLI train)"
              if (spec.name, split) in MISSING_FROM_DATA_BUNDLE else "")
    raise UserError(f"GLUE {spec.name}/{split} not found: expected {expected}(.gz){absent}; put the HF glue "
                    "JSONL there, set data.dir/NEUROADA_DATA_DIR to a folder with glue/<task>/<split>.jsonl, "
                    "or unset HF_HUB_OFFLINE to fetch it from the hub")


# ------------------------------------------------------------------------------- the LoReFT split

def loreft_selection_size(n: int) -> int:
    """Rows of a validation split of ``n`` rows that go to model selection (pyreft's rule)."""
    return SELECTION_SIZE_LARGE if n > LARGE_SPLIT_THRESHOLD else n // 2


def loreft_split_indices(n: int, seed: int = 42) -> tuple[list[int], list[int]]:
    """(selection, report) row indices, each ascending; pyreft's random_split after set_seed(seed)."""
    import torch

    if n < 0:
        raise ValueError("n must be >= 0")
    selection_size = loreft_selection_size(n)
    generator = torch.Generator().manual_seed(int(seed))  # same stream as torch.manual_seed(seed)
    permutation = torch.randperm(n, generator=generator).tolist()
    report, selection = permutation[: n - selection_size], permutation[n - selection_size:]
    return sorted(selection), sorted(report)


def loreft_split(rows: list, seed: int = 42) -> tuple[list, list]:
    """(selection_rows, report_rows): disjoint, together all rows, each in file order.

    Select the checkpoint on ``selection_rows``; report the metric on ``report_rows``.
    """
    selection, report = loreft_split_indices(len(rows), seed)
    return [rows[i] for i in selection], [rows[i] for i in report]


def train_rows(task: str, data_dir, limit: int | None, seed: int) -> list[dict]:
    """The training rows: all of the train split, or ``limit`` of them drawn with ``seed`` (file order)."""
    spec = glue_task(task)
    return seeded_subset(load_split(spec.name, spec.train_split, data_dir), limit, seed)


def selection_rows(task: str, data_dir, seed: int, split: str | None = None) -> list[dict]:
    """The LoReFT model-selection part of ``split`` (default: the task's selection split) for the run seed."""
    spec = glue_task(task)
    return loreft_split(load_split(spec.name, split or spec.selection_split, data_dir), seed)[0]


def report_rows(task: str, data_dir, seed: int, split: str | None = None) -> list[dict]:
    """The LoReFT report part of ``split`` (where the published score is computed) for the run seed."""
    spec = glue_task(task)
    return loreft_split(load_split(spec.name, split or spec.selection_split, data_dir), seed)[1]


# ------------------------------------------------------------------------- tokenisation, batches

def encode(rows: list[dict], tokenizer, task: str, max_length: int) -> list[dict]:
    """Tokenise rows in one batched call: ``{input_ids, attention_mask, [token_type_ids], labels, idx}``.

    Sentence pairs go through the tokenizer's pair API (special tokens and segment ids as the
    model was pretrained); ``labels`` is a float for stsb, an int otherwise.
    """
    spec = glue_task(task)
    check_max_length(max_length, "data.max_length")
    if not rows:
        return []
    columns = [[row[column] for row in rows] for column in spec.text_columns]
    batch = tokenizer(*columns, truncation=True, max_length=max_length)
    keep = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch]
    examples = []
    for i, row in enumerate(rows):
        example = {key: list(batch[key][i]) for key in keep}
        example["labels"] = float(row["label"]) if spec.is_regression else int(row["label"])
        example["idx"] = row.get("idx", i)
        examples.append(example)
    return examples


def collate_classification(examples: list[dict], pad_id: int, regression: bool | None = None) -> dict:
    """Right-pad to the longest example: input_ids, attention_mask, [token_type_ids], labels.

    Labels are float32 for regression (stsb), int64 otherwise; ``regression`` None infers it from
    the label values (encode() gives stsb float labels). ``idx`` stays out: the batch goes to
    ``model(**batch)`` as is.
    """
    import torch

    if not examples:
        raise ValueError("collate_classification needs at least one example")
    width = max(len(example["input_ids"]) for example in examples)
    count = len(examples)
    input_ids = torch.full((count, width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((count, width), dtype=torch.long)
    with_types = all("token_type_ids" in example for example in examples)
    token_type_ids = torch.zeros((count, width), dtype=torch.long) if with_types else None
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
        # The mask marks real tokens even when pad_id also occurs as a real token (unk-as-pad).
        attention_mask[row, :length] = 1
        if token_type_ids is not None:
            token_type_ids[row, :length] = torch.tensor(example["token_type_ids"], dtype=torch.long)
    labels = [example["labels"] for example in examples]
    if regression is None:
        regression = any(isinstance(label, float) for label in labels)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        batch["token_type_ids"] = token_type_ids
    batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
    return batch
