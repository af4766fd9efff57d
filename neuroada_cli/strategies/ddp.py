"""``trainer.strategy=ddp`` (the default): a whole copy of the model per process, accelerate's DDP (gloo on CPU).

Nothing here is collective beyond DDP's own gradient all-reduce: process 0 alone saves and evaluates.
"""
from __future__ import annotations

import contextlib
from typing import Callable


class DdpStrategy:
    """One whole model per process; ``accelerator.prepare`` wraps it in DDP (broadcast_buffers=False)."""

    name = "ddp"
    collective = False  # forwards and saves need no other process

    def check(self, cfg, world_size: int) -> None:
        """Every method and every cell layout runs on whole copies: nothing to refuse."""

    def load(self, accelerator, load: Callable[..., tuple]) -> tuple:
        return load(empty=False)

    def shard(self, model, build_structure: Callable, accelerator):
        return model  # nothing to shard: every process keeps the whole model

    def prepare(self, accelerator, model, optimizer):
        """(model, optimizer, what checkpoints save of the optimizer: the optimizer itself)."""
        model, optimizer = accelerator.prepare(model, optimizer)
        return model, optimizer, optimizer

    def accumulating(self, accelerator, model, last: bool):
        """accelerate's no_sync on every micro-batch but the ``last``: one gradient all-reduce per step."""
        return contextlib.nullcontext() if last else accelerator.no_sync(model)

    def gathered(self, model):
        return contextlib.nullcontext(model)  # already whole on every process
