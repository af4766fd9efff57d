"""The autograd functions of the NeuroAda layer and the small helpers they share.

FusedLinearFunction (merged mode): W already holds orig + delta at the cells; forward is the frozen matmul,
backward gives dX, db and the sampled delta gradient ``g[r, j] = sum_t dY[t, r] * X[t, idx[r, j]]`` (SDDMM,
sddmm.py), never a dense dW.

DeltaProductFunction (unmerged mode): W is never written (a quantized or shared base); the layer adds
``x @ S^T`` where S is the sparse [d_out, d_in] matrix holding the delta at the cells. Measured on 2 CPU threads
(T=1024 tokens, SmolLM2 and 2048/5504 shapes, k=1 and 20; see scripts/bench_train_step.py), a CSR sparse
matmul beats a loop over k of index_select (1.5-13x at k=20) and a dense scatter + matmul (3-16x), and its
scratch is the [T, d_out] result only. The input gradient adds ``dY @ S`` (the transposed CSR product); the
delta gradient is the same SDDMM as the merged mode's.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from .sddmm import sampled_cell_grad, sampled_delta_grad

try:  # torch.distributed may be absent from a build; then nothing is ever sharded
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()

# A delta's version counter misses some in-place updates: torch's fused AdamW (transformers' Trainer default on
# torch >= 2.8) writes parameters without bumping ``_version``. Every optimizer step also bumps this counter, and
# a merged layer rewrites its cells when either changed (one integer compare per forward).
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps() -> int:
    """Optimizer steps taken in this process (any torch optimizer), for the layers' "delta changed" check."""
    return _OPTIMIZER_STEPS[0]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's rows of a sharded (DTensor) parameter, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


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


def _kept_input(x, factors, input_cols):
    """What the delta gradient reads of x: its two factors, its selected columns, or x itself (see below)."""
    if factors is not None:
        return factors
    if input_cols is not None:
        return (x.reshape(-1, x.shape[-1]).index_select(1, input_cols),)
    return (x,)


def _delta_grad(flat_grad, kept, input_cols, grad_idx, cell_rows):
    flat = [t.reshape(-1, t.shape[-1]) for t in kept]
    if len(flat) == 2:  # factors: x = a * b, recomputed (at the selected columns only, if compact)
        if input_cols is not None:
            flat = [t.index_select(1, input_cols) for t in flat]
        flat = [flat[0] * flat[1]]
    # bf16/fp16 autocast: the product was computed from x cast to grad_out's dtype; do the same.
    if cell_rows is None:
        return sampled_delta_grad(flat_grad, flat[0].to(flat_grad.dtype), grad_idx)
    return sampled_cell_grad(flat_grad, flat[0].to(flat_grad.dtype), *cell_rows, grad_idx)


class FusedLinearFunction(torch.autograd.Function):
    """Forward with the (already merged) weight; backward gives dX, db and the sparse d(delta).

    The delta gradient needs the layer input at the selected columns. What is kept for it, cheapest first:
    the two factors of the input when they are kept anyway (``factors``, see product_factors); only the
    selected columns when they are few (``input_cols`` given, e.g. k=1 on a layer whose largest weights
    sit in a few input features; ``local_idx`` then points into them); else the input itself, which costs
    nothing extra where sibling layers (q/k/v, gate/up) keep the same tensor.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, idx, input_cols, local_idx, factors, cell_rows=None, rewrite=None):
        kept = _kept_input(x, factors, input_cols) if delta.requires_grad else ()
        grad_idx = idx if input_cols is None else local_idx
        # ``rewrite`` (unsharded layers): W may be restored in place between forward and backward (a state dict
        # taken then holds the pristine base); backward calls it to put the same cells back (the delta cannot
        # change before its gradient exists), so W is kept by reference, outside the version check.
        ctx.weight, ctx.rewrite = (weight, rewrite) if rewrite is not None else (None, None)
        ctx.save_for_backward(weight if rewrite is None else None, grad_idx, input_cols, *kept)
        ctx.cell_rows = cell_rows  # (crow, rows) of the general layout, or None: the fixed [d_out, k] path
        ctx.has_bias = bias is not None
        ctx.x_dtype = x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight, grad_idx, input_cols, *kept = ctx.saved_tensors
        if ctx.rewrite is not None:
            ctx.rewrite()
            weight = ctx.weight
        grad_x = grad_bias = grad_delta = None
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = flat_grad @ weight.to(flat_grad.dtype)
            grad_x = grad_x.view(*grad_out.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        if ctx.needs_input_grad[3]:
            grad_delta = _delta_grad(flat_grad, kept, input_cols, grad_idx, ctx.cell_rows)
        return grad_x, None, grad_bias, grad_delta, None, None, None, None, None, None


def delta_matrix(delta: torch.Tensor, cols: torch.Tensor, crow: torch.Tensor, d_in: int, dtype) -> torch.Tensor:
    """The delta as a sparse CSR [d_out, d_in] matrix (cells in CSR order: by row, then column)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # "CSR support is in beta" noise
        return torch.sparse_csr_tensor(crow, cols, delta.detach().reshape(-1).to(dtype),
                                       (crow.numel() - 1, d_in), check_invariants=False)


class DeltaProductFunction(torch.autograd.Function):
    """``x @ S^T`` for the sparse delta S (unmerged mode); backward: dX = dY @ S and the sampled d(delta).

    ``crow``: CSR row pointers of the cells (the per-row layout's are 0, k, 2k, ...); ``cols``: their columns
    in CSR order. The rest is as FusedLinearFunction (what is kept of x for the delta gradient). Computed in
    fp32 (fp64 for fp64 inputs) and returned in x's dtype, so the sum with the base output rounds once.
    """

    @staticmethod
    def forward(ctx, x, delta, cols, crow, idx, input_cols, local_idx, factors, cell_rows=None):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        matrix = delta_matrix(delta, cols, crow, x.shape[-1], dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            out = (matrix @ x.reshape(-1, x.shape[-1]).to(dtype).t()).t()
        kept = _kept_input(x, factors, input_cols) if delta.requires_grad else ()
        grad_idx = idx if input_cols is None else local_idx
        ctx.save_for_backward(delta, cols, crow, grad_idx, input_cols, *kept)
        ctx.cell_rows, ctx.x_dtype, ctx.d_in = cell_rows, x.dtype, x.shape[-1]
        return out.to(x.dtype).view(*x.shape[:-1], crow.numel() - 1)

    @staticmethod
    def backward(ctx, grad_out):
        delta, cols, crow, grad_idx, input_cols, *kept = ctx.saved_tensors
        grad_x = grad_delta = None
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            dtype = torch.float64 if flat_grad.dtype == torch.float64 else torch.float32
            matrix = delta_matrix(delta, cols, crow, ctx.d_in, dtype)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
                grad_x = (matrix.t() @ flat_grad.to(dtype).t()).t()
            grad_x = grad_x.reshape(*grad_out.shape[:-1], ctx.d_in).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_delta = _delta_grad(flat_grad, kept, input_cols, grad_idx, ctx.cell_rows).view(delta.shape)
        return grad_x, grad_delta, None, None, None, None, None, None, None
