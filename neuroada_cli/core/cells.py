"""One adapter's cells in a NeuroAda layer: the tensors layer.py keeps per adapter, built and read here.

Per adapter: ``neuroada_idx`` (columns: [d_out, k], or [n] in CSR order for the general layout),
``neuroada_row_counts`` ([d_out] cells per row; None on the per-row layout), ``neuroada_cell_rows`` (each cell's
row; general layout only), ``neuroada_crow`` (CSR row pointers, also 0, k, 2k, ... on the per-row layout: the
unmerged product's sparse matrix), ``neuroada_orig`` (the base's original values at the cells) and, when backward
keeps only the selected input columns, ``neuroada_input_cols`` / ``neuroada_local_idx``.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .quantized import dequantized_weight

CELL_NAMES = ("neuroada_idx", "neuroada_orig", "neuroada_row_counts", "neuroada_cell_rows", "neuroada_crow",
              "neuroada_input_cols", "neuroada_local_idx")


def make_cells(base_layer, quantized: bool, idx, orig, compact_input: bool) -> dict:
    """The cell tensors of ``idx`` (either layout) on ``base_layer``'s device; ``orig`` None: read from W."""
    d_out, d_in = base_layer.out_features, base_layer.in_features
    device = base_layer.weight.device
    row_counts = cell_rows = crow = None
    if isinstance(idx, (tuple, list)):
        row_counts, idx = (torch.as_tensor(t).to(device=device, dtype=torch.long) for t in idx)
        if row_counts.shape != (d_out,) or idx.dim() != 1 or int(row_counts.sum()) != idx.numel():
            raise ValueError(f"cells with {tuple(row_counts.shape)} row counts and {tuple(idx.shape)} columns "
                             f"do not fit a weight of shape {(d_out, d_in)}")
        cell_rows = torch.repeat_interleave(torch.arange(d_out, device=device), row_counts)
        crow = torch.cat([row_counts.new_zeros(1), row_counts.cumsum(0)])
    elif idx.dim() != 2 or idx.shape[0] != d_out:
        raise ValueError(f"indices of shape {tuple(idx.shape)} do not fit a weight of shape {(d_out, d_in)}")
    idx = idx.to(device=device, dtype=torch.long)
    if idx.numel() and not idx.is_meta and (int(idx.max()) >= d_in or int(idx.min()) < 0):
        raise UserError(f"NeuroAda indices up to {int(idx.max())} do not fit a layer with {d_in} inputs; "
                        "load the adapter onto the model it was trained on")
    if crow is None:  # per-row layout: the CSR row pointers of the unmerged product are 0, k, 2k, ...
        crow = torch.arange(0, idx.numel() + 1, max(1, idx.shape[1]), device=device)[:d_out + 1]
    cells = {"neuroada_idx": idx, "neuroada_row_counts": row_counts, "neuroada_cell_rows": cell_rows,
             "neuroada_crow": crow, "neuroada_input_cols": None, "neuroada_local_idx": None}
    if orig is None:
        orig = read_cells(base_layer, quantized, cells)
    cells["neuroada_orig"] = orig.detach().to(device).clone()
    if compact_input and idx.numel():
        cells["neuroada_input_cols"], cells["neuroada_local_idx"] = torch.unique(idx, return_inverse=True)
    return cells


def read_cells(base_layer, quantized: bool, cells: dict) -> torch.Tensor:
    """The base values at the cells (call with W pristine); dequantized on a quantized base."""
    weight = dequantized_weight(base_layer) if quantized else base_layer.weight.detach()
    if cells["neuroada_row_counts"] is None:
        return weight.gather(1, cells["neuroada_idx"])
    return weight[cells["neuroada_cell_rows"], cells["neuroada_idx"]]


def dense_delta(delta: torch.Tensor, idx: torch.Tensor, rows, d_out: int, d_in: int) -> torch.Tensor:
    """scatter(delta) as a dense fp32 [d_out, d_in] (the reference impl, get_delta_weight); autograd flows."""
    update = torch.zeros(d_out, d_in, dtype=torch.float32, device=delta.device)
    if rows is None:
        return update.scatter(1, idx, delta)
    return update.index_put((rows, idx), delta)
