"""Which input connections each output neuron keeps.

The per-neuron functions (the method) return column indices of shape [d_out, k] (int64), sorted ascending
within a row so that the sparse backward reads the input in order. The placement ablations (scope=layer|
global, neuron_fraction < 1) return (row_counts, cols) cells instead (see the section below). Ties are
broken towards the lower column (and earlier layer), so the choice is identical on every run, rank and device.
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


# ---- General cell layouts (scope=layer|global, neuron_fraction < 1) ---------------------------------------------
# Cells are returned as (row_counts [d_out], cols [n]): a CSR layout sorted by row, then column. Rows may hold any
# number of cells (0 included), so no padding is stored: memory and file size are exactly the budget.

def cells_from_positions(positions: torch.Tensor, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions in W.view(-1) -> (row_counts, cols), sorted by row then column."""
    positions = torch.sort(positions.long()).values
    rows = torch.div(positions, d_in, rounding_mode="floor")
    return torch.bincount(rows, minlength=d_out), positions - rows * d_in


def cell_scores(selection_name: str, weight: torch.Tensor, seed: int, name: str) -> tuple[torch.Tensor, bool]:
    """(scores, largest) of every cell for placement by value: raw |W| (no normalisation), or seeded noise."""
    if selection_name == "magnitude":
        return weight.detach().abs().float(), True
    if selection_name == "reverse":
        return weight.detach().abs().float(), False
    if selection_name == "random":
        generator = torch.Generator().manual_seed(layer_seed(seed, "cells:" + name))
        return torch.rand(weight.shape, generator=generator).to(weight.device), True
    raise ValueError(f"selection {selection_name!r} cannot place cells by value")


def _ranked(scores: torch.Tensor, count: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` (value, flat position) pairs, best first; ties keep the lower position (stable sort)."""
    flat = scores.reshape(-1)
    order = torch.sort(flat, descending=largest, stable=True).indices[:count]
    return flat[order], order


def top_cells(scores: torch.Tensor, budget: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scope=layer: the ``budget`` best cells anywhere in one layer."""
    _, positions = _ranked(scores, budget, largest)
    return cells_from_positions(positions, *scores.shape)


def top_cells_global(scores: dict[str, torch.Tensor], budget: int, largest: bool) -> dict[str, tuple]:
    """scope=global: the ``budget`` best cells over all layers, compared by raw score.

    Streams layer by layer, keeping the running best ``budget`` candidates (memory: budget + one layer),
    so the whole model's scores never exist at once. Ties go to the earlier layer, then the lower position.
    """
    best_values = torch.empty(0)
    best_layer = torch.empty(0, dtype=torch.long)
    best_pos = torch.empty(0, dtype=torch.long)
    names = list(scores)
    for number, name in enumerate(names):
        values, positions = _ranked(scores[name].cpu(), budget, largest)
        values = torch.cat([best_values, values.float()])
        layer = torch.cat([best_layer, torch.full_like(positions, number)])
        positions = torch.cat([best_pos, positions.cpu()])
        keep = torch.sort(values, descending=largest, stable=True).indices[:budget]
        best_values, best_layer, best_pos = values[keep], layer[keep], positions[keep]
    result = {}
    for number, name in enumerate(names):
        d_out, d_in = scores[name].shape
        cells = cells_from_positions(best_pos[best_layer == number], d_out, d_in)
        result[name] = tuple(t.to(scores[name].device) for t in cells)
    return result


def covered_rows(d_out: int, fraction: float, seed: int, name: str) -> torch.Tensor:
    """round(fraction * d_out) distinct rows, reproducible from (seed, layer name), ascending."""
    count = round(fraction * d_out)
    generator = torch.Generator().manual_seed(layer_seed(seed, "rows:" + name))
    return torch.sort(torch.randperm(d_out, generator=generator)[:count]).values


def keep_rows(idx: torch.Tensor, rows: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """neuron_fraction: the per-row cells [d_out, k] of the given rows only; the other rows get none."""
    d_out = idx.shape[0]
    rows = rows.to(idx.device)
    positions = (rows.unsqueeze(1) * d_in + idx.index_select(0, rows)).reshape(-1)
    return cells_from_positions(positions, d_out, d_in)


# ---- The one table of selection rules -----------------------------------------------------------------------
# Every path (inject, the PEFT tuner, load, the CLI) selects through ``columns`` / ``cell_scores`` below, so a rule
# added here behaves the same everywhere; core.config.SELECTIONS names the same rules (a test checks they match).
# gradient is scored from training batches (core.model._gradient_scores) and has no weight-only scorer.

def _random_rule(weight: torch.Tensor, k: int, seed: int, name: str) -> torch.Tensor:
    return random_columns(*weight.shape, k, seed, name, weight.device)


PER_ROW_RULES = {
    "magnitude": lambda weight, k, seed, name: magnitude(weight, k),
    "reverse": lambda weight, k, seed, name: reverse(weight, k),
    "random": _random_rule,
    "gradient": None,  # needs batches: see core.model._gradient_scores
}


def columns(rule: str, weight: torch.Tensor, k: int, seed: int, name: str) -> torch.Tensor:
    """[d_out, k] columns of one layer chosen by ``rule`` (ties -> lower column, identical on every run)."""
    from ..errors import UserError

    if rule not in PER_ROW_RULES:
        raise UserError(f"neuroada selection={rule!r} is unknown; use one of {', '.join(PER_ROW_RULES)}")
    scorer = PER_ROW_RULES[rule]
    if scorer is None:
        raise UserError(f"neuroada selection={rule} needs training batches; use neuroada_cli.inject(model, "
                        "config, gradient_batches) or selection=magnitude")
    return scorer(weight, k, seed, name)
