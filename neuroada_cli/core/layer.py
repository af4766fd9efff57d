"""The NeuroAda linear layer: a frozen nn.Linear plus a trainable delta at d_out x k selected cells.

Two implementations, one result: ``y = F.linear(x, W + scatter(delta), b)``.

fused (default)
    The base weight is kept merged in place: the selected cells of W hold ``orig + delta`` (rounded
    once from fp32 to W's dtype) and are rewritten in forward only after the delta changed (an
    optimizer step, a load). The forward is then exactly the frozen model's matmul, and backward keeps
    no W-sized tensor and forms no dense dW: the delta gradient is a sampled product over the selected
    cells only, ``g[r, j] = sum_t dY[t, r] * X[t, idx[r, j]]``, a sampled dense-dense product (SDDMM)
    with bounded scratch, never O(d_out x d_in). Of the input X only what that product needs is kept
    (see FusedLinearFunction). The original values of the selected cells are kept aside (d_out x k), so
    ``unmerge`` restores W bitwise.
reference
    Materialise ``W + scatter(delta)`` every forward and let autograd form the dense gradient: the
    authors' approach, kept for tests and benchmarks.

Deltas are fp32 whatever W's dtype, so many small updates accumulate instead of rounding away.

Cell layouts: the method's fixed [d_out, k] (k cells per row, the fast path above) or, for the placement
ablations (scope=layer|global, neuron_fraction < 1), a general CSR layout: ``(row_counts, cols)`` with a
1-D delta [n]. No padding: a padded [d_out, k_max] layout would cost 9.3x the budget on SmolLM2-135M at
k=20 with scope=global (magnitude piles up to 824 cells on one row), so the general layout stores the real
cells only and its backward is ``sampled_cell_grad`` (sampled_addmm on the CSR pattern, gather fallback).

What ``state_dict()`` holds, per layer: ``<name>.neuroada_delta`` (fp32 [d_out, k]) and the wrapped layer's
``<name>.base_layer.weight`` / ``.bias``; the selected columns and the original cell values are
non-persistent buffers, not in it. ``base_layer.weight`` is the weight the forward uses: under fused the
selected cells hold ``orig + delta`` (written when the state dict is taken, so also right after an
optimizer step), under reference the pristine W, after ``merge`` the merged W. A state dict therefore
moves between models with the same base, selection and impl (deepcopy, resuming); adapters travel with
``save_adapter`` / ``load_adapter``, a plain merged model comes from ``unload``.

Sharded (FSDP2, ``neuroada_cli/strategies/``): ``cells_as_parameters()`` turns the selected columns and the
original cells into frozen parameters, so that FSDP2 splits them along rows together with W and the delta
(dim 0) and all-gathers the columns with W for the backward. The unsharded W seen in forward is a temporary
copy, so a sharded layer never writes it: ``sync_cells()`` writes orig + delta into the LOCAL rows of the
sharded W before FSDP2 gathers it (the strategy calls it from a hook that runs before the root's forward).
Every cell write here goes through ``local_tensor``: on a sharded parameter it touches this process's rows only.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .sddmm import sampled_cell_grad, sampled_delta_grad

try:  # torch.distributed may be absent from a build; then nothing is ever sharded
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()

# A delta's version counter misses some in-place updates: torch's fused AdamW (transformers' Trainer default on
# torch >= 2.8) writes parameters without bumping ``_version``. Every optimizer step also bumps this counter, and
# a fused layer rewrites its cells when either changed (one integer compare per forward).
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps() -> int:
    """Optimizer steps taken in this process (any torch optimizer), for the fused layers' "delta changed" check."""
    return _OPTIMIZER_STEPS[0]


COMPACT_INPUT_FRACTION = 0.5  # keep only selected input columns when they (summed over siblings) are <= half


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


