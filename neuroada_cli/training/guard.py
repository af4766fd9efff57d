"""The non-finite guard: a NaN/inf loss or gradient norm never reaches the weights.

Checked after backward and BEFORE ``optimizer.step()``: ``trainer.nonfinite=stop`` (default) ends the run
with one line naming the step and the likely fix, before anything of that step is written, so the last
checkpoint and adapter/ keep finite values; ``skip`` drops the step (no optimizer or schedule step) and stops
after ``trainer.nonfinite_patience`` such steps in a row. With several processes the flag is summed over
them, so every process takes the same decision (a process that stopped alone would deadlock the others).
The gradient norm is computed over the trainable parameters even without ``optimizer.max_grad_norm``
(one fused norm per step; reading it changes nothing, so finite runs stay bitwise as before).
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError

FIX = "lower optimizer.lr, train in fp32 or bf16 (trainer.precision), or check the data"


class NonFiniteStop(UserError):
    """The run stopped on a non-finite loss or gradient norm (nothing of that step was written)."""


def gradient_norm(parameters) -> torch.Tensor:
    """The total L2 norm of the gradients of ``parameters`` (local shards of sharded ones), float32."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([g.float() for g in torch._foreach_norm(grads)]))


class NonFiniteGuard:
    """``allows_step(step, loss_sum, grad_norm)``: True to take the optimizer step, False to skip it; raises
    NonFiniteStop when the run must stop."""

    def __init__(self, mode: str, patience: int, reduce=None):
        self.mode, self.patience = mode, patience
        self.reduce = reduce          # None (one process) or a function summing a tensor over processes
        self.in_a_row = 0
        self.skipped = 0

    def allows_step(self, step: int, loss_sum: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
        values = torch.stack([loss_sum.detach().float().reshape(()),
                              (grad_norm if grad_norm is not None else torch.zeros(())).detach().float()
                              .reshape(()).to(loss_sum.device)])
        bad = (~torch.isfinite(values)).float()
        if self.reduce is not None:
            bad = self.reduce(bad)
        loss_bad, norm_bad = (bool(flag) for flag in (bad > 0).tolist())
        if not (loss_bad or norm_bad):
            self.in_a_row = 0
            return True
        what = "loss" if loss_bad else "gradient norm"
        value = values[0 if loss_bad else 1].item()
        self.in_a_row += 1
        self.skipped += 1
        if self.mode == "skip" and self.in_a_row < self.patience:
            return False
        shown = value if not math.isfinite(value) else "non-finite on another process"
        streak = f" ({self.in_a_row} non-finite steps in a row, trainer.nonfinite_patience={self.patience})" \
            if self.mode == "skip" else ""
        raise NonFiniteStop(f"step {step}: the {what} is {shown}{streak}; the run stopped before the optimizer "
                            f"step, the last checkpoint and adapter/ are untouched; {FIX}")
