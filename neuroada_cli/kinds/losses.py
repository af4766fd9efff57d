"""Causal-LM cross-entropy over the target tokens without the [targets x vocab] fp32 logits of a whole batch.

``trainer.cross_entropy`` (``CROSS_ENTROPY_IMPLS`` in kinds/causal_lm.py) picks how:

* plain: the model's output head projects every target position at once (``logits_to_keep`` mask, so never
  the prompt) and one ``F.cross_entropy`` sums them: [targets x vocab] logits in the model dtype plus an fp32
  copy and its gradient: with a 128k vocabulary and 8k target tokens that is several GB, the largest
  allocation of a step.
* chunked: the same forward, but for this one call the output head returns the summed loss instead of logits
  (``head_returns_loss``). It receives the hidden states of the target positions only ([N, hidden]), projects
  ``chunk_rows`` of them at a time and sums their cross-entropies; each chunk is checkpointed, so its logits
  are freed right after its loss and formed again in backward. Peak: one chunk's logits (a few hundred MB at
  most, ``CHUNK_BYTES``), whatever N is; cost: the head's matmul once more in backward.
* liger: liger-kernel's fused linear cross-entropy (Triton, CUDA): the head's matmul and the loss fused
  chunk by chunk with the gradients formed in forward: no recompute, no fp32 logits. Needs a plain linear head.

Why inside the head's own call rather than calling the decoder and the head ourselves: everything a wrapper
hangs on the model keeps working. DDP's and FSDP2's hooks see one ordinary call (FSDP2 gathers the head's
shard around it and reduces its gradient after; the chunks call the head's ORIGINAL forward, not the hooked
module, so the shard is gathered once, not once per chunk), PEFT's LoRA and modules_to_save wrappers run as
they are (a trained head gets its gradient through the chunks), and a quantized base is just another module.
Models that change the logits after the head (Gemma's soft-capping, Cohere's logit scale, ...) would see the
loss instead of logits: ``unsupported_reason`` names them; ``auto`` then falls back to plain and an explicit
chunked/liger is refused.
"""
from __future__ import annotations

import contextlib

from ..data import IGNORE_INDEX
from ..errors import UserError

CHUNK_BYTES = 128 * 2**20       # fp32 logits of one chunk: ~682 positions at 49k vocab, ~262 at 128k
# Config attributes of transformers models whose forward changes the logits after the head (value: no-op value).
LOGIT_POSTPROCESSING = {"final_logit_softcapping": None, "logit_scale": None, "logits_scaling": 1.0,
                        "output_logits_scale": None}


def unwrap(model):
    """The model inside DDP / DataParallel / torch.compile wrappers (PEFT and FSDP2 keep the model's methods)."""
    import torch

    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def output_head(model):
    """The output embedding module (``get_output_embeddings()``; through PEFT to the base model), or None."""
    getter = getattr(unwrap(model), "get_output_embeddings", None)
    try:
        return getter() if getter is not None else None
    except (AttributeError, NotImplementedError):
        return None