class FusedLinearFunction(torch.autograd.Function):
    """Forward with the (already merged) weight; backward gives dX, db and the sparse d(delta).

    The delta gradient needs the layer input at the selected columns. What is kept for it, cheapest first:
    the two factors of the input when they are kept anyway (``factors``, see product_factors); only the
    selected columns when they are few (``input_cols`` given, e.g. k=1 on a layer whose largest weights
    sit in a few input features; ``local_idx`` then points into them); else the input itself, which costs
    nothing extra where sibling layers (q/k/v, gate/up) keep the same tensor.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, idx, input_cols, local_idx, factors, cell_rows=None):
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
        ctx.cell_rows = cell_rows  # (crow, rows) of the general layout, or None: the fixed [d_out, k] path
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
            if ctx.cell_rows is None:
                grad_delta = sampled_delta_grad(flat_grad, flat[0].to(flat_grad.dtype), grad_idx)
            else:
                grad_delta = sampled_cell_grad(flat_grad, flat[0].to(flat_grad.dtype), *ctx.cell_rows, grad_idx)
        return grad_x, None, grad_bias, grad_delta, None, None, None, None, None


class NeuroAdaLinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` (kept as ``base_layer``) with a delta at its selected cells.

    ``idx`` is either the method's fixed layout, [d_out, k] columns (k cells on every row; delta [d_out, k]),
    or the general layout of the placement ablations (scope=layer|global, neuron_fraction < 1), a pair
    ``(row_counts [d_out], cols [n])`` in CSR order (sorted by row, then column; rows may hold no cell;
    delta [n]). The general layout stores exactly the real cells (no padding), so nothing can write an
    empty slot into W and the trainable count is the cell count. Then ``neuroada_idx`` holds ``cols``,
    ``neuroada_row_counts`` the counts (None on the fixed layout) and ``k`` is None.
    """

    def __init__(self, base_layer: nn.Linear, idx, impl: str = "fused", train_bias: bool = False,
                 compact_input: bool = False):
        super().__init__()
        weight = base_layer.weight
        d_out, d_in = weight.shape
        row_counts = None
        if isinstance(idx, (tuple, list)):
            row_counts, idx = (torch.as_tensor(t).to(device=weight.device, dtype=torch.long) for t in idx)
            if row_counts.shape != (d_out,) or idx.dim() != 1 or int(row_counts.sum()) != idx.numel():
                raise ValueError(f"cells with {tuple(row_counts.shape)} row counts and {tuple(idx.shape)} columns "
                                 f"do not fit a weight of shape {(d_out, d_in)}")
        elif idx.dim() != 2 or idx.shape[0] != d_out:
            raise ValueError(f"indices of shape {tuple(idx.shape)} do not fit a weight of shape {(d_out, d_in)}")
        self.base_layer = base_layer
        self.impl = impl
        self.k = idx.shape[1] if row_counts is None else None
        weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(train_bias)
        idx = idx.to(device=weight.device, dtype=torch.long)
        # Buffers, not parameters: they follow .to(device) but are saved only through save_adapter.
        self.register_buffer("neuroada_idx", idx, persistent=False)
        self.register_buffer("neuroada_row_counts", row_counts, persistent=False)
        cell_rows = crow = None
        if row_counts is not None:  # each cell's row and the CSR row pointers, for W writes and the backward
            cell_rows = torch.repeat_interleave(torch.arange(d_out, device=weight.device), row_counts)
            crow = torch.cat([row_counts.new_zeros(1), row_counts.cumsum(0)])
        self.register_buffer("neuroada_cell_rows", cell_rows, persistent=False)
        self.register_buffer("neuroada_crow", crow, persistent=False)
        orig = (weight.detach().gather(1, idx) if row_counts is None
                else weight.detach().reshape(-1)[self._positions(idx, d_in)])
        self.register_buffer("neuroada_orig", orig.clone(), persistent=False)
        input_cols = local_idx = None
        if compact_input and idx.numel():  # backward keeps only the selected input columns (see FusedLinearFunction)
            input_cols, local_idx = torch.unique(idx, return_inverse=True)
        self.register_buffer("neuroada_input_cols", input_cols, persistent=False)
        self.register_buffer("neuroada_local_idx", local_idx, persistent=False)
        self.neuroada_delta = nn.Parameter(torch.zeros(idx.shape, dtype=torch.float32, device=weight.device))
        self.merged = False  # True after merge(): delta baked into W, no longer applied or trained
        self._synced_version = None  # delta version last written into W by the fused path
        self.sharded = False  # set by strategy.shard_model: forward must not write the (temporary) gathered W

    @property
    def general_layout(self) -> bool:
        return self.neuroada_row_counts is not None

    def _positions(self, idx: torch.Tensor, d_in: int) -> torch.Tensor:
        """Flat positions in W.view(-1) of the cells at columns ``idx`` (either layout)."""
        if self.neuroada_cell_rows is not None:
            return self.neuroada_cell_rows * d_in + idx
        rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * d_in
        return (rows + idx).reshape(-1)

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

    def cells_as_parameters(self) -> None:
        """Hold the selected columns and original cells as frozen parameters (rows sharded with W); idempotent.

        Only for sharding: they then appear in state_dict() and parameters() (count_parameters skips them).
        """
        if self.general_layout:  # cells are not aligned with W's rows, so FSDP2's row split cannot carry them
            from ..errors import UserError

            raise UserError("neuroada scope=layer|global or neuron_fraction < 1 cannot be sharded; "
                            "use trainer.strategy=ddp or scope=neuron with neuron_fraction=1")
        for name in ("neuroada_idx", "neuroada_orig"):
            if name in self._buffers:
                value = self._buffers.pop(name)
                self._non_persistent_buffers_set.discard(name)  # else state-dict tools still skip the name
                self.register_parameter(name, nn.Parameter(value, requires_grad=False))

    def merged_values(self) -> torch.Tensor:
        """orig + delta in fp32, rounded once to W's dtype (this process's rows when sharded)."""
        orig, delta = local_tensor(self.neuroada_orig), local_tensor(self.neuroada_delta)
        return (orig.float() + delta.detach()).to(self.base_layer.weight.dtype)

    def flat_indices(self) -> torch.Tensor:
        """Positions of the selected cells in W.view(-1) (computed, not stored: saves 8 bytes a cell)."""
        weight, idx = local_tensor(self.base_layer.weight), local_tensor(self.neuroada_idx)
        return self._positions(idx, weight.shape[1])

    @torch.no_grad()
    def _write_cells(self, values: torch.Tensor) -> None:
        local_tensor(self.base_layer.weight).view(-1).index_copy_(0, self.flat_indices(), values.reshape(-1))

    def _sync_fused(self) -> None:
        """Write orig + delta into W if the delta changed since the last write (cheap: d_out x k cells)."""
        # the parameter's own version (a sharded DTensor's in-place updates bump it, not its local tensor's)
        version = (self.neuroada_delta._version, local_tensor(self.neuroada_delta).data_ptr(), optimizer_steps())
        if version != self._synced_version:
            self._write_cells(self.merged_values())
            self._synced_version = version

    def sync_cells(self) -> None:
        """Sharded fused layer: bring the local rows of W up to date; only while W is sharded (between steps)."""
        if self.impl == "fused" and not self.merged and isinstance(self.base_layer.weight, DTensor):
            self._sync_fused()

    def restore_cells(self) -> None:
        self._write_cells(local_tensor(self.neuroada_orig))
        self._synced_version = None

    def set_impl(self, impl: str) -> None:
        """Switch implementation; W holds pristine cells under reference, merged cells under fused."""
        if impl == self.impl:
            return
        if self.impl == "fused" and not self.merged:
            self.restore_cells()
        self.impl = impl

    def merge(self) -> None:
        if not self.merged:
            self._write_cells(self.merged_values())
            self.merged = True
            self._synced_version = None

    def unmerge(self) -> None:
        """Restore the original values of the selected cells bitwise; the delta is applied again.

        A no-op when not merged: under fused W already holds what the forward needs.
        """
        if not self.merged:
            return
        self.restore_cells()
        self.merged = False

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The fused path rewrites W only in forward; bring it up to date so that a state dict taken after an
        # optimizer step holds the current orig + delta (see the module docstring), not the previous one.
        if self.impl == "fused" and not self.merged:
            self.sync_cells() if self.sharded else self._sync_fused()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged:
            return base(x)
        if self.impl == "reference":
            update = torch.zeros(base.weight.shape, dtype=torch.float32, device=base.weight.device)
            if self.general_layout:
                update = update.view(-1).index_add(0, self.flat_indices(), self.neuroada_delta).view(update.shape)
            else:
                update = update.scatter(1, self.neuroada_idx, self.neuroada_delta)
            weight = (base.weight.float() + update).to(base.weight.dtype)
            return F.linear(x, weight, base.bias)
        if not self.sharded:  # sharded: W here is a gathered copy; the strategy's hook synced the local rows
            self._sync_fused()
        if not torch.is_grad_enabled():
            return base(x)
        factors = product_factors(x) if self.neuroada_delta.requires_grad else None
        cell_rows = (self.neuroada_crow, self.neuroada_cell_rows) if self.general_layout else None
        return FusedLinearFunction.apply(x, base.weight, base.bias, self.neuroada_delta, self.neuroada_idx,
                                         self.neuroada_input_cols, self.neuroada_local_idx, factors, cell_rows)

    def extra_repr(self) -> str:
        cells = f"k={self.k}" if self.k is not None else f"cells={self.neuroada_idx.numel()}"
        return f"in={self.in_features}, out={self.out_features}, {cells}, impl={self.impl}, merged={self.merged}"
