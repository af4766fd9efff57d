"""Log-likelihood scoring of candidate continuations (multiple-choice tasks), batched.

For each example we score every candidate continuation c_k (e.g. "the correct answer is true") after
its prompt p: ``log P(c_k | p) = sum_t log P(c_k[t] | p, c_k[:t])`` over the continuation's tokens.

Tokenisation matches training: ``prefix + ids(p + c_k)`` tokenised jointly (as ``data/tokenize.py``
builds targets), and the continuation tokens are those after the longest common prefix with the
prompt's own ids. Scores therefore never depend on how a separate tokenisation of ``c_k`` would start.

Sharing work between candidates (they differ only at the end):

* "one forward" path: when all candidate sequences of an example are identical except for their
  last token (true/false, answer1..answer5, solution1/2 ... for BPE and SentencePiece tokenizers),
  ONE sequence — the prompt plus the shared part of the continuation — is run, and the logits at
  its last position score every candidate's final token at once.
* general path: otherwise each (prompt, candidate) sequence is its own row.

Rows of both kinds are sorted by length and run in batches of ``batch_size`` rows, LEFT padded with
explicit position ids (so a padded row sees the positions it would see alone); only the logits of
the positions that are scored are projected onto the vocabulary (``logits_to_keep``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import UserError
from ..data.batching import length_sorted_batches
from ..data.tokenize import common_prefix
from ..models import forward_accepts  # torch is imported inside the functions: `neuroada ls` needs none
from .generation import encode, left_pad, pad_token_id


@dataclass
class _Row:
    ids: list[int]
    # (t, token, example, candidate): add log P(token at position t | ids[:t]) to that candidate's score.
    # t == len(ids) scores a token that follows the row (the "one forward" branch token).
    targets: list[tuple[int, int, int, int]] = field(default_factory=list)


def plan_rows(prompt_ids: list[list[int]], full_ids: list[list[list[int]]], share: bool) -> tuple[list[_Row], list[list[int]]]:
    """Rows to run and the number of scored tokens of every (example, candidate)."""
    rows: list[_Row] = []
    counts: list[list[int]] = []
    for i, (prompt, fulls) in enumerate(zip(prompt_ids, full_ids)):
        starts = []
        for k, full in enumerate(fulls):
            start = common_prefix(prompt, full)
            if start < 1:
                raise UserError(f"example {i}: the prompt is empty and the tokenizer adds no bos token; cannot score it")
            if start >= len(full):
                raise UserError(f"example {i}: candidate {k} adds no token to the prompt; cannot score it")
            starts.append(start)
        counts.append([len(full) - start for full, start in zip(fulls, starts)])
        shared = len(fulls[0])
        for full in fulls[1:]:
            shared = min(shared, common_prefix(fulls[0], full))
        one_forward = share and all(len(full) == shared + 1 for full in fulls) and max(starts) <= shared
        if one_forward:
            row = _Row(list(fulls[0][:shared]))
            for k, (full, start) in enumerate(zip(fulls, starts)):
                row.targets += [(t, full[t], i, k) for t in range(start, shared + 1)]
            rows.append(row)
        else:
            for k, (full, start) in enumerate(zip(fulls, starts)):
                # The last token is scored from the row's final position, so it need not be fed.
                rows.append(_Row(list(full[:-1]), [(t, full[t], i, k) for t in range(start, len(full))]))
    return rows, counts


def _run_rows(model, rows: list[_Row], pad_id: int, batch_size: int, totals: list[list[float]],
              advance_rows: Callable[[list[_Row]], None] | None) -> None:
    import torch

    device = next(model.parameters()).device
    use_keep = forward_accepts(model, "logits_to_keep")
    for batch in length_sorted_batches([len(row.ids) for row in rows], batch_size):
        chosen = [rows[b] for b in batch]
        input_ids, attention_mask = left_pad([row.ids for row in chosen], pad_id, device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        # Scored positions, counted from the end of the (left-padded, right-aligned) rows. A target at
        # t is predicted by the logits at position t-1 of its row.
        keep = max(len(row.ids) - min(t for t, *_ in row.targets) + 1 for row in chosen)
        kwargs = {"logits_to_keep": keep} if use_keep else {}
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, **kwargs).logits
        logprobs = torch.log_softmax(logits[:, -keep:, :].float(), dim=-1)
        for r, row in enumerate(chosen):
            length = len(row.ids)
            for t, token, i, k in row.targets:
                totals[i][k] += float(logprobs[r, keep - length + t - 1, token])
        if advance_rows is not None:
            advance_rows(chosen)


def score_continuations(
    model,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[Sequence[str]],
    *,
    batch_size: int,
    share_prefix: bool = True,
    advance: Callable[[int], None] | None = None,
) -> list[list[tuple[float, int]]]:
    """``[(sum of log-probs, number of scored tokens) per candidate] per example``.

    ``share_prefix=False`` forces one row per (prompt, candidate) (used by tests to compare paths).
    ``advance(n)`` is called with the number of examples whose rows are all done.
    """
    import torch

    if len(prompts) != len(continuations):
        raise ValueError("prompts and continuations must have the same length")
    if not prompts:
        return []
    if any(len(cands) == 0 for cands in continuations):
        raise UserError("a multiple-choice example has no candidate answers; check the data file")
    prompt_ids = encode(tokenizer, prompts)
    flat = encode(tokenizer, [p + c for p, cands in zip(prompts, continuations) for c in cands])
    full_ids, cursor = [], 0
    for cands in continuations:
        full_ids.append(flat[cursor:cursor + len(cands)])
        cursor += len(cands)
    rows, counts = plan_rows(prompt_ids, full_ids, share_prefix)
    totals = [[0.0] * len(cands) for cands in continuations]

    pending = [0] * len(prompts)
    for row in rows:
        for i in {i for _, _, i, _ in row.targets}:
            pending[i] += 1

    def advance_rows(done: list[_Row]) -> None:
        finished = 0
        for row in done:
            for i in {i for _, _, i, _ in row.targets}:
                pending[i] -= 1
                finished += pending[i] == 0
        if advance is not None and finished:
            advance(finished)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            _run_rows(model, rows, pad_token_id(tokenizer), batch_size, totals, advance_rows)
    finally:
        model.train(was_training)
    return [[(total, n) for total, n in zip(ts, ns)] for ts, ns in zip(totals, counts)]


def choose(scores: Sequence[tuple[float, int]], normalize: bool) -> int:
    """Index of the best candidate: highest sum, or highest mean per scored token when ``normalize``."""
    values = [total / n if normalize else total for total, n in scores]
    return max(range(len(values)), key=lambda k: (values[k], -k))