def unsupported_reason(model) -> str | None:
    """Why the loss cannot be computed inside the head's call for ``model`` (None: it can)."""
    if output_head(model) is None:
        return "the model has no output head (get_output_embeddings() is None)"
    config = getattr(unwrap(model), "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, neutral in LOGIT_POSTPROCESSING.items():
        value = getattr(text_config, name, None)
        if value is not None and value != neutral:
            return f"the model changes its logits after the head ({name}={value})"
    return None


def liger_weight(head):
    """The head's weight when liger can use it (a plain floating-point nn.Linear without bias), else None."""
    import torch

    if not isinstance(head, torch.nn.Linear) or getattr(head, "bias", None) is not None:
        return None
    weight = head.weight
    return weight if weight.dtype.is_floating_point else None  # bitsandbytes stores int8 / packed uint8


def liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def check_liger_available() -> None:
    """One-line UserError when trainer.cross_entropy=liger cannot run here (no package or no CUDA)."""
    import torch

    if not liger_installed():
        raise UserError("trainer.cross_entropy=liger needs liger-kernel: pip install 'neuroada[liger]' "
                        "(CUDA only), or use trainer.cross_entropy=chunked")
    if not torch.cuda.is_available():
        raise UserError("trainer.cross_entropy=liger runs on CUDA only and no GPU is visible; use "
                        "trainer.cross_entropy=chunked (or auto)")


def resolve_impl(requested: str, model, device) -> str:
    """The implementation to run for ``requested`` (auto | plain | chunked | liger) on ``model`` at ``device``."""
    if requested == "plain":
        return "plain"
    reason = unsupported_reason(model)
    if requested == "auto":
        if reason is not None:
            return "plain"
        # liger first on CUDA: it fuses the head's matmul with the loss and forms the gradients in forward, so
        # it neither recomputes the head in backward (chunked does) nor materialises fp32 logits chunks; it is
        # Triton (CUDA only) and an optional package, so everywhere else chunked (plain torch) is the choice.
        if getattr(device, "type", str(device)) == "cuda" and liger_installed() \
                and liger_weight(output_head(model)) is not None:
            return "liger"
        return "chunked"
    if reason is not None:
        raise UserError(f"trainer.cross_entropy={requested} cannot run on this model: {reason}; use "
                        "trainer.cross_entropy=plain (or auto)")
    if requested == "liger":
        check_liger_available()
        if liger_weight(output_head(model)) is None:
            raise UserError("trainer.cross_entropy=liger needs a plain linear output head without bias (this one "
                            "is adapted, quantized or has a bias); use trainer.cross_entropy=chunked")
    return requested


def chunk_rows(head, model=None) -> int:
    """Target positions per chunk: CHUNK_BYTES of fp32 logits (at least one)."""
    vocab = getattr(head, "out_features", None)
    if not isinstance(vocab, int):
        config = getattr(unwrap(model), "config", None) if model is not None else None
        vocab = getattr(config, "vocab_size", None) or 32_000
    return max(1, CHUNK_BYTES // (4 * vocab))


def _chunk_loss(project, hidden, targets):
    import torch.nn.functional as F

    return F.cross_entropy(project(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy_sum(project, hidden, targets, rows: int):
    """Sum of cross-entropies of ``project(hidden)`` against ``targets``, ``rows`` positions at a time.

    ``project``: the head's projection (hidden [n, h] -> logits [n, vocab]). Each chunk is checkpointed
    (non-reentrant): its logits live only while its loss is formed, in forward and again in backward.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    if hidden.shape[0] <= rows:  # one chunk holds every target: recomputing it would save no memory, only time
        return _chunk_loss(project, hidden, targets)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        chunk, chunk_targets = hidden[start:start + rows], targets[start:start + rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, project, chunk, chunk_targets, use_reentrant=False)
        else:  # evaluation: nothing to recompute
            total = total + _chunk_loss(project, chunk, chunk_targets)
    return total


def liger_cross_entropy_sum(weight, hidden, targets):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    return loss(weight, hidden, targets).float()


@contextlib.contextmanager
def head_returns_loss(head, loss_of_hidden):
    """For the calls inside this block, ``head(hidden)`` returns ``loss_of_hidden(project, hidden)``.

    ``project`` is the head's original forward (no module hooks: FSDP2 already gathered the weights around the
    outer call). An instance attribute shadows the class's forward; the previous state is restored after.
    """
    had_own = "forward" in head.__dict__
    previous = head.__dict__.get("forward")
    project = head.forward
    head.forward = lambda hidden, *args, **kwargs: loss_of_hidden(project, hidden)
    try:
        yield
    finally:
        if had_own:
            head.forward = previous
        else:
            del head.forward


def target_loss_sum(model, inputs: dict, labels, impl: str, slice_logits: bool):
    """Sum of next-token cross-entropies (fp32) over positions whose label (shifted by one) is not -100.

    ``inputs``: the model's keyword inputs (input_ids and attention_mask or position_ids); ``impl``: a
    resolved implementation (plain | chunked | liger); ``slice_logits``: the model takes a boolean
    ``logits_to_keep`` mask (transformers causal LMs), so only target positions reach the head.
    """
    import torch
    import torch.nn.functional as F

    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = keep
    target_ids = targets[keep]
    extra = {"logits_to_keep": mask} if slice_logits else {}
    if impl == "plain":
        logits = model(**inputs, **extra).logits
        if logits.dim() == 3:  # the model ignored the mask or has none: every position came back
            logits = logits[:, :-1][keep]
        return F.cross_entropy(logits.float(), target_ids, reduction="sum")

    head = output_head(model)
    rows = chunk_rows(head, model)

    def loss_of_hidden(project, hidden):
        if hidden.dim() == 3:  # all positions (no logits_to_keep): pick the target ones
            hidden = hidden[:, :-1][keep]
        if impl == "liger":
            return liger_cross_entropy_sum(liger_weight(head), hidden, target_ids)
        return chunked_cross_entropy_sum(project, hidden, target_ids, rows)

    with head_returns_loss(head, loss_of_hidden):
        loss = model(**inputs, **extra).logits
    if loss.dim() != 0:
        raise UserError(f"trainer.cross_entropy={impl} cannot run on this model: its forward reshapes the "
                        "head's output; use trainer.cross_entropy=plain")
    return loss
