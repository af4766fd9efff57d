"""Packing (``data.packing=true``): several examples share a row of ``data.max_length`` tokens; no padding.

Layout of a packed row (causal LM):

    input_ids     a0 a1 a2 a3 | b0 b1 b2 | pad pad
    position_ids   0  1  2  3 |  0  1  2 |   0   1
    labels        -- l1 l2 l3 | -- l1 l2 |  --  --      (-- = -100)

* Attention never crosses examples: the batch has NO attention mask, and transformers (masking_utils,
  ``find_packed_sequence_indices``) then reads the restarting position ids as sequence boundaries and builds a
  block-diagonal causal mask for sdpa and eager; flash attention instead takes one row of all examples and
  forms its varlen ``cu_seqlens`` from the position ids (it treats only a batch of ONE row as packed), so for
  flash attention ``collate_packed(..., flat=True)`` puts the micro-batch in one row and drops the padding.
* The first token of every example gets label -100: it would otherwise be "predicted" from the previous
  example's last token. Unpacked, the first label is never predicted either, so the supervised positions,
  every example's loss and the loss normaliser (target tokens, kinds/causal_lm.py ``weight``) are exactly
  those of the unpacked batch. Padding (rows end at different lengths) is a sequence of its own: its
  position ids restart at 0, so real tokens never attend to it, and its labels are -100.
* Which examples form a row: as few rows as first fit needs, the examples spread evenly over them
  (``balanced_rows``: a micro-batch tensor is as wide as its widest row). The training plan
  (``packed_micro_batches``, used by data/batching.BatchPlan) decides per optimizer step which examples
  form each micro-batch of ``micro_batch_size`` rows, the same number on every process.
"""
from __future__ import annotations

import math
from typing import Sequence

from . import IGNORE_INDEX


def flat_rows_for(attn_implementation: str | None) -> bool:
    """True for flash-attention implementations (varlen from position ids needs one row per batch)."""
    return bool(attn_implementation) and "flash" in str(attn_implementation)


def first_fit_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Positions (into ``lengths``) per row: each item goes into the first row with room (an item longer than
    ``capacity`` gets a row of its own). Fed longest first this is first-fit decreasing.

    Fed a concatenation of blocks that each fit one row, it never makes more rows than there are blocks
    (a new row is opened at most once per block), which ``packed_micro_batches`` relies on.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for position, length in enumerate(lengths):
        for row, free in enumerate(room):
            if length <= free:
                rows[row].append(position)
                room[row] -= length
                break
        else:
            rows.append([position])
            room.append(capacity - length)
    return rows


def balanced_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Positions per row: as few rows as first fit finds (in the given order, or longest first, whichever is
    fewer), then the items spread over that many rows evenly (longest first, each to the emptiest row it fits).

    Why even: a micro-batch tensor is as wide as its widest row, so 1,600 tokens as 512+512+512+64 cost 2,048
    cells and as 4 x ~400 about 1,650. When the even spread does not fit, the first-fit rows are kept.
    """
    given = first_fit_rows(lengths, capacity)
    order = sorted(range(len(lengths)), key=lambda p: (-lengths[p], p))
    decreasing = [[order[p] for p in row] for row in first_fit_rows([lengths[p] for p in order], capacity)]
    fewest = decreasing if len(decreasing) < len(given) else given
    rows: list[list[int]] = [[] for _ in fewest]
    load = [0] * len(fewest)
    for position in order:
        fits = [row for row in range(len(rows)) if load[row] + lengths[position] <= capacity]
        if not fits:
            return fewest
        row = min(fits, key=lambda r: (load[r], r))
        rows[row].append(position)
        load[row] += lengths[position]
    return [sorted(row) for row in rows if row]


def packed_micro_batches(batch: list[int], lengths: Sequence[int], capacity: int, rank: int, world_size: int,
                         micro_batch_size: int) -> list[list[int]]:
    """This process's micro-batches of a packed global batch: lists of example indices, each packing into at
    most ``micro_batch_size`` rows of ``capacity`` tokens (listed row by row, so ``collate_packed``'s
    ``balanced_rows`` finds at most that many rows again).

    The global batch is packed first-fit decreasing; the rows are dealt into ``world_size x steps`` groups
    (steps = fewest accumulation steps that hold them), longest row to the least-loaded group, group g to
    process ``g % world_size`` as its step ``g // world_size``. Every process gets the same number of
    micro-batches (DDP and FSDP2 need that), none empty: rows are split when there are fewer rows than groups.
    A pure function of its arguments, so every process plans alike and a resumed run continues identically.
    """
    if micro_batch_size < 1 or world_size < 1:
        raise ValueError("micro_batch_size and world_size must be >= 1")
    order = sorted(batch, key=lambda i: (-lengths[i], i))
    rows = [[order[p] for p in row] for row in first_fit_rows([lengths[i] for i in order], capacity)]
    steps = math.ceil(len(rows) / (world_size * micro_batch_size))
    groups = world_size * steps
    if len(batch) < groups:
        raise ValueError(f"a global batch of {len(batch)} examples cannot feed {groups} micro-batches")
    while len(rows) < groups:  # too few rows to give every process a micro-batch: split the fullest row
        widest = max(range(len(rows)), key=lambda r: (len(rows[r]), -r))
        rows.append(rows[widest][1::2])
        rows[widest] = rows[widest][0::2]
    rows.sort(key=lambda row: -sum(lengths[i] for i in row))  # stable: ties keep their order
    members: list[list[list[int]]] = [[] for _ in range(groups)]
    load = [0] * groups
    for row in rows:
        group = min((g for g in range(groups) if len(members[g]) < micro_batch_size), key=lambda g: (load[g], g))
        members[group].append(row)
        load[group] += sum(lengths[i] for i in row)
    return [[index for row in members[group] for index in row] for group in range(rank, groups, world_size)]


def collate_packed(examples: list[dict], pad_id: int, capacity: int, flat: bool = False) -> dict:
    """Pack ``examples`` (``balanced_rows``) into rows of ``capacity`` tokens: ``input_ids``,
    ``position_ids``, ``labels`` (see the module docstring); no ``attention_mask``.

    ``flat``: all rows concatenated into ONE row without padding (flash attention's varlen layout).
    """
    import torch

    if not examples:
        raise ValueError("collate_packed needs at least one example")
    rows = balanced_rows([len(example["input_ids"]) for example in examples], capacity)
    if flat:
        rows = [[position for row in rows for position in row]]
    width = max(sum(len(examples[p]["input_ids"]) for p in row) for row in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for number, row in enumerate(rows):
        start = 0
        for position in row:
            example = examples[position]
            length = len(example["input_ids"])
            input_ids[number, start:start + length] = torch.tensor(example["input_ids"], dtype=torch.long)
            labels[number, start + 1:start + length] = torch.tensor(example["labels"][1:], dtype=torch.long)
            position_ids[number, start:start + length] = torch.arange(length)
            start += length
        position_ids[number, start:] = torch.arange(width - start)  # padding: a sequence of its own
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
