"""Named sections of wall time: the training recipe times its parts here instead of in the loop's code."""
from __future__ import annotations

import contextlib
import time


class Stopwatch:
    """``with watch.section("data"): ...`` adds the block's seconds to ``totals["data"]``; ``latest[name]`` is the
    block's last duration and ``total(*names)`` a sum of sections."""

    def __init__(self, *names: str):
        self.totals = dict.fromkeys(names, 0.0)
        self.latest = dict.fromkeys(names, 0.0)

    @contextlib.contextmanager
    def section(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.totals[name] = self.totals.get(name, 0.0) + elapsed
            self.latest[name] = elapsed

    def total(self, *names: str) -> float:
        return sum(self.totals.get(name, 0.0) for name in names)
