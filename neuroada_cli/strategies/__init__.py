"""How the model is spread over processes (``trainer.strategy``): one small class per strategy behind one
interface, looked up in one table, as the methods are. This module imports no torch (config validation reads
``STRATEGIES``); the recipe never asks which strategy it runs.

    strategy = get_strategy(cfg.trainer.strategy)
    strategy.check(cfg, world_size)                  # before any model work: what it cannot run, as one line
    model, tokenizer = strategy.load(accelerator, load)        # load(empty=...) -> (model, tokenizer)
    model = strategy.shard(model, build_structure, accelerator)  # after the method is attached
    model, optimizer, optimizer_state = strategy.prepare(accelerator, model, optimizer)
    with strategy.accumulating(accelerator, model, last): backward      # gradient sync on the last micro-batch
    with strategy.gathered(model): save on process 0                    # whole trainable tensors
    strategy.collective                              # True: forwards and saves need every process

Adding one: a class in ``strategies/<name>.py`` and a line in ``STRATEGY_MODULES``; the schema's allowed
values follow.
"""
from __future__ import annotations

import importlib
from typing import Callable, ContextManager, Protocol

from ..errors import UserError

STRATEGY_MODULES = {
    "ddp": "neuroada_cli.strategies.ddp:DdpStrategy",
    "fsdp": "neuroada_cli.strategies.fsdp:FsdpStrategy",
}
STRATEGIES = tuple(STRATEGY_MODULES)


class Strategy(Protocol):
    """What the training recipe needs from a strategy (structural: no base class)."""

    name: str
    collective: bool  # the model is sharded: every forward, gather and save involves every process

    def check(self, cfg, world_size: int) -> None:
        """UserError (one line, the value and the fix) for what this strategy cannot run; on every process."""

    def load(self, accelerator, load: Callable[..., tuple]) -> tuple:
        """(model, tokenizer) from ``load(empty=bool)``: which process reads weights and in what order."""

    def shard(self, model, build_structure: Callable, accelerator):
        """The attached model spread over processes; ``build_structure()`` = the same on the meta device."""

    def prepare(self, accelerator, model, optimizer) -> tuple:
        """(model, optimizer, optimizer_state): wrapped by accelerate; the last is what checkpoints save."""

    def accumulating(self, accelerator, model, last: bool) -> ContextManager:
        """The context of one micro-batch's backward: gradients are synchronised on the ``last`` only."""

    def gathered(self, model) -> ContextManager:
        """Inside: trainable tensors whole, so that the method's save runs on process 0 (collective if sharded)."""


def get_strategy(name: str) -> Strategy:
    """The strategy object for ``trainer.strategy``; UserError naming the valid names."""
    if name not in STRATEGY_MODULES:
        raise UserError(f"trainer.strategy={name!r} is unknown; use one of: {', '.join(STRATEGIES)}")
    module_name, class_name = STRATEGY_MODULES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
