"""The NeuroAda linear layer: a frozen nn.Linear plus a trainable delta at d_out x k selected cells.

Two implementations, one result: ``y = F.linear(x, W + scatter(delta), b)``.

fused (default)
    The base weight is kept merged in place: the selected cells of W hold ``orig + delta`` (rounded
    once from fp32 to W's dtype) and are rewritten in forward only after the delta changed (an
    optimizer step, a load). The forward is then exactly the frozen model's matmul, and backward keeps
    no W-sized tensor and forms no dense dW: the delta gradient is a sampled product over the selected
    cells only, ``g[r, j] = sum_t dY[t, r] * X[t, idx[r, j]]``, a sampled dense-dense product (SDDMM)
    with bounded scratch, never O(d_out x d_in). Of the input X only what that product needs is kept
    (see _FusedLinear). The original values of the selected cells are kept aside (d_out x k), so
    ``unmerge`` restores W bitwise.
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

SCRATCH_ELEMENTS = 1 << 22  # ~16 MB of fp32 scratch per chunk of the gather fallback
COLUMN_SCRATCH_ELEMENTS = 1 << 20  # ~4 MB per token block of the column path: stays in cache, no page faults
COLUMN_PATH_MAX_K = 4  # at k <= 4 one gathered column per selected slot beats sampled_addmm 2-8x (bench_sddmm)
COMPACT_INPUT_FRACTION = 0.5  # keep only selected input columns when they (summed over siblings) are <= half


def sampled_delta_grad(grad_out: torch.Tensor, inputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """g[r, j] = sum_t grad_out[t, r] * inputs[t, idx[r, j]] for 2-D grad_out [T, d_out], inputs [T, d_in].

    A sampled dense-dense product (SDDMM) over the d_out x k selected cells, never forming the dense
    d_out x d_in gradient. Which kernel is fastest depends on k (measured in scripts/bench_sddmm.py):
    at small k, gathering the selected input column of every output row, k times, and reducing over
    tokens (no transposes, scratch bounded by a token block); at larger k, torch.sparse.sampled_addmm
    (CPU and CUDA, fp32/fp64), with a chunked gather + batched matrix-vector product as the fallback
    where the backend lacks it.
    """
    dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    grad_out, inputs = grad_out.to(dtype), inputs.to(dtype)
    if idx.shape[1] <= COLUMN_PATH_MAX_K:
        return _sddmm_columns(grad_out, inputs, idx)
    try:
        return _sddmm_sparse(grad_out, inputs, idx)
    except (RuntimeError, NotImplementedError):  # backend without sampled_addmm for this device/dtype
        return _sddmm_gather(grad_out, inputs, idx)


def _sddmm_columns(grad_out: torch.Tensor, inputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """For each slot j: gather column idx[r, j] for every row r, multiply by dY, sum over a token block."""
    d_out, k = idx.shape
    result = torch.zeros(k, d_out, dtype=grad_out.dtype, device=grad_out.device)
    tokens_per_block = max(1, COLUMN_SCRATCH_ELEMENTS // d_out)
    for start in range(0, inputs.shape[0], tokens_per_block):
        block_in = inputs[start:start + tokens_per_block]
        block_grad = grad_out[start:start + tokens_per_block]
        for j in range(k):
            gathered = block_in.index_select(1, idx[:, j])
            result[j] += gathered.mul_(block_grad).sum(0)
    return result.t().contiguous()


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


def _saved_tensor_hooks_active() -> bool:
    """True under activation checkpointing / offloading hooks (or if this torch cannot tell us)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def product_factors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a, b) if x = a * b and autograd already keeps a and b for that product's own backward.

    Gated MLPs (Llama, Mistral, Qwen, SmolLM2) feed down_proj with act(gate) * up; both factors are
    saved anyway, so backward can recompute x (bitwise: the same elementwise product) instead of a
    second [tokens, d_ff] copy being kept. Under saved-tensor hooks (checkpointing) reading a saved
    tensor could trigger recomputation, so the input is simply saved there.
    """
    if torch.compiler.is_compiling():  # autograd nodes are not inspectable while tracing
        return None
    node = x.grad_fn
    if node is None or type(node).__name__ != "MulBackward0" or _saved_tensor_hooks_active():
        return None
    try:
        a, b = node._saved_self, node._saved_other
    except (AttributeError, RuntimeError):  # not saved (a frozen factor) or already released
        return None
    if a is None or b is None or any(t.shape != x.shape or t.dtype != x.dtype for t in (a, b)):
        return None
    return a, b


class _FusedLinear(torch.autograd.Function):
    """Forward with the (already merged) weight; backward gives dX, db and the sparse d(delta).

    The delta gradient needs the layer input at the selected columns. What is kept for it, cheapest first:
    the two factors of the input when they are kept anyway (``factors``, see product_factors); only the
    selected columns when they are few (``input_cols`` given, e.g. k=1 on a layer whose largest weights
    sit in a few input features; ``local_idx`` then points into them); else the input itself, which costs
    nothing extra where sibling layers (q/k/v, gate/up) keep the same tensor.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, idx, input_cols, local_idx, factors):
        kept = ()  # the two factors of x, or x (or its selected columns): what the delta gradient reads
        if delta.requires_grad:
            if factors is not None:
                kept = factors
            elif input_cols is not None:
                kept = (x.reshape(-1, x.shape[-1]).index_select(1, input_cols),)
            else:
                kept = (x,)
        grad_idx = idx if input_cols is None else local_idx
        ctx.save_for_backward(weight, grad_idx, input_cols, *kept)
        ctx.has_bias = bias is not None
        ctx.x_dtype = x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight, grad_idx, input_cols, *kept = ctx.saved_tensors
        grad_x = grad_bias = grad_delta = None
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = flat_grad @ weight.to(flat_grad.dtype)
            grad_x = grad_x.view(*grad_out.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        if ctx.needs_input_grad[3]:
            flat = [t.reshape(-1, t.shape[-1]) for t in kept]
            if len(flat) == 2:  # factors: x = a * b, recomputed (at the selected columns only, if compact)
                if input_cols is not None:
                    flat = [t.index_select(1, input_cols) for t in flat]
                flat = [flat[0] * flat[1]]
            # bf16/fp16 autocast: the product was computed from x cast to grad_out's dtype; do the same.
            grad_delta = sampled_delta_grad(flat_grad, flat[0].to(flat_grad.dtype), grad_idx)
        return grad_x, None, grad_bias, grad_delta, None, None, None, None


class NeuroAdaLinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` (kept as ``base_layer``) with a delta at ``idx`` ([d_out, k] columns)."""

    def __init__(self, base_layer: nn.Linear, idx: torch.Tensor, impl: str = "fused", train_bias: bool = False,
                 compact_input: bool = False):
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
        input_cols = local_idx = None
        if compact_input:  # backward keeps only the selected input columns (inject decides; see _FusedLinear)
            input_cols, local_idx = torch.unique(idx, return_inverse=True)
        self.register_buffer("neuroada_input_cols", input_cols, persistent=False)
        self.register_buffer("neuroada_local_idx", local_idx, persistent=False)
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
        factors = product_factors(x) if self.neuroada_delta.requires_grad else None
        return _FusedLinear.apply(x, base.weight, base.bias, self.neuroada_delta, self.neuroada_idx,
                                  self.neuroada_input_cols, self.neuroada_local_idx, factors)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, k={self.k}, impl={self.impl}, merged={self.merged}"
