"""The NeuroAda linear layer: a frozen linear layer plus trainable deltas at d_out x k selected cells.

ONE class serves ``inject`` (one adapter, "default"), the PEFT tuner (several named adapters, one active) and
FSDP2. One result, ``y = base(x) + x @ scatter(delta)^T``, three ways to compute it (functions.py):

merged mode, impl=fused (default on full-precision bases)
    W is kept merged in place: the cells hold ``orig + delta`` (rounded once from fp32 to W's dtype), rewritten
    in forward only after the delta changed (an optimizer step, a load, an adapter switch). The forward is the
    frozen model's matmul; backward forms only the sampled delta gradient (SDDMM over the cells, never a dense
    dW). The original cell values are kept aside (d_out x k), so W comes back bitwise.
unmerged mode (default on quantized bases; a user may pick it for a shared base)
    W is never written; the forward adds the delta's sparse product from the selected input columns to
    ``base_layer(x)`` (any base, bitsandbytes Linear4bit / Linear8bitLt included); backward gives the same
    sampled delta gradient and the input gradient through both.
impl=reference
    ``W + scatter(delta)`` materialised every forward (unmerged: ``base(x) + x @ scatter(delta)^T``) with a dense
    autograd gradient: the authors' approach, kept for tests and benchmarks.

Deltas are fp32 whatever W's dtype, so many small updates accumulate instead of rounding away.

Cell layouts: the method's [d_out, k] (k columns on every row) or, for the placement ablations, a general CSR
layout ``(row_counts [d_out], cols [n])`` with a 1-D delta [n] (no padding: a padded layout would cost 9.3x
the budget on SmolLM2-135M at k=20 with scope=global).

Adapters: ``neuroada_delta`` is a ParameterDict (adapter name -> delta); the ACTIVE adapter's cells are the
buffers ``neuroada_idx`` (columns), ``neuroada_orig`` (original values), ``neuroada_row_counts`` (None on the
per-row layout) and helpers; other adapters' cells wait in ``_cells``. Adapters selected on the same base usually
pick the same cells; they then share one index and one ``orig``, and a switch is a single write. ``delta`` is
the active adapter's parameter. ``state_dict()`` holds the deltas and the PRISTINE ``base_layer.weight`` (taking
it restores the cells; the next forward rewrites them), so a state dict moves between models with the same base;
loading a new base re-reads ``orig`` from it (a later disable or unload never writes old values over it).

Sharded (FSDP2, ``neuroada_cli/strategies/``): ``cells_as_parameters()`` turns the columns and original cells
into frozen parameters, split along rows with W and the delta; the gathered W seen in forward is a temporary
copy, so a sharded layer writes the LOCAL rows of W in ``sync_cells()`` (from a hook before FSDP2 gathers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .functions import (
    DeltaProductFunction,
    DTensor,
    FusedLinearFunction,
    local_tensor,
    optimizer_steps,
    product_factors,
)
from .cells import CELL_NAMES, dense_delta, make_cells, read_cells
from .quantized import is_quantized

__all__ = ["NeuroAdaLinear", "local_tensor", "optimizer_steps", "DTensor", "COMPACT_INPUT_FRACTION"]

COMPACT_INPUT_FRACTION = 0.5  # keep only selected input columns when they (summed over siblings) are <= half
LAYER_MODES = ("merged", "unmerged")


def _after_load(layer: "NeuroAdaLinear", incompatible_keys) -> None:
    if layer._base_reloaded:
        layer._base_loaded()


class NeuroAdaLinear(nn.Module):
    """Wraps a frozen linear layer (``base_layer``) with fp32 deltas at its selected cells, one per adapter.

    ``idx``: [d_out, k] columns, or ``(row_counts, cols)`` in CSR order (general layout). ``orig``: the original
    values at the cells when W cannot be read (a quantized base: the full-precision values, so the adapter
    merges exactly into that base); by default read from W (dequantized if quantized).
    """

    adapter_layer_names = ("neuroada_delta",)  # PEFT's names for the per-adapter containers
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, idx, *, impl: str = "fused", mode: str = "merged",
                 train_bias: bool = False, compact_input: bool = False, orig: torch.Tensor | None = None,
                 adapter_name: str = "default"):
        super().__init__()
        self.base_layer = base_layer
        self.quantized = is_quantized(base_layer)
        if mode not in LAYER_MODES:
            raise ValueError(f"layer mode {mode!r} is not one of {LAYER_MODES}")
        if mode == "merged" and self.quantized:
            raise UserError(f"a quantized layer ({type(base_layer).__name__}) cannot hold merged cells; "
                            "use neuroada.mode=unmerged (or auto)")
        self.impl, self.mode = impl, mode
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        for name in CELL_NAMES:  # the active adapter's cells; buffers so they follow .to(device)
            self.register_buffer(name, None, persistent=False)
        self.neuroada_delta = nn.ParameterDict()
        self._cells: dict[str, dict] = {}  # adapter -> its cell tensors (the active one's are the buffers above)
        self._cells_owner: str | None = None  # adapter whose cells the buffers hold
        self._active_adapter: list[str] = [adapter_name]
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._written: str | None = None  # adapter whose orig + delta W holds at its cells (None: pristine)
        self._written_version = None
        self.sharded = False  # set by strategies.shard_model: forward must not write the (gathered) W
        self._base_reloaded = False
        self.register_load_state_dict_post_hook(_after_load)
        base_layer.weight.requires_grad_(False)
        if getattr(base_layer, "bias", None) is not None:
            base_layer.bias.requires_grad_(train_bias)
        self.update_layer(adapter_name, idx, orig=orig, compact_input=compact_input)

    # ----- cells -----------------------------------------------------------------------------------------
    def _make_cells(self, idx, orig, compact_input: bool) -> dict:
        return make_cells(self.base_layer, self.quantized, idx, orig, compact_input)

    def _read_cells(self, cells: dict) -> torch.Tensor:
        return read_cells(self.base_layer, self.quantized, cells)

    def cell(self, adapter: str, name: str):
        return getattr(self, name) if adapter == self._cells_owner else self._cells[adapter][name]

    def _own_cells(self, adapter: str) -> None:
        """Make ``adapter``'s cells the layer's buffers (what forward and the FSDP strategy read)."""
        if adapter == self._cells_owner or adapter not in self._cells:
            return
        if self._cells_owner in self._cells:
            self._cells[self._cells_owner] = {name: getattr(self, name) for name in CELL_NAMES}
        for name, value in self._cells[adapter].items():
            setattr(self, name, value)
        self._cells_owner = adapter

    def _apply(self, fn, recurse=True):
        """.to()/.cuda(): move the waiting adapters' cells too, keeping shared tensors shared."""
        before = {name: getattr(self, name) for name in CELL_NAMES}
        result = super()._apply(fn, recurse)
        moved = {id(before[n]): getattr(self, n) for n in CELL_NAMES if before[n] is not None}
        for adapter, cells in self._cells.items():
            if adapter == self._cells_owner:
                continue
            for name, value in cells.items():
                if value is not None:
                    cells[name] = moved.setdefault(id(value), fn(value))
        return result

    def update_layer(self, adapter_name: str, idx, *, orig: torch.Tensor | None = None,
                     compact_input: bool = False, inference_mode: bool = False) -> None:
        """Add an adapter (zero delta) at ``idx``, or re-point an existing one at new cells (a load)."""
        self._show(None)  # selection and orig must see the pristine base
        cells = self._make_cells(idx, orig, compact_input)
        for other, other_cells in ((n, self._cells[n]) for n in self._cells if n != adapter_name):
            other_idx = self.cell(other, "neuroada_idx")
            if other_idx.shape == cells["neuroada_idx"].shape and torch.equal(other_idx, cells["neuroada_idx"]) \
                    and (self.cell(other, "neuroada_row_counts") is None) == (cells["neuroada_row_counts"] is None):
                cells = {name: self.cell(other, name) for name in CELL_NAMES}  # share: a switch is one write
                break
        if adapter_name == self._cells_owner:
            self._cells_owner = None  # its buffers are replaced below
        self._cells[adapter_name] = cells
        old = self.neuroada_delta[adapter_name] if adapter_name in self.neuroada_delta else None
        if old is None or old.shape != cells["neuroada_idx"].shape:
            self.neuroada_delta[adapter_name] = nn.Parameter(torch.zeros(
                cells["neuroada_idx"].shape, dtype=torch.float32, device=self.base_layer.weight.device))
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def use_compact_input(self, adapter_name: str) -> None:
        """Backward keeps only the selected input columns (decided per sibling group by the caller)."""
        cols, local = torch.unique(self.cell(adapter_name, "neuroada_idx"), return_inverse=True)
        for name, value in (("neuroada_input_cols", cols), ("neuroada_local_idx", local)):
            if adapter_name == self._cells_owner:
                setattr(self, name, value)
            else:
                self._cells[adapter_name][name] = value

    # ----- the single-adapter view (inject, FSDP, save_adapter) ---------------------------------------------
    @property
    def delta(self) -> nn.Parameter:
        """The active adapter's delta."""
        return self.neuroada_delta[self._active_name() or next(iter(self.neuroada_delta))]

    @property
    def k(self) -> int | None:
        idx = self.neuroada_idx
        return None if self.neuroada_row_counts is not None or idx is None else idx.shape[1]

    @property
    def general_layout(self) -> bool:
        return self.neuroada_row_counts is not None

    @property
    def weight(self) -> torch.Tensor:  # so code that inspects module.weight still works
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def cells_as_parameters(self) -> None:
        """Hold the columns and original cells as frozen parameters (rows sharded with W); idempotent.

        Only for sharding: they then appear in state_dict() and parameters() (count_parameters skips them).
        """
        if self.general_layout:  # cells are not aligned with W's rows, so FSDP2's row split cannot carry them
            raise UserError("neuroada scope=layer|global or neuron_fraction < 1 cannot be sharded; "
                            "use trainer.strategy=ddp or scope=neuron with neuron_fraction=1")
        if len(self.neuroada_delta) > 1:
            raise UserError("a NeuroAda layer with several adapters cannot be sharded; keep one adapter")
        for name in ("neuroada_idx", "neuroada_orig"):
            if name in self._buffers:
                value = self._buffers.pop(name)
                self._non_persistent_buffers_set.discard(name)  # else state-dict tools still skip the name
                self.register_parameter(name, nn.Parameter(value, requires_grad=False))
        self._cells[self._cells_owner] = {name: getattr(self, name) for name in CELL_NAMES}

    # ----- writing cells (merged mode) ---------------------------------------------------------------------
    def merged_values(self, adapter: str | None = None) -> torch.Tensor:
        """orig + delta in fp32, rounded once to W's dtype (this process's rows when sharded)."""
        adapter = adapter or self._active_name() or next(iter(self.neuroada_delta))
        orig = local_tensor(self.cell(adapter, "neuroada_orig"))
        delta = local_tensor(self.neuroada_delta[adapter])
        return (orig.float() + delta.detach()).to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def _write(self, adapter: str, values: torch.Tensor) -> None:
        if self.quantized:
            raise UserError("a quantized base layer cannot be written; merge into a full-precision or dequantized "
                            "copy of the base instead (neuroada export / eval.merge)")
        weight, idx = local_tensor(self.base_layer.weight), local_tensor(self.cell(adapter, "neuroada_idx"))
        rows = self.cell(adapter, "neuroada_cell_rows")
        if rows is None:  # scatter_ along rows: no flat index to build, about 2x faster than index_copy_
            weight.scatter_(1, idx, values)
        else:
            weight.index_put_((rows, idx), values.reshape(-1))

    def _show(self, adapter: str | None) -> None:
        """Make W hold ``adapter``'s orig + delta at its cells (None: the pristine base); only what changed."""
        if adapter is None:
            if self._written is not None:
                self._write(self._written, local_tensor(self.cell(self._written, "neuroada_orig")))
            self._written = self._written_version = None
            return
        delta = self.neuroada_delta[adapter]
        if delta.is_meta or self.cell(adapter, "neuroada_orig").is_meta:
            return  # low_cpu_mem_usage: the values arrive later (load_state_dict(assign=True)); write then
        # the parameter's own version (a sharded DTensor's in-place updates bump it, not its local tensor's)
        version = (delta._version, local_tensor(delta).data_ptr(), optimizer_steps())
        if self._written == adapter and self._written_version == version:
            return
        if self._written not in (None, adapter) and \
                self.cell(self._written, "neuroada_idx") is not self.cell(adapter, "neuroada_idx"):
            self._show(None)  # other cells: put the originals back before writing the new ones
        self._write(adapter, self.merged_values(adapter))
        self._written, self._written_version = adapter, version

    def restore_cells(self) -> None:
        """W back to the pristine base at every written cell (bitwise)."""
        self._show(None)

    def sync_cells(self) -> None:
        """Sharded merged layer: bring the local rows of W up to date; only while W is sharded (between steps)."""
        name = self._active_name()
        if self._writes_cells() and not self.merged and name and isinstance(self.base_layer.weight, DTensor):
            self._show(name)

    def _writes_cells(self) -> bool:
        return self.impl == "fused" and self.mode == "merged" and not self._disable_adapters

    def set_impl(self, impl: str) -> None:
        """Switch implementation; W holds pristine cells under reference, merged cells under fused."""
        if impl != self.impl and not self.merged:
            self._show(None)
        self.impl = impl

    # ----- adapters (PEFT's tuner-layer interface) -----------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self):
        return self._active_adapter[0] if len(self._active_adapter) == 1 else list(self._active_adapter)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _active_name(self) -> str | None:
        present = [name for name in self._active_adapter if name in self.neuroada_delta]
        if len(present) > 1:
            raise UserError(f"NeuroAda applies one adapter at a time; active adapters are {present}: "
                            "call set_adapter(<one name>)")
        return present[0] if present else None

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        """Activate ``adapter_names`` (only they train) and, merged mode, write the active adapter's cells now."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for key, delta in self.neuroada_delta.items():
            delta.requires_grad_(key in names and not inference_mode)
        self._active_adapter = names
        active = self._active_name()
        if active is not None:
            self._own_cells(active)
        if not self.merged and not self._disable_adapters and self._writes_cells():
            self._show(active)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for key, delta in self.neuroada_delta.items():
            if key in names:
                delta.requires_grad_(requires_grad)

    def enable_adapters(self, enabled: bool) -> None:
        """disable: the base weight again, bitwise, even after a merge; enable: back to what was before."""
        if enabled:
            self._disable_adapters = False
            self.set_adapter(self.active_adapters)
            if self.merged:
                self._show(self.merged_adapters[0])
        else:
            for delta in self.neuroada_delta.values():
                delta.requires_grad_(False)
            self._disable_adapters = True
            if not self.quantized:
                self._show(None)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.neuroada_delta:
            return
        if self._written == adapter_name or adapter_name in self.merged_adapters:
            self._show(None)
            self.merged_adapters = [n for n in self.merged_adapters if n != adapter_name]
        del self.neuroada_delta[adapter_name]
        cells = self._cells.pop(adapter_name)
        if self._cells_owner == adapter_name:
            self._cells_owner = None
            for name in CELL_NAMES:
                setattr(self, name, None)
        del cells
        remaining = [n for n in self.active_adapters if n != adapter_name] or list(self.neuroada_delta)[:1]
        self.set_adapter(remaining)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Bake one adapter into W (under fused merged mode it already is): the forward stops applying or
        training it. ``adapter_names`` absent from this layer are skipped."""
        if self.quantized:
            raise UserError("cannot merge into a quantized base layer; merge into a full-precision or dequantized "
                            "copy of the base instead (neuroada export, eval.merge=true)")
        wanted = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in wanted if n in self.neuroada_delta and n not in self.merged_adapters]
        if not names:
            return
        if len(names) > 1 or self.merged_adapters:
            raise UserError(f"NeuroAda merges one adapter per layer; asked for {names}, "
                            f"already merged {self.merged_adapters}")
        name = names[0]
        if safe_merge and not torch.isfinite(self.merged_values(name).float()).all():
            raise UserError(f"NeuroAda adapter {name!r} has non-finite values; it cannot be merged")
        self._show(name)
        self._written_version = None  # a merged snapshot: later delta changes are not written
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the original cells bitwise; the active adapter is applied again (a no-op if not merged)."""
        if not self.merged:
            return
        self._show(None)
        self.merged_adapters.clear()

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> nn.Module:
        """The plain base layer: merged with the named adapter if this layer holds it, else pristine."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        if not self.merged and not self.quantized:
            self._show(None)  # e.g. merge_and_unload(adapter_names=["B"]) on a layer holding only A
        return self.base_layer

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        """PEFT hook for variants with frozen adapter weights; every NeuroAda delta trains."""

    def _all_available_adapter_names(self) -> list[str]:
        return sorted(self.neuroada_delta)

    def _get_available_adapters(self) -> set[str]:
        return set(self.neuroada_delta)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """After a low_cpu_mem_usage load: the delta on W's device (kept fp32), cells rewritten on next forward."""
        if adapter_name not in self.neuroada_delta:
            return
        device = device or self.base_layer.weight.device
        delta = self.neuroada_delta[adapter_name]
        if delta.device != torch.device(device) and not delta.is_meta:
            self.neuroada_delta[adapter_name] = nn.Parameter(delta.detach().to(device),
                                                             requires_grad=delta.requires_grad)

    def flat_indices(self) -> torch.Tensor:
        """Positions of the active adapter's cells in W.view(-1) (either layout; this process's rows)."""
        idx, rows = local_tensor(self.neuroada_idx), self.neuroada_cell_rows
        if rows is None:
            rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx)
        return (rows * self.in_features + idx).reshape(-1)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense update W_merged - W (for inspection; never used on the training path)."""
        return self._dense_delta(adapter_name).detach()

    def _dense_delta(self, adapter: str) -> torch.Tensor:
        return dense_delta(self.neuroada_delta[adapter], self.cell(adapter, "neuroada_idx"),
                           self.cell(adapter, "neuroada_cell_rows"), self.out_features, self.in_features)

    # ----- state dict ----------------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The state dict holds the pristine base (PEFT's get_base_model_state_dict, FSDP's lean load); the next
        # forward (or the sharded strategy's hook) writes the cells again: d_out x k values.
        if not self.merged and self._written is not None:
            self._show(None)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # the base layer loads after this; _base_loaded (a post hook) re-reads the cells once it has
        self._base_reloaded = prefix + "base_layer.weight" in state_dict and not self.quantized

    def _base_loaded(self) -> None:
        """A new base arrived (set_base_model_state_dict): its values at the cells are the originals now."""
        self._base_reloaded = False
        self._written = self._written_version = None
        for adapter in self._cells:
            if "neuroada_orig" in self._buffers or adapter != self._cells_owner:  # sharded: orig loads itself
                value = self._read_cells({n: self.cell(adapter, n) for n in CELL_NAMES})
                self.cell(adapter, "neuroada_orig").copy_(value)
        if self.merged:
            self._show(self.merged_adapters[0])

    # ----- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        name = None if self._disable_adapters else self._active_name()
        if name is None:
            if self._written is not None:
                self._show(None)
            return base(x, *args, **kwargs)
        if self.merged:
            if self._written != self.merged_adapters[0]:  # re-enabled after disable_adapter()
                self._show(self.merged_adapters[0])
            return base(x, *args, **kwargs)
        delta = self.neuroada_delta[name]
        if self.impl == "reference":  # the authors' way: W + scatter(delta), dense autograd gradient
            self._show(None)
            if self.mode == "unmerged":
                return base(x, *args, **kwargs) + F.linear(x, self._dense_delta(name).to(x.dtype))
            weight = (base.weight.float() + self._dense_delta(name)).to(base.weight.dtype)
            return F.linear(x, weight, base.bias)
        factors = product_factors(x) if delta.requires_grad and torch.is_grad_enabled() else None
        cell_rows = (self.neuroada_crow, self.neuroada_cell_rows) if self.general_layout else None
        if self.mode == "unmerged":
            out = base(x, *args, **kwargs)
            cols = self.neuroada_idx.reshape(-1)
            product = DeltaProductFunction.apply(x, delta, cols, self.neuroada_crow, self.neuroada_idx,
                                                 self.neuroada_input_cols, self.neuroada_local_idx, factors,
                                                 cell_rows)
            return out + product.to(out.dtype)
        if not self.sharded:  # sharded: W here is a gathered copy; the strategy's hook synced the local rows
            self._show(name)
        if not torch.is_grad_enabled() or not delta.requires_grad:
            return base(x, *args, **kwargs)  # the frozen model's forward (W already holds the adapter)
        rewrite = None if self.sharded else (lambda: self._show(name))
        return FusedLinearFunction.apply(x, base.weight, base.bias, delta, self.neuroada_idx,
                                         self.neuroada_input_cols, self.neuroada_local_idx, factors, cell_rows,
                                         rewrite)

    def extra_repr(self) -> str:
        cells = f"k={self.k}" if self.k is not None else f"cells={self.neuroada_idx.numel()}"
        adapters = "" if list(self.neuroada_delta) == ["default"] else f", adapters={list(self.neuroada_delta)}"
        return (f"in={self.in_features}, out={self.out_features}, {cells}, impl={self.impl}, mode={self.mode}, "
                f"merged={self.merged}{adapters}")
