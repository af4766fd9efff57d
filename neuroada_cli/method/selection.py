"""Which k input connections each output neuron keeps.

Every function returns column indices of shape [d_out, k] (int64), sorted ascending within a row so
that the sparse backward reads the input in order. Ties are broken towards the lower column index, so
the choice is identical on every run, rank and device.
"""
from __future__ import annotations

import hashlib

import torch

ROW_CHUNK = 1024  # rows scored at once: bounds the temporary memory of the sort on large layers


def _top_k_columns(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Per-row top-k with deterministic ties (stable sort keeps the lower column first)."""
    chosen = []
    for start in range(0, scores.shape[0], ROW_CHUNK):
        block = scores[start:start + ROW_CHUNK].float()
        order = torch.sort(block, dim=1, descending=largest, stable=True).indices[:, :k]
        chosen.append(torch.sort(order, dim=1).values)
    return torch.cat(chosen, dim=0)


def magnitude(weight: torch.Tensor, k: int) -> torch.Tensor:
    return _top_k_columns(weight.detach().abs(), k, largest=True)


def reverse(weight: torch.Tensor, k: int) -> torch.Tensor:
    return _top_k_columns(weight.detach().abs(), k, largest=False)


def from_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Gradient selection: largest accumulated |dL/dW| per row."""
    return _top_k_columns(scores.abs(), k, largest=True)


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that depends only on the config seed and the module name (not on hash())."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_columns(d_out: int, d_in: int, k: int, seed: int, name: str, device=None) -> torch.Tensor:
    """k distinct random columns per row, reproducible from (seed, layer name)."""
    generator = torch.Generator().manual_seed(layer_seed(seed, name))
    chosen = []
    for start in range(0, d_out, ROW_CHUNK):
        rows = min(ROW_CHUNK, d_out - start)
        noise = torch.rand(rows, d_in, generator=generator)
        chosen.append(torch.sort(torch.topk(noise, k, dim=1).indices, dim=1).values)
    return torch.cat(chosen, dim=0).to(device)
