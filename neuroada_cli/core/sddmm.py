"""The delta gradient of the fused layer: a sampled dense-dense product (SDDMM) at the selected cells only.

``g[r, j] = sum_t dY[t, r] * X[t, idx[r, j]]`` for the per-row layout (``sampled_delta_grad``: a column gather at
small k, ``torch.sparse.sampled_addmm`` above, a chunked gather + bmm fallback), and the same for the general
layout of unequal rows (``sampled_cell_grad``, CSR order). Never O(d_out x d_in) scratch. scripts/bench_sddmm.py
compares the kernels; the thresholds below come from it.
"""
from __future__ import annotations

import warnings

import torch

SCRATCH_ELEMENTS = 1 << 22  # ~16 MB of fp32 scratch per chunk of the gather fallback
COLUMN_SCRATCH_ELEMENTS = 1 << 20  # ~4 MB per token block of the column path: stays in cache, no page faults
COLUMN_PATH_MAX_K = 4  # at k <= 4 one gathered column per selected slot beats sampled_addmm 2-8x (bench_sddmm)


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
        return sddmm_columns(grad_out, inputs, idx)
    try:
        return sddmm_sparse(grad_out, inputs, idx)
    except (RuntimeError, NotImplementedError):  # backend without sampled_addmm for this device/dtype
        return sddmm_gather(grad_out, inputs, idx)


def sddmm_columns(grad_out: torch.Tensor, inputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
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


def sddmm_sparse(grad_out: torch.Tensor, inputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    d_out, k = idx.shape
    crow = torch.arange(0, d_out * k + 1, k, device=idx.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        pattern = torch.sparse_csr_tensor(
            crow, idx.reshape(-1), torch.zeros(d_out * k, dtype=grad_out.dtype, device=grad_out.device),
            (d_out, inputs.shape[1]), check_invariants=False,
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # "CSR support is in beta" noise
        product = torch.sparse.sampled_addmm(pattern, *_row_major_operands(grad_out, inputs), beta=0.0)
    return product.values().view(d_out, k)


# The last input transposed for sampled_addmm: sibling layers (q/k/v, gate/up) keep the same input tensor, so
# their backward passes transpose it once. The source is held, so its memory cannot be reused while cached;
# the key also carries its version, so an in-place change misses. Emptied when the backward pass ends.
_TRANSPOSED: list = [None, None, None]  # [key, source, transposed copy]


def _forget_transposed() -> None:
    _TRANSPOSED[:] = [None, None, None]


def _transposed(inputs: torch.Tensor) -> torch.Tensor:
    """inputs^T as a contiguous [d_in, T] copy, reused while the same tensor comes again."""
    if torch.compiler.is_compiling():
        return inputs.t().contiguous()
    key = (inputs.data_ptr(), inputs.shape, inputs.stride(), inputs.dtype, inputs.device, inputs._version)
    if _TRANSPOSED[0] != key:
        _TRANSPOSED[:] = [None, None, None]  # drop the old copy before making the new one
        _TRANSPOSED[:] = [key, inputs, inputs.t().contiguous()]
        try:  # inside a backward pass: forget the copy when it ends (not an activation to keep until the next)
            torch.autograd.Variable._execution_engine.queue_callback(_forget_transposed)
        except RuntimeError:  # called outside backward (a benchmark, a test): kept until the next input
            pass
    return _TRANSPOSED[2]


def _row_major_operands(grad_out: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sampled_addmm's operands dY^T [d_out, T] and X [T, d_in] laid out so that each of its dot products reads
    two contiguous rows: dY^T made contiguous here (on CPU its own copy of a strided operand is about 2x slower
    than .contiguous(), bench_sddmm.py), X as the transpose of a contiguous X^T. The same values in the same
    order reach the kernel, so the gradient is bitwise the one of passing the strided views."""
    return grad_out.t().contiguous(), _transposed(inputs).t()


def sddmm_gather(grad_out: torch.Tensor, inputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
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


def sampled_cell_grad(grad_out: torch.Tensor, inputs: torch.Tensor, crow: torch.Tensor, rows: torch.Tensor,
                      cols: torch.Tensor) -> torch.Tensor:
    """The general layout's SDDMM: g[c] = sum_t grad_out[t, rows[c]] * inputs[t, cols[c]] for cells in CSR order.

    Rows hold any number of cells (crow: CSR row pointers, rows: each cell's row), so torch's sampled_addmm
    takes the pattern as is; the fallback gathers both operands' columns per chunk of cells.
    """
    dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    if cols.numel() == 0:  # scope=global may leave a layer without cells
        return torch.zeros(0, dtype=dtype, device=cols.device)
    grad_out, inputs = grad_out.to(dtype), inputs.to(dtype)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
            pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(cols.numel(), dtype=dtype, device=cols.device),
                                              (grad_out.shape[1], inputs.shape[1]), check_invariants=False)
            return torch.sparse.sampled_addmm(pattern, *_row_major_operands(grad_out, inputs), beta=0.0).values()
    except (RuntimeError, NotImplementedError):  # backend without sampled_addmm for this device/dtype
        inputs_t, grad_t = inputs.t().contiguous(), grad_out.t().contiguous()
        step = max(1, SCRATCH_ELEMENTS // max(1, inputs.shape[0]))
        parts = [(grad_t.index_select(0, rows[s:s + step]) * inputs_t.index_select(0, cols[s:s + step])).sum(1)
                 for s in range(0, cols.numel(), step)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=cols.device)
