"""The NeuroAda linear layer: a frozen nn.Linear plus a trainable delta at d_out x k selected cells.

Two implementations, one result: ``y = F.linear(x, W + scatter(delta), b)``.

fused (default)
    The base weight is kept merged in place: the selected cells of W hold ``orig + delta`` (rounded
    once from fp32 to W's dtype) and are rewritten in forward only after the delta changed (an
    optimizer step, a load). The forward is then exactly the frozen model's matmul, and backward keeps
    no W-sized tensor and forms no dense dW: the delta gradient is a sampled product over the selected
    cells only, ``g[r, j] = sum_t dY[t, r] * X[t, idx[r, j]]``, a sampled dense-dense product (SDDMM)
    with O(d_out x k + tokens x d_in) scratch, never O(d_out x d_in). The original values of the
    selected cells are kept aside (d_out x k), so ``unmerge`` restores W bitwise.
reference
    Materialise ``W + scatter(delta)`` every forward and let autograd form the dense gradient: the
    authors' approach, kept for tests and benchmarks.

Deltas are fp32 whatever W's dtype, so many small updates accumulate instead of rounding away.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

SCRATCH_ELEMENTS = 1 << 22  # ~16 MB of fp32 scratch per chunk of the sparse delta gradient


def sampled_delta_grad(grad_out: torch.Tensor, inputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """g[r, j] = sum_t grad_out[t, r] * inputs[t, idx[r, j]] for 2-D grad_out [T, d_out], inputs [T, d_in].

    A sampled dense-dense product (SDDMM) over the d_out x k selected cells: torch.sparse.sampled_addmm
    where the backend has it (CPU and CUDA, fp32/fp64; 2-12x faster than a gather on CPU, see
    scripts/bench_sddmm.py), else a chunked gather + batched matrix-vector product. The dense
    d_out x d_in gradient is never formed.
    """
    dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    grad_out, inputs = grad_out.to(dtype), inputs.to(dtype)
    try:
        return _sddmm_sparse(grad_out, inputs, idx)
    except (RuntimeError, NotImplementedError):  # backend without sampled_addmm for this device/dtype
        return _sddmm_gather(grad_out, inputs, idx)


def _sddmm_sparse(grad_out: torch.Tensor, inputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    d_out, k = idx.shape
    crow = torch.arange(0, d_out * k + 1, k, device=idx.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        pattern = torch.sparse_csr_tensor(
            crow, idx.reshape(-1), torch.zeros(d_out * k, dtype=grad_out.dtype, device=grad_out.device),
            (d_out, inputs.shape[1]), check_invariants=False,
        )
    # inputs in column-major layout: each selected column is read contiguously
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # "CSR support is in beta" noise
        product = torch.sparse.sampled_addmm(pattern, grad_out.t(), inputs.t().contiguous().t(), beta=0.0)
    return product.values().view(d_out, k)


def _sddmm_gather(grad_out: torch.Tensor, inputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Portable fallback: gather selected input columns as rows of inputs^T, chunked over output rows."""
    d_out, k = idx.shape
    tokens = inputs.shape[0]
    inputs_t = inputs.t().contiguous()  # [d_in, T]: a selected column becomes a contiguous row
    grad_t = grad_out.t().contiguous()  # [d_out, T]
    rows_per_chunk = max(1, SCRATCH_ELEMENTS // max(1, k * tokens))
    result = torch.empty(d_out, k, dtype=grad_out.dtype, device=grad_out.device)
    for start in range(0, d_out, rows_per_chunk):
        stop = min(d_out, start + rows_per_chunk)
        gathered = inputs_t.index_select(0, idx[start:stop].reshape(-1)).view(stop - start, k, tokens)
        result[start:stop] = torch.bmm(gathered, grad_t[start:stop].unsqueeze(-1)).squeeze(-1)
    return result


class _FusedLinear(torch.autograd.Function):
    """Forward with the (already merged) weight; backward gives dX, db and the sparse d(delta)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, idx):
        ctx.save_for_backward(x if delta.requires_grad else None, weight, idx)
        ctx.has_bias = bias is not None
        ctx.x_dtype = x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, idx = ctx.saved_tensors
        grad_x = grad_bias = grad_delta = None
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = flat_grad @ weight.to(flat_grad.dtype)
            grad_x = grad_x.view(*grad_out.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        if ctx.needs_input_grad[3]:
            flat_x = x.reshape(-1, x.shape[-1])
            # bf16/fp16 autocast: the product was computed from x cast to grad_out's dtype; do the same.
            grad_delta = sampled_delta_grad(flat_grad, flat_x.to(flat_grad.dtype), idx)
        return grad_x, None, grad_bias, grad_delta, None


class NeuroAdaLinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` (kept as ``base_layer``) with a delta at ``idx`` ([d_out, k] columns)."""

    def __init__(self, base_layer: nn.Linear, idx: torch.Tensor, impl: str = "fused", train_bias: bool = False):
        super().__init__()
        weight = base_layer.weight
        d_out, d_in = weight.shape
        if idx.dim() != 2 or idx.shape[0] != d_out:
            raise ValueError(f"indices of shape {tuple(idx.shape)} do not fit a weight of shape {(d_out, d_in)}")
        self.base_layer = base_layer
        self.impl = impl
        self.k = idx.shape[1]
        weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(train_bias)
        idx = idx.to(device=weight.device, dtype=torch.long)
        # Buffers, not parameters: they follow .to(device) but are saved only through save_adapter.
        self.register_buffer("neuroada_idx", idx, persistent=False)
        self.register_buffer("neuroada_orig", weight.detach().gather(1, idx).clone(), persistent=False)
        self.neuroada_delta = nn.Parameter(torch.zeros(d_out, self.k, dtype=torch.float32, device=weight.device))
        self.merged = False  # True after merge(): delta baked into W, no longer applied or trained
        self._synced_version = None  # delta version last written into W by the fused path

    @property
    def weight(self) -> torch.Tensor:  # so code that inspects module.weight still works
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def merged_values(self) -> torch.Tensor:
        """orig + delta in fp32, rounded once to W's dtype."""
        return (self.neuroada_orig.float() + self.neuroada_delta.detach()).to(self.base_layer.weight.dtype)

    def flat_indices(self) -> torch.Tensor:
        """Positions of the selected cells in W.view(-1) (computed, not stored: saves 8 bytes a cell)."""
        d_out, d_in = self.base_layer.weight.shape
        rows = torch.arange(d_out, device=self.neuroada_idx.device).unsqueeze(1) * d_in
        return (rows + self.neuroada_idx).reshape(-1)

    @torch.no_grad()
    def _write_cells(self, values: torch.Tensor) -> None:
        self.base_layer.weight.view(-1).index_copy_(0, self.flat_indices(), values.reshape(-1))

    def _sync_fused(self) -> None:
        """Write orig + delta into W if the delta changed since the last write (cheap: d_out x k cells)."""
        version = (self.neuroada_delta._version, self.neuroada_delta.data_ptr())
        if version != self._synced_version:
            self._write_cells(self.merged_values())
            self._synced_version = version

    def _restore_cells(self) -> None:
        self._write_cells(self.neuroada_orig)
        self._synced_version = None

    def set_impl(self, impl: str) -> None:
        """Switch implementation; W holds pristine cells under reference, merged cells under fused."""
        if impl == self.impl:
            return
        if self.impl == "fused" and not self.merged:
            self._restore_cells()
        self.impl = impl

    def merge(self) -> None:
        if not self.merged:
            self._write_cells(self.merged_values())
            self.merged = True
            self._synced_version = None

    def unmerge(self) -> None:
        """Restore the original values of the selected cells bitwise; the delta is applied again."""
        self._restore_cells()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged:
            return base(x)
        if self.impl == "reference":
            update = torch.zeros(base.weight.shape, dtype=torch.float32, device=base.weight.device)
            update = update.scatter(1, self.neuroada_idx, self.neuroada_delta)
            weight = (base.weight.float() + update).to(base.weight.dtype)
            return F.linear(x, weight, base.bias)
        self._sync_fused()
        if not torch.is_grad_enabled():
            return base(x)
        return _FusedLinear.apply(x, base.weight, base.bias, self.neuroada_delta, self.neuroada_idx)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, k={self.k}, impl={self.impl}, merged={self.merged}"
