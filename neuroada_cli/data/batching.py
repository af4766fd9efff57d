"""The global-batch plan: which examples form optimizer step N, on which process, in which micro-batch.

Everything is a pure function of (example lengths, batch size, seed, epoch), so

* every process computes the same plan without communication, and splits each global batch itself;
* resuming needs only the step number: step N is batch ``N % steps_per_epoch`` of epoch
  ``N // steps_per_epoch`` (``position``), no sampler state to save;
* one process accumulating a global batch and several processes sharing it see the same examples.

Length bucketing (cuts padding): each epoch the examples are shuffled with the seed, cut into buckets
of ``bucket_batches`` global batches, sorted by length inside a bucket and cut into global batches;
the order of all global batches is then shuffled again, so consecutive steps do not go from short to
long. The last incomplete global batch of an epoch is dropped (its examples differ every epoch).

Packing (``pack_length`` = data.max_length when data.packing): the global batches are the same examples as
without packing (same steps, same loss normaliser, so toggling packing does not change which examples a step
sees); only a process's micro-batches differ: ``micro_batches`` packs the global batch into rows of
``pack_length`` tokens and gives each process micro-batches of up to ``micro_batch_size`` ROWS, as many as
the step needs (the same number on every process; data/packing.py).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..errors import UserError


@dataclass
class BatchPlan:
    lengths: list[int]          # tokens per example
    batch_size: int             # examples per optimizer step, all processes together
    seed: int
    bucket_batches: int = 32    # global batches per length bucket; 1 = plain shuffle
    pack_length: int | None = None  # data.max_length when packing, else None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.batch_size < 1 or self.bucket_batches < 1:
            raise ValueError("batch_size and bucket_batches must be >= 1")

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.batch_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of one epoch (lists of example indices, longest first inside a batch)."""
        if epoch not in self._cache:
            self._cache.clear()  # one epoch at a time is all the loop needs
            self._cache[epoch] = self._plan_epoch(epoch)
        return self._cache[epoch]

    def _plan_epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"neuroada-batches:{self.seed}:{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        order = order[: self.steps_per_epoch * self.batch_size]  # drop the incomplete batch
        bucket = self.batch_size * self.bucket_batches
        batches = []
        for start in range(0, len(order), bucket):
            # Stable sort on a shuffled chunk: equal lengths keep their random order.
            chunk = sorted(order[start:start + bucket], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of optimizer step ``step`` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def global_batch(self, step: int) -> list[int]:
        epoch, index = self.position(step)
        return self.epoch_batches(epoch)[index]

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
        """This process's micro-batches (example indices) of optimizer step ``step``.

        Unpacked: ``micro_batch_size`` examples each, always the same count (``split_global_batch``). Packed:
        each packs into at most ``micro_batch_size`` rows of ``pack_length``; the count varies by step, so the
        caller loops over what it gets and syncs gradients on the last one.
        """
        batch = self.global_batch(step)
        if self.pack_length is None:
            return split_global_batch(batch, rank, world_size, micro_batch_size)
        from .packing import packed_micro_batches

        return packed_micro_batches(batch, self.lengths, self.pack_length, rank, world_size, micro_batch_size)


def split_global_batch(batch: list[int], rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """This process's micro-batches of a global batch.

    The (length-sorted) batch is cut into micro-batches of ``micro_batch_size``; micro-batch c goes to
    process ``c % world_size`` as its accumulation step ``c // world_size``, so at every accumulation
    step all processes hold examples of similar length (no process waits long for another).
    """
    per_step = micro_batch_size * world_size
    if len(batch) % per_step:
        raise ValueError(f"a global batch of {len(batch)} cannot be split into {world_size} x {micro_batch_size}")
    micro = [batch[i:i + micro_batch_size] for i in range(0, len(batch), micro_batch_size)]
    return micro[rank::world_size]


def length_sorted_batches(examples: list, batch_size: int) -> list[list[int]]:
    """Eval batches as index lists, longest first, so each batch pads little (no shuffling, no dropping).

    ``examples`` are encoded examples (dicts with input_ids) or plain lengths. Put predictions
    back with the indices: ``preds[i] for batch in batches for i in batch`` are in that order.
    Longest first also surfaces an out-of-memory batch at once, not at the end.
    """
    if batch_size < 1:
        raise UserError(f"eval.batch_size={batch_size!r} must be >= 1")
    lengths = [e if isinstance(e, int) else len(e["input_ids"]) for e in examples]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
